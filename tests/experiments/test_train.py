"""Training (tiny runs as subprocesses, CleanRL style), resume, export parity and the deployment-policy loader."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from agents.checkpoint import read_checkpoint
from agents.deployment_policy import DeploymentPolicy, PolicyLoadError

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "WANDB_MODE": "offline"}


def train(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "experiments.train",
        "experiment=smoke",
        "scenario=tiny",
        f"hydra.run.dir={out}",
        *overrides,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def evaluate(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The leaderboard CLI with the smallest tuning budget, quiet, into `out` (`overrides` after the defaults)."""
    quiet = ["tuning.instances=1", "tuning.epochs=2", "logger=disabled", "progress_bar=false", "plots=false"]
    cmd = [sys.executable, "-m", "experiments.evaluate", *quiet, *overrides, f"hydra.run.dir={out}"]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train")
    proc = train(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_training_writes_model_policy_checkpoints_and_wandb(trained):
    summary = json.loads((trained / "train_summary.json").read_text())
    assert summary["timesteps"] >= 512 and summary["scenario"] == "tiny"
    assert read_checkpoint(trained / "model.zip").num_timesteps == summary["timesteps"]
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["ckpt_256_steps.zip", "ckpt_512_steps.zip"]
    assert read_checkpoint(trained / "checkpoints" / "ckpt_256_steps.zip").num_timesteps == 256
    assert sorted(p.name for p in (trained / "policy").iterdir()) == ["actor.onnx", "integrity.json", "policy.json"]
    assert not list(trained.glob(".*.tmp*")), "temporary files left behind"
    assert list((trained / "wandb").glob("offline-run-*")), "no W&B offline run directory"
    evals = summary["evaluations"]
    assert evals and all(np.isfinite(e["agent"]["return"]) for e in evals)
    assert np.isfinite(evals[-1]["best_baseline_return"])
    progress = (trained / "progress.csv").read_text().splitlines()
    assert "eval/agent_return" in progress[0] and "eval/agent_score_raw" in progress[0]
    rows = list(csv.DictReader((trained / "progress.csv").open()))
    evals = [r for r in rows if r.get("eval/agent_score_raw")]
    assert evals and all(r["eval/timesteps"] for r in evals)  # learning curves have their x
    assert len(evals) == 2 and all(r["eval/static_score_raw"] for r in evals)  # baselines: a value at every eval
    assert summary["train_instances"][0] == "train0" and summary["eval_instances"] == ["val0"]


def test_resume_continues_from_checkpoint(trained, tmp_path):
    ckpt = trained / "checkpoints" / "ckpt_256_steps.zip"
    proc = train(tmp_path, f"resume={ckpt}", "total_timesteps=256", "export=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["timesteps"] >= 512  # 256 restored + 256 more, counter not reset
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["ckpt_512_steps.zip"]  # next multiple


def test_resume_from_truncated_checkpoint_is_one_line(trained, tmp_path):
    data = (trained / "checkpoints" / "ckpt_256_steps.zip").read_bytes()
    cut = tmp_path / "cut.zip"
    cut.write_bytes(data[: len(data) // 2])
    proc = train(tmp_path / "run", f"resume={cut}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: resume: checkpoint '{cut}' is not a readable zip (truncated or corrupt?): BadZipFile"
    )
    assert not (tmp_path / "run" / "model.zip").exists() and not (tmp_path / "run" / "wandb").exists()


def test_resume_from_missing_checkpoint_is_one_line(tmp_path):
    proc = train(tmp_path, "resume=/nonexistent/ckpt.zip")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "error: resume: no checkpoint at '/nonexistent/ckpt.zip'"


def _flat_env(trained: Path):
    from agents.envs import make_env_from_spec

    return make_env_from_spec(json.loads((trained / "policy" / "policy.json").read_text())["env"])


def test_exported_knobs_policy_matches_sb3(trained):
    from agents.sb3 import load_model

    ckpt = read_checkpoint(trained / "model.zip")
    model = load_model(ckpt)
    rms, clip = ckpt.obs_normalization()
    mean, var = rms.mean, rms.var
    policy = DeploymentPolicy(trained / "policy")
    env = _flat_env(trained)
    obs, _ = env.reset(seed=3)
    batch = [obs]
    for _ in range(6):
        obs, *_ = env.step(env.action_space.sample())
        batch.append(obs)
    obs = np.stack(batch)
    ours = policy.act(obs)
    norm = np.clip((obs - mean) / np.sqrt(var + 1e-8), -clip, clip).astype(np.float32)
    ref = model.predict(norm, deterministic=True)[0]
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert ours.shape == (7, env.action_space.shape[0])


def test_exported_masked_multidiscrete_policy_matches_sb3(tmp_path):
    """MaskablePPO on the `full` space: ONNX logits + masks give SB3's deterministic masked actions."""
    from sb3_contrib import MaskablePPO

    from agents.export import export_policy
    from agents.sb3 import make_flat_env

    env = make_flat_env({"scenario": "tiny", "max_epochs": 8, "action_space": "full"})
    model = MaskablePPO("MlpPolicy", env, n_steps=32, batch_size=32, n_epochs=1, seed=0, device="cpu")
    model.learn(32)
    export_policy(model, tmp_path, env_spec={"id": "CoEL-v0", "kwargs": {"scenario": "tiny"}})
    policy = DeploymentPolicy(tmp_path)
    obs, _ = env.reset(seed=1)
    for _ in range(3):
        mask = env.unwrapped.action_masks()
        ref = model.predict(obs, deterministic=True, action_masks=mask)[0]
        np.testing.assert_array_equal(policy.act(obs, mask), ref)
        assert mask.reshape(-1)[np.cumsum([0, *policy.nvec[:-1]]) + policy.act(obs, mask)].all()
        obs, *_ = env.step(ref)
    from agents.deployed import DeployedAgent

    agent = DeployedAgent(tmp_path)
    assert agent.incompatibility(gym.make("CoEL-v0", scenario="tiny", action_space="full", max_epochs=2)) is None
    other = gym.make("CoEL-v0", scenario="tiny", action_space="threshold", max_epochs=2)
    assert "with a MultiDiscrete action of shape" in agent.incompatibility(other)  # same observation, other action


@pytest.mark.parametrize(
    "tamper, message",
    [
        (
            lambda d: (d / "actor.onnx").write_bytes((d / "actor.onnx").read_bytes() + b"x"),
            "does not match its SHA-256",
        ),
        (
            lambda d: _edit_meta(d, lambda m: m.update(algorithm="DQN"), reseal=False),
            "'policy.json' in .* does not match",
        ),
        (lambda d: _reseal(d, (d / "policy.json").write_text("{not json")), "not valid JSON"),
        (lambda d: _edit_meta(d, lambda m: m.pop("action")), "lacks field 'action'"),
        (lambda d: _edit_meta(d, lambda m: m.update(format="pickle")), "unsupported"),
        (lambda d: _edit_meta(d, lambda m: m.update(version=1)), "unsupported"),
        (lambda d: _edit_meta(d, lambda m: m.update(onnx="../../etc/passwd")), "missing from"),
        (lambda d: _edit_meta(d, lambda m: m.update(onnx_sha256="0" * 64)), "does not match onnx_sha256"),
        (lambda d: _edit_meta(d, lambda m: m.update(observation={})), "malformed observation"),
        (lambda d: (d / "actor.onnx").unlink(), "missing from"),
        (lambda d: (d / "integrity.json").unlink(), "has no integrity.json"),
    ],
)
def test_deployment_policy_refuses_tampered_directories(trained, tmp_path, tamper, message):
    d = tmp_path / "policy"
    shutil.copytree(trained / "policy", d)
    tamper(d)
    with pytest.raises(PolicyLoadError, match=message) as err:
        DeploymentPolicy(d)
    assert "\n" not in str(err.value)


def _edit_meta(d: Path, fn, reseal: bool = True) -> None:
    meta = json.loads((d / "policy.json").read_text())
    fn(meta)
    (d / "policy.json").write_text(json.dumps(meta))
    if reseal:  # a consistent integrity list: the loader's other checks still refuse
        _reseal(d)


def _reseal(d: Path, _=None) -> None:
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir() if p.name != "integrity.json"}
    (d / "integrity.json").write_text(json.dumps({"format": "coel-policy-integrity", "version": 1, "sha256": files}))


def test_exported_policy_runs_in_the_leaderboard(trained, tmp_path):
    proc = evaluate(
        tmp_path,
        "scenarios=[tiny]",
        f"policies=[static_linear,{trained}/policy]",
        "seeds=2",
        "max_epochs=4",
        "tuning.trials=2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    board = (tmp_path / "leaderboard.md").read_text()
    assert f"agent:{trained.name}" in board and "static_linear" in board


def test_gym_make_registered():
    import coel_env  # noqa: F401

    assert "CoEL-v0" in gym.registry


def test_export_cli_reexports_a_checkpoint(trained, tmp_path):
    out = tmp_path / "policy256"
    cmd = [sys.executable, "-m", "experiments.export", f"run={trained}", f"out={out}", "checkpoint=ckpt_256_steps"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    policy = DeploymentPolicy(out)
    assert policy.env_spec["knobs"]["base"] == "coel_tuned" and "plan" not in policy.env_spec["obs_keys"]
    bad = subprocess.run(
        [sys.executable, "-m", "experiments.export", f"run={tmp_path}"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "has no env_spec.json" in bad.stderr.strip().splitlines()[-1]


def test_export_cli_never_replaces_the_run_it_exports(trained):
    """`out=<run>` used to move the whole training run away and delete it; now one line, and the run is intact."""
    before = {str(p.relative_to(trained)): p.stat().st_mtime_ns for p in trained.rglob("*")}
    cmd = [sys.executable, "-m", "experiments.export", f"run={trained}", f"out={trained}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: out: '{trained}' is the run directory")
    assert {str(p.relative_to(trained)): p.stat().st_mtime_ns for p in trained.rglob("*")} == before


def test_deployment_policy_refuses_bad_observations_of_a_trained_policy(trained):
    from agents.deployment_policy import PolicyInputError

    policy = DeploymentPolicy(trained / "policy")
    n = policy.obs_dim
    for obs in (np.zeros(2 * n), np.full(n, np.nan), {"time": 0.0}):
        with pytest.raises(PolicyInputError, match=rf"expected shape \({n},\) or a batch \(B, {n}\)") as err:
            policy.act(obs)
        assert "\n" not in str(err.value)


def test_deployed_agent_on_another_scenario_is_one_clear_error(trained):
    from agents.deployed import DeployedAgent
    from coel_env.errors import ConfigError

    agent = DeployedAgent(trained / "policy")
    fits = gym.make("CoEL-v0", scenario="tiny", action_space=agent.env_kwargs["action_space"], max_epochs=2)
    assert agent.incompatibility(fits) is None
    fits.close()
    env = gym.make("CoEL-v0", scenario="paper-testbed", max_epochs=2)
    assert agent.incompatibility(env).startswith("trained on scenario 'tiny' (observation size")  # no episode run
    obs, _ = env.reset(seed=0)
    agent.reset(env.unwrapped.cluster, seed=0, scenario=env.unwrapped.scenario)
    with pytest.raises(ConfigError, match="trained on scenario 'tiny'") as err:
        agent.act(obs, env)
    assert "\n" not in str(err.value)


def test_a_policy_that_does_not_fit_a_scenario_is_skipped_not_fatal(trained, tmp_path):
    """An exported policy trained on `tiny` cannot act on `paper-testbed` (observation size differs): evaluate and
    compare skip that (policy, scenario) with one warning line naming both and why, and write everything else."""
    board = tmp_path / "evaluate"
    proc = evaluate(
        board,
        "scenarios=[tiny,paper-testbed]",
        f"policies=[static_linear,{trained}/policy]",
        "seeds=1",
        "max_epochs=2",
        "tuning.trials=1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    agent = f"agent:{trained.name}"
    warnings = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "skipping policy" in ln]
    assert len(warnings) == 1, warnings
    assert "WARNING" in warnings[0] and agent in warnings[0] and "on scenario paper-testbed" in warnings[0]
    assert "trained on scenario 'tiny'" in warnings[0] and "observation size" in warnings[0]
    rows = list(csv.DictReader((board / "leaderboard.csv").open()))
    pairs = {(r["scenario"], r["policy"]) for r in rows}
    assert ("tiny", agent) in pairs and ("paper-testbed", agent) not in pairs
    assert ("paper-testbed", "static_linear") in pairs and ("paper-testbed", "coel_tuned") in pairs
    skipped = json.loads((board / "skipped.json").read_text())
    assert [(k["scenario"], k["policy"]) for k in skipped] == [("paper-testbed", agent)]
    assert "## Skipped" in (board / "leaderboard.md").read_text()

    report = tmp_path / "compare"
    cmd = [
        sys.executable,
        "-m",
        "experiments.compare",
        f"runs=[{trained}]",
        f"leaderboard={board}",
        "heatmaps.scenario=paper-testbed",
        "heatmaps.policies=[static_linear]",
        "heatmaps.epochs=1",
        "logger=disabled",
        f"hydra.run.dir={report}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "skipping policy" in ln]
    assert len(warnings) == 1 and agent in warnings[0] and "paper-testbed" in warnings[0], warnings
    md = (report / "report.md").read_text()
    assert "placement_paper-testbed_static_linear.png" in md and f"Skipped `{agent}`" in md
    assert f"Not evaluated: `{agent}` on `paper-testbed`" in md
    assert (report / "report.html").is_file()
