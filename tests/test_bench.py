import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_bench_tiny_smoke(tmp_path):
    """tools/bench.py --tiny runs every case on the CPU and prints the table (speed is measured on a GPU, not here)."""
    out = subprocess.run([sys.executable, "-m", "tools.bench", "--tiny", "--json", str(tmp_path / "rows.json")],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert {(r["case"], r["impl"]) for r in rows} >= {
        ("sd", "diffusers as shipped"), ("sd", "ours"), ("clip", "transformers as shipped"), ("clip", "ours"),
        ("unidiff", "ours"), ("sample", "diffusers as shipped"), ("sample", "ours")}
    assert all(r["img_s"] > 0 for r in rows)
    assert "| unidiff | ours |" in out.stdout
    check_memory_rows(json.loads((tmp_path / "rows.json").read_text())["memory"], out.stdout)


def check_memory_rows(rows, stdout):
    """The memory table: each row measured (its own process), its trained numbers and fp32 state counted here
    from the model itself, its peak above that state."""
    import torch
    from lora import add_lora
    from unidiff import UniDiff
    m = UniDiff.tiny()
    total = sum(p.numel() for p in m.parameters())
    full = total - sum(p.numel() for p in m.vae.parameters())  # all but the frozen VAE
    adapters = add_lora(m, ["unet", "text", "vision"], 16, 16.0, torch.Generator().manual_seed(0))
    lora = sum(p.numel() for p in adapters.parameters())
    assert lora == sum(16 * (a.target[0].in_features + a.target[0].out_features) for a in adapters.values())
    assert [(r["lora"], r["cache"], r["ckpt"]) for r in rows] == [
        (lora_, cache, ckpt) for lora_ in (None, 16) for cache in (False, True) for ckpt in (False, True)]
    for r in rows:
        assert "failed" not in r, r
        trained = lora if r["lora"] else full
        assert r["trained"] == trained
        assert r["state_gb"] * 2**30 == (total + (lora if r["lora"] else 0) + 3 * trained) * 4
        assert r["peak_gb"] > r["state_gb"] and r["sec"] > 0
    assert "| --lora 16 --cache-latents --grad-ckpt | 0.1 M |" in stdout


def test_flops_cached_latents_save_the_vae_encoder_and_nothing_else(capsys):
    """tools/bench.py --flops: from cached latents each step costs its FLOPs from pixels less one VAE encode (none for
    CLIP's step, which never encodes); the table prints."""
    import math
    from tools import bench
    rows, vae = bench.step_flops(tiny=True, batch=2, res=32)
    assert vae["encode"] > 0 and len(rows) == 4
    for name, (pixels, cached) in rows.items():
        assert math.isclose(pixels - cached, 0 if name.startswith("CLIP") else vae["encode"], rel_tol=1e-9), name
    bench.print_flops(True, 2, 32)
    pixels, cached = rows["SD step (UNet trained)"]
    assert f"| SD step (UNet trained) | {pixels / 1e9:.2f} GFLOP | {cached / 1e9:.2f} GFLOP (-" in capsys.readouterr().out


@pytest.mark.parametrize("flags, says", [
    (["--cases", "sd,foo"], "--cases sd,foo: unknown foo; choose from sd,clip,unidiff,sample,memory"),  # empty table
    (["--batch", "0"], "--batch 0: images per training step, at least 1"),  # crashed in the model
    (["--res", "0"], "--res 0: the images' side in pixels, at least 1"),  # measured 512 px unsaid
])
def test_bad_flags_stop_with_one_line(flags, says):
    out = subprocess.run([sys.executable, "-m", "tools.bench", "--flops", *flags], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr
