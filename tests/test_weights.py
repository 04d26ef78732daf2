import json
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn

import runs
import train
from single_file import to_single_file
from unidiff import UniDiff
from download import CLIP_REPO, pretrained
from weights import WeightsError, find_weights, load_strict, read_safetensors, save_safetensors


def test_load_strict_names_bad_tensors():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    del sd["0.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["1.weight"] = torch.zeros(5, 5)
    with pytest.raises(WeightsError) as e:
        load_strict(model, sd, "x.safetensors")
    msg = str(e.value)
    assert "missing (1):\n    0.bias" in msg
    assert "unexpected (1):\n    extra.weight" in msg
    assert "1.weight: file (5, 5), model (2, 4)" in msg


def test_pickle_refused_never_opened(tmp_path):
    p = tmp_path / "model.ckpt"
    p.write_bytes(b"not even a pickle")  # never read: refused by name
    with pytest.raises(WeightsError, match="(?s)pickle checkpoints are refused.*weights_only=True"):
        read_safetensors(p)
    with pytest.raises(WeightsError, match="refused"):
        find_weights(tmp_path, ["model.safetensors"])


def test_truncated_safetensors_is_clear(tmp_path):
    p = tmp_path / "model.safetensors"
    save_safetensors({"a": torch.randn(100)}, p)
    p.write_bytes(p.read_bytes()[:-50])
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        read_safetensors(p)


# ---- the pretrained weights a user already has: an SD 1.x single file (--weights FILE or in the folder),
# a .ckpt named and refused with its conversion. train.main's own path, at tiny size, never the network.

def closed_port():
    with socket.socket() as s:  # bound, never listening: a download attempt fails at once
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("UNIDIFF_WEIGHTS", str(tmp_path / "weights"))
    return tmp_path / "weights"


def single_file_and_clip(folder, clip_root):
    """A tiny random SD 1.x single file in `folder` (the original layout) and CLIP's folder in `clip_root`."""
    m = UniDiff.tiny(seed=1)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(to_single_file(m.unet, m.vae, m.clip), folder / "v1-5-pruned-emaonly.safetensors")
    if clip_root is not None:
        m.clip.save(clip_root / CLIP_REPO.split("/")[-1])
    return m, folder / "v1-5-pruned-emaonly.safetensors"


TINY_SD15 = ["--data", "demo", "--model", "sd15", "--res", "16", "--batch-size", "4", "--steps", "1",
             "--eval-every", "0", "--warmup", "1"]


def test_train_from_single_file_and_clip_folder(offline, tmp_path):
    m, file = single_file_and_clip(tmp_path / "comfyui" / "checkpoints", offline)
    assert train.main(TINY_SD15 + ["--weights", str(file), "--out", str(tmp_path / "run")]) == 0
    start = json.loads((tmp_path / "run" / "run.json").read_text())["start"]
    assert start["sd"] == str(file.resolve()) and start["clip"] == str((offline / "clip-vit-large-patch14").resolve())
    assert not (file.parent / "clip-vit-large-patch14").exists()  # nothing written into the other app's folder
    loaded, _ = runs.load_start(tmp_path / "run")  # the model the run started from
    want = m.state_dict()
    assert loaded.state_dict().keys() == want.keys() and all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    # the same file found in the --weights folder, CLIP beside it there; another safetensors does not count
    save_safetensors({"lora_unet_x.alpha": torch.ones(1)}, file.parent / "a_lora.safetensors")
    (file.parent / "v1-5-pruned-emaonly.ckpt").write_bytes(b"never read")  # converted already: not in the way
    m.clip.save(file.parent / "clip-vit-large-patch14")
    assert pretrained(file.parent) == (file, file.parent / "clip-vit-large-patch14")


def test_ckpt_in_weights_folder_is_named_with_its_conversion(offline, tmp_path, capsys):
    folder = tmp_path / "models"
    folder.mkdir()
    ckpt = folder / "v1-5-pruned-emaonly.ckpt"
    ckpt.write_bytes(b"never read")  # refused by name: not even opened
    for weights in (folder, ckpt):
        assert train.main(TINY_SD15 + ["--weights", str(weights), "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert f"{ckpt}: pickle checkpoints are refused" in err and "Place these files" not in err
        assert "weights_only=True" in err and f"'{folder / 'v1-5-pruned-emaonly.safetensors'}'" in err

    # The command it gives really converts (run here on a pickle this test wrote itself).
    m, single = single_file_and_clip(tmp_path / "made", folder)
    torch.save({"state_dict": read_safetensors(single), "global_step": 7}, ckpt)
    with pytest.raises(WeightsError) as e:
        pretrained(folder)
    command = next(line for line in str(e.value).splitlines() if "python -c" in line).strip()
    subprocess.run(command.replace("python -c", f"{sys.executable} -c", 1), shell=True, check=True)
    sd_path, clip_path = pretrained(folder)
    assert sd_path == folder / "v1-5-pruned-emaonly.safetensors"
    loaded = UniDiff.from_pretrained(sd_path, clip=clip_path)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_single_file_without_clip_names_only_the_clip_files(offline, tmp_path, capsys):
    _, file = single_file_and_clip(offline, None)
    assert train.main(TINY_SD15 + ["--out", str(tmp_path / "run")]) == 2  # --weights: $UNIDIFF_WEIGHTS
    err = capsys.readouterr().err
    assert "Place these files (2;" in err and "stable-diffusion-v1-5" not in err
    for f in ("config.json", "model.safetensors"):
        assert f"{offline}/clip-vit-large-patch14/{f}    <- https://huggingface.co/{CLIP_REPO}/resolve/main/{f}" in err
    assert train.main(TINY_SD15 + ["--weights", str(file), "--out", str(tmp_path / "run")]) == 2
    assert "Place these files (2;" in capsys.readouterr().err
    assert train.main(TINY_SD15 + ["--weights", str(tmp_path / "typo.safetensors"), "--out", str(tmp_path / "r")]) == 2
    assert "typo.safetensors: no such file" in capsys.readouterr().err
