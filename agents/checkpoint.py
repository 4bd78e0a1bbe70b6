"""CoEL-Gym's training checkpoints: a zip of JSON and safetensors only, so loading one never unpickles anything.

A checkpoint (`model.zip`, `checkpoints/ckpt_<N>_steps.zip`) holds exactly these members:

    meta.json              format/version tag, algo, num_timesteps, n_updates, n_envs, seed, the agent config
                           (algo, policy, policy_kwargs, kwargs) needed to rebuild the algorithm, the observation and
                           action spaces (shape check), VecNormalize count/clip, and the optimizer state's structure
    policy.safetensors     the policy's state dict
    optimizer.safetensors  the optimizer state's tensors (their place in the state dict is in meta.json)
    vecnorm.safetensors    VecNormalize's observation mean/var (only when observations are normalised)

stable-baselines3's own zips (whose `data` entries can carry cloudpickle payloads) are refused, as is anything
truncated, corrupt or unexpected: every failure is one `ConfigError` line. Checkpoints are written atomically.
"""

from __future__ import annotations

import json
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from coel_env.atomic import atomic_path
from coel_env.errors import ConfigError

CHECKPOINT_FORMAT = "coel-checkpoint"
CHECKPOINT_VERSION = 1
META, POLICY, OPTIMIZER, VECNORM = "meta.json", "policy.safetensors", "optimizer.safetensors", "vecnorm.safetensors"
MAX_MEMBER_BYTES = 1 << 31  # refuse zip bombs
MAX_ENVS = 4096
REQUIRED = (
    "format",
    "version",
    "algo",
    "num_timesteps",
    "n_envs",
    "agent",
    "observation_space",
    "action_space",
    "optimizer",
    "normalization",
)


def describe_space(space: spaces.Space) -> dict:
    """A JSON description of a flat observation or action space (what a checkpoint must match)."""
    if isinstance(space, spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": space.nvec.astype(int).ravel().tolist()}
    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n)}
    if isinstance(space, spaces.Box):
        return {
            "type": "Box",
            "shape": list(space.shape),
            "low": space.low.ravel().tolist(),
            "high": space.high.ravel().tolist(),
        }
    raise ConfigError(f"checkpoint: space {type(space).__name__} unsupported; allowed: MultiDiscrete, Discrete, Box")


def space_from_description(desc: dict) -> spaces.Space:
    """The space `describe_space` described."""
    if desc["type"] == "MultiDiscrete":
        return spaces.MultiDiscrete(np.asarray(desc["nvec"], dtype=np.int64))
    if desc["type"] == "Discrete":
        return spaces.Discrete(int(desc["n"]))
    shape = tuple(desc["shape"])
    low = np.asarray(desc["low"], np.float32).reshape(shape)
    return spaces.Box(low, np.asarray(desc["high"], np.float32).reshape(shape), dtype=np.float32)


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON tree for an optimizer state dict; tensors go to `tensors` under a numbered key."""
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"t": key}
    if isinstance(obj, dict):
        return {"d": [[k, _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"l" if isinstance(obj, list) else "u": [_encode(v, tensors) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"v": obj}
    raise ConfigError(f"checkpoint: optimizer state holds a {type(obj).__name__}; only tensors and JSON values")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `_encode` (a malformed tree is a ValueError)."""
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError("malformed optimizer state")
    ((tag, value),) = node.items()
    if tag == "t":
        return tensors[value]
    if tag == "d":
        return {k: _decode(v, tensors) for k, v in value}
    if tag in ("l", "u"):
        items = [_decode(v, tensors) for v in value]
        return items if tag == "l" else tuple(items)
    if tag == "v" and (value is None or isinstance(value, (bool, int, float, str))):
        return value
    raise ValueError("malformed optimizer state")


def write_checkpoint(path: str | Path, model, agent: dict, venv=None) -> Path:
    """Write `model` (an SB3 on-policy algorithm), the `agent` config it was built from and `venv`'s observation
    statistics (a VecNormalize; anything else: none) to `path`, atomically."""
    opt_tensors: dict[str, torch.Tensor] = {}
    optimizer = _encode(model.policy.optimizer.state_dict(), opt_tensors)
    policy = {k: v.detach().cpu().contiguous().clone() for k, v in model.policy.state_dict().items()}
    rms = getattr(venv, "obs_rms", None)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "algo": type(model).__name__,
        "num_timesteps": int(model.num_timesteps),
        "n_updates": int(getattr(model, "_n_updates", 0)),
        "n_envs": int(model.n_envs),
        "seed": model.seed,
        "agent": {k: agent.get(k) for k in ("algo", "policy", "policy_kwargs", "kwargs")},
        "observation_space": describe_space(model.observation_space),
        "action_space": describe_space(model.action_space),
        "optimizer": optimizer,
        "normalization": None if rms is None else {"count": float(rms.count), "clip_obs": float(venv.clip_obs)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(META, json.dumps(meta, indent=1))
        zf.writestr(POLICY, save_tensors(policy))
        zf.writestr(OPTIMIZER, save_tensors(opt_tensors))
        if rms is not None:
            zf.writestr(
                VECNORM,
                save_tensors(
                    {
                        "mean": torch.from_numpy(np.asarray(rms.mean, np.float64)),
                        "var": torch.from_numpy(np.asarray(rms.var, np.float64)),
                    }
                ),
            )
    return Path(path)


@dataclass
class Checkpoint:
    """A checkpoint read (and checked for form) by `read_checkpoint`; `field` names it in error messages."""

    path: Path
    field: str
    meta: dict
    policy: dict[str, torch.Tensor]
    optimizer: dict
    vecnorm: dict[str, np.ndarray] | None

    @property
    def algo(self) -> str:
        return self.meta["algo"]

    @property
    def num_timesteps(self) -> int:
        return int(self.meta["num_timesteps"])

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.field}: checkpoint '{self.path}' {message}")

    def check_spaces(self, observation_space: spaces.Space, action_space: spaces.Space) -> None:
        """Refuse an env whose observation shape or action space differs from the checkpoint's."""
        want, got = self.meta["observation_space"].get("shape"), list(getattr(observation_space, "shape", []))
        if want != got:
            raise self.error(
                f"has observation shape {want}, this run's env {got} (another scenario, knobs or obs_exclude?)"
            )
        if describe_space(action_space) != self.meta["action_space"]:
            raise self.error(
                f"has action space {space_from_description(self.meta['action_space'])}, this run's env "
                f"{action_space} (another scenario, env or knobs?)"
            )

    def restore(self, model, venv=None) -> None:
        """Load the weights, optimizer state and step counters into `model` (an algorithm built from the same agent
        config for the same spaces) and, given the training `venv`, the observation statistics into it (which must
        then be a VecNormalize exactly when the checkpoint has statistics)."""
        try:
            model.policy.load_state_dict(self.policy, strict=True)
            model.policy.optimizer.load_state_dict(self.optimizer)
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise self.error(f"does not fit this agent's network (another net_arch?): {first}") from None
        model.num_timesteps = self.num_timesteps
        model._n_updates = int(self.meta.get("n_updates", 0))
        if venv is None:
            return
        if hasattr(venv, "obs_rms"):
            if self.vecnorm is None:
                raise self.error("has no observation statistics (trained with normalize_obs=false)")
            venv.obs_rms.mean, venv.obs_rms.var = self.vecnorm["mean"].copy(), self.vecnorm["var"].copy()
            venv.obs_rms.count = float(self.meta["normalization"]["count"])
        elif self.vecnorm is not None:
            raise self.error("was trained on normalised observations (normalize_obs=true)")

    def obs_normalization(self):
        """VecNormalize's statistics as (RunningMeanStd, clip_obs), or None when observations were not normalised."""
        if self.vecnorm is None:
            return None
        from stable_baselines3.common.running_mean_std import RunningMeanStd

        rms = RunningMeanStd(shape=self.vecnorm["mean"].shape)
        rms.mean, rms.var = self.vecnorm["mean"].copy(), self.vecnorm["var"].copy()
        rms.count = float(self.meta["normalization"]["count"])
        return rms, float(self.meta["normalization"]["clip_obs"])


def read_checkpoint(path: str | Path, field: str = "resume") -> Checkpoint:
    """Read and check a checkpoint written by `write_checkpoint`; anything else is one `ConfigError` line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{field}: no checkpoint at '{path}'")
    where = f"{field}: checkpoint '{path}'"
    try:
        with zipfile.ZipFile(path) as zf:
            infos = {i.filename: i for i in zf.infolist()}
            names = set(infos)
            if META not in names:
                if "data" in names:
                    raise ConfigError(
                        f"{where} is a stable-baselines3 zip: refused, loading it could run code "
                        "(only checkpoints written by experiments.train are loaded)"
                    )
                raise ConfigError(f"{where} has no {META}: not a CoEL-Gym checkpoint")
            extra = sorted(names - {META, POLICY, OPTIMIZER, VECNORM})
            if extra:
                raise ConfigError(f"{where} has an unexpected member '{extra[0]}': not a CoEL-Gym checkpoint")
            big = [n for n, i in infos.items() if i.file_size > MAX_MEMBER_BYTES]
            if big:
                raise ConfigError(f"{where}: member '{big[0]}' is larger than {MAX_MEMBER_BYTES} bytes")
            raw = {name: zf.read(name) for name in sorted(names)}
    except ConfigError:
        raise
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        zlib.error,
        EOFError,
        OSError,
        ValueError,
        RuntimeError,
        NotImplementedError,
    ) as exc:  # truncated, corrupt, encrypted or oddly compressed
        raise ConfigError(f"{where} is not a readable zip (truncated or corrupt?): {type(exc).__name__}") from None
    return _parse(path, field, raw)


def _parse(path: Path, field: str, raw: dict[str, bytes]) -> Checkpoint:
    where = f"{field}: checkpoint '{path}'"
    try:
        meta = json.loads(raw[META])
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ConfigError(f"{where}: {META} is not valid JSON") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{where}: {META} must hold a JSON object")
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(
            f"{where}: format/version {meta.get('format')!r}/{meta.get('version')!r} unsupported; "
            f"allowed: {CHECKPOINT_FORMAT}/{CHECKPOINT_VERSION}"
        )
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ConfigError(f"{where}: {META} lacks field '{missing[0]}'")
    agent = meta["agent"]
    n_envs = meta["n_envs"]
    if (
        not isinstance(agent, dict)
        or agent.get("algo") != meta["algo"]
        or not isinstance(meta["num_timesteps"], int)
        or not isinstance(n_envs, int)
        or not 1 <= n_envs <= MAX_ENVS
    ):
        raise ConfigError(f"{where}: {META} has a malformed agent, algo, num_timesteps or n_envs")
    norm = meta["normalization"]
    needed = [POLICY, OPTIMIZER] + ([VECNORM] if norm is not None else [])
    absent = [n for n in needed if n not in raw]
    if absent or (norm is None and VECNORM in raw):
        raise ConfigError(f"{where}: members do not match {META} (missing '{(absent or [VECNORM])[0]}' or extra)")
    try:
        policy = load_tensors(raw[POLICY])
        opt_tensors = load_tensors(raw[OPTIMIZER])
        optimizer = _decode(meta["optimizer"], opt_tensors)
        vecnorm = None
        if norm is not None:
            stats = load_tensors(raw[VECNORM])
            vecnorm = {"mean": stats["mean"].numpy(), "var": stats["var"].numpy()}
            if not all(isinstance(norm[k], (int, float)) for k in ("count", "clip_obs")):
                raise ValueError("normalization")
        obs_space = space_from_description(meta["observation_space"])
        space_from_description(meta["action_space"])
        if vecnorm is not None and not vecnorm["mean"].shape == vecnorm["var"].shape == obs_space.shape:
            raise ValueError("normalization shape")
    except (SafetensorError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise ConfigError(
            f"{where} is corrupt ({type(exc).__name__}): not a checkpoint written by experiments.train"
        ) from None
    return Checkpoint(path, field, meta, policy, optimizer, vecnorm)
