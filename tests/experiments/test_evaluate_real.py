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
    assert "## Ranking: measured vs the surrogate's prediction" in board
    with (tmp_path / "leaderboard.csv").open() as f:
        row = next(csv.DictReader(f))
    measured, predicted = float(row["e2e_p95_s"]), float(row["pred_e2e_p95_s"])
    assert measured > 0 and predicted > 0 and measured != predicted  # a real measurement, not the model echoed


def test_surrogate_ranking_and_kendall_tau():
    """Measured vs predicted order of the policies (bounds left out) and Kendall τ between them."""
    import pytest

    from experiments.evaluate import add_surrogate_ranking, ranking_markdown

    def row(policy, kind, real, pred):
        return {"scenario": "s", "policy": policy, "kind": kind, "score_raw": real, "pred_score_raw": pred}

    rows = [row("a", "baseline", 0.9, 0.7), row("b", "baseline", 0.8, 0.8), row("c", "reference", 0.5, 0.4)]
    rows.append(row("oracle", "bound", 1.0, 0.1))
    got = add_surrogate_ranking(rows)
    assert got["n"] == 3 and got["tau"] == pytest.approx(1 / 3)  # one discordant pair of three
    assert [(r["real_order"], r["pred_rank"]) for r in rows] == [(1, 2), (2, 1), (3, 3), ("bound", "bound")]
    text = "\n".join(ranking_markdown(rows))
    assert "Kendall τ = 0.333" in text and "| 1 | a | 0.9000 | 2 | 0.7000 |" in text
    assert add_surrogate_ranking([{"kind": "baseline", "score_raw": 1.0}]) is None  # no predictions: nothing
