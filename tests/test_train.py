"""train.py: exact resume, Ctrl-C, a full disk or a kill while saving, NaN, bad data, DDP = one process.

Every run is the tiny model at 16 px with a batch of 4 for a few steps, in-process (train.main),
except DDP, which needs torchrun.
"""
import errno
import gc
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import config
import runs
import train
from lora import add_lora
from helpers import assert_same_grads, ctrl_c_at, recording, rel_err
from test_data import metadata_folder
from unidiff import UniDiff
from weights import read_safetensors

REPO = Path(__file__).resolve().parents[1]
TINY = ["--data", "world", "--model", "tiny", "--res", "16", "--batch-size", "4", "--eval-every", "0", "--warmup", "2", "--vae-steps", "2"]


def weights(ckpt):
    """Every tensor of a checkpoint folder, keyed by file/name."""
    return {f"{f.relative_to(ckpt)}/{k}": v for f in sorted(Path(ckpt).rglob("*.safetensors"))
            for k, v in read_safetensors(f).items()}


def straight_and_interrupted(flags, tmp_path, monkeypatch):
    """Run `flags` straight into a/, then into b/ with a Ctrl-C during the second step: b/ saves after it, exit 130."""
    assert train.main(flags + ["--out", str(tmp_path / "a")]) == 0
    real_lr = ctrl_c_at(monkeypatch, train, 1)
    assert train.main(flags + ["--out", str(tmp_path / "b")]) == 130
    monkeypatch.setattr(train, "lr_factor", real_lr)


def test_resume_after_ctrl_c_equals_straight_run(tmp_path, monkeypatch):
    torch.manual_seed(0)
    flags = TINY + ["--steps", "4", "--save-every", "4", "--ema", "0.9", "--grad-accum", "2"]
    straight_and_interrupted(flags, tmp_path, monkeypatch)
    assert sorted(p.name for p in (tmp_path / "b").glob("step_*")) == ["step_000002"]
    assert train.main(["--resume", str(tmp_path / "b")]) == 0

    a, b = weights(tmp_path / "a" / "step_000004"), weights(tmp_path / "b" / "step_000004")
    # the model folders hold the EMA, live.safetensors the trained weights: both must come back
    assert a.keys() == b.keys() and any(k.startswith("live.") for k in a) and any(".exp_avg_sq" in k for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # bit-equal in fp32 on the CPU
    assert json.loads((tmp_path / "b" / "step_000004" / "state.json").read_text())["samples_seen"] == 16



def test_the_start_model_is_not_kept_beside_the_trained_one(tmp_path, monkeypatch):
    """L2-SP keeps θ₀ of the trained weights alone: the start model itself goes once they are taken (it was kept for
    the whole run: under FSDP a whole copy on every rank's host, under DDP its frozen parts on the device too)."""
    gc.collect()  # what is left is alive, and stays: no id of it comes back as a new model's
    before = {id(o) for o in gc.get_objects() if type(o) is UniDiff}
    alive, real = [], train.optimizer_step
    def optimizer_step(*a, **kw):  # at each step, the UniDiff models this run made that are still alive
        gc.collect()
        alive.append(sum(type(o) is UniDiff and id(o) not in before for o in gc.get_objects()))
        return real(*a, **kw)
    monkeypatch.setattr(train, "optimizer_step", optimizer_step)
    run = tmp_path / "r"
    assert train.main(TINY + ["--steps", "2", "--save-every", "2", "--l2sp", "1", "--out", str(run)]) == 0
    assert train.main(["--resume", str(run), "--steps", "3"]) == 0
    assert alive == [1, 1, 1]  # the trained model alone, in a new run and a resumed one


def test_l2sp_and_anchored_resume_equal_straight_run(tmp_path, monkeypatch):
    """Both hold the run near its start, which a resumed run reads back from the run folder."""
    torch.manual_seed(0)
    pulled = []
    def l2_sp_(params, start, lam):  # record what L2-SP pulls towards, then pull
        pulled.append((lam, {n: p0.clone() for n, p0 in zip(names, start)}))
        real_l2_sp_(params, start, lam)
    real_l2_sp_, names = train.l2_sp_, None
    real_opt = train.make_optimizer
    def make_optimizer(*a):
        nonlocal names
        opt, named = real_opt(*a)
        names = [n for n, _ in named]
        return opt, named
    monkeypatch.setattr(train, "l2_sp_", l2_sp_)
    monkeypatch.setattr(train, "make_optimizer", make_optimizer)
    flags = TINY + ["--steps", "3", "--save-every", "3", "--l2sp", "0.5", "--rsc-form", "anchored"]
    straight_and_interrupted(flags, tmp_path, monkeypatch)
    assert train.main(["--resume", str(tmp_path / "b")]) == 0
    a, b = weights(tmp_path / "a" / "step_000003"), weights(tmp_path / "b" / "step_000003")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    start = weights(tmp_path / "a" / "init")  # the run's start, as the run recorded it
    assert len(pulled) == 3 + 3 and all(lam == 0.5 for lam, _ in pulled)  # a: 3 steps; b: 2, then 1 resumed
    for _, theta0 in pulled:
        for n, p0 in theta0.items():
            part, key = n.split(".", 1)
            file = {"unet": "unet/diffusion_pytorch_model.safetensors", "clip": "clip/model.safetensors"}[part]
            assert torch.equal(p0, start[f"{file}/{key}"].float()), n



def test_wise_ft_saves_the_interpolation_and_resumes_from_the_trained_weights(tmp_path, monkeypatch):
    torch.manual_seed(0)
    flags = TINY + ["--steps", "3", "--save-every", "3", "--wise-ft", "0.25"]
    straight_and_interrupted(flags, tmp_path, monkeypatch)
    assert train.main(["--resume", str(tmp_path / "b")]) == 0
    a, b = weights(tmp_path / "a" / "step_000003"), weights(tmp_path / "b" / "step_000003")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []  # resumed from θ, not the mix
    start = weights(tmp_path / "a" / "init")
    live = {k.removeprefix("live.safetensors/"): v for k, v in a.items() if k.startswith("live.")}
    key = "unet/diffusion_pytorch_model.safetensors/conv_in.weight"
    theta0, theta = start[key], live["unet.conv_in.weight"]
    assert not torch.equal(theta0, theta) and torch.allclose(a[key], 0.75 * theta0 + 0.25 * theta, atol=1e-6)


def test_lora_resume_equals_straight_run_and_checkpoint_holds_the_merge(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    flags = TINY + ["--steps", "4", "--save-every", "4", "--ema", "0.9", "--grad-accum", "2", "--lora", "2",
                    "--lora-alpha", "4"]
    straight_and_interrupted(flags, tmp_path, monkeypatch)
    # a loader globbing *lora*.safetensors took the base weights (then lora_base.safetensors) for an adapter
    assert sorted(p.name for p in (tmp_path / "a" / "step_000004").glob("*lora*.safetensors")) == [
        "lora.safetensors", "lora_vision.safetensors"]
    old = tmp_path / "b" / "step_000002"  # a checkpoint written before the rename resumes as well
    (old / "base_weights.safetensors").rename(old / "lora_base.safetensors")
    assert train.main(["--resume", str(tmp_path / "b"), "--lora", "4"]) == 2  # another rank: refused
    assert "was trained with --lora 2 --lora-alpha 4: resume it without giving --lora" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # other layers than its files' adapters: refused
        train.main(["--resume", str(tmp_path / "b"), "--lora-targets", "kohya"])
    assert "was trained with --lora-targets attention; resume it without giving it again" in capsys.readouterr().err
    assert train.main(["--resume", str(tmp_path / "b")]) == 0

    ckpt = tmp_path / "a" / "step_000004"
    a, b = weights(ckpt), weights(tmp_path / "b" / "step_000004")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []  # bit-equal
    # AdamW and the EMA held the adapters alone; the model folders hold base + (α/r) B A of the EMA adapters
    assert {k.split("/")[0] for k in a} >= {"lora.safetensors", "lora_vision.safetensors", "base_weights.safetensors"}
    assert all(k.startswith("optimizer.safetensors/lora.lora_") for k in a if k.startswith("optimizer"))
    assert all(k.startswith("live.safetensors/lora.lora_") for k in a if k.startswith("live"))
    live = read_safetensors(ckpt / "live.safetensors")
    start = UniDiff.from_pretrained(tmp_path / "a" / "init")
    names = {id(m): n for n, m in start.named_modules()}
    path = {name: names[id(ad.target[0])] for name, ad in add_lora(start, ["unet", "text", "vision"], 2, 4).items()}
    folder = {f"unet.{k.split('/', 2)[2]}" if k.startswith("unet/") else f"clip.{k.split('/', 2)[2]}": v
              for k, v in a.items() if k.startswith(("unet/", "clip/"))}
    start_sd = start.state_dict()
    adapted = {f"{p}.weight" for p in path.values()}
    assert all(torch.equal(folder[k], start_sd[k]) for k in folder if k not in adapted)  # the rest: frozen
    live_model, _, _ = runs.load_model(ckpt, "live")
    live_sd = live_model.state_dict()
    for name, p in path.items():
        assert torch.equal(a[f"base_weights.safetensors/{name}"], start_sd[f"{p}.weight"])
        file = "lora_vision" if name.startswith("lora_clip_") else "lora"
        for sd, got in ((a, folder[f"{p}.weight"]), (live, live_sd[f"{p}.weight"])):  # EMA in the folders; live
            k = f"{file}.safetensors/" if sd is a else "lora."
            up, down = sd[f"{k}{name}.lora_up.weight"], sd[f"{k}{name}.lora_down.weight"]
            assert rel_err(got, start_sd[f"{p}.weight"] + 4 / 2 * up @ down) < 1e-6, name
    assert any(not torch.equal(folder[k], start_sd[k]) for k in adapted)  # the adapters trained


def test_full_disk_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    real_save, calls = runs.save_safetensors, []
    def save(sd, path, metadata=None):
        calls.append(path)
        if "step_000004" in str(path):  # the second checkpoint dies half-written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(sd, path, metadata)
    monkeypatch.setattr(runs, "save_safetensors", save)
    assert train.main(TINY + ["--steps", "4", "--save-every", "2", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "step_000002 is intact" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["init", "log.jsonl", "run.json", "step_000002"]  # no temp left
    model, ckpt, _ = runs.load_model(tmp_path / "r")
    assert ckpt.name == "step_000002" and isinstance(model, train.UniDiff)


KILL_WHILE_SAVING = """
import os, sys, runs, train
real = runs.save_safetensors
def save(sd, path, metadata=None):
    if "step_000004" in str(path) and path.name == "optimizer.safetensors":
        os._exit(137)  # killed half-way through the second checkpoint: no handler runs
    return real(sd, path, metadata)
runs.save_safetensors = save
sys.exit(train.main(sys.argv[1:]))
"""


def test_killed_while_saving_leaves_previous_checkpoint_loadable(tmp_path):
    run = tmp_path / "r"
    flags = TINY + ["--steps", "4", "--save-every", "2", "--out", str(run)]
    killed = subprocess.run([sys.executable, "-c", KILL_WHILE_SAVING, *flags], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert (run / ".step_000004.tmp").is_dir()  # the half-written checkpoint, never renamed into place
    model, ckpt, _ = runs.load_model(run)
    assert ckpt.name == "step_000002" and isinstance(model, train.UniDiff)
    assert train.main(["--resume", str(run)]) == 0  # and the run continues from it
    assert sorted(p.name for p in run.glob("step_*")) == ["step_000002", "step_000004"]
    assert not (run / ".step_000004.tmp").exists()


def test_nan_loss_stops_cleanly_keeping_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    real, n = train.UniDiff.losses, []
    def losses(self, *a, **kw):
        out = real(self, *a, **kw)
        n.append(1)
        if len(n) >= 3:  # the third step diverges
            out["total"] = out["total"] * float("nan")
        return out
    monkeypatch.setattr(train.UniDiff, "losses", losses)
    assert train.main(TINY + ["--steps", "6", "--save-every", "2", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "loss is not finite between steps 3 and 4" in err and "step_000002" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "r").glob("step_*")) == ["step_000002"]


def test_bad_data_is_skipped_counted_and_the_run_goes_on(tmp_path, capsys):
    torch.manual_seed(0)
    metadata_folder(tmp_path / "set")
    with open(tmp_path / "set" / "metadata.jsonl", "a") as f:  # a test split, and a caption over 77 tokens
        for i in range(2):
            f.write("\n" + json.dumps({"file_name": f"ok{i}.jpg", "text": f"test photo {i}", "split": "test"}))
        f.write("\n" + json.dumps({"file_name": "ok3.jpg", "text": "long " * 100, "split": "train"}))
    flags = ["--data", str(tmp_path / "set"), "--model", "tiny", "--res", "16", "--batch-size", "2", "--steps", "2",
             "--vae-steps", "0", "--eval-every", "2", "--out", str(tmp_path / "r")]
    assert train.main(flags) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    for line in ["skipped 2: unreadable image", "skipped 1: missing image", "skipped 1: empty caption",
                 "skipped 1: metadata line not valid UTF-8", "skipped 1: metadata line not valid JSON",
                 "converted 1: CMYK → RGB", "truncated 1: caption longer than 77 tokens",
                 "step 2 | validation: embedding"]:  # long work says what it does
        assert line in out
    assert (tmp_path / "r" / "step_000002" / "state.json").is_file()
    assert (tmp_path / "r" / "samples" / "step_000002.png").is_file()
    # an empty folder is one clear message
    (tmp_path / "empty").mkdir()
    assert train.main(["--data", str(tmp_path / "empty"), "--model", "tiny", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "no images found" in err and "Traceback" not in err


RECORD = """
import sys
import train
from helpers import recording
with recording(sys.argv[1]):
    code = train.main(sys.argv[2:])
sys.exit(code)
"""


def recorded(tmp_path, name, flags, ranks=1):
    """Run train.py on `ranks` processes (1: in this one) under helpers.recording: [each rank's record]."""
    if ranks == 1:
        with recording(tmp_path / name):
            assert train.main(flags + ["--out", str(tmp_path / name)]) == 0
    else:
        (tmp_path / "record.py").write_text(RECORD)
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc_per_node={ranks}", str(tmp_path / "record.py"), str(tmp_path / name), *flags,
                              "--out", str(tmp_path / name)],
                             cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1",
                                            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])},
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
    return [read_safetensors(tmp_path / name / f"rank{r}.safetensors") for r in range(ranks)]


def same_step(ours, ref, rtol=1e-4):
    """`ours` (a rank's record) is the run `ref` is: the same losses at every step (to rtol: the later steps
    start from weights that AdamW's normalisation moved apart by rounding) and first-step gradients."""
    assert torch.allclose(ours["losses"], ref["losses"], rtol=rtol, atol=1e-7), (ours["losses"], ref["losses"])
    assert_same_grads({k: v for k, v in ours.items() if k.startswith("grad.")},
                      {k: v for k, v in ref.items() if k.startswith("grad.")})


@pytest.mark.parametrize("lora", [[], ["--lora", "2"]])
def test_ddp_two_processes_equal_one(tmp_path, lora):
    # All three losses, every part trained: the global batch, its noise and timesteps are the same however they
    # are split over ranks. Compared: what DDP makes equal, each step's losses (the mean over ranks: each rank
    # holds its share) and the all-reduced gradients; not the weights, which AdamW moves by a full step where a
    # true gradient of ~0 leaves only rounding noise. A real mismatch (noise drawn per rank) differs by O(1).
    # With --lora the adapters alone get gradients, all-reduced by DDP as the weights are.
    flags = TINY + ["--steps", "3", "--lambda-rsc", "0.1", "--rsc-t-max", "1000", "--tensorboard"] + lora
    torch.manual_seed(0)
    one, = recorded(tmp_path, "one", flags)
    two = recorded(tmp_path, "two", flags, ranks=2)
    assert (one["losses"].reshape(-1, 4)[:, :3] > 0).all()  # ITC, IS and RSC each on (RSC is off by default)
    assert len(list((tmp_path / "two" / "tensorboard").glob("*tfevents*"))) == 1  # rank 0 alone writes
    assert sorted(e[:2] for e in events(tmp_path / "two")) == sorted(e[:2] for e in events(tmp_path / "one"))
    assert all(torch.equal(two[0][k], two[1][k]) for k in one if k.startswith("grad."))  # the ranks agree
    assert all(k.startswith("grad.lora.") == bool(lora) for k in one if k.startswith("grad."))
    same_step({**two[0], "losses": (two[0]["losses"] + two[1]["losses"]) / 2}, one)


def test_tiny_defaults_apply_on_any_data():
    folder = train.parse_args(["--data", "my/folder", "--model", "tiny"])
    demo = train.parse_args(["--data", "demo"])
    for key, value in config.TINY.items():
        assert getattr(folder, key) == value
        assert getattr(demo, key) == config.DEMO.get(key, value)
    assert folder.model == demo.model == "tiny" and folder.res == 32 and folder.out == str(Path("runs/folder"))
    assert folder.weights is None and Path(demo.weights) == config.PRETRAINED_TINY and demo.ood_data == "world"
    sd15 = train.parse_args(["--data", "demo", "--model", "sd15", "--steps", "7"])
    assert (sd15.res, sd15.lr_unet, sd15.steps) == (512, 1e-5, 7)  # tiny's defaults only for the tiny model



def test_batch_and_grad_accum_below_one_stop_with_one_line(capsys):
    """--grad-accum 0 divided by zero in micro_batch; --batch-size 0 was called not a multiple of 1."""
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--data", "demo", "--grad-accum", "0"])
    assert e.value.code == 2 and "--grad-accum 0: micro-steps per optimizer step, at least 1" in capsys.readouterr().err
    with pytest.raises(train.RunError, match="--batch-size 0 must be a positive multiple of ranks"):
        cfg = train.parse_args(["--data", "demo", "--batch-size", "0"])
        train.micro_batch(cfg.batch_size, cfg.grad_accum, 1)
    with pytest.raises(train.RunError, match="--batch-size -4 must be a positive multiple of ranks"):  # was an IndexError
        cfg = train.parse_args(["--data", "demo", "--batch-size", "-4"])
        train.micro_batch(cfg.batch_size, cfg.grad_accum, 1)


@pytest.mark.parametrize("flags, says", [
    (["--steps", "0"], "--steps 0: optimizer steps in all, at least 1"),  # said done, with no checkpoint
    (["--steps", "-3"], "--steps -3: optimizer steps in all, at least 1"),
    (["--save-every", "-1"], "--save-every -1: steps between checkpoints, at least 0"),  # saved every step
    (["--eval-every", "-1"], "--eval-every -1: steps between validations, at least 0"),  # validated every step
    (["--warmup", "-5"], "--warmup -5: linear warm-up steps, at least 0"),
    (["--ema", "1.5"], "--ema 1.5: the EMA's decay, from 0 (no EMA) up to but not including 1"),
    (["--ema", "1"], "--ema 1.0: the EMA's decay"),
    (["--ema", "-0.1"], "--ema -0.1: the EMA's decay"),  # overshot the weights
    (["--lr-unet=-1e-5"], "--lr-unet -1e-05: a peak learning rate, must be > 0"),  # climbed the loss
    (["--lr-clip", "0"], "--lr-clip 0.0: a peak learning rate, must be > 0"),
    (["--lambda-is", "-1"], "--lambda-is -1.0: a loss weight, at least 0"),
    (["--lambda-itc", "0", "--lambda-is", "0", "--lambda-rsc", "0"], "are all 0: no loss is left to train"),  # traceback
    (["--rsc-t-max", "5000"], "--rsc-t-max 5000: RSC uses the timesteps below it, from 1 to 1000"),
    (["--rsc-t-max", "0"], "--rsc-t-max 0: RSC uses the timesteps below it"),  # RSC silently off
    (["--max-grad-norm", "-1"], "--max-grad-norm -1.0: the norm the gradient is clipped to, at least 0"),  # flipped it
    (["--workers", "-2"], "--workers -2: data loader processes per rank, at least 0"),  # traceback
    (["--vae-steps", "-1"], "--vae-steps -1: steps fitting the tiny VAE, at least 0"),  # traceback
    (["--train-size", "0"], "--train-size 0: the first N training items, at least 1"),  # trained on all of them
    (["--train-size", "-1"], "--train-size -1: the first N training items, at least 1"),  # traceback
    (["--lora", "2", "--lora-alpha", "0"], "--lora-alpha 0.0: scales the adapters' update by alpha / rank"),  # froze them
    (["--lora-alpha", "16"], "--lora-alpha 16: scales LoRA's adapters; give --lora RANK too"),  # a full fine-tune
    (["--lora-targets", "kohya"], "--lora-targets kohya: chooses LoRA's layers; give --lora RANK too"),  # ignored
    (["--ood-data", "wrold", "--eval-every", "0"], "--ood-data wrold: measured at each validation"),  # never opened
])
def test_out_of_range_numbers_stop_with_one_line(flags, says, capsys):
    """Each of these ran on silently wrong or crashed with a traceback (the comments say which)."""
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--data", "demo", *flags])
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_the_edges_of_each_range_still_run():
    """0 means something for these (off, none, only at the end); 1000 is all of RSC's timesteps."""
    args = train.parse_args(["--data", "demo", "--save-every", "0", "--eval-every", "0", "--warmup", "0", "--ema", "0",
                             "--lambda-itc", "0", "--lambda-rsc", "0", "--rsc-t-max", "1000", "--max-grad-norm", "0",
                             "--workers", "0", "--vae-steps", "0", "--train-size", "1", "--steps", "1"])
    assert (args.save_every, args.ema, args.lambda_is, args.rsc_t_max, args.workers) == (0, 0, 1.0, 1000, 0)


def test_fashion_presets_train_portrait_and_res_is_stored_as_before():
    for data in ("fashion_woman", "fashion_man", "ecommerce_product"):
        assert train.parse_args(["--data", data]).res == "512x768"  # 2:3 photos: heads and shoes kept
    assert train.parse_args(["--data", "fashion_woman", "--model", "tiny"]).res == 32  # tiny stays square, CPU-sized
    assert train.parse_args(["--data", "my/folder"]).res == 512
    # a square is stored as the int it always was (run.json, state.json: old runs resume), else as "WxH"
    assert train.parse_args(["--data", "x", "--res", "512x512"]).res == 512
    assert train.parse_args(["--data", "x", "--res", "512X768"]).res == "512x768"

def test_help_states_the_defaults_the_code_uses(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    options = re.split(r"\n  (?=--)", capsys.readouterr().out.split("options:")[1])
    run = {"sd15": vars(train.parse_args(["--data", "x"])), "tiny": vars(train.parse_args(["--data", "x", "--model", "tiny"])),
           "demo": vars(train.parse_args(["--data", "demo"])),
           "fashion": vars(train.parse_args(["--data", "fashion_man"]))}
    def same(shown, value):
        return shown == str(value) or isinstance(value, (int, float)) and float(shown) == value
    checked = set()
    for text in options:
        text = " ".join(text.split())
        key = text.split()[0][2:].replace("-", "_")
        m = re.search(r"\(default ([^;:)]+)((?:; \w+ [^;:)]+)*)", text)
        if m is None or config.DEFAULTS.get(key) is None:  # e.g. --out, --workers: defaults in words
            continue
        assert same(m[1], run["sd15"][key]), text
        shown = dict(part.split(" ", 1) for part in m[2].split("; ")[1:])  # e.g. {"tiny": "300", "demo": "200"}
        if key == "model":
            assert "--data demo implies tiny" in text
            continue
        for name, prev in (("fashion", "sd15"), ("tiny", "sd15"), ("demo", "tiny")):
            if run[name][key] != run[prev][key]:
                assert same(shown[name], run[name][key]), text
        checked.add(key)
    assert set(config.TINY) | {"lambda_rsc", "rsc_t_max", "caption_dropout", "max_grad_norm", "vae_steps"} <= checked
    assert set(config.DEMO) - {"weights", "ood_data"} <= checked  # those two: defaults in words
    assert set(config.FASHION) <= checked


def test_snr_gamma_and_caption_dropout_reach_the_losses(tmp_path, monkeypatch):
    assert (train.parse_args(["--data", "demo"]).snr_gamma, train.parse_args(["--data", "demo"]).caption_dropout) == (None, 0.1)
    real, seen = train.UniDiff.losses, []
    def losses(self, *a, **kw):
        seen.append(kw)
        return real(self, *a, **kw)
    monkeypatch.setattr(train.UniDiff, "losses", losses)
    torch.manual_seed(0)
    assert train.main(TINY + ["--steps", "1", "--snr-gamma", "5", "--caption-dropout", "0.3", "--rsc-form",
                              "kl-one-way", "--is-detach-text", "--out", str(tmp_path / "r")]) == 0
    assert seen and all(kw["snr_gamma"] == 5 and kw["p_uncond"] == 0.3 and kw["rsc_form"] == "kl-one-way"
                    and kw["is_detach_text"] for kw in seen)


def test_fit_vae_shows_progress(monkeypatch):
    clock = iter(range(0, 10**6, 2))  # every reading of the clock is 2 s later
    import vae
    monkeypatch.setattr(vae, "time", SimpleNamespace(time=lambda: next(clock)))
    lines = []
    vae.fit_vae(train.UniDiff.tiny().vae, train.open_dataset("demo", "train", 16), 12, 0, lines.append, batch=2)
    progress = [re.fullmatch(r"tiny VAE: step (\d+)/12, reconstruction MSE (\S+) \((\d+)s\)", s) for s in lines]
    progress = [m for m in progress if m]
    assert lines[0].startswith("fitting the tiny VAE as an autoencoder: 12 steps")
    assert 2 <= len(progress) < 12  # a line every PROGRESS_EVERY seconds, not every step
    assert [int(m[1]) for m in progress] == sorted({int(m[1]) for m in progress})
    assert all(math.isfinite(float(m[2])) for m in progress)
    assert lines[-1].startswith("tiny VAE fitted as an autoencoder: 12 steps")


def test_a_folder_without_test_rows_trains_without_validation(tmp_path, capsys):
    root = tmp_path / "set"
    root.mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(root / f"{i}.png")
    (root / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{i}.png", "text": f"photo {i}", "split": "train"}) + "\n" for i in range(4)))
    flags = ["--data", str(root), "--model", "tiny", "--res", "16", "--batch-size", "2", "--steps", "1",
             "--vae-steps", "0", "--out", str(tmp_path / "r")]
    assert train.main(flags) == 2  # validation needs test rows: one clear line
    err = capsys.readouterr().err
    assert "no test images: all 4 usable rows are in train" in err and "--eval-every 0" in err
    assert train.main(flags + ["--eval-every", "0"]) == 0
    out = capsys.readouterr().out  # no validation, no sample grid: the last line names no samples folder
    assert f"done: 1 steps; checkpoints in {tmp_path / 'r'}/\n" in out and "samples" not in out


# A per-step hook, then train.main: argv = SIGNAL STEP TO train-flags... At the start of step STEP the
# signal goes to the process group ("group": what Ctrl-C in a terminal does: the main process and its
# loader workers) or to one rank's process ("rank1"). Each rank reports the last step it started.
SIGNAL_AT_STEP = """
import os, signal, sys, train
sig, at, to = signal.Signals[sys.argv[1]], int(sys.argv[2]), sys.argv[3]
real, last = train.lr_factor, [None]
def lr_factor(step, *a):  # called once at the start of each step
    last[0] = step
    if step == at and to == "group":
        os.killpg(0, sig)
    if step == at and to == "rank" + os.environ.get("RANK", "0"):
        os.kill(os.getpid(), sig)
    return real(step, *a)
train.lr_factor = lr_factor
code = train.main(sys.argv[4:])
print(f"rank {os.environ.get('RANK', '0')}: last step started {last[0]}, exit {code}", flush=True)
sys.exit(code)
"""


def signal_at_step(tmp_path, launcher, args):
    script = tmp_path / "signal_at_step.py"
    script.write_text(SIGNAL_AT_STEP)
    return subprocess.run([*launcher, str(script), *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                          start_new_session=True)  # its own process group: killpg(0) reaches nothing else


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_with_loader_workers_saves_and_resumes(tmp_path, sig, code):
    run = tmp_path / "r"
    flags = [*TINY, "--batch-size", "6", "--grad-accum", "6", "--steps", "4", "--save-every", "4", "--workers", "2"]
    # Ctrl-C (or a scheduler's SIGTERM) reaches the whole process group, loader workers too. The workers
    # alternate batches, so at step 2 both have started; with 6 micro-steps the step under way needs
    # batches beyond the 4 already requested: the workers must live on.
    p = signal_at_step(tmp_path, [sys.executable], [sig, "2", "group", *flags, "--out", str(run)])
    assert p.returncode == code, p.stdout[-2000:] + p.stderr[-2000:]
    assert "exited unexpectedly" not in p.stderr and "Traceback" not in p.stderr
    assert "stopped at step 3" in p.stdout  # the step under way finished, then saved
    assert [c.name for c in train.checkpoints(run)] == ["step_000003"]
    assert train.main(["--resume", str(run)]) == 0
    assert [c.name for c in train.checkpoints(run)] == ["step_000003", "step_000004"]
    # and it is the straight run, to the bit (one thread here and there): the names hold for a resume on other data
    assert train.main(flags + ["--out", str(tmp_path / "a")]) == 0
    a, b = weights(tmp_path / "a" / "step_000004"), weights(run / "step_000004")
    assert a.keys() == b.keys() and any(".exp_avg_sq" in k for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_ddp_sigterm_to_one_rank_stops_both_after_that_step(tmp_path):
    run = tmp_path / "r"
    p = signal_at_step(tmp_path, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
                       ["SIGTERM", "2", "rank1", *TINY, "--steps", "5", "--save-every", "5", "--out", str(run)])
    out = p.stdout + p.stderr
    # both ranks finished step 3 (started as step 2), saved it together, and stopped: not at a multiple of 10
    assert "rank 0: last step started 2, exit 143" in out and "rank 1: last step started 2, exit 143" in out, out[-3000:]
    assert "stopped at step 3: continue with  torchrun --nproc_per_node=2 train.py --resume" in p.stdout
    assert [c.name for c in train.checkpoints(run)] == ["step_000003"]
    assert train.main(["--resume", str(run)]) == 0
    assert [c.name for c in train.checkpoints(run)] == ["step_000003", "step_000005"]


def nan_gradient_at(steps, monkeypatch):
    """Make the gradient NaN (the loss stays finite) at the given step indices (no grad-accum: one call a step)."""
    real, n = train.UniDiff.losses, [0]
    def losses(self, *a, **kw):
        out = real(self, *a, **kw)
        if n[0] in steps:
            out["total"].register_hook(lambda g: torch.full_like(g, float("nan")))
        n[0] += 1
        return out
    monkeypatch.setattr(train.UniDiff, "losses", losses)


def test_nan_gradient_skips_the_step(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    nan_gradient_at({1}, monkeypatch)
    assert train.main(TINY + ["--steps", "4", "--save-every", "4", "--ema", "0.9", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "loss" in out and "skipped 1 of 4 steps (non-finite gradient)" in out
    ckpt = weights(tmp_path / "r" / "step_000004")
    assert all(v.isfinite().all() for v in ckpt.values())  # live, EMA (model folders) and AdamW's moments
    steps = {v.item() for k, v in ckpt.items() if k.endswith(".step")}
    assert steps == {3.0}  # AdamW counted only the 3 real updates
    init = weights(tmp_path / "r" / "init")
    assert any(not torch.equal(ckpt[k], init[k]) for k in init if k.startswith("unet/"))  # the others trained


def test_nan_gradient_ten_steps_in_a_row_stop_at_the_tenth_and_save(tmp_path, monkeypatch, capsys):
    """NaN gradients from step 3 on: the run stops after step 12, the tenth in a row (it went on to the progress
    line at step 20), and saves the weights, intact since step 2 (it saved nothing)."""
    torch.manual_seed(0)
    nan_gradient_at(set(range(2, 100)), monkeypatch)
    run = tmp_path / "r"
    assert train.main(TINY + ["--steps", "30", "--save-every", "8", "--ema", "0.9", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"the gradient was not finite at each of the last 10 steps (up to step 12); they were skipped, so the " \
           f"weights are intact: saved in {run / 'step_000012'}" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert [c.name for c in train.checkpoints(run)] == ["step_000008", "step_000012"]
    first, last = weights(run / "step_000008"), weights(run / "step_000012")
    assert all(v.isfinite().all() for v in last.values())  # live, EMA and AdamW's moments
    assert last.keys() == first.keys() and all(torch.equal(first[k], last[k]) for k in first)  # no step since 2


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    real = train.lr_factor
    monkeypatch.setattr(train, "lr_factor", lambda step, *a: float("nan") if step == 1 else real(step, *a))
    # finite gradients, but a NaN learning rate at the last step writes NaN into the weights
    assert train.main(TINY + ["--steps", "2", "--save-every", "2", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "the weights are not finite after step 2. Stopped without saving" in err and "Traceback" not in err
    assert train.checkpoints(tmp_path / "r") == []


def test_ema_warms_up_and_fills_the_checkpoint_model_folders(tmp_path, monkeypatch):
    torch.manual_seed(0)
    real, seen = train.UniDiff.losses, []
    def losses(self, *a, **kw):  # once a step: the trained weights before its update
        seen.append({n: p.detach().double().clone() for n, p in self.named_parameters() if p.requires_grad})
        return real(self, *a, **kw)
    monkeypatch.setattr(train.UniDiff, "losses", losses)
    k, decay = 3, 0.9
    assert train.main(TINY + ["--steps", str(k), "--save-every", str(k), "--ema", str(decay),
                              "--out", str(tmp_path / "r")]) == 0
    ckpt = tmp_path / "r" / f"step_{k:06d}"
    live = read_safetensors(ckpt / "live.safetensors")
    p = seen + [{n: v.double() for n, v in live.items()}]  # the weights after 0..k updates
    d = [min(decay, (1 + t) / (10 + t)) for t in range(k)]  # the warm-up: 0.1, 0.18, 0.25 here
    # EMA_k = Π d · p_0 + Σ_j (1 - d_{j-1}) Π_{i>=j} d_i · p_j
    prod = lambda xs: math.prod(xs)
    folders = {**{f"unet.{n}": v for n, v in read_safetensors(ckpt / "unet" / "diffusion_pytorch_model.safetensors").items()},
               **{f"clip.{n}": v for n, v in read_safetensors(ckpt / "clip" / "model.safetensors").items()}}
    for n in live:
        closed = prod(d) * p[0][n] + sum((1 - d[j - 1]) * prod(d[j:]) * p[j][n] for j in range(1, k + 1))
        assert rel_err(folders[n], closed) < 1e-5, n
    assert any(rel_err(folders[n], live[n]) > 1e-3 for n in live)  # and the EMA is not the live weights


def test_resume_from_a_checkpoint_folder_continues_in_its_run(tmp_path, capsys):
    torch.manual_seed(0)
    run = tmp_path / "r"
    assert train.main(TINY + ["--steps", "2", "--save-every", "2", "--out", str(run)]) == 0
    assert train.main(["--resume", str(run / "step_000002"), "--steps", "3"]) == 0
    assert sorted(p.name for p in run.glob("step_*")) == ["step_000002", "step_000003"]
    assert not any((run / "step_000002").glob("step_*"))
    # from an older checkpoint, the run would write over the later ones: refused
    assert train.main(["--resume", str(run / "step_000002")]) == 2
    assert "holds checkpoints after step_000002" in capsys.readouterr().err


def test_latest_checkpoint_is_the_highest_step_number(tmp_path):
    for name in ["step_000010", "step_999999", "step_1000000", "step_2000000"]:
        (tmp_path / name).mkdir()
        if name != "step_2000000":  # incomplete: no state.json
            (tmp_path / name / "state.json").write_text("{}")
    assert train.latest_checkpoint(tmp_path).name == "step_1000000"


def test_grad_accum_itc_equals_one_batch(tmp_path):
    # ITC alone (it draws no noise, so any split of the batch meets the same loss): --grad-accum 4, and 2 ranks ×
    # --grad-accum 2, are the one-batch run, in each step's loss (the mean over micro-steps and ranks) and its
    # first gradients. Without gradient caching each micro-batch of 1 would have ITC = 0.
    flags = TINY + ["--steps", "2", "--lambda-is", "0", "--lambda-rsc", "0"]
    per_step = lambda rec, K: rec["losses"].view(-1, K, 4).mean(1)
    torch.manual_seed(0)
    one, = recorded(tmp_path, "one", flags)
    four, = recorded(tmp_path, "four", flags + ["--grad-accum", "4"])
    same_step({**four, "losses": per_step(four, 4)}, one)
    two = recorded(tmp_path, "two", flags + ["--grad-accum", "2"], ranks=2)
    same_step({**two[0], "losses": (per_step(two[0], 2) + per_step(two[1], 2)) / 2}, one)


def world_folder(root, n=12, test=0):
    """A data folder of n 16 px images of the synthetic world and their captions, the first `test` in test."""
    from data import open_dataset
    root.mkdir(parents=True)
    world, rows = open_dataset("world", "train", 16), []
    for i in range(n):
        x, text = world[i]
        Image.fromarray(((x.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()).save(root / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": text, "split": "test" if i < test else "train"}) + "\n")
    (root / "metadata.jsonl").write_text("".join(rows))
    return root


def cache_flags(data):
    return ["--data", str(data), *TINY[2:], "--rsc-t-max", "1000"]


def test_cached_latents_train_as_pixels_do_also_under_ddp(tmp_path):
    # The same run from the pixels, from the latent cache, and on 2 ranks that encode half the cache each: the same
    # losses and first gradients (the same draws). The cache's rows are what UniDiff.encode makes of each image.
    flags = cache_flags(world_folder(tmp_path / "set")) + ["--steps", "2"]
    torch.manual_seed(0)
    plain, = recorded(tmp_path, "plain", flags)
    cached, = recorded(tmp_path, "cached", flags + ["--cache-latents"])
    same_step(cached, plain)
    two = recorded(tmp_path, "ddp/two", flags + ["--cache-latents"], ranks=2)  # ddp/latent-cache: its own
    same_step({**two[0], "losses": (two[0]["losses"] + two[1]["losses"]) / 2}, plain)

    file, = (tmp_path / "latent-cache").glob("set-16-*.safetensors")
    rows, by_two = read_safetensors(file), read_safetensors(tmp_path / "ddp" / "latent-cache" / file.name)
    model = UniDiff.from_pretrained(tmp_path / "cached" / "init")  # the run's start: its VAE
    ds = train.open_dataset(str(tmp_path / "set"), "train", 16)
    encoded = model.encode(torch.stack([ds[i][0] for i in range(len(ds))]))
    assert rows.keys() == by_two.keys() == {"mean", "logvar", "clip"} and len(rows["mean"]) == len(ds) == 12
    for name, t in zip(encoded._fields, encoded):
        assert rel_err(rows[name], t) < 1e-6 and rel_err(by_two[name], t) < 1e-6, name


def test_cached_latents_resume_equals_straight_run(tmp_path, monkeypatch, capsys):
    # The first run encodes the cache; the interrupted run and its resume read it; all bit-equal.
    flags = cache_flags(world_folder(tmp_path / "set")) + ["--steps", "4", "--save-every", "4", "--grad-accum", "2",
                                                           "--cache-latents"]
    torch.manual_seed(0)
    straight_and_interrupted(flags, tmp_path, monkeypatch)
    assert train.main(["--resume", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert out.count("latent cache: encoding the 12 training images once") == 1
    assert out.count("(12 images; made for this data, resolution, VAE, CLIP input and precision)") == 2
    a, b = weights(tmp_path / "a" / "step_000004"), weights(tmp_path / "b" / "step_000004")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


def test_latent_cache_is_keyed_by_data_resolution_vae_and_precision(tmp_path, capsys):
    from latent_cache import cache_file
    folder = world_folder(tmp_path / "set")
    model = UniDiff.tiny()
    vae = model.vae
    key = lambda res=16, dtype=torch.float32: cache_file(tmp_path, "set", train.open_dataset(str(folder), "train", res),
                                                         res, model, dtype)
    first = key()
    assert key() == first and first.name.startswith("set-16-")
    assert key(res=24) != first and key(dtype=torch.bfloat16) != first
    bias = vae.decoder.conv_out.bias.data
    was = bias.clone()
    bias[0] += 1  # the decoder is not cached, yet the key covers all of the VAE
    assert key() != first
    bias.copy_(was)
    assert key() == first
    img = Image.open(folder / "3.png")
    img.rotate(90).save(folder / "3.png")  # the same file name, new pixels
    assert key() != first
    # a run that changes its VAE encodes a new cache, and says that it does not reuse the other
    flags = cache_flags(folder) + ["--steps", "1", "--cache-latents"]
    assert train.main(flags + ["--out", str(tmp_path / "a")]) == 0
    assert train.main(flags + ["--out", str(tmp_path / "b"), "--vae-steps", "3"]) == 0
    out = capsys.readouterr().out
    old, new = sorted((tmp_path / "latent-cache").glob("set-16-*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    assert f"latent cache: encoding the 12 training images once into {new} (0.2 MB); not reusing {old.name}: " \
           "made for other data, resolution, VAE, CLIP input or precision" in out


def test_latent_cache_is_keyed_by_clip_input_size(tmp_path):
    """The cache holds CLIP's view of each image: a model with the same VAE but CLIP at 48 px read the 32 px
    model's cache, and its first step died of a shape error."""
    from dataclasses import replace
    from clip import CLIP
    m = UniDiff.tiny(v_prediction=True)
    m.save(tmp_path / "clip32")
    c = m.clip.cfg
    UniDiff(CLIP(replace(c, vision=replace(c.vision, image_size=48))), m.unet, m.vae, True).save(tmp_path / "clip48")
    flags = cache_flags(world_folder(tmp_path / "set")) + ["--steps", "1", "--cache-latents"]
    for size in (32, 48):
        assert train.main(flags + ["--weights", str(tmp_path / f"clip{size}"), "--out", str(tmp_path / f"r{size}")]) == 0
    assert len(list((tmp_path / "latent-cache").glob("set-16-*.safetensors"))) == 2


def test_latent_cache_refuses_an_image_that_fails_to_load(tmp_path, monkeypatch, capsys):
    # Without the cache, the next image and its caption stand in for an unreadable one; cached under the
    # unreadable one's row and caption it would be a wrong pair: the run stops, and leaves no cache file behind.
    import data
    real = data.load_pixels
    monkeypatch.setattr(data, "load_pixels", lambda path, size: 1 / 0 if path.name == "3.png" else real(path, size))
    flags = cache_flags(world_folder(tmp_path / "set")) + ["--steps", "1", "--cache-latents"]
    assert train.main(flags + ["--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "skipped unreadable image" in err and "3.png" in err
    assert "error: 1 training image(s) could not be read while caching (named above): remove them from" in err
    assert list((tmp_path / "latent-cache").iterdir()) == []


# argv = SIGNAL train-flags...: the signal comes while the latent cache's second batch is written
SIGNAL_WHILE_CACHING = """
import os, signal, sys, latent_cache, train
signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job starts with Ctrl-C ignored
real, n = latent_cache.write_rows, [0]
def write_rows(*a):
    n[0] += 1
    if n[0] == 2:
        os.kill(os.getpid(), signal.Signals[sys.argv[1]])
    return real(*a)
latent_cache.write_rows = write_rows
sys.exit(train.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_while_caching_leaves_no_temp_file_and_one_line(tmp_path, sig, code):
    """Ctrl-C or SIGTERM (before the training loop's own handler) while the latent cache is written: the temp file,
    as large as a whole cache, is removed (SIGTERM left it; Ctrl-C printed a traceback), and one line says so."""
    flags = cache_flags(world_folder(tmp_path / "set")) + ["--steps", "1", "--cache-latents", "--out", str(tmp_path / "a")]
    p = subprocess.run([sys.executable, "-c", SIGNAL_WHILE_CACHING, sig, *flags], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == code, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stderr and f"{sig}: stopped; no checkpoint was saved: nothing to resume" in p.stdout
    assert list((tmp_path / "latent-cache").iterdir()) == []


def test_full_disk_while_caching_ends_in_one_line(tmp_path, monkeypatch, capsys):
    """The cache written to a full disk (/dev/full: every write fails with ENOSPC, as a full disk's do) ended in a
    traceback; now one line, and no temp file left."""
    import builtins
    import latent_cache
    monkeypatch.setattr(latent_cache, "open", lambda path, mode: builtins.open("/dev/full" if mode == "r+b" else path,
                                                                                  mode), raising=False)
    flags = cache_flags(world_folder(tmp_path / "set")) + ["--steps", "1", "--cache-latents"]
    assert train.main(flags + ["--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "error: could not write the latent cache" in err and "(No space left on device); nothing was kept" in err
    assert len(err.strip().splitlines()) == 1 and list((tmp_path / "latent-cache").iterdir()) == []


@pytest.mark.parametrize("phase", ["fit_vae", "cached_training_set", "validate"])
def test_ctrl_c_during_setup_ends_in_one_line(tmp_path, monkeypatch, capsys, phase):
    """Ctrl-C while the tiny VAE is fitted, the latent cache made or the first validation run printed a traceback."""
    def ctrl_c(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, phase, ctrl_c)
    try:
        code = train.main(TINY + ["--steps", "1", "--cache-latents", "--train-size", "8", "--eval-every", "1",
                                  "--out", str(tmp_path / "r")])
    except KeyboardInterrupt:  # it escaped main: a traceback
        code = "KeyboardInterrupt"
    out, err = capsys.readouterr()
    assert code == 130 and err == "" and out.splitlines()[-1] == "SIGINT: stopped; no checkpoint was saved: nothing to resume"


def test_plain_sd_fine_tuning_of_a_model_without_a_vision_tower(tmp_path, capsys):
    """--lambda-itc 0 --lambda-rsc 0 on an SD single file (a text encoder, no vision tower) died of an AttributeError
    in prepare_model: the UNet and text tower train, validation samples, and one line says vision is left out."""
    UniDiff.tiny(v_prediction=True).save(tmp_path / "m", single_file=True)
    flags = TINY + ["--weights", str(tmp_path / "m" / "model_single_file.safetensors"), "--lambda-itc", "0",
                    "--lambda-rsc", "0", "--steps", "1", "--eval-every", "1"]
    assert train.main(flags + ["--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "this model has no vision tower (a text encoder only): --train's vision is left out" in out
    assert "training unet, text (" in out and (tmp_path / "r" / "samples" / "step_000001.png").is_file()
    assert train.main(flags + ["--train", "vision", "--out", str(tmp_path / "v")]) == 2
    assert capsys.readouterr().err == ("error: --train vision: this model has no vision tower (a text encoder only): "
                                       "nothing would train\n")


def test_weights_given_a_pipeline_or_run_folder_read_as_such_never_downloading(tmp_path, monkeypatch):
    """--weights DIR looked for stable-diffusion-v1-5/ inside a diffusers pipeline folder, and would have downloaded
    SD 1.5 into it. A pipeline folder is read as it is (CLIP-L from the weights folder), a run folder of ours as its
    newest checkpoint (with its own clip/)."""
    import download
    monkeypatch.setattr(download, "download", lambda url, dest: pytest.fail(f"downloaded {url}"))
    monkeypatch.setenv("UNIDIFF_WEIGHTS", str(tmp_path / "w"))
    m = UniDiff.tiny(v_prediction=True)
    m.save(tmp_path / "pipe")
    shutil.rmtree(tmp_path / "pipe" / "clip")  # a plain diffusers folder: SD's text encoder only
    m.clip.save(tmp_path / "w" / "clip-vit-large-patch14")
    flags = ["--data", "world", "--model", "sd15", *TINY[4:-2], "--steps", "1"]
    for weights, run in (("pipe", "a"), ("a", "b")):
        assert train.main(flags + ["--weights", str(tmp_path / weights), "--out", str(tmp_path / run)]) == 0
    starts = [json.loads((tmp_path / run / "run.json").read_text())["start"] for run in "ab"]
    assert (starts[0]["sd"], starts[0]["clip"]) == (str(tmp_path / "pipe"), str(tmp_path / "w" / "clip-vit-large-patch14"))
    assert (starts[1]["sd"], starts[1]["clip"]) == (str(tmp_path / "a" / "step_000001"),
                                                    str(tmp_path / "a" / "step_000001" / "clip"))


def test_resume_with_another_batch_size_reads_on_from_the_samples_seen(tmp_path, monkeypatch):
    """Resuming at batch 8 after 2 steps at batch 4 reads on from sample 8 (not step × 8 = 16, which skipped 8–15)
    and counts the samples really seen."""
    starts, real = [], train.Batches
    monkeypatch.setattr(train, "Batches", lambda *a: starts.append(a[-1]) or real(*a))
    run = tmp_path / "r"
    assert train.main(TINY + ["--steps", "2", "--save-every", "2", "--out", str(run)]) == 0
    assert train.main(["--resume", str(run), "--steps", "3", "--batch-size", "8"]) == 0
    assert starts == [0, 8]
    assert runs.read_state(run / "step_000003")["samples_seen"] == 8 + 8


def test_out_given_with_resume_is_refused_not_ignored(tmp_path, capsys):
    """--out with --resume wrote into the old run folder unsaid; now one line, and the old run's own folder is fine."""
    run = tmp_path / "r"
    assert train.main(TINY + ["--steps", "1", "--out", str(run)]) == 0
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--resume", str(run), "--out", str(tmp_path / "other")])
    assert e.value.code == 2 and "a resumed run goes on in its own folder" in capsys.readouterr().err
    assert train.parse_args(["--resume", str(run), "--out", str(run)]).out == str(run)


def test_train_size_on_a_folder_is_said_in_the_data_line(tmp_path, capsys):
    """--train-size on a folder logged the full image count: the data line now says how many train."""
    flags = cache_flags(world_folder(tmp_path / "set"))
    assert train.main(flags + ["--steps", "1", "--train-size", "4", "--out", str(tmp_path / "r")]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("data (train):"))
    assert "training on the first 4 of them (--train-size)" in line


def test_full_disk_reported_by_safetensors_keeps_previous_checkpoint(tmp_path, monkeypatch, capsys):
    """safetensors reports a full disk as SafetensorError, not OSError: it ended in a traceback, not the one line."""
    from safetensors import SafetensorError
    real_save = runs.save_safetensors
    def save(sd, path, metadata=None):
        if "step_000004" in str(path):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(sd, path, metadata)
    monkeypatch.setattr(runs, "save_safetensors", save)
    assert train.main(TINY + ["--steps", "4", "--save-every", "2", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "step_000002 is intact" in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["init", "log.jsonl", "run.json", "step_000002"]


def logged_flags(tmp_path):
    """A quick run that validates, in and out of domain (the same 4 test rows: quick)."""
    data = world_folder(tmp_path / "set", test=4)
    return cache_flags(data) + ["--eval-every", "2", "--ood-data", str(data)]


def test_the_run_logs_each_progress_line_and_validation_and_draws_curves(tmp_path, capsys):
    run = tmp_path / "r"
    assert train.main(logged_flags(tmp_path) + ["--steps", "4", "--out", str(run)]) == 0
    lines = [int(m[1]) for m in re.finditer(r"^step (\d+)/4 \|", capsys.readouterr().out, re.M)]
    log = runs.read_log(run)
    progress = [r for r in log if "total" in r]
    assert [r["step"] for r in progress] == lines == [2, 4]
    assert progress[0].keys() == {"step", "itc", "is", "rsc", "total", "lr", "img_s", "skipped"}
    checks = [r for r in log if "retrieval" in r]
    assert [r["step"] for r in checks] == [0, 2, 4] and len(log) == len(progress) + len(checks)
    for r in checks:
        assert r["retrieval"].keys() == {"test", "out of domain test"}
        assert all(0 <= r["retrieval"][split][f"{way}_r{k}"] <= 100
                   for split in r["retrieval"] for way in ("i2t", "t2i") for k in (1, 5, 10))
    assert Image.open(run / "curves.png").size[0] > 0


def test_resumed_run_logs_what_a_straight_run_logs(tmp_path, monkeypatch):
    # b stops after step 2 and saves; a kill after a checkpoint can leave later lines in the log: resuming drops them
    torch.manual_seed(0)
    flags = logged_flags(tmp_path) + ["--steps", "4", "--eval-every", "4", "--save-every", "2"]
    straight_and_interrupted(flags, tmp_path, monkeypatch)
    runs.log_line(tmp_path / "b", {"step": 3, "total": 1.0})
    with open(tmp_path / "b" / "log.jsonl", "a") as f:
        f.write('{"step": 3, "tot')  # a line cut short
    assert train.main(["--resume", str(tmp_path / "b")]) == 0
    a, b = ([{k: v for k, v in r.items() if k != "img_s"} for r in runs.read_log(tmp_path / r)] for r in "ab")
    assert [r["step"] for r in b] == [r["step"] for r in a] == [0, 2, 4, 4]
    assert b == a  # the same losses and retrieval, as the resume is exact
    assert (tmp_path / "b" / "curves.png").is_file()


def test_without_matplotlib_the_run_goes_on_and_says_so_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    run = tmp_path / "r"
    assert train.main(logged_flags(tmp_path) + ["--steps", "2", "--eval-every", "1", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.count("matplotlib is not installed") == 1 and "Traceback" not in out
    assert not (run / "curves.png").exists() and len(runs.read_log(run)) == 2 + 3  # lines at 1, 2; validations at 0, 1, 2


def events(run):
    """(tag, step, value or image) of every scalar and image in run/tensorboard's event files, all of them as written
    (TensorBoard's own readers drop some repeated steps: a duplicate would hide)."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    found = []
    for path in sorted((run / "tensorboard").glob("*tfevents*")):
        for e in map(Event.FromString, RawEventFileLoader(str(path)).Load()):
            found += [(v.tag, e.step, v.simple_value if v.HasField("simple_value") else
                       np.asarray(Image.open(io.BytesIO(v.image.encoded_image_string)))) for v in e.summary.value]
    return found


def test_tensorboard_shows_the_logs_numbers_and_the_sample_grids(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "r"
    assert train.main(logged_flags(tmp_path) + ["--steps", "4", "--tensorboard", "--out", str(run)]) == 0
    logged = {}
    for r in runs.read_log(run):
        logged.update({(("loss/" if k in ("itc", "is", "rsc", "total") else "train/") + k, r["step"]): v
                       for k, v in r.items() if k not in ("step", "retrieval")})
        logged.update({(f"retrieval/{split}/{k}", r["step"]): v for split, found in r.get("retrieval", {}).items()
                       for k, v in found.items()})
    shown = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    got = {(tag, e.step): e.value for tag in shown.Tags()["scalars"] for e in shown.Scalars(tag)}
    assert {"loss/total", "train/img_s", "train/skipped", "retrieval/out of domain test/t2i_r10"} <= {t for t, _ in got}
    assert got.keys() == logged.keys() and len(got) == 2 * 7 + 3 * 2 * 7  # 2 lines, 3 validations of 2 splits
    assert all(got[k] == pytest.approx(v, rel=1e-6) for k, v in logged.items())  # float32 there
    grids = shown.Images("samples")
    assert [g.step for g in grids] == [0, 2, 4]
    for g in grids:
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(g.encoded_image_string))),
                              np.asarray(Image.open(run / "samples" / f"step_{g.step:06d}.png")))


def test_resumed_run_shows_tensorboard_each_step_once_as_a_straight_run(tmp_path, monkeypatch):
    # b stops after step 2 and saves; a kill after a checkpoint can leave later steps in the events: resuming drops them
    from torch.utils.tensorboard import SummaryWriter
    torch.manual_seed(0)
    flags = logged_flags(tmp_path) + ["--steps", "4", "--eval-every", "4", "--save-every", "2", "--tensorboard"]
    straight_and_interrupted(flags, tmp_path, monkeypatch)
    with SummaryWriter(str(tmp_path / "b" / "tensorboard")) as later:
        later.add_scalar("loss/total", 1.0, 3)
        later.add_scalar("loss/total", 1.0, 4)
    assert train.main(["--resume", str(tmp_path / "b")]) == 0
    a, b = events(tmp_path / "a"), events(tmp_path / "b")
    assert len({(tag, step) for tag, step, _ in b}) == len(b)  # no step twice
    a, b = ({(tag, step): v for tag, step, v in ev if tag != "train/img_s"} for ev in (a, b))
    assert sorted(b) == sorted(a) and max(step for _, step in b) == 4
    assert [k for k in a if not np.array_equal(a[k], b[k])] == []  # the same losses, retrieval and grids


def test_tensorboard_without_the_package_is_refused_when_given_and_said_when_resumed(tmp_path, monkeypatch, capsys):
    run = tmp_path / "r"
    assert train.main(TINY + ["--steps", "1", "--tensorboard", "--out", str(run)]) == 0
    assert [(tag, step) for tag, step, _ in events(run) if tag == "loss/total"] == [("loss/total", 1)]
    for name in ("tensorboard", "torch.utils.tensorboard"):  # as if never installed
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--steps", "1", "--tensorboard", "--out", str(tmp_path / "s")])
    assert e.value.code == 2 and "--tensorboard: the tensorboard package is not installed" in capsys.readouterr().err
    assert train.main(["--resume", str(run), "--steps", "2"]) == 0  # the run's own --tensorboard: it goes on
    out = capsys.readouterr().out
    assert out.count("tensorboard is not installed") == 1 and "Traceback" not in out
    assert [r["step"] for r in runs.read_log(run)] == [1, 2]


def test_a_rank_other_than_0_leaves_the_logs_alone(tmp_path, monkeypatch):
    # Only rank 0 opens the logs. Without that guard the ranks would trim each other's event files as they open,
    # a race that the DDP test's count of event files can pass by chance: rank 1's own view, checked directly.
    run = tmp_path / "r"
    (run / "tensorboard").mkdir(parents=True)
    (run / "tensorboard" / "events.out.tfevents.0.host.1.0").write_bytes(b"rank 0's")
    (run / "log.jsonl").write_text('{"step": 5}\n')
    monkeypatch.setattr(runs, "master", lambda: False)
    runs.open_log(run, 2, tensorboard=True)  # a resume at step 2 would trim both, on rank 0
    assert run not in runs.TENSORBOARD and (run / "log.jsonl").read_text() == '{"step": 5}\n'
    assert [f.name for f in (run / "tensorboard").iterdir()] == ["events.out.tfevents.0.host.1.0"]
