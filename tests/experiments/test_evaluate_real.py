"""The leaderboard on the real backend (CPU, gloo) with the surrogate's prediction next to each measurement."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_evaluate_on_real_backend_reports_measured_and_predicted(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "experiments.evaluate",
        "backend=real",
        "scenarios=[tiny]",
        "policies=[coel]",
        "add_references=false",
        "seeds=1",
        "max_epochs=2",
        "logger=disabled",
        "progress_bar=false",
        "plots=false",
        f"hydra.run.dir={tmp_path}",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    board = (tmp_path / "leaderboard.md").read_text()
    assert "leaderboard (real backend)" in board and "Measured vs the surrogate's prediction" in board
    with (tmp_path / "leaderboard.csv").open() as f:
        row = next(csv.DictReader(f))
    measured, predicted = float(row["e2e_p95_s"]), float(row["pred_e2e_p95_s"])
    assert measured > 0 and predicted > 0 and measured != predicted  # a real measurement, not the model echoed
