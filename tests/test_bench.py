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
