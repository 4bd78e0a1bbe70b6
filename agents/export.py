"""Export a trained SB3 actor as an SB3-free deployment policy: `actor.onnx` + `policy.json` + `integrity.json`.

The ONNX graph maps a (normalised) flat observation batch to the actor's raw output: logits for Discrete /
MultiDiscrete actions (so action masks can be applied at deployment) or the mean action for Box. `policy.json`
holds everything else a deployment needs — spaces, observation normalisation, how to decode actions, the env
(scenario, spaces) the policy was trained for. `integrity.json` lists the SHA-256 of every other file in the
directory; the loader (agents.deployment_policy) refuses any extra, missing, changed or symlinked file. The directory
is built beside its target and renamed into place, so a crash never leaves half an export. An existing target is
replaced only when it is an empty folder or itself a policy directory (`is_policy_dir`): anything else — a training
run, a folder of other files, a file — is refused in one `ConfigError` line and left untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from agents.checkpoint import describe_space
from coel_env.atomic import atomic_dir
from coel_env.errors import ConfigError

POLICY_FORMAT = "coel-deployment-policy"  # keep in sync with agents.deployment_policy
POLICY_VERSION = 2  # 2: integrity.json covers every file
ONNX_NAME = "actor.onnx"
META_NAME = "policy.json"
INTEGRITY_NAME = "integrity.json"
INTEGRITY_FORMAT = "coel-policy-integrity"
SUPPORTED_ALGOS = ("PPO", "A2C", "MaskablePPO")
MAX_INTEGRITY_BYTES = 1 << 20


class _Actor(nn.Module):
    """The deterministic part of an SB3 ActorCriticPolicy: features -> actor MLP -> action net."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        p = self.policy
        features = p.extract_features(obs, p.pi_features_extractor)
        return p.action_net(p.mlp_extractor.forward_actor(features))


def is_policy_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a real (not symlinked) folder holding policy.json, integrity.json and nothing but regular
    files that integrity.json lists: an earlier export, which a new one may replace."""
    path = Path(path)
    try:
        if path.is_symlink() or not path.is_dir():
            return False
        with os.scandir(path) as it:
            entries = {e.name: e for e in it}
        if META_NAME not in entries or INTEGRITY_NAME not in entries:
            return False
        if any(e.is_symlink() or not e.is_file(follow_symlinks=False) for e in entries.values()):
            return False
        if entries[INTEGRITY_NAME].stat(follow_symlinks=False).st_size > MAX_INTEGRITY_BYTES:
            return False
        integrity = json.loads((path / INTEGRITY_NAME).read_bytes())
    except (OSError, ValueError, RecursionError):  # unreadable, not JSON
        return False
    if not isinstance(integrity, dict) or integrity.get("format") != INTEGRITY_FORMAT:
        return False
    listed = integrity.get("sha256")
    return isinstance(listed, dict) and set(entries) - {INTEGRITY_NAME} <= set(listed)


def check_export_target(out_dir: str | os.PathLike) -> Path:
    """`out_dir` as an absolute path (symlinks not followed) if an export may be written there: absent, an empty
    folder, or an earlier policy directory; otherwise one ConfigError line naming it (nothing is touched)."""
    target = Path(os.path.abspath(out_dir))
    if not os.path.lexists(target):
        return target
    if target.is_symlink():
        raise ConfigError(f"out: '{target}' is a symlink; refusing to replace it (pass a new or policy directory)")
    if not target.is_dir():
        raise ConfigError(
            f"out: '{target}' is an existing file, not a policy directory; refusing to replace it "
            "(remove it or choose another out)"
        )
    try:
        empty = not any(target.iterdir())
    except OSError as exc:
        raise ConfigError(f"out: cannot read '{target}' ({exc.strerror})") from None
    if not empty and not is_policy_dir(target):
        raise ConfigError(
            f"out: '{target}' exists and is not a policy directory (policy.json, integrity.json and "
            "only the files it lists); refusing to replace it (remove it or choose another out)"
        )
    return target


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def describe_action_space(space: spaces.Space) -> dict:
    """policy.json's `action` entry: the space as a checkpoint describes it, plus what the actor outputs."""
    try:
        desc = describe_space(space)
    except ConfigError:
        raise TypeError(
            f"action space {type(space).__name__} is not exportable; allowed: MultiDiscrete, Discrete, Box"
        ) from None
    return {**desc, "output": "mean" if desc["type"] == "Box" else "logits"}


def export_policy(
    model,
    out_dir: str | Path,
    env_spec: dict | None = None,
    obs_rms=None,
    clip_obs: float = 10.0,
    extra: dict | None = None,
) -> Path:
    """Write `actor.onnx` and `policy.json` for an SB3 on-policy model (PPO, A2C, MaskablePPO).

    `env_spec` records how to rebuild the environment (id and kwargs); `obs_rms` is VecNormalize's running mean/var
    (observations are normalised in numpy at deployment, exactly as VecNormalize does)."""
    algo = type(model).__name__
    if algo not in SUPPORTED_ALGOS:
        raise TypeError(f"export: algorithm {algo} unsupported; allowed: {', '.join(SUPPORTED_ALGOS)}")
    obs_space = model.observation_space
    if not isinstance(obs_space, spaces.Box) or len(obs_space.shape) != 1:
        raise TypeError("export: the observation space must be a flat Box (wrap the env in FlattenObservation)")
    out_dir = check_export_target(out_dir)
    with atomic_dir(out_dir, replace=is_policy_dir) as tmp:
        _write_policy(tmp, model, env_spec, obs_rms, clip_obs, extra)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
    return out_dir


# INFO chatter of the ONNX passes and "torchvision is not installed" notes of torch.onnx: not ours, not actionable
_EXPORT_LOGGERS = {"onnx_ir": logging.WARNING, "onnxscript": logging.WARNING, "torch.onnx": logging.ERROR}


@contextlib.contextmanager
def quiet_onnx_export():
    """torch.onnx.export without third-party log noise (its INFO lines, optional-dependency notes, a torch
    deprecation FutureWarning about LeafSpec); every other warning still shows."""
    saved = {name: logging.getLogger(name).level for name in _EXPORT_LOGGERS}
    for name, level in _EXPORT_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*\bLeafSpec\b", category=FutureWarning)
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _write_policy(out: Path, model, env_spec: dict | None, obs_rms, clip_obs: float, extra: dict | None) -> None:
    """Write the policy's files into the (empty, temporary) folder `out`, then the integrity list of all of them."""
    obs_space = model.observation_space
    actor = _Actor(model.policy).to("cpu").eval()
    dummy = torch.zeros((2, obs_space.shape[0]), dtype=torch.float32)
    onnx_path = out / ONNX_NAME
    with torch.no_grad(), quiet_onnx_export():
        torch.onnx.export(
            actor,
            (dummy,),
            str(onnx_path),
            input_names=["obs"],
            output_names=["action_out"],
            dynamic_shapes={"obs": {0: torch.export.Dim("batch", min=1, max=4096)}},
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    norm = None
    if obs_rms is not None:
        norm = {
            "mean": np.asarray(obs_rms.mean, dtype=np.float64).tolist(),
            "var": np.asarray(obs_rms.var, dtype=np.float64).tolist(),
            "clip": float(clip_obs),
            "epsilon": 1e-8,
        }
    meta = {
        "format": POLICY_FORMAT,
        "version": POLICY_VERSION,
        "algorithm": type(model).__name__,
        "onnx": ONNX_NAME,
        "onnx_sha256": sha256(onnx_path),
        "observation": {"shape": list(obs_space.shape), "dtype": "float32"},
        "normalization": norm,
        "action": describe_action_space(model.action_space),
        "env": env_spec or {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **(extra or {}),
    }
    (out / META_NAME).write_text(json.dumps(meta, indent=1))
    files = {p.name: sha256(p) for p in sorted(out.iterdir())}
    (out / INTEGRITY_NAME).write_text(json.dumps({"format": INTEGRITY_FORMAT, "version": 1, "sha256": files}, indent=1))
