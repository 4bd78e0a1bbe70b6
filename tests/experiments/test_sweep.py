"""Hydra sweeps with the default settings: the joblib launcher and the default subprocess vector env."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agents.tracking import read_offline_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # two loky workers start torch/SB3 (~1 min on 2 busy cores)
def test_joblib_sweep_with_subprocess_vec_env(tmp_path):
    """`-m hydra/launcher=joblib seed=0,1` used to die in every SubprocVecEnv child (`cannot find context for
    'loky'`, then BrokenPipeError): a loky worker's start method leaked into the children."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "experiments.train",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "seed=0,1",
        "experiment=smoke",
        "scenario=tiny",
        "vec_env=subproc",  # the default (the smoke preset picks dummy)
        "total_timesteps=128",
        "eval_every=null",
        "checkpoint_every=null",
        "export=false",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "cannot find context" not in out and "BrokenPipeError" not in out
    groups = set()
    for job, seed in ((0, 0), (1, 1)):
        summary = json.loads((sweep / str(job) / "train_summary.json").read_text())
        assert summary["seed"] == seed and summary["timesteps"] >= 128
        assert (sweep / str(job) / "model.zip").is_file()
        (run,) = (sweep / str(job) / "wandb").glob("offline-run-*")
        record = read_offline_run(run)
        assert record["job_type"] == "train" and record["name"] == f"PPO-tiny-s{seed}"
        groups.add(record["group"])
    assert groups == {"sweep-sweep"}  # one W&B group per sweep (its folder's name)
