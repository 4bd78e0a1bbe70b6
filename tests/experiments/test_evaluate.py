"""The leaderboard harness end to end in a subprocess with a tiny budget."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from coel_env.benchmark import instances

ROOT = Path(__file__).resolve().parents[2]


def _evaluate(out: Path, *overrides: str) -> None:
    """`python -m experiments.evaluate` on tiny into `out`, W&B off; it must succeed."""
    cmd = [sys.executable, "-m", "experiments.evaluate", "scenarios=[tiny]", *overrides]
    cmd += ["logger=disabled", "progress_bar=false", f"hydra.run.dir={out}"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_evaluate_end_to_end(tmp_path):
    out = tmp_path / "run"
    policies = "policies=[static_linear,greedy_popularity,eplb]"
    _evaluate(out, policies, "seeds=2", "max_epochs=2", "tuning.trials=2", "tuning.instances=1", "tuning.epochs=2")
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    # the listed policies, then the score's references (static_linear is listed), ranked on the score
    assert {r["policy"] for r in rows} == {"static_linear", "greedy_popularity", "eplb", "coel_tuned", "eplb_tuned"}
    scores = [float(r["score_raw"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    test = [[i.routing_seed, i.seed] for i in instances("test", 2)]
    for r in rows:
        assert int(r["episodes"]) == 2 and int(r["epochs"]) == 2
        assert float(r["return"]) < 0 and 0.0 <= float(r["slo_attainment"]) <= 1.0
        assert float(r["slo_attainment_lo"]) <= float(r["slo_attainment"]) <= float(r["slo_attainment_hi"]) <= 1.0
        cfg = json.loads(r["config"])
        assert cfg["policy"] == r["policy"] and cfg["instances"] == test and cfg["env"]["scenario"] == "tiny"
        assert cfg["split"] == "test" and r["score_version"] == "coel-score-v1"
    eps = list(csv.DictReader((out / "episodes.csv").open()))
    assert len(eps) == 10 and {e["instance"] for e in eps} == {"test0", "test1"}
    tuned = json.loads((out / "tuned.json").read_text())
    assert set(tuned["tiny"]) == {"coel", "eplb"} and tuned["tiny"]["coel"]["instances"] == ["train0"]
    md = (out / "leaderboard.md").read_text()
    assert "## tiny" in md and "Ranked on the official score" in md and rows[0]["config_id"] in md
    assert "at least 10" in md  # two instances: the report warns
    assert (out / "leaderboard_score.png").stat().st_size > 1000
    assert not (out / "episodes_partial.csv").exists()  # a completed run leaves episodes.csv only


KILLED_AT_THIRD_EPISODE = """
import os, runpy, sys
import agents.rollout as rollout
calls, run = [0], rollout.run_episode
def run_episode(*a, **k):
    calls[0] += 1
    if calls[0] == 3:  # the second instance's first episode: the process dies as under a hard timeout
        os._exit(137)
    return run(*a, **k)
rollout.run_episode = run_episode  # what experiments.evaluate imports
sys.argv = ["evaluate", *sys.argv[1:]]
runpy.run_module("experiments.evaluate", run_name="__main__", alter_sys=True)
"""


def test_a_killed_run_keeps_the_episodes_of_its_completed_instances(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", KILLED_AT_THIRD_EPISODE, "scenarios=[tiny]", "policies=[static_linear,eplb]"]
    cmd += ["add_references=false", "seeds=2", "max_epochs=1", "logger=disabled", "progress_bar=false"]
    cmd += [f"hydra.run.dir={out}"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert not (out / "episodes.csv").exists()
    eps = list(csv.DictReader((out / "episodes_partial.csv").open()))
    assert sorted((e["policy"], e["instance"]) for e in eps) == [("eplb", "test0"), ("static_linear", "test0")]


def test_time_budget_reports_the_completed_instances(tmp_path):
    """time_budget_s: no instance starts after the budget (here 0: only the first runs), and the leaderboard says
    how many of the asked instances it reports; every episode of that instance is there for every policy."""
    out = tmp_path / "run"
    _evaluate(
        out, "policies=[static_linear,eplb]", "add_references=false", "seeds=3", "max_epochs=1", "time_budget_s=0"
    )
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert {r["policy"] for r in rows} == {"static_linear", "eplb"} and all(int(r["episodes"]) == 1 for r in rows)
    assert all(
        json.loads(r["config"])["instances"] == [[i.routing_seed, i.seed] for i in instances("test", 1)] for r in rows
    )
    eps = list(csv.DictReader((out / "episodes.csv").open()))
    assert sorted((e["policy"], e["instance"]) for e in eps) == [("eplb", "test0"), ("static_linear", "test0")]
    assert "Stopped by `time_budget_s`" in (out / "leaderboard.md").read_text()
