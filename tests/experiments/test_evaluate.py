"""The leaderboard harness end to end in a subprocess with a tiny budget."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_evaluate_end_to_end(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "experiments.evaluate",
        "scenarios=[tiny]",
        "policies=[static_linear,greedy_popularity,eplb]",
        "seeds=2",
        "max_epochs=2",
        "logger=disabled",
        "progress_bar=false",
        f"hydra.run.dir={out}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert [r["policy"] for r in rows] == ["static_linear", "greedy_popularity", "eplb"]
    for r in rows:
        assert int(r["episodes"]) == 2 and int(r["epochs"]) == 2
        assert float(r["return"]) < 0 and 0.0 <= float(r["slo_attainment"]) <= 1.0
        cfg = json.loads(r["config"])
        assert cfg["policy"] == r["policy"] and cfg["seeds"] == [0, 1] and cfg["env"]["scenario"] == "tiny"
    eps = list(csv.DictReader((out / "episodes.csv").open()))
    assert len(eps) == 6
    md = (out / "leaderboard.md").read_text()
    assert "## tiny" in md and "± " in md and rows[0]["config_id"] in md
    assert (out / "leaderboard_return.png").stat().st_size > 1000
