"""Which action/observation spaces experiments.train accepts: `full` is planner-only (refused end to end, in one
line naming the alternatives); the knobs agent trains on either observation space."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from coel_env.errors import ConfigError
from experiments.train import check_cfg

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "WANDB_MODE": "offline"}
FULL = "env.action_space: 'full' is a planner-only space"


def _cfg(algo: str = "MaskablePPO", knobs: str | None = None, action_space: str = "full"):
    return OmegaConf.create(
        {
            "seed": 0,
            "n_envs": 2,
            "total_timesteps": 512,
            "eval_episodes": 1,
            "torch_threads": 1,
            "checkpoint_every": None,
            "train_instances": 2,
            "eval_every": None,
            "normalize_obs": True,
            "export": False,
            "progress_bar": False,
            "vec_env": "dummy",
            "knobs": knobs,
            "env": {"action_space": action_space, "observation_space": "default"},
            "agent": {"algo": algo, "policy": "MlpPolicy", "kwargs": {"n_steps": 64, "batch_size": 64}},
            "eval_baselines": ["static"],
            "resume": None,
        }
    )


@pytest.mark.parametrize("algo", ["MaskablePPO", "PPO", "A2C"])
def test_full_without_knobs_is_refused(algo):
    with pytest.raises(ConfigError, match=f"{FULL} \\({algo} cannot train on it.*knobs=coel.*env=edit.*env=threshold"):
        check_cfg(_cfg(algo))


@pytest.mark.parametrize(
    "knobs, action_space", [("coel_tuned", "full"), ("coel", "full"), (None, "edit"), (None, "threshold")]
)
def test_trainable_combinations_pass(knobs, action_space):
    check_cfg(_cfg("MaskablePPO" if action_space != "threshold" else "PPO", knobs, action_space))


def test_train_cli_refuses_full_with_maskable_ppo_in_one_line(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.train", "experiment=smoke", "scenario=tiny", "logger=disabled"]
    cmd += ["agent=maskable_ppo", "env=default", "knobs=null", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {FULL} (MaskablePPO cannot train on it")
    assert {p.name for p in out.iterdir()} <= {".hydra", "train.log"}  # refused before any work


def test_knobs_agent_trains_on_the_compact_observation(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.train", "experiment=smoke", "scenario=tiny", "logger=disabled"]
    cmd += ["env.observation_space=compact", "export=false", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    spec = json.loads((out / "env_spec.json").read_text())
    assert spec["kwargs"]["observation_space"] == "compact" and "plan" not in spec["obs_keys"]
    assert "pop_top" in spec["obs_keys"] and spec["knobs"]["base"] == "coel_tuned"
