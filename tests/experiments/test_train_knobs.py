"""experiments.train with `knobs=coel_tuned`: CoEL tuned on train instances is the centre, written to tuned.json and
carried by the exported policy; a cached tuned.json is reused; a bad knobs name is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "WANDB_MODE": "offline"}


def train(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "experiments.train", "experiment=smoke", "scenario=tiny", "logger=disabled"]
    cmd += [f"hydra.run.dir={out}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def test_coel_tuned_centre_is_tuned_saved_and_exported(tmp_path):
    from agents.deployed import DeployedAgent

    proc = train(tmp_path / "a", "knobs=coel_tuned", "total_timesteps=128", "eval_every=null", "checkpoint_every=null")
    assert proc.returncode == 0, proc.stderr[-3000:]
    tuned = json.loads((tmp_path / "a" / "tuned.json").read_text())["tiny"]["coel"]
    assert tuned["instances"] == ["train0"] and tuned["trials"] == 2  # the smoke preset's budget, train split
    knobs = json.loads((tmp_path / "a" / "policy" / "policy.json").read_text())["env"]["knobs"]
    assert knobs["base"] == "coel_tuned" and knobs["centre"] == tuned["params"]
    agent = DeployedAgent(tmp_path / "a" / "policy")
    assert {k: getattr(agent.knobbed.base, k) for k in tuned["params"]} == tuned["params"]

    # a cached tuning (this run's tuned.json) is reused as is: another budget would give other knobs
    cached = tmp_path / "a" / "tuned.json"
    proc = train(tmp_path / "b", "knobs=coel_tuned", f"tuned={cached}", "tuning.trials=5", "total_timesteps=64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "b" / "env_spec.json").read_text())["knobs"]["centre"] == tuned["params"]


def test_bad_knobs_name_is_one_line(tmp_path):
    proc = train(tmp_path, "knobs=coel_tunned")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: knobs: 'coel_tunned' has no knobs; allowed: coel, greedy_popularity, coel_tuned"
    )
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "tuned.json").exists()
