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
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from agents.checkpoint import read_checkpoint, write_checkpoint
from agents.deployment_policy import DeploymentPolicy, PolicyInputError, PolicyLoadError
from agents.export import export_policy
from agents.sb3 import load_model, make_algorithm, make_flat_env, save_model
from coel_env.errors import ConfigError
from experiments.export import export_run
from experiments.train import check_cfg

ROOT = Path(__file__).resolve().parents[2]
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


def _run_dir(run: Path, checkpoint: Path) -> Path:
    """A minimal training run folder around `checkpoint` (what experiments.export reads)."""
    run.mkdir(parents=True)
    (run / "env_spec.json").write_text(json.dumps({"id": "CoEL-v0", "kwargs": ENV_KWARGS, "knobs": "coel"}))
    (run / "train_summary.json").write_text(json.dumps({"algo": "PPO", "scenario": "tiny", "seed": 0}))
    shutil.copy(checkpoint, run / "model.zip")
    (run / "train.log").write_text("training log")
    return run


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


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


def _agent(members: dict, section: str, **changes) -> None:
    """Set agent.<section> entries (kwargs / policy_kwargs) of meta.json."""
    meta = json.loads(members["meta.json"])
    meta["agent"][section] = {**(meta["agent"].get(section) or {}), **changes}
    members["meta.json"] = json.dumps(meta).encode()


def _tensors(members: dict, member: str, edit) -> None:
    """Pass the tensors of `member` through `edit` (name -> tensor dict, edited in place)."""
    tensors = load_tensors(members[member])
    edit(tensors)
    members[member] = save_tensors(tensors)


def _param_group(members: dict, key: str, value, node: dict | None = None) -> None:
    """Set param_groups[0][key] in meta.json's encoded optimizer state (to `value`, or the encoded `node`)."""
    meta = json.loads(members["meta.json"])
    groups = dict(meta["optimizer"]["d"])["param_groups"]
    for pair in groups["l"][0]["d"]:
        if pair[0] == key:
            pair[1] = node or {"v": value}
    members["meta.json"] = json.dumps(meta).encode()


def _crafted(edit):
    return lambda src, dst: _rezip(src, dst, edit)


def _dup_member(src: Path, dst: Path) -> None:
    _rezip(src, dst, lambda m: None)
    with zipfile.ZipFile(dst, "a") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.writestr("meta.json", b"{}")


_BOX = {"type": "Box", "shape": [2], "low": [0.0, 0.0], "high": [1.0, 1.0]}
CRAFTED_CHECKPOINTS = {  # meta.json / tensors a crafted checkpoint may carry: all refused before anything is built
    "num_timesteps bool": (_crafted(lambda m: _meta(m, num_timesteps=True)), "num_timesteps: True must be an integer"),
    "num_timesteps < 0": (_crafted(lambda m: _meta(m, num_timesteps=-5)), "num_timesteps: -5 must be an integer in"),
    "num_timesteps huge": (_crafted(lambda m: _meta(m, num_timesteps=10**30)), "num_timesteps: 10000000000000000000"),
    "n_updates list": (_crafted(lambda m: _meta(m, n_updates=[1])), "n_updates: [1] must be an integer"),
    "n_updates float": (_crafted(lambda m: _meta(m, n_updates=3.0)), "n_updates: 3.0 must be an integer"),
    "n_envs bool": (_crafted(lambda m: _meta(m, n_envs=True)), "n_envs: True must be an integer in [1, 4096]"),
    "n_envs 5000": (_crafted(lambda m: _meta(m, n_envs=5000)), "n_envs: 5000 must be an integer in [1, 4096]"),
    "seed 2**70": (_crafted(lambda m: _meta(m, seed=2**70)), "seed: 1180591620717411303424 must be null or an int"),
    "version 1.0": (_crafted(lambda m: _meta(m, version=1.0)), "format/version 'coel-checkpoint'/1.0 unsupported"),
    "unknown field": (_crafted(lambda m: _meta(m, extra=1)), "meta.json has unknown field 'extra'"),
    "kwargs underscore": (
        _crafted(lambda m: _agent(m, "kwargs", _init_setup_model=False)),
        "meta.json agent.kwargs._init_setup_model: unknown for PPO; allowed: learning_rate",
    ),
    "kwargs tensorboard_log": (
        _crafted(lambda m: _agent(m, "kwargs", tensorboard_log="/tmp/x")),
        "agent.kwargs.tensorboard_log: unknown for PPO",
    ),
    "kwargs n_steps huge": (
        _crafted(lambda m: _agent(m, "kwargs", n_steps=10**12)),
        "agent.kwargs.n_steps: 1000000000000 must be an integer in [1, 1048576]",
    ),
    "kwargs lr str": (
        _crafted(lambda m: _agent(m, "kwargs", learning_rate="x")),
        "agent.kwargs.learning_rate: 'x' must be a finite number",
    ),
    "kwargs not a mapping": (
        _crafted(lambda m: _meta(m, agent={**AGENT, "kwargs": [1]})),
        "agent.kwargs: [1] must be a mapping",
    ),
    "net_arch huge": (
        _crafted(lambda m: _agent(m, "policy_kwargs", net_arch=[10**8])),
        "agent.policy_kwargs.net_arch: [100000000] must be a list of at most 8 integers",
    ),
    "net_arch negative": (
        _crafted(lambda m: _agent(m, "policy_kwargs", net_arch=[-1])),
        "agent.policy_kwargs.net_arch: [-1] must be",
    ),
    "activation by path": (
        _crafted(lambda m: _agent(m, "policy_kwargs", activation_fn="os.system")),
        "agent.policy_kwargs.activation_fn: 'os.system' unknown; allowed: tanh",
    ),
    "policy_kwargs unknown": (
        _crafted(lambda m: _agent(m, "policy_kwargs", optimizer_class="x")),
        "agent.policy_kwargs.optimizer_class: unknown",
    ),
    "Discrete n=0": (_crafted(lambda m: _meta(m, action_space={"type": "Discrete", "n": 0})), "action_space.n: 0"),
    "Discrete n huge": (
        _crafted(lambda m: _meta(m, action_space={"type": "Discrete", "n": 10**20})),
        "action_space.n: 100000000000000000000 must be an integer in [1, 2147483647]",
    ),
    "Discrete too many logits": (
        _crafted(lambda m: _meta(m, action_space={"type": "Discrete", "n": 2**31 - 1})),
        "agent: its network for these spaces has about",
    ),
    "nvec 2**70": (
        _crafted(lambda m: _meta(m, action_space={"type": "MultiDiscrete", "nvec": [2**70]})),
        "action_space.nvec must be a list",
    ),
    "nvec empty": (
        _crafted(lambda m: _meta(m, action_space={"type": "MultiDiscrete", "nvec": []})),
        "action_space.nvec must be a list",
    ),
    "Box low > high": (
        _crafted(lambda m: _meta(m, action_space={**_BOX, "low": [1.0, 1.0], "high": [0.0, 0.0]})),
        "action_space: low must be <= high",
    ),
    "Box shape 0": (_crafted(lambda m: _meta(m, action_space={**_BOX, "shape": [0]})), "action_space.shape: [0]"),
    "obs 2-D": (
        _crafted(lambda m: _meta(m, observation_space={**_BOX, "shape": [1, 2]})),
        "observation_space.shape: [1, 2] must be a 1-D list",
    ),
    "clip NaN": (
        _crafted(lambda m: _meta(m, normalization={"count": 1.0, "clip_obs": float("nan")})),
        "normalization: must be null or {count, clip_obs}, both finite numbers > 0",
    ),
    "count bool": (_crafted(lambda m: _meta(m, normalization={"count": True, "clip_obs": 10.0})), "normalization:"),
    "optimizer eps str": (_crafted(lambda m: _param_group(m, "eps", "x")), "optimizer param_groups[0].eps: x must"),
    "policy NaN": (
        _crafted(lambda m: _tensors(m, "policy.safetensors", lambda t: t["log_std"].fill_(float("nan")))),
        "policy.safetensors tensor 'log_std' holds NaN or inf",
    ),
    "policy int8": (
        _crafted(lambda m: _tensors(m, "policy.safetensors", lambda t: t.update(log_std=t["log_std"].to(torch.int8)))),
        "policy.safetensors tensor 'log_std' is torch.int8, expected torch.float32",
    ),
    "policy bool": (
        _crafted(lambda m: _tensors(m, "policy.safetensors", lambda t: t.update(log_std=t["log_std"].bool()))),
        "is torch.bool",
    ),
    "optimizer inf": (
        _crafted(lambda m: _tensors(m, "optimizer.safetensors", lambda t: t["1"].fill_(float("inf")))),
        "optimizer.safetensors tensor '1' holds NaN or inf",
    ),
    "optimizer unused tensor": (
        _crafted(lambda m: _tensors(m, "optimizer.safetensors", lambda t: t.update(evil=torch.zeros(1)))),
        "optimizer.safetensors holds tensors meta.json does not use",
    ),
    "vecnorm var < 0": (
        _crafted(lambda m: _tensors(m, "vecnorm.safetensors", lambda t: t["var"].fill_(-1.0))),
        "vecnorm.safetensors var holds negative values",
    ),
    "vecnorm NaN": (
        _crafted(lambda m: _tensors(m, "vecnorm.safetensors", lambda t: t["mean"].fill_(float("nan")))),
        "vecnorm.safetensors tensor 'mean' holds NaN or inf",
    ),
    "vecnorm fp16": (
        _crafted(lambda m: _tensors(m, "vecnorm.safetensors", lambda t: t.update({k: v.half() for k, v in t.items()}))),
        "is torch.float16, expected torch.float64",
    ),
    "duplicate member": (_dup_member, "has member 'meta.json' twice"),
}
BAD_CHECKPOINTS.update(CRAFTED_CHECKPOINTS)


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoints_are_one_line(trained, tmp_path, case):
    make, message = BAD_CHECKPOINTS[case]
    dst = tmp_path / "bad.zip"
    make(trained[2], dst)
    with pytest.raises(ConfigError) as err:
        read_checkpoint(dst, "resume")
    assert message in one_line(err) and one_line(err).startswith(f"resume: checkpoint '{dst}'")


def test_checkpoint_total_size_is_capped_from_the_zip_directory(trained, tmp_path, monkeypatch):
    with zipfile.ZipFile(trained[2]) as zf:
        sizes = [i.file_size for i in zf.infolist()]
    monkeypatch.setattr("agents.checkpoint.MAX_TOTAL_BYTES", sum(sizes) - 1)  # every member alone is fine
    read_calls = []
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda self, name, pwd=None: read_calls.append(name))
    with pytest.raises(ConfigError) as err:
        read_checkpoint(trained[2])
    assert f"members are {sum(sizes)} bytes uncompressed, more than {sum(sizes) - 1}" in one_line(err)
    assert not read_calls  # refused before any member was decompressed


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: _param_group(m, "eps", True), "optimizer param_groups[0].eps is True, this agent's is 1e-05"),
        (lambda m: _param_group(m, "betas", None, {"u": [{"v": 0.9}]}), "optimizer param_groups[0].betas is (0.9,)"),
        (
            lambda m: _tensors(m, "optimizer.safetensors", lambda t: t.update({"1": torch.zeros(3)})),
            "optimizer state 'exp_avg' of parameter 0 has shape [3]",
        ),
    ],
)
def test_resume_refuses_optimizer_state_that_does_not_fit(trained, tmp_path, edit, message):
    """What torch's load_state_dict would accept and fail on (or silently misuse) at the first update."""
    ckpt = read_checkpoint(_rezip(trained[2], tmp_path / "bad.zip", edit))
    with pytest.raises(ConfigError) as err:
        make_algorithm(AGENT, flat_venv(), seed=0, checkpoint=ckpt)
    assert message in one_line(err)


@pytest.mark.parametrize("case", ["policy NaN", "kwargs underscore", "vecnorm var < 0", "net_arch huge"])
def test_export_applies_the_same_checkpoint_checks(trained, tmp_path, case):
    run = _run_dir(tmp_path / "run", trained[2])
    CRAFTED_CHECKPOINTS[case][0](trained[2], run / "model.zip")
    with pytest.raises(ConfigError) as err:
        export_run(run)
    assert CRAFTED_CHECKPOINTS[case][1] in one_line(err) and not (run / "policy").exists()


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


# -- export never replaces what is not an export -----------------------------------------------------------------


def _targets(tmp_path: Path, run: Path) -> dict[str, tuple[Path, str]]:
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    fake = tmp_path / "fake_policy"  # policy.json + integrity.json, but also a file integrity.json does not list
    fake.mkdir()
    (fake / "policy.json").write_text("{}")
    (fake / "integrity.json").write_text(json.dumps({"format": "coel-policy-integrity", "sha256": {"policy.json": ""}}))
    (fake / "data.csv").write_text("1,2")
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    link = tmp_path / "link"
    link.symlink_to(other, target_is_directory=True)
    return {
        "the run": (run, "is the run directory"),
        "the run, spelled differently": (run / "checkpoints" / "..", "is the run directory"),
        "a folder containing the run": (tmp_path, "or contains it"),
        "a folder of other files": (other, "exists and is not a policy directory"),
        "a policy-like folder with extra files": (fake, "exists and is not a policy directory"),
        "the run's checkpoint": (run / "model.zip", "is an existing file, not a policy directory"),
        "a file": (afile, "is an existing file"),
        "a symlink": (link, "is a symlink"),
    }


def test_export_refuses_to_replace_anything_but_a_policy_directory(trained, tmp_path):
    run = _run_dir(tmp_path / "run", trained[2])
    (run / "checkpoints").mkdir()
    for label, (target, message) in _targets(tmp_path, run).items():
        before = _snapshot(tmp_path)
        with pytest.raises(ConfigError) as err:
            export_run(run, out=target)
        assert one_line(err).startswith("out: ") and message in one_line(err), label
        assert _snapshot(tmp_path) == before, f"{label}: files changed"
    with pytest.raises(ConfigError, match="exists and is not a policy directory"):  # the library call checks too
        export_policy(trained[0], tmp_path / "other")


def test_export_replaces_an_earlier_export_or_an_empty_folder(trained, policy_dir, tmp_path, monkeypatch):
    old = tmp_path / "policy"
    shutil.copytree(policy_dir, old)
    (old / "policy.json").write_text("{}")  # stale or edited: still only files integrity.json lists
    export_policy(trained[0], old, env_spec={"id": "CoEL-v0"}, obs_rms=trained[1].obs_rms)
    DeploymentPolicy(old)
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(
        "agents.export._write_policy", lambda out, *args: shutil.copytree(policy_dir, out, dirs_exist_ok=True)
    )  # no second export
    export_policy(trained[0], tmp_path / "empty")
    DeploymentPolicy(tmp_path / "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "policy"]


def test_export_cli_refuses_out_equal_to_the_run(trained, tmp_path):
    run = _run_dir(tmp_path / "run", trained[2])
    before = _snapshot(run)
    proc = _cli("experiments.export", f"run={run}", f"out={run}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: out: '{run}' is the run directory")
    assert _snapshot(run) == before


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


def _seal(d: Path) -> None:
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir() if p.name != "integrity.json"}
    (d / "integrity.json").write_text(json.dumps({"format": "coel-policy-integrity", "version": 1, "sha256": files}))


def _external(tensor, location: str) -> None:
    """Make an onnx TensorProto's data live in `location` (what onnx's external-data format writes)."""
    from onnx import TensorProto

    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(4 * int(np.prod(tensor.dims))))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def handmade_policy(
    d: Path,
    action: dict,
    obs_dim: int = 5,
    out_dim: int | None = None,
    external: str | None = None,
    meta: dict | None = None,
) -> Path:
    """A sealed policy directory whose actor is `obs @ W` (W the identity, so the logits are the observation),
    built with onnx.helper in-process; `external` puts W's data in a file ('initializer' or 'attribute' tensor)."""
    from onnx import TensorProto, helper, numpy_helper

    out_dim = obs_dim if out_dim is None else out_dim
    w = numpy_helper.from_array(np.eye(obs_dim, out_dim, dtype=np.float32), "W")
    nodes, inits = [helper.make_node("MatMul", ["obs", "W"], ["action_out"])], [w]
    if external == "initializer":
        _external(w, "secret.bin")
    elif external == "attribute":  # a Constant node's value tensor
        _external(w, "secret.bin")
        nodes.insert(0, helper.make_node("Constant", [], ["W"], value=w))
        inits = []
    graph = helper.make_graph(
        nodes,
        "actor",
        [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["B", obs_dim])],
        [helper.make_tensor_value_info("action_out", TensorProto.FLOAT, ["B", out_dim])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()
    d.mkdir(parents=True, exist_ok=True)
    (d / "actor.onnx").write_bytes(data)
    (d / "policy.json").write_text(
        json.dumps(
            {
                "format": "coel-deployment-policy",
                "version": 2,
                "algorithm": "PPO",
                "onnx": "actor.onnx",
                "onnx_sha256": hashlib.sha256(data).hexdigest(),
                "observation": {"shape": [obs_dim], "dtype": "float32"},
                "normalization": None,
                "action": action,
                "env": {},
                **(meta or {}),
            }
        )
    )
    _seal(d)
    return d


MD = {"type": "MultiDiscrete", "nvec": [2, 3], "output": "logits"}


@pytest.mark.parametrize("where", ["initializer", "attribute"])
def test_policy_with_external_onnx_data_is_refused(tmp_path, monkeypatch, where):
    """Weights in a file beside the model (resolved from the working directory) are covered by no hash: refused."""
    (tmp_path / "secret.bin").write_bytes(np.ones(25, np.float32).tobytes())
    monkeypatch.chdir(tmp_path)
    handmade_policy(tmp_path / "ok", MD)
    assert DeploymentPolicy(tmp_path / "ok").act(np.array([0, 1, 0, 0, 1.0])).tolist() == [1, 2]  # control
    d = handmade_policy(tmp_path / "policy", MD, external=where)
    with pytest.raises(PolicyLoadError, match=r"tensor 'W' references external data \('secret.bin'\): refused"):
        DeploymentPolicy(d)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"action": {"type": "Discrete", "n": 3}}, r"output 'action_out' has shape \['B', 5\].*wants float32 \[B, 3\]"),
        ({"action": {**MD, "nvec": [2, 2]}}, r"wants float32 \[B, 4\]"),
        ({"action": {"type": "Box", "shape": [3], "low": [0] * 3, "high": [1] * 3}}, r"wants float32 \[B, 3\]"),
        (
            {"action": MD, "meta": {"observation": {"shape": [4], "dtype": "float32"}}},
            r"input 'obs' has shape \['B', 5\].*wants float32 \[B, 4\]",
        ),
        ({"action": MD, "meta": {"observation": {"shape": [0]}}}, "malformed observation entry"),
        ({"action": MD, "meta": {"observation": {"shape": [-5]}}}, "malformed observation entry"),
        ({"action": {**MD, "nvec": [0, 5]}}, "action.nvec must be a non-empty list of integers >= 1"),
        ({"action": {**MD, "nvec": []}}, "action.nvec must be a non-empty list"),
        ({"action": {"type": "Discrete", "n": 0}}, r"action.n must be an integer in \[1, "),
        ({"action": {"type": "Box", "shape": [0], "low": [], "high": []}}, "action.shape must be a non-empty list"),
        ({"action": {"type": "Box", "shape": [5], "low": [1] * 5, "high": [0] * 5}}, "action.low must be <= action"),
        (
            {"action": MD, "meta": {"normalization": {"mean": [0] * 5, "var": [-1] * 5, "clip": 10, "epsilon": 1e-8}}},
            "normalization.mean/var must be finite, var >= 0",
        ),
        (
            {"action": MD, "meta": {"normalization": {"mean": [0] * 4, "var": [1] * 5, "clip": 10, "epsilon": 1e-8}}},
            "normalization.mean must be a list of 5 numbers",
        ),
        ({"action": MD, "meta": {"version": 2.0}}, "unsupported"),
    ],
)
def test_policy_json_must_match_the_onnx_graph(tmp_path, kwargs, message):
    d = handmade_policy(tmp_path / "policy", **kwargs)
    with pytest.raises(PolicyLoadError, match=message) as err:
        DeploymentPolicy(d)
    one_line(err)


@pytest.mark.parametrize(
    "obs, message",
    [
        ({"a": np.zeros(5)}, r"observation is a dict \(keys \['a'\]\); expected shape \(5,\)"),
        (np.zeros(10), r"observation has shape \(10,\); expected shape \(5,\) or a batch \(B, 5\)"),
        (np.zeros(4), r"observation has shape \(4,\)"),
        (np.zeros((2, 4)), r"observation has shape \(2, 4\)"),
        (np.zeros((0, 5)), r"observation has shape \(0, 5\)"),
        (np.zeros((1, 1, 5)), r"observation has shape \(1, 1, 5\)"),
        (np.float32(0), r"observation has shape \(\)"),
        (np.full(5, np.nan), r"observation holds NaN or inf \(entry \[0, 0\]\)"),
        (np.array([[0, 0, 0, 0, 0], [0, 0, np.inf, 0, 0]]), r"observation holds NaN or inf \(entry \[1, 2\]\)"),
        ("abcde", "observation has dtype <U5 \\(not numeric\\)"),
        (np.array([None] * 5), "observation has dtype object"),
        (np.zeros(5, complex), "observation has dtype complex128"),
        ([[0.0] * 5, [0.0] * 4], r"observation \(list\) is not an array"),
    ],
)
def test_act_refuses_observations_that_do_not_fit(tmp_path, obs, message):
    policy = DeploymentPolicy(handmade_policy(tmp_path / "policy", MD))
    for call in (policy.act, policy.raw):
        with pytest.raises(PolicyInputError, match=message) as err:
            call(obs)
        one_line(err)


def test_act_checks_action_masks(tmp_path):
    policy = DeploymentPolicy(handmade_policy(tmp_path / "policy", MD))
    obs = np.array([0, 1, 0, 0, 1.0])  # logits: component 0 -> 1, component 1 -> 2
    assert policy.act(obs).tolist() == [1, 2] and policy.act(obs.tolist()).tolist() == [1, 2]
    assert policy.act(obs, np.array([1, 0, 1, 1, 0], bool)).tolist() == [0, 0]
    assert policy.act(np.stack([obs, obs]), np.ones((2, 5))).tolist() == [[1, 2], [1, 2]]
    assert policy.raw(obs).shape == (1, 5)
    for mask, message in [
        (np.ones(4, bool), r"action_mask has shape \(4,\); expected 5 flags"),
        (np.ones(10, bool), r"action_mask has shape \(10,\)"),
        (np.array([1, 1, 0, 0, 0]), "action_mask allows no value for component 1"),
        (np.array([1, 1, np.nan, 1, 1]), "action_mask has dtype float64 or NaN/inf"),
        ("11111", "action_mask has dtype <U5"),
    ]:
        with pytest.raises(PolicyInputError, match=message) as err:
            policy.act(obs, mask)
        one_line(err)
    with pytest.raises(PolicyInputError, match=r"action_mask has shape \(5,\); expected .* \(2, 5\)"):
        policy.act(np.stack([obs, obs]), np.ones(5, bool))


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
        "status_every_s": 30,
        "train_instances": 8,
        "vec_env": "dummy",
        "agent": {
            "algo": "PPO",
            "policy": "MlpPolicy",
            "kwargs": {"n_steps": 64, "batch_size": 64},
            "policy_kwargs": {"net_arch": [16]},
        },
        "eval_baselines": ["static"],
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
        ({"seed": 2**32}, "seed: 4294967296 must be an integer in [0, 4294967295]"),
        ({"status_every_s": 0}, "status_every_s: 0 must be a finite number > 0"),
        ({"status_every_s": "often"}, "status_every_s: 'often' must be a finite number > 0"),
        ({"agent": {"algo": "PPO", "kwargs": {"batch_size": 0}}}, "agent.kwargs.batch_size: 0 must be an integer in"),
        ({"agent": {"algo": "PPO", "kwargs": {"batch_size": 1}}}, "agent.kwargs.batch_size: 1 must be an integer in"),
        ({"agent": {"algo": "PPO", "kwargs": {"n_steps": 0}}}, "agent.kwargs.n_steps: 0 must be an integer in"),
        ({"agent": {"algo": "PPO", "kwargs": {"n_steps": 10**11}}}, "agent.kwargs.n_steps: 100000000000 must be"),
        ({"agent": {"algo": "PPO", "kwargs": {"n_steps": 2**20}}}, "agent.kwargs.n_steps: n_steps * n_envs = 2097152"),
        ({"agent": {"algo": "PPO", "kwargs": {"learning_rate": float("nan")}}}, "agent.kwargs.learning_rate: nan"),
        ({"agent": {"algo": "PPO", "kwargs": {"learning_rate": 0}}}, "agent.kwargs.learning_rate: 0 must be a finite"),
        ({"agent": {"algo": "PPO", "kwargs": {"device": "cuda"}}}, "agent.kwargs.device: unknown for PPO; allowed:"),
        ({"agent": {"algo": "PPO", "kwargs": {"_init_setup_model": False}}}, "agent.kwargs._init_setup_model: unknown"),
        ({"agent": {"algo": "A2C", "kwargs": {"batch_size": 64}}}, "agent.kwargs.batch_size: unknown for A2C"),
        ({"agent": {"algo": "PPO", "policy_kwargs": {"net_arch": [0]}}}, "agent.policy_kwargs.net_arch: [0] must be"),
        ({"agent": {"algo": "PPO", "policy_kwargs": {"net_arch": {"pi": [10**8]}}}}, "agent.policy_kwargs.net_arch:"),
        ({"agent": {"algo": "PPO", "policy_kwargs": {"activation_fn": "torch.nn.ReLU"}}}, "agent.policy_kwargs.act"),
        ({"agent": {"algo": "PPO", "policy_kwargs": {"features_extractor_class": "x"}}}, "agent.policy_kwargs.feat"),
        ({"agent": {"algo": "PPO", "policy": "CnnPolicy"}}, "agent.policy: 'CnnPolicy' unsupported"),
        ({"eval_baselines": ["nope"]}, "eval_baselines: unknown baseline 'nope'; allowed: random, static"),
        ({"eval_baselines": "static"}, "eval_baselines: 'static' must be a list of baseline names"),
    ],
)
def test_check_cfg_refuses_bad_values(changes, message):
    with pytest.raises(ConfigError) as err:
        check_cfg(_cfg(**changes))
    assert one_line(err).startswith(message)


def test_check_cfg_allows_null_to_turn_checkpoints_and_evaluation_off():
    check_cfg(_cfg(checkpoint_every=None, eval_every=None))


def test_check_cfg_accepts_the_shipped_agents_and_named_activations():
    for name in ("ppo", "a2c", "maskable_ppo"):
        agent = OmegaConf.load(ROOT / "conf" / "agent" / f"{name}.yaml")
        check_cfg(_cfg(agent=agent, n_envs=8, seed=2**32 - 1, eval_baselines=["static", "eplb", "coel"]))
    agent = {**AGENT, "policy_kwargs": {"net_arch": {"pi": [8], "vf": [8]}, "activation_fn": "relu"}}
    model = make_algorithm(agent, flat_venv(), seed=0)  # the name becomes torch.nn.ReLU
    assert isinstance(model.policy.mlp_extractor.policy_net[1], torch.nn.ReLU)


@pytest.mark.parametrize(
    "override, line",
    [
        ("checkpoint_every=0", "error: checkpoint_every: 0 must be an integer >= 1 (env steps), or null for off"),
        ("seed=abc", "error: seed: 'abc' must be an integer >= 0"),
        ("n_envs=0", "error: n_envs: 0 must be an integer >= 1"),
        ("eval_baselines=[nope]", "error: eval_baselines: unknown baseline 'nope'; allowed: random, static"),
    ],
)
def test_train_cli_refuses_bad_values_before_writing(tmp_path, override, line):
    out = tmp_path / "run"
    proc = _cli(
        "experiments.train", "experiment=smoke", "scenario=tiny", "logger=disabled", f"hydra.run.dir={out}", override
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(line)
    assert {p.name for p in out.iterdir()} <= {".hydra", "train.log"}  # only Hydra's own records
