"""The claim in miniature: the shipped pretrained tiny UniDiff, the demo that fine-tunes it, the ablation."""
import json
import re
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import config
import train
from data import open_dataset
from eval import SAMPLE, embed, retrieval
from runs import checkpoints, read_state
from tools import ablation
from tools.judge import load_judge
from helpers import ctrl_c_at
from unidiff import UniDiff


def test_shipped_tiny_model_reads_and_draws_the_world():
    model = UniDiff.from_pretrained(config.PRETRAINED_TINY).eval()
    world = open_dataset("world", "test", 32)
    world.keep_first(200)
    r = retrieval(*embed(model, world), world.captions)
    assert r["chance_r1"] < 1 and min(r["i2t_r1"], r["t2i_r1"]) > 40, r  # measured 72.5 / 66.5
    torch.manual_seed(0)
    gen = model.generate(world.captions[:40], steps=SAMPLE["steps"], guidance=SAMPLE["guidance"],
                         height=32, width=32)
    acc = load_judge().accuracy(gen, [world.label(i) for i in range(40)])
    # measured 0.25 / 0.70 / 0.95; chance 1/12, 1/10, 1/6: the shapes are the tiny model's weak part
    assert acc["kind"] > 0.15 and acc["colour"] > 0.45 and acc["pattern"] > 0.7, acc


def test_demo_fine_tunes_the_shipped_model(tmp_path, capsys):
    run = tmp_path / "demo"
    assert train.main(["--data", "demo", "--steps", "2", "--batch-size", "8", "--eval-every", "2", "--save-every", "2",
                       "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "test retrieval, 200 pairs" in out and "out of domain test retrieval, 1000 pairs" in out
    # the last line: the in-domain gain and what was kept out of it, from the first and last validations
    r1 = lambda line: sum(float(x) for x in re.findall(r"(?:I→T R@1/5/10|T→I) ([\d.]+)", line)) / 2
    lines = [line for line in out.splitlines() if "retrieval, " in line]
    (i0, o0), (i1, o1) = [(r1(lines[k]), r1(lines[k + 1])) for k in (0, -2)]
    last = out.splitlines()[-1]
    assert last.startswith("summary: test R@1 (mean of I→T and T→I) in domain") and last.endswith("% kept")
    got = [float(x) for x in re.findall(r"(-?[\d.]+) %", last)]  # in0, in1, out0, out1, kept
    assert max(abs(g - w) for g, w in zip(got, [i0, i1, o0, o1])) < 0.1 and abs(got[4] - 100 * o1 / o0) < 1
    start = json.loads((run / "run.json").read_text())["start"]
    assert start["weights"] == str(config.PRETRAINED_TINY)
    init, shipped = UniDiff.from_pretrained(run / "init"), UniDiff.from_pretrained(config.PRETRAINED_TINY)
    assert all(torch.equal(a, b) for a, b in zip(init.state_dict().values(), shipped.state_dict().values()))
    # the grid: real, the start model (drawn at step 0), the fine-tuned model
    assert Image.open(run / "samples" / "step_000000.png").size == (8 * 32, 2 * 32)
    assert Image.open(run / "samples" / "step_000002.png").size == (8 * 32, 3 * 32)


def test_ablation_runs_end_to_end_at_micro_scale(tmp_path):
    arms = ["pretrained", "ITC", "ITC+IS+RSC one-way"]
    assert ablation.main(["--arms", ",".join(arms), "--seeds", "0", "--steps", "2", "--every", "1", "--n-eval", "8",
                          "--n-gen", "4", "--train-size", "100", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert list(res["results"]) == arms
    assert [c["step"] for c in res["results"]["ITC"]["0"]["curve"]] == [0, 1, 2]
    assert read_state(tmp_path / "runs" / "ITC" / "seed0" / "step_000002")["args"]["train_size"] == 100
    for arm in arms:
        final = res["results"][arm]["0"]["final"]
        assert {"in_i2t_r1", "out_t2i_r1", "rankme", "uniformity", "judge_hem", "fd"} <= set(final)
        assert all(math.isfinite(v) for v in final.values())
    md = (tmp_path / "results.md").read_text()
    assert all(f"| {arm} |" in md for arm in arms)
    assert Image.open(tmp_path / "ablation.png").size[0] > 500 and Image.open(tmp_path / "ablation-front.png")
    # each fine-tune's WiSE-FT points, and the front table's line for it
    wise = res["results"]["ITC"]["0"]["wise"]
    assert [w["alpha"] for w in wise] == list(ablation.WISE) and res["results"]["pretrained"]["0"]["wise"] == []
    pts = ablation.front_points(res["results"]["ITC"])
    assert pts[0.5] == ((ablation.r1(wise[1], "in"), 0.0), (ablation.r1(wise[1], "out"), 0.0))
    assert f"| ITC | {pts[1.0][0][0]:.1f} ± 0.0 | {pts[1.0][1][0]:.1f} ± 0.0 |" in md


def test_wise_ft_interpolates_every_weight_and_flags_reach_train(tmp_path):
    a, b = UniDiff.tiny(seed=0), UniDiff.tiny(seed=1)
    for alpha in (0.0, 0.25, 1.0):
        w = ablation.wise_ft(a, b, alpha).state_dict()
        assert all(torch.allclose(w[k], (1 - alpha) * a.state_dict()[k] + alpha * v, atol=1e-6)
                   for k, v in b.state_dict().items())
    args = SimpleNamespace(lr_unet=1e-3, lr_clip=1e-3, train_size=None, flags="--lambda-rsc 3 --l2sp 0.5")
    cfg = train.parse_args(["--data", "demo", *ablation.arm_flags("RSC feature", args)])
    assert (cfg.lambda_rsc, cfg.rsc_form, cfg.l2sp, cfg.lr_clip) == (3.0, "feature", 0.5, 1e-3)  # --flags come last


def test_ablation_cost_is_the_step_time_past_setup(tmp_path, monkeypatch, capsys):
    clock = [0.0]
    per_step = {"ITC+IS": 0.2, "RSC feature": 0.3}
    def fake_main(flags):  # 5 s of setup, then each step's time
        arm = "RSC feature" if "feature" in flags else "ITC+IS"
        clock[0] += 5 + per_step[arm] * int(flags[flags.index("--steps") + 1])
        return 0
    monkeypatch.setattr(ablation.train, "main", fake_main)
    monkeypatch.setattr(ablation.time, "perf_counter", lambda: clock[0])
    assert ablation.main(["--cost", "--arms", "pretrained,ITC+IS,RSC feature", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "cost.md").read_text()
    assert "| ITC+IS | 0.200 | 1.00 |" in table and "| RSC feature | 0.300 | 1.50 |" in table


@pytest.mark.parametrize("flags, says", [
    (["--seeds", "0,a"], "--seeds 0,a: comma-separated whole numbers"),  # int() crashed
    (["--steps", "0"], "--steps 0: fine-tuning steps, at least 1"),  # reported the start model under each arm
    (["--every", "-1"], "--every -1: steps between retrieval measurements, at least 0"),  # measured every step
    (["--train-size", "0"], "--train-size 0: the first N items, at least 1"),  # trained on all of them
    (["--n-eval", "-1"], "--n-eval -1: the first N items, at least 1"),  # crashed
    (["--n-gen", "0"], "--n-gen 0: FD fits a covariance to the generated images, which needs at least 2"),  # crashed
])
def test_ablation_refuses_bad_numbers_with_one_line(flags, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ablation.main(flags + ["--out", str(tmp_path)])
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_ablation_reuses_a_run_that_was_resumed(tmp_path):
    """A run cut off and continued with --resume records resume in its state: the ablation refused to reuse it."""
    args = SimpleNamespace(out=str(tmp_path), steps=2, every=1, lr_unet=2e-3, lr_clip=1e-3, train_size=16, flags="")
    out = tmp_path / "runs" / "ITC" / "seed0"
    flags = ["--data", "demo", "--out", str(out), "--seed", "0", "--steps", "1", "--save-every", "1",
             "--eval-every", "0", "--lr-unet", str(args.lr_unet), "--lr-clip", str(args.lr_clip), "--train-size", "16",
             "--l2sp", "0", "--lambda-itc", "1", "--lambda-is", "0", "--lambda-rsc", "0"]
    assert train.main(flags) == 0
    assert train.main(["--resume", str(out), "--steps", "2"]) == 0  # state.json now holds "resume"
    assert ablation.fine_tune("ITC", 0, args) == out
    state = json.loads((out / "step_000002" / "state.json").read_text())
    del state["args"]["wise_ft"]  # a run saved before --wise-ft existed: it ran with its default
    (out / "step_000002" / "state.json").write_text(json.dumps(state))
    assert ablation.fine_tune("ITC", 0, args) == out


def test_ablation_interrupted_says_so_and_the_rerun_measures_only_the_grid(tmp_path, monkeypatch, capsys):
    """Ctrl-C in a fine-tune saves an off-grid step (3). It was reported as "train.py failed", the rerun put step 3
    on the curve (`plot` then crashed), and measures kept with step 3 were reused. A last rerun reuses all."""
    flags = ["--arms", "ITC", "--seeds", "0", "--steps", "4", "--every", "2", "--n-eval", "8", "--n-gen", "4",
             "--train-size", "16", "--out", str(tmp_path)]
    real_lr = ctrl_c_at(monkeypatch, train, 2)
    with pytest.raises(SystemExit) as e:
        ablation.main(flags)
    assert e.value.code == 130 and "ITC, seed 0: interrupted" in capsys.readouterr().err
    assert [c.name for c in checkpoints(tmp_path / "runs" / "ITC" / "seed0")] == ["step_000002", "step_000003"]
    monkeypatch.setattr(train, "lr_factor", real_lr)
    steps = lambda: [c["step"] for c in json.loads((tmp_path / "results.json").read_text())["results"]["ITC"]["0"]
                     ["curve"]]
    assert ablation.main(flags) == 0 and steps() == [0, 2, 4]
    kept = tmp_path / "runs" / "ITC" / "seed0" / "measures-test.json"
    old = json.loads(kept.read_text())  # as measured before: step 3 on the curve, then reused as it was
    old["measures"]["curve"].insert(2, {**old["measures"]["curve"][1], "step": 3})
    kept.write_text(json.dumps(old))
    assert ablation.main(flags) == 0 and steps() == [0, 2, 4]
    monkeypatch.setattr(train, "main", None)  # reused: neither trained nor measured again
    monkeypatch.setattr(ablation, "retrieval_r1", None)
    assert ablation.main(flags) == 0 and steps() == [0, 2, 4]


def test_ablation_plot_takes_seeds_with_curves_of_different_lengths(tmp_path):
    point = lambda step: {"step": step, "in_i2t_r1": 1.0, "in_t2i_r1": 2.0, "out_i2t_r1": 3.0, "out_t2i_r1": 4.0}
    seeds = {0: {"curve": [point(s) for s in (0, 2, 3, 4)]}, 1: {"curve": [point(s) for s in (0, 2, 4)]}}
    ablation.plot({"ITC": seeds}, tmp_path / "p.png")  # "expected sequence of length 4"
    assert Image.open(tmp_path / "p.png").size[0] > 500


def test_ablation_writes_every_file_atomically(tmp_path, monkeypatch):
    """Processes run in parallel (one per seed) share the results, the plot and the pretrained arm's measures: each
    file is written beside itself, then renamed over it, so none is ever seen half written."""
    real, renamed = os.replace, []
    monkeypatch.setattr(os, "replace", lambda src, dst: renamed.append((Path(src), Path(dst))) or real(src, dst))
    assert ablation.main(["--arms", "pretrained", "--seeds", "0", "--n-eval", "8", "--n-gen", "4",
                          "--out", str(tmp_path)]) == 0
    written = {p for p in tmp_path.rglob("*") if p.is_file()}  # temp files left behind would show here too
    assert {d.name for d in written} == {"measures-test.json", "results.json", "results.md", "ablation.png",
                                         "ablation-front.png"}
    assert {d for _, d in renamed} == written and all(s.parent == d.parent for s, d in renamed)
