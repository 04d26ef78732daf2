"""eval.py and sample.py end to end on a tiny run, and the metrics on inputs with known answers."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval as ev
import sample
import train
from weights import read_safetensors


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert train.main(["--data", "world", "--model", "tiny", "--res", "16", "--batch-size", "4", "--steps", "2", "--eval-every", "0",
                       "--ema", "0.5", "--vae-steps", "2", "--out", str(out)]) == 0
    return out


def test_eval_prints_the_table_side_by_side(run, capsys, tmp_path):
    assert ev.main(["--ckpt", str(run), "--n", "6", "--steps", "2", "--batch", "3", "--out", str(tmp_path / "t.md")]) == 0
    out = capsys.readouterr().out
    assert "| metric | pretrained | run (step_000002) |" in out
    assert f"judged by the pretrained CLIP: tiny initial weights ({run / 'init'})" in out
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in out.splitlines() if line.startswith("| ")}
    for name, _, _ in ev.ROWS:
        assert all(math.isfinite(float(v)) for v in rows[name])
    assert (tmp_path / "t.md").read_text().startswith("| metric |")


def test_sample_writes_a_grid(run, tmp_path, capsys):
    out = tmp_path / "g.png"
    assert sample.main(["--ckpt", str(run / "step_000002"), "--prompt", "a red dress", "--prompt", "a pair of blue shoes",
                        "--n", "3", "--steps", "2", "--height", "16", "--width", "24", "--out", str(out)]) == 0
    img = np.asarray(Image.open(out))
    assert img.shape == (2 * 16, 3 * 24, 3) and img.std() > 0
    assert sample.main(["--ckpt", str(tmp_path), "--prompt", "x"]) == 2  # not a run: one clear line
    assert "no checkpoint here" in capsys.readouterr().err


def test_sample_and_eval_refuse_counts_they_cannot_run(run, tmp_path, capsys):
    """--n 0 crashed in the text tower, --steps 0 divided by zero, --batch 0 crashed in range(), --steps over
    1000 sampled every step at timestep 1 and wrote the result as if all were well, --height 0 drew the run's
    size, --width -16 crashed in the sampler: each is now one line."""
    out = ["--out", str(tmp_path / "g.png")]
    cases = [(sample.main, ["--prompt", "x", "--n", "0"] + out, "--n 0: images per prompt, at least 1"),
             (sample.main, ["--prompt", "x", "--steps", "0"] + out, "--steps 0: DDIM steps, from 1 to 1000"),
             (sample.main, ["--prompt", "x", "--n", "1", "--steps", "1001"] + out, "--steps 1001: DDIM steps"),
             (sample.main, ["--prompt", "x", "--height", "0"] + out, "--height 0: pixels, at least 1"),  # ignored
             (sample.main, ["--prompt", "x", "--width", "-16"] + out, "--width -16: pixels, at least 1"),  # traceback
             (ev.main, ["--n", "2", "--steps", "0"], "--steps 0: DDIM steps, from 1 to 1000"),
             (ev.main, ["--n", "2", "--steps", "1001"], "--steps 1001: DDIM steps"),
             (ev.main, ["--n", "2", "--steps", "2", "--batch", "0"], "--batch 0: images generated per batch")]
    for main, flags, says in cases:
        with pytest.raises(SystemExit) as e:
            main(["--ckpt", str(run)] + flags)
        assert e.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_weights_ema_or_live(run, tmp_path, monkeypatch, capsys):
    ckpt = run / "step_000002"
    live = read_safetensors(ckpt / "live.safetensors")
    ema = read_safetensors(ckpt / "unet" / "diffusion_pytorch_model.safetensors")  # the model folders: EMA
    assert any(not torch.equal(ema[k[5:]], v) for k, v in live.items() if k.startswith("unet."))
    loaded = {}
    def evaluate(model, judge, test_set, args):  # records the run's weights instead of measuring them
        if model is not judge:
            loaded[args.weights] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return dict.fromkeys((key for _, key, _ in ev.ROWS), 0.0)
    monkeypatch.setattr(ev, "evaluate", evaluate)
    for weights in (None, "ema", "live"):
        assert ev.main(["--ckpt", str(run)] + (["--weights", weights] if weights else [])) == 0
    assert "(ema weights)" in capsys.readouterr().err
    assert all(torch.equal(loaded["live"][k], v) for k, v in live.items())
    unet = {k[5:]: v for k, v in loaded["ema"].items() if k.startswith("unet.")}
    assert unet.keys() == ema.keys() and all(torch.equal(unet[k], v) for k, v in ema.items())
    assert all(torch.equal(loaded[None][k], v) for k, v in loaded["ema"].items())  # EMA by default

    grids = {}
    for weights in ("ema", "live"):
        out = tmp_path / f"{weights}.png"
        assert sample.main(["--ckpt", str(run), "--prompt", "a red dress", "--n", "2", "--steps", "2",
                            "--weights", weights, "--out", str(out)]) == 0
        grids[weights] = np.asarray(Image.open(out))
    assert (grids["ema"] != grids["live"]).any()
    # a run without --ema has no EMA to ask for: one clear line
    shutil.copytree(ckpt, tmp_path / "no_ema", ignore=shutil.ignore_patterns("live.safetensors"))
    assert sample.main(["--ckpt", str(tmp_path / "no_ema"), "--prompt", "x", "--weights", "ema"]) == 2
    assert "has no EMA weights (its run trained without --ema): use --weights live" in capsys.readouterr().err


def test_retrieval_counts_equal_captions_as_correct():
    torch.manual_seed(0)
    txt = F.normalize(torch.randn(4, 8), dim=-1)
    r = ev.retrieval(txt.clone(), txt, ["a", "b", "c", "d"])
    assert r["i2t_r1"] == r["t2i_r1"] == 100 and r["chance_r1"] == 25
    img = txt[[1, 0, 2, 3]]  # images 0 and 1 swapped: wrong unless their captions are equal
    assert ev.retrieval(img, txt, ["a", "b", "c", "d"])["i2t_r1"] == 50
    assert ev.retrieval(img, txt, ["a", "a", "c", "d"])["i2t_r1"] == 100


def test_frechet_and_collapse_on_known_inputs():
    torch.manual_seed(0)
    a = torch.randn(500, 4)
    assert abs(ev.frechet(a, a)) < 1e-6
    assert ev.frechet(a, a + 3) == pytest.approx(4 * 9, rel=1e-6)  # a shift moves only the means
    b = torch.randn(500, 4) * 2  # Σb = 4 I: tr Σa + tr Σb − 2 tr (Σa^½ Σb Σa^½)^½ ≈ 4 + 16 − 16
    assert ev.frechet(a, b) == pytest.approx(4, abs=1.5)
    assert ev.collapse(torch.eye(3)) == 0 and ev.collapse(F.normalize(torch.ones(3, 2), dim=-1)) == pytest.approx(1)


def test_eval_needs_two_images_and_says_so(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--ckpt", str(run), "--n", "1"])
    assert e.value.code == 2 and "FD fits a covariance to the generated images, which needs at least 2" in capsys.readouterr().err
    root = tmp_path / "one_test"  # a folder whose test split has a single pair
    root.mkdir()
    for i, split in enumerate(["train", "train", "test"]):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(root / f"{i}.png")
    (root / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{i}.png", "text": f"a photo {i}", "split": s}) + "\n"
        for i, s in enumerate(["train", "train", "test"])))
    assert ev.main(["--ckpt", str(run), "--data", str(root), "--n", "6", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "the test split has 1 pair; FD and collapse need at least 2" in err and "Traceback" not in err


def test_portrait_run_trains_validates_samples_and_evaluates_at_its_resolution(tmp_path, monkeypatch, capsys):
    root = tmp_path / "portraits"  # 2:3 photos, as the fashion sets are
    root.mkdir()
    rows = []
    for i in range(8):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (45, 30, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a person in outfit {i}", "split": "test" if i < 2 else "train"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    flags = ["--data", str(root), "--model", "tiny", "--batch-size", "2", "--vae-steps", "2", "--eval-every", "1"]
    torch.manual_seed(0)
    assert train.main(flags + ["--res", "16x24", "--steps", "1", "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["args"]["res"] == "16x24"
    grid = np.asarray(Image.open(out / "samples" / "step_000001.png"))
    assert grid.shape == (3 * 24, 2 * 16, 3)  # real, start and current rows of the 2 test captions, each 16x24
    assert train.main(["--resume", str(out), "--steps", "2"]) == 0  # the W x H run continues
    assert (out / "step_000002" / "state.json").is_file()

    assert sample.main(["--ckpt", str(out), "--prompt", "a person", "--n", "2", "--steps", "2",
                        "--out", str(tmp_path / "g.png")]) == 0
    assert np.asarray(Image.open(tmp_path / "g.png")).shape == (24, 2 * 16, 3)  # the run's W x H by default
    shapes, real_generate = [], ev.generate
    def generate(*a):  # records the images' shape
        images = real_generate(*a)
        shapes.append(tuple(images.shape))
        return images
    monkeypatch.setattr(ev, "generate", generate)
    capsys.readouterr()
    assert ev.main(["--ckpt", str(out), "--n", "2", "--steps", "2"]) == 0
    assert shapes == [(2, 24, 16, 3)] * 2 and "2 generated at 16x24 px" in capsys.readouterr().err

    # sides the model cannot take: one clear line, before the tiny VAE is fitted
    assert train.main(flags + ["--res", "18x24", "--steps", "1", "--out", str(tmp_path / "bad")]) == 2
    out_text, err = capsys.readouterr()
    assert "18x24 px: this model needs width and height in multiples of 4" in err and "Traceback" not in err
    assert "fitting the tiny VAE" not in out_text
    assert sample.main(["--ckpt", str(out), "--prompt", "x", "--width", "18"]) == 2
    assert "18x24 px: this model needs width and height in multiples of 4" in capsys.readouterr().err
    for main, argv in ((train.main, flags + ["--res", "16x"]), (ev.main, ["--ckpt", str(out), "--res", "16x"])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "--res: resolution '16x': give WIDTHxHEIGHT" in capsys.readouterr().err
