"""The README runs as written: its Python snippets, each in a fresh interpreter in a scratch folder where the
README's quick training command has made `outputs/quickstart/policy` (what the SB3-free example loads)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
QUICK_TRAIN = next(line for line in README.splitlines() if "hydra.run.dir=outputs/quickstart" in line)
ENV = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A scratch folder holding the policy the README's quick training command writes."""
    out = tmp_path_factory.mktemp("readme")
    args = shlex.split(QUICK_TRAIN.split("#")[0])
    assert args[:3] == ["python", "-m", "experiments.train"]
    proc = subprocess.run([sys.executable, *args[1:]], cwd=out, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "outputs" / "quickstart" / "policy" / "policy.json").is_file()
    return out


def test_readme_has_python_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, workdir):
    proc = subprocess.run(
        [sys.executable, "-c", SNIPPETS[index]], cwd=workdir, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"README snippet {index + 1} failed:\n{SNIPPETS[index]}\n{proc.stderr[-2000:]}"
