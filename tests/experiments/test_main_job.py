"""`make run`'s job end to end with a tiny budget: train → evaluate → export → comparison report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_main_job_smoke(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "experiments.main",
        "experiment=smoke",
        "scenario=tiny",
        "seeds=1",
        "eval_epochs=4",
        "policies=[static_linear,eplb]",
        "eval_overrides=['tuning.trials=2','tuning.instances=1','tuning.epochs=2']",
        f"hydra.run.dir={tmp_path}",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert f"Everything is under {tmp_path}" in proc.stdout
    assert (Path(summary["policy"]) / "actor.onnx").is_file()
    board = Path(summary["leaderboard"]).read_text()
    assert "agent:train" in board and "eplb" in board and "static_linear" in board
    report = Path(summary["report"]).read_text()
    assert "agent:train vs the best baseline" in report and "test instances" in report  # the headline
    for section in ("## Training runs", "## Learning curves", "## Leaderboard", "## Pareto fronts", "## Placements"):
        assert section in report
    compare = tmp_path / "compare"
    assert {
        "learning_curves.png",
        "pareto_latency_quality.png",
        "pareto_latency_energy.png",
        "placement_tiny_eplb.png",
        "report.html",
    } <= {p.name for p in compare.iterdir()}
    assert "<table>" in (compare / "report.html").read_text()
    assert list((compare / "wandb").glob("offline-run-*"))


def test_compare_rejects_a_non_run_directory(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "experiments.compare",
        f"runs=[{tmp_path}]",
        f"hydra.run.dir={tmp_path / 'out'}",
        "logger=disabled",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"error: runs: '{tmp_path}' is not a training run directory (no progress.csv)"
    )
