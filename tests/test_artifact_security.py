"""Training artifacts are safe to load: checkpoints never unpickle (crafted SB3 zips are refused before anything runs),
bad checkpoints are one line, exported policies are verified file by file, and artifacts are written atomically."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from agents.checkpoint import read_checkpoint, write_checkpoint
from agents.deployment_policy import DeploymentPolicy, PolicyLoadError
from agents.export import export_policy
from agents.sb3 import load_model, make_algorithm, make_flat_env, save_model
from coel_env.errors import ConfigError
from experiments.export import export_run
from experiments.train import check_cfg

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "offline"}
AGENT = {
    "algo": "PPO",
    "policy": "MlpPolicy",
    "kwargs": {"n_steps": 16, "batch_size": 16, "n_epochs": 1},
    "policy_kwargs": {"net_arch": [16, 16]},
}
ENV_KWARGS = {"scenario": "tiny", "max_epochs": 8}


class _Touch:
    """Unpickling this runs `touch <path>`: the payload a crafted checkpoint would carry."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch '{self.path}'",)


def malicious_sb3_zip(path: Path, marker: Path) -> Path:
    """An SB3-style zip: a `:serialized:` cloudpickle entry in `data` and pickles in the `.pth` members."""
    payload = pickle.dumps(_Touch(marker))
    data = {
        "policy_class": {":type:": "<class 'abc.ABCMeta'>", ":serialized:": base64.b64encode(payload).decode()},
        "observation_space": {
            ":type:": "<class 'gymnasium.spaces.box.Box'>",
            ":serialized:": base64.b64encode(payload).decode(),
        },
    }
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("data", json.dumps(data))
        zf.writestr("policy.pth", payload)
        zf.writestr("pytorch_variables.pth", payload)
        zf.writestr("_stable_baselines3_version", "2.9.2")
    return path


def flat_venv(normalize: bool = True, obs_exclude: tuple[str, ...] = ("plan",), knobs: str | None = "coel"):
    venv = DummyVecEnv([lambda: make_flat_env(ENV_KWARGS, knobs, obs_exclude)])
    return VecNormalize(venv, norm_reward=False) if normalize else venv


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A briefly trained PPO, its VecNormalize env and its checkpoint."""
    venv = flat_venv()
    model = make_algorithm(AGENT, venv, seed=0)
    model.learn(32)
    path = save_model(model, tmp_path_factory.mktemp("ckpt") / "ckpt_32_steps.zip", AGENT, venv)
    return model, venv, path


@pytest.fixture(scope="module")
def policy_dir(trained, tmp_path_factory) -> Path:
    model, venv, _ = trained
    return export_policy(
        model, tmp_path_factory.mktemp("export") / "policy", env_spec={"id": "CoEL-v0"}, obs_rms=venv.obs_rms
    )


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


# -- checkpoints never unpickle ----------------------------------------------------------------------------------


def test_the_payload_is_live(tmp_path):
    """Control: SB3's own loader runs the crafted zip's code, so the refusals below are meaningful."""
    from stable_baselines3.common.save_util import load_from_zip_file

    marker = tmp_path / "pwned"
    with contextlib.suppress(Exception):  # whatever SB3 raises after the payload ran
        load_from_zip_file(malicious_sb3_zip(tmp_path / "evil.zip", marker))
    assert marker.exists()


def test_malicious_sb3_zip_is_refused_in_process(tmp_path):
    marker = tmp_path / "pwned"
    evil = malicious_sb3_zip(tmp_path / "evil.zip", marker)
    with pytest.raises(ConfigError) as err:
        read_checkpoint(evil)
    assert "is a stable-baselines3 zip: refused" in one_line(err)
    run = tmp_path / "run"
    run.mkdir()
    (run / "env_spec.json").write_text(json.dumps({"id": "CoEL-v0", "kwargs": ENV_KWARGS}))
    (run / "train_summary.json").write_text(json.dumps({"algo": "PPO"}))
    shutil.copy(evil, run / "model.zip")
    with pytest.raises(ConfigError, match="stable-baselines3 zip"):
        export_run(run)
    assert not marker.exists() and not (run / "policy").exists()


def _cli(module: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300
    )


def test_malicious_checkpoint_runs_nothing_on_resume_cli(tmp_path):
    marker = tmp_path / "pwned"
    evil = malicious_sb3_zip(tmp_path / "evil.zip", marker)
    out = tmp_path / "run"
    proc = _cli(
        "experiments.train",
        "experiment=smoke",
        "scenario=tiny",
        "logger=disabled",
        f"hydra.run.dir={out}",
        f"resume={evil}",
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: resume: checkpoint '{evil}' is a stable-baselines3")
    assert not marker.exists()
    assert {p.name for p in out.iterdir()} <= {".hydra", "train.log"}  # no model, checkpoints, W&B run


def test_malicious_checkpoint_runs_nothing_on_export_cli(tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "env_spec.json").write_text(json.dumps({"id": "CoEL-v0", "kwargs": ENV_KWARGS}))
    (run / "train_summary.json").write_text(json.dumps({"algo": "PPO"}))
    malicious_sb3_zip(run / "checkpoints" / "ckpt_1_steps.zip", marker)
    proc = _cli("experiments.export", f"run={run}", "checkpoint=ckpt_1_steps")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "is a stable-baselines3 zip: refused" in proc.stderr.strip().splitlines()[-1]
    assert not marker.exists() and not (run / "policy").exists()


def _rezip(src: Path, dst: Path, edit) -> Path:
    """Copy checkpoint `src` to `dst`, passing its members (name -> bytes) through `edit`."""
    with zipfile.ZipFile(src) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    edit(members)
    with zipfile.ZipFile(dst, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return dst


def _meta(members: dict, **changes) -> None:
    meta = json.loads(members["meta.json"])
    meta.update(changes)
    members["meta.json"] = json.dumps(meta).encode()


BAD_CHECKPOINTS = {
    "empty": (lambda src, dst: dst.write_bytes(b""), "not a readable zip"),
    "random bytes": (lambda src, dst: dst.write_bytes(os.urandom(4096)), "not a readable zip"),
    "truncated": (lambda src, dst: dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2]), "not a readable zip"),
    "no meta.json": (lambda src, dst: _rezip(src, dst, lambda m: m.pop("meta.json")), "has no meta.json"),
    "extra pickle member": (
        lambda src, dst: _rezip(src, dst, lambda m: m.update({"policy.pth": pickle.dumps(1)})),
        "unexpected member 'policy.pth'",
    ),
    "wrong format": (lambda src, dst: _rezip(src, dst, lambda m: _meta(m, format="sb3")), "unsupported"),
    "newer version": (lambda src, dst: _rezip(src, dst, lambda m: _meta(m, version=99)), "unsupported"),
    "meta not JSON": (lambda src, dst: _rezip(src, dst, lambda m: m.update({"meta.json": b"{"})), "not valid JSON"),
    "corrupt tensors": (
        lambda src, dst: _rezip(src, dst, lambda m: m.update({"policy.safetensors": b"x" * 64})),
        "is corrupt",
    ),
    "bad optimizer tree": (
        lambda src, dst: _rezip(src, dst, lambda m: _meta(m, optimizer={"pickle": "x"})),
        "is corrupt",
    ),
    "missing statistics": (
        lambda src, dst: _rezip(src, dst, lambda m: m.pop("vecnorm.safetensors")),
        "missing 'vecnorm.safetensors'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoints_are_one_line(trained, tmp_path, case):
    make, message = BAD_CHECKPOINTS[case]
    dst = tmp_path / "bad.zip"
    make(trained[2], dst)
    with pytest.raises(ConfigError) as err:
        read_checkpoint(dst, "resume")
    assert message in one_line(err) and one_line(err).startswith(f"resume: checkpoint '{dst}'")


def test_checkpoint_round_trip_restores_everything(trained):
    model, venv, path = trained
    ckpt = read_checkpoint(path)
    assert ckpt.algo == "PPO" and ckpt.num_timesteps == model.num_timesteps
    venv2 = flat_venv()
    resumed = make_algorithm(AGENT, venv2, seed=1, checkpoint=ckpt)
    for (name, a), b in zip(model.policy.state_dict().items(), resumed.policy.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    s1, s2 = model.policy.optimizer.state_dict(), resumed.policy.optimizer.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert all(torch.equal(s1["state"][i][k], s2["state"][i][k]) for i in s1["state"] for k in s1["state"][i])
    assert resumed.num_timesteps == model.num_timesteps and resumed._n_updates == model._n_updates
    np.testing.assert_array_equal(venv2.obs_rms.mean, venv.obs_rms.mean)
    np.testing.assert_array_equal(venv2.obs_rms.var, venv.obs_rms.var)
    assert venv2.obs_rms.count == venv.obs_rms.count
    exported = load_model(ckpt)  # no env: rebuilt from the checkpoint's own agent config and spaces
    obs = np.random.default_rng(0).random((4, *model.observation_space.shape)).astype(np.float32)
    ours, ref = (m.predict(obs, deterministic=True)[0] for m in (exported, model))
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize(
    "agent, venv_kwargs, message",
    [
        ({**AGENT, "algo": "A2C", "kwargs": {}}, {}, "was trained with PPO, this run's agent.algo is A2C"),
        ({**AGENT, "policy_kwargs": {"net_arch": [8]}}, {}, "has policy_kwargs"),
        (AGENT, {"obs_exclude": ()}, "has observation shape"),
        (AGENT, {"knobs": "greedy_popularity"}, "has action space"),
        (AGENT, {"normalize": False}, "was trained on normalised observations"),
    ],
)
def test_resume_refuses_another_algorithm_network_or_env(trained, agent, venv_kwargs, message):
    ckpt = read_checkpoint(trained[2])
    with pytest.raises(ConfigError) as err:
        make_algorithm(agent, flat_venv(**venv_kwargs), seed=0, checkpoint=ckpt)
    assert message in one_line(err)


def test_export_refuses_a_checkpoint_of_another_algorithm(trained, tmp_path):
    (tmp_path / "env_spec.json").write_text(json.dumps({"id": "CoEL-v0", "kwargs": ENV_KWARGS}))
    (tmp_path / "train_summary.json").write_text(json.dumps({"algo": "A2C"}))
    shutil.copy(trained[2], tmp_path / "model.zip")
    with pytest.raises(ConfigError, match=r"holds PPO, but train_summary\.json names 'A2C'"):
        export_run(tmp_path)
    assert not (tmp_path / "policy").exists()


# -- exported policy integrity -----------------------------------------------------------------------------------


def _link_file(d: Path) -> None:
    real = d.parent / "elsewhere.onnx"
    shutil.copy(d / "actor.onnx", real)
    (d / "actor.onnx").unlink()
    (d / "actor.onnx").symlink_to(real)  # same bytes, same hash: refused for being a link


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda d: (d / "notes.txt").write_text("hi"), "'notes.txt' in .* is not listed in integrity.json"),
        (lambda d: (d / ".hidden").write_bytes(b""), "'.hidden' in .* is not listed"),
        (lambda d: (d / "sub").mkdir(), "'sub' in .* is not a regular file"),
        (lambda d: (d / "policy.json").unlink(), "'policy.json' listed in integrity.json is missing"),
        (
            lambda d: (d / "policy.json").write_text((d / "policy.json").read_text().replace("PPO", "A2C")),
            "'policy.json' in .* does not match its SHA-256",
        ),
        (lambda d: (d / "integrity.json").write_text('{"format": "coel-policy-integrity", "sha256": []}'), "malformed"),
        (_link_file, "'actor.onnx' in .* is a symlink"),
    ],
)
def test_policy_loader_verifies_every_file(policy_dir, tmp_path, tamper, message):
    d = tmp_path / "policy"
    shutil.copytree(policy_dir, d)
    DeploymentPolicy(d)  # the untouched copy loads
    tamper(d)
    with pytest.raises(PolicyLoadError, match=message) as err:
        DeploymentPolicy(d)
    one_line(err)


def test_policy_loader_refuses_a_symlinked_directory(policy_dir, tmp_path):
    (tmp_path / "link").symlink_to(policy_dir, target_is_directory=True)
    with pytest.raises(PolicyLoadError, match="is a symlink") as err:
        DeploymentPolicy(tmp_path / "link")
    one_line(err)


def test_integrity_lists_every_file(policy_dir):
    listed = json.loads((policy_dir / "integrity.json").read_text())["sha256"]
    assert set(listed) == {p.name for p in policy_dir.iterdir()} - {"integrity.json"} == {"actor.onnx", "policy.json"}
    assert all(hashlib.sha256((policy_dir / n).read_bytes()).hexdigest() == h for n, h in listed.items())


# -- atomic writes -----------------------------------------------------------------------------------------------


def test_failed_export_leaves_the_previous_policy_intact(trained, policy_dir, tmp_path, monkeypatch):
    d = tmp_path / "policy"
    shutil.copytree(policy_dir, d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def crash(model, args, path, **kwargs):
        Path(path).write_bytes(b"half an onnx")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.onnx, "export", crash)
    with pytest.raises(KeyboardInterrupt):
        export_policy(trained[0], d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["policy"]


def test_failed_checkpoint_write_leaves_the_previous_one_intact(trained, tmp_path, monkeypatch):
    model, venv, path = trained
    target = shutil.copy(path, tmp_path / "ckpt.zip")
    before = Path(target).read_bytes()

    def crash(tensors):
        raise KeyboardInterrupt

    monkeypatch.setattr("agents.checkpoint.save_tensors", crash)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(target, model, AGENT, venv)
    assert Path(target).read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ckpt.zip"]


# -- train's command-line values ---------------------------------------------------------------------------------


def _cfg(**changes):
    base = {
        "seed": 0,
        "n_envs": 2,
        "total_timesteps": 512,
        "eval_episodes": 1,
        "torch_threads": 1,
        "checkpoint_every": 256,
        "eval_every": 256,
        "normalize_obs": True,
        "export": True,
        "progress_bar": False,
        "vec_env": "dummy",
        "agent": {"algo": "PPO"},
        "resume": None,
    }
    return OmegaConf.create({**base, **changes})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"checkpoint_every": 0}, "checkpoint_every: 0 must be an integer >= 1 (env steps), or null for off"),
        ({"checkpoint_every": -5}, "checkpoint_every: -5 must be"),
        ({"eval_every": 0}, "eval_every: 0 must be"),
        ({"n_envs": 0}, "n_envs: 0 must be an integer >= 1"),
        ({"total_timesteps": -1}, "total_timesteps: -1 must be an integer >= 1"),
        ({"total_timesteps": 1.5}, "total_timesteps: 1.5 must be an integer"),
        ({"seed": "abc"}, "seed: 'abc' must be an integer >= 0"),
        ({"seed": -1}, "seed: -1 must be an integer >= 0"),
        ({"eval_episodes": 0}, "eval_episodes: 0 must be an integer >= 1"),
        ({"normalize_obs": "yes"}, "normalize_obs: 'yes' must be true or false"),
        ({"vec_env": "threads"}, "vec_env: 'threads' unknown"),
        ({"agent": {"algo": "DQN"}}, "agent.algo: 'DQN' unknown"),
    ],
)
def test_check_cfg_refuses_bad_values(changes, message):
    with pytest.raises(ConfigError) as err:
        check_cfg(_cfg(**changes))
    assert one_line(err).startswith(message)


def test_check_cfg_allows_null_to_turn_checkpoints_and_evaluation_off():
    check_cfg(_cfg(checkpoint_every=None, eval_every=None))


@pytest.mark.parametrize(
    "override, line",
    [
        ("checkpoint_every=0", "error: checkpoint_every: 0 must be an integer >= 1 (env steps), or null for off"),
        ("seed=abc", "error: seed: 'abc' must be an integer >= 0"),
        ("n_envs=0", "error: n_envs: 0 must be an integer >= 1"),
    ],
)
def test_train_cli_refuses_bad_values_before_writing(tmp_path, override, line):
    out = tmp_path / "run"
    proc = _cli(
        "experiments.train", "experiment=smoke", "scenario=tiny", "logger=disabled", f"hydra.run.dir={out}", override
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == line
    assert {p.name for p in out.iterdir()} <= {".hydra", "train.log"}  # only Hydra's own records
