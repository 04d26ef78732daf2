"""The layout: the core (the root's modules) never imports tools/; each tool runs as `python -m tools.NAME`."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imported(path):
    """The top-level package of every module a file imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_never_imports_tools():
    core = sorted(REPO.glob("*.py"))
    assert core
    assert [p.name for p in core if "tools" in imported(p)] == []


@pytest.mark.parametrize("name", ["bench", "ablation", "judge", "prepare"])
def test_tools_run_as_modules(name):
    out = subprocess.run([sys.executable, "-m", f"tools.{name}", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "usage:" in out.stdout
