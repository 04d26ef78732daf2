import json
import subprocess
import sys


def test_bench_tiny_smoke(tmp_path):
    """bench.py --tiny runs every case on the CPU and prints the table (speed is measured on a GPU, not here)."""
    out = subprocess.run([sys.executable, "bench.py", "--tiny", "--json", str(tmp_path / "rows.json")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert {(r["case"], r["impl"]) for r in rows} >= {
        ("sd", "diffusers as shipped"), ("sd", "ours"), ("clip", "transformers as shipped"), ("clip", "ours"),
        ("unidiff", "ours"), ("sample", "diffusers as shipped"), ("sample", "ours")}
    assert all(r["img_s"] > 0 for r in rows)
    assert "| unidiff | ours |" in out.stdout


def test_flops_cached_latents_save_the_vae_encoder_and_nothing_else(capsys):
    """bench.py --flops: from cached latents each step costs its FLOPs from pixels less one VAE encode (none for
    CLIP's step, which never encodes); the table prints."""
    import math
    import bench
    rows, vae = bench.step_flops(tiny=True, batch=2, res=32)
    assert vae["encode"] > 0 and len(rows) == 4
    for name, (pixels, cached) in rows.items():
        assert math.isclose(pixels - cached, 0 if name.startswith("CLIP") else vae["encode"], rel_tol=1e-9), name
    bench.print_flops(True, 2, 32)
    pixels, cached = rows["SD step (UNet trained)"]
    assert f"| SD step (UNet trained) | {pixels / 1e9:.2f} GFLOP | {cached / 1e9:.2f} GFLOP (-" in capsys.readouterr().out
