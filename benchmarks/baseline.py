"""Export a git revision's `coel_env` as the importable package `coel_base`, for side-by-side benchmarks.

    python -m benchmarks.baseline [REV] [DEST]      (default: HEAD, /tmp/coel_baseline)
then `bench_env.py --baseline DEST` / `bench_surrogate --baseline DEST` time both versions in one run,
alternating trials, and report medians and the new/baseline ratio. Reads git only (`git archive`).
"""

from __future__ import annotations

import importlib
import io
import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def export(rev: str = "HEAD", dest: str | Path = "/tmp/coel_baseline") -> Path:
    dest = Path(dest)
    data = subprocess.run(["git", "archive", rev, "coel_env", "conf"], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    pkg = dest / "coel_base"
    if pkg.exists():
        subprocess.run(["rm", "-rf", str(pkg)], check=True)
    (dest / "coel_env").rename(pkg)
    for f in pkg.rglob("*.py"):
        f.write_text(re.sub(r"\bcoel_env\b", "coel_base", f.read_text()))
    return dest


def load(dest: str | Path):
    """Import `coel_base` from an exported baseline (its env module registers nothing new with gymnasium)."""
    sys.path.insert(0, str(dest))
    importlib.import_module("coel_base.env.vector")
    return importlib.import_module("coel_base")


if __name__ == "__main__":
    print(export(*sys.argv[1:]))
