"""CoEL-Gym's training checkpoints: a zip of JSON and safetensors only, so loading one never unpickles anything.

A checkpoint (`model.zip`, `checkpoints/ckpt_<N>_steps.zip`) holds exactly these members:

    meta.json              format/version tag, algo, num_timesteps, n_updates, n_envs, seed, the agent config
                           (algo, policy, policy_kwargs, kwargs) needed to rebuild the algorithm, the observation and
                           action spaces (shape check), VecNormalize count/clip, and the optimizer state's structure
    policy.safetensors     the policy's state dict
    optimizer.safetensors  the optimizer state's tensors (their place in the state dict is in meta.json)
    vecnorm.safetensors    VecNormalize's observation mean/var (only when observations are normalised)

stable-baselines3's own zips (whose `data` entries can carry cloudpickle payloads) are refused, as is anything
truncated, corrupt or unexpected: every failure is one `ConfigError` line. Nothing in a checkpoint is trusted: every
meta.json field is checked for type and range, the agent config against a whitelist (`check_agent_config`, the same
check a training config gets) with caps that keep the rebuilt algorithm small, and every tensor for dtype, shape and
finiteness, before anything is built from them. Checkpoints are written atomically.
"""

from __future__ import annotations

import itertools
import json
import math
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
MAX_TOTAL_BYTES = 1 << 30  # all members together, uncompressed: refuse zip bombs
MAX_MEMBER_BYTES = MAX_TOTAL_BYTES
MAX_ENVS = 4096
MAX_STEPS = 2**62  # num_timesteps, n_updates
MAX_SEED = 2**32 - 1  # numpy's legacy seeding (SB3's set_random_seed)
MAX_CATEGORIES = 2**31 - 1  # Discrete n, MultiDiscrete nvec entries
MAX_SPACE_ENTRIES = 1 << 20  # entries of a Box / MultiDiscrete description
MAX_ROLLOUT = 1 << 20  # n_steps * n_envs
MAX_BUFFER_ENTRIES = 1 << 28  # n_steps * n_envs * (observation + action entries): the rollout buffer
MAX_PARAMS = 1 << 26  # estimated policy parameters of a rebuilt network
MAX_WIDTH, MAX_DEPTH = 4096, 8  # net_arch layers
ALGOS = ("PPO", "A2C", "MaskablePPO")  # keep in sync with agents.sb3.ALGORITHMS
POLICIES = ("MlpPolicy",)  # observations are flat Boxes
ACTIVATIONS = ("tanh", "relu", "elu", "leaky_relu", "gelu", "silu")  # agents.sb3 maps them to torch.nn modules
N_STEPS_DEFAULT = {"PPO": 2048, "MaskablePPO": 2048, "A2C": 5}  # SB3's defaults
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
OPTIONAL = ("n_updates", "seed", "created")

# agent.kwargs a config or checkpoint may set: name -> (kind, low, high); "int" in [low, high], "float" finite in
# [low, high] ("float>" : low excluded), "bool", "float?" a float> or null
_COMMON_KWARGS = {
    "learning_rate": ("float>", 0.0, 10.0),
    "n_steps": ("int", 1, MAX_ROLLOUT),
    "gamma": ("float", 0.0, 1.0),
    "gae_lambda": ("float", 0.0, 1.0),
    "ent_coef": ("float", 0.0, 1e3),
    "vf_coef": ("float", 0.0, 1e3),
    "max_grad_norm": ("float>", 0.0, 1e6),
    "normalize_advantage": ("bool", None, None),
}
_PPO_KWARGS = {
    **_COMMON_KWARGS,
    "batch_size": ("int", 2, MAX_ROLLOUT),  # SB3 asserts batch_size > 1
    "n_epochs": ("int", 1, 1000),
    "clip_range": ("float>", 0.0, 10.0),
    "clip_range_vf": ("float?", 0.0, 10.0),
    "target_kl": ("float?", 0.0, 1e3),
}
AGENT_KWARGS = {
    "PPO": _PPO_KWARGS,
    "MaskablePPO": _PPO_KWARGS,
    "A2C": {**_COMMON_KWARGS, "use_rms_prop": ("bool", None, None), "rms_prop_eps": ("float>", 0.0, 1.0)},
}
POLICY_KWARGS = ("net_arch", "log_std_init", "ortho_init", "activation_fn")


def _is_int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _is_num(value: Any, low: float = -math.inf, high: float = math.inf, low_open: bool = False) -> bool:
    """A finite int/float (not a bool) in [low, high] (low excluded with `low_open`)."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and value <= high
    )


def _check_kwarg(key: str, value: Any, spec: tuple) -> str | None:
    """What is wrong with agent.kwargs[key] (None if nothing)."""
    kind, low, high = spec
    if kind == "int":
        ok, want = _is_int(value, low, high), f"an integer in [{low}, {high}]"
    elif kind == "bool":
        ok, want = isinstance(value, bool), "true or false"
    elif kind == "float":
        ok, want = _is_num(value, low, high), f"a finite number in [{low}, {high}]"
    else:
        ok = (value is None and kind == "float?") or _is_num(value, low, high, low_open=True)
        want = f"a finite number in ({low}, {high}]" + (" or null" if kind == "float?" else "")
    return None if ok else f"agent.kwargs.{key}: {value!r} must be {want}"


def _net_arch_layers(value: Any, field: str) -> list[list[int]]:
    """The hidden-layer lists of a net_arch (a list, or a dict of pi/vf lists); ConfigError text if malformed."""
    lists = list(value.values()) if isinstance(value, dict) else [value]
    if isinstance(value, dict) and (not value or not set(value) <= {"pi", "vf"}):
        raise ConfigError(f"{field}: {value!r} must be a list of layer widths or a dict with keys pi and/or vf")
    for layers in lists:
        if not isinstance(layers, list) or len(layers) > MAX_DEPTH or not all(_is_int(w, 1, MAX_WIDTH) for w in layers):
            raise ConfigError(f"{field}: {layers!r} must be a list of at most {MAX_DEPTH} integers in [1, {MAX_WIDTH}]")
    return lists


def check_agent_config(agent: Any, n_envs: int | None = None, prefix: str = "") -> dict:
    """Refuse (one ConfigError line, `prefix` + field) an agent config — from a training config or a checkpoint,
    both untrusted — that is not: algo one of ALGOS, policy MlpPolicy, kwargs only the whitelisted keys of that
    algorithm with their types and ranges, policy_kwargs only net_arch (layer widths), log_std_init, ortho_init,
    activation_fn (a name), and a rollout (n_steps * n_envs, given `n_envs`) of at most MAX_ROLLOUT steps."""
    if not isinstance(agent, dict):
        raise ConfigError(f"{prefix}agent: must be a mapping with algo, policy, policy_kwargs, kwargs")
    unknown = sorted(set(agent) - {"algo", "policy", "policy_kwargs", "kwargs"}, key=str)
    if unknown:
        raise ConfigError(f"{prefix}agent.{unknown[0]}: unknown field; allowed: algo, policy, policy_kwargs, kwargs")
    algo = agent.get("algo")
    if algo not in ALGOS:
        raise ConfigError(f"{prefix}agent.algo: {algo!r} unknown; allowed: {', '.join(ALGOS)}")
    if agent.get("policy", "MlpPolicy") not in POLICIES:
        raise ConfigError(
            f"{prefix}agent.policy: {agent.get('policy')!r} unsupported; allowed: {', '.join(POLICIES)}"
            " (observations are flat)"
        )
    kwargs = agent.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{prefix}agent.kwargs: {kwargs!r} must be a mapping (or null)")
    allowed = AGENT_KWARGS[algo]
    for key, value in kwargs.items():
        if key not in allowed:
            raise ConfigError(f"{prefix}agent.kwargs.{key}: unknown for {algo}; allowed: {', '.join(allowed)}")
        problem = _check_kwarg(key, value, allowed[key])
        if problem:
            raise ConfigError(prefix + problem)
    if n_envs is not None:
        rollout = kwargs.get("n_steps", N_STEPS_DEFAULT[algo]) * n_envs
        if rollout > MAX_ROLLOUT or (rollout < 2 and algo != "A2C"):
            raise ConfigError(
                f"{prefix}agent.kwargs.n_steps: n_steps * n_envs = {rollout} must be in "
                f"[{1 if algo == 'A2C' else 2}, {MAX_ROLLOUT}] (the rollout per update)"
            )
    policy_kwargs = agent.get("policy_kwargs") or {}
    if not isinstance(policy_kwargs, dict):
        raise ConfigError(f"{prefix}agent.policy_kwargs: {policy_kwargs!r} must be a mapping (or null)")
    for key, value in policy_kwargs.items():
        field = f"{prefix}agent.policy_kwargs.{key}"
        if key not in POLICY_KWARGS:
            raise ConfigError(f"{field}: unknown; allowed: {', '.join(POLICY_KWARGS)}")
        if key == "net_arch":
            for layers in _net_arch_layers(value, field):
                if sum(a * b for a, b in itertools.pairwise(layers)) > MAX_PARAMS:
                    raise ConfigError(f"{field}: {layers!r} is too large (over {MAX_PARAMS} weights)")
        elif key == "log_std_init" and not _is_num(value, -20.0, 20.0):
            raise ConfigError(f"{field}: {value!r} must be a finite number in [-20, 20]")
        elif key == "ortho_init" and not isinstance(value, bool):
            raise ConfigError(f"{field}: {value!r} must be true or false")
        elif key == "activation_fn" and value not in ACTIVATIONS:
            raise ConfigError(f"{field}: {value!r} unknown; allowed: {', '.join(ACTIVATIONS)}")
    return agent


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
        self._check_optimizer_fits(model.policy.optimizer)
        try:
            model.policy.load_state_dict(self.policy, strict=True)
            model.policy.optimizer.load_state_dict(self.optimizer)
        except (RuntimeError, ValueError, KeyError) as exc:
            text = " ".join(line.strip() for line in str(exc).strip().splitlines()) or type(exc).__name__
            text = text if len(text) <= 300 else text[:297] + "..."
            raise self.error(f"does not fit this agent's network (another net_arch?): {text}") from None
        model.num_timesteps = self.num_timesteps
        model._n_updates = self.meta.get("n_updates", 0)
        if venv is None:
            return
        if hasattr(venv, "obs_rms"):
            if self.vecnorm is None:
                raise self.error("has no observation statistics (trained with normalize_obs=false)")
            venv.obs_rms.mean, venv.obs_rms.var = self.vecnorm["mean"].copy(), self.vecnorm["var"].copy()
            venv.obs_rms.count = float(self.meta["normalization"]["count"])
        elif self.vecnorm is not None:
            raise self.error("was trained on normalised observations (normalize_obs=true)")

    def _check_optimizer_fits(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse optimizer state that torch would load but that does not fit `optimizer` (what torch does not check:
        hyperparameters of another kind, per-parameter state of another shape)."""
        fresh = optimizer.state_dict()["param_groups"]
        saved = self.optimizer["param_groups"]
        if len(saved) != len(fresh):
            raise self.error(f"has {len(saved)} optimizer parameter groups, this agent {len(fresh)}")
        for i, (got, want) in enumerate(zip(saved, fresh, strict=True)):
            for key, value in want.items():
                if key == "params" or key not in got:
                    continue
                old = got[key]
                if isinstance(value, (list, tuple)):
                    ok = isinstance(old, (list, tuple)) and len(old) == len(value)
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    ok = _is_num(old)
                else:  # flags and options: bool or None
                    ok = old is None or isinstance(old, bool)
                if not ok:
                    raise self.error(
                        f"optimizer param_groups[{i}].{key} is {str(old)[:40]}, this agent's is "
                        f"{value!r} (another kind)"
                    )
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for index, entries in self.optimizer["state"].items():
            if index >= len(params):
                raise self.error(f"has optimizer state for parameter {index}; this agent has {len(params)}")
            for name, value in entries.items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != params[index].shape:
                    raise self.error(
                        f"optimizer state '{name}' of parameter {index} has shape {list(value.shape)}, "
                        f"the parameter {list(params[index].shape)} (another net_arch?)"
                    )

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
            infolist = zf.infolist()
            infos = {i.filename: i for i in infolist}
            names = set(infos)
            if len(infolist) != len(infos):
                dup = sorted(n for n in names if sum(i.filename == n for i in infolist) > 1)[0]
                raise ConfigError(f"{where} has member '{dup}' twice: not a checkpoint written by experiments.train")
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
            total = sum(i.file_size for i in infolist)
            if total > MAX_TOTAL_BYTES:
                raise ConfigError(f"{where}: members are {total} bytes uncompressed, more than {MAX_TOTAL_BYTES}")
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


def _check_space(desc: Any, name: str, flat_box: bool = False) -> tuple[int, int, int]:
    """Check a space description (ValueError text naming `name` otherwise); returns its (entries, network outputs,
    rollout-buffer entries): a Box's size twice, Discrete (1, n, 1), MultiDiscrete (len, sum(nvec), len)."""
    types = ("Box",) if flat_box else ("MultiDiscrete", "Discrete", "Box")
    if not isinstance(desc, dict) or desc.get("type") not in types:
        raise ValueError(f"{name}: type must be one of {', '.join(types)}" + (" (a flat Box)" if flat_box else ""))
    kind = desc["type"]
    keys = {"Discrete": {"type", "n"}, "MultiDiscrete": {"type", "nvec"}, "Box": {"type", "shape", "low", "high"}}
    if set(desc) != keys[kind]:
        raise ValueError(f"{name}: a {kind} has exactly the fields {', '.join(sorted(keys[kind]))}")
    if kind == "Discrete":
        if not _is_int(desc["n"], 1, MAX_CATEGORIES):
            raise ValueError(f"{name}.n: {desc['n']!r} must be an integer in [1, {MAX_CATEGORIES}]")
        return 1, desc["n"], 1
    if kind == "MultiDiscrete":
        nvec = desc["nvec"]
        if (
            not isinstance(nvec, list)
            or not 1 <= len(nvec) <= MAX_SPACE_ENTRIES
            or not all(_is_int(v, 1, MAX_CATEGORIES) for v in nvec)
        ):
            raise ValueError(
                f"{name}.nvec must be a list of 1 to {MAX_SPACE_ENTRIES} integers in [1, {MAX_CATEGORIES}]"
            )
        return len(nvec), sum(nvec), len(nvec)
    shape = desc["shape"]
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= (1 if flat_box else 8)
        or not all(_is_int(d, 1, MAX_SPACE_ENTRIES) for d in shape)
        or math.prod(shape) > MAX_SPACE_ENTRIES
    ):
        raise ValueError(
            f"{name}.shape: {str(shape)[:40]} must be a {'1-D ' if flat_box else ''}list of positive "
            f"integers with at most {MAX_SPACE_ENTRIES} entries in all"
        )
    size = math.prod(shape)
    bounds = []
    for key in ("low", "high"):
        values = desc[key]
        if (
            not isinstance(values, list)
            or len(values) != size
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) for v in values)
        ):
            raise ValueError(f"{name}.{key} must be a list of {size} numbers (no NaN)")
        bounds.append(np.asarray(values, np.float64))
    if (bounds[0] > bounds[1]).any():
        raise ValueError(f"{name}: low must be <= high")
    return size, size, size


def _param_estimate(obs_dim: int, outputs: int, agent: dict) -> int:
    """About how many parameters the rebuilt actor-critic has (SB3's MlpPolicy layout; default net_arch 64, 64)."""
    arch = (agent.get("policy_kwargs") or {}).get("net_arch", [64, 64])
    pi, vf = (arch.get("pi", []), arch.get("vf", [])) if isinstance(arch, dict) else (arch, arch)

    def mlp(widths: list[int]) -> int:
        return sum(a * b + b for a, b in itertools.pairwise(widths))

    return mlp([obs_dim, *pi, outputs]) + mlp([obs_dim, *vf, 1]) + outputs


def _check_meta(meta: dict, where: str) -> None:
    """Check every field of a parsed meta.json for type and range (ConfigError otherwise)."""
    if (
        meta.get("format") != CHECKPOINT_FORMAT
        or type(meta.get("version")) is not int
        or (meta.get("version") != CHECKPOINT_VERSION)
    ):
        raise ConfigError(
            f"{where}: format/version {meta.get('format')!r}/{meta.get('version')!r} unsupported; "
            f"allowed: {CHECKPOINT_FORMAT}/{CHECKPOINT_VERSION}"
        )
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ConfigError(f"{where}: {META} lacks field '{missing[0]}'")
    unknown = sorted(set(meta) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ConfigError(f"{where}: {META} has unknown field '{unknown[0]}'")
    bad = f"{where}: {META} field"
    if meta["algo"] not in ALGOS:
        raise ConfigError(f"{bad} algo: {meta['algo']!r} unknown; allowed: {', '.join(ALGOS)}")
    for key in ("num_timesteps", "n_updates"):
        if key in meta and not _is_int(meta[key], 0, MAX_STEPS):
            raise ConfigError(f"{bad} {key}: {str(meta[key])[:40]} must be an integer in [0, {MAX_STEPS}]")
    if not _is_int(meta["n_envs"], 1, MAX_ENVS):
        raise ConfigError(f"{bad} n_envs: {str(meta['n_envs'])[:40]} must be an integer in [1, {MAX_ENVS}]")
    if meta.get("seed") is not None and not _is_int(meta["seed"], 0, MAX_SEED):
        raise ConfigError(f"{bad} seed: {str(meta['seed'])[:40]} must be null or an integer in [0, {MAX_SEED}]")
    if "created" in meta and not isinstance(meta["created"], str):
        raise ConfigError(f"{bad} created: must be a string")
    agent = meta["agent"]
    if not isinstance(agent, dict) or agent.get("algo") != meta["algo"]:
        raise ConfigError(f"{bad} agent: must be a mapping whose algo is {meta['algo']!r}")
    check_agent_config(agent, meta["n_envs"], prefix=f"{where}: {META} ")
    try:
        obs_dim, _, obs_entries = _check_space(meta["observation_space"], "observation_space", flat_box=True)
        _, outputs, act_entries = _check_space(meta["action_space"], "action_space")
    except ValueError as exc:
        raise ConfigError(f"{bad} {exc}") from None
    rollout = (agent.get("kwargs") or {}).get("n_steps", N_STEPS_DEFAULT[meta["algo"]]) * meta["n_envs"]
    if rollout * (obs_entries + act_entries) > MAX_BUFFER_ENTRIES:
        raise ConfigError(
            f"{bad} agent: a rollout of {rollout} steps of {obs_entries} observation and {act_entries} "
            f"action entries is more than {MAX_BUFFER_ENTRIES} entries"
        )
    params = _param_estimate(obs_dim, outputs, agent)
    if params > MAX_PARAMS:
        raise ConfigError(
            f"{bad} agent: its network for these spaces has about {params} parameters, more than {MAX_PARAMS}"
        )
    norm = meta["normalization"]
    if norm is not None and (
        not isinstance(norm, dict)
        or set(norm) != {"count", "clip_obs"}
        or not _is_num(norm["count"], 0.0, float(MAX_STEPS), low_open=True)
        or not _is_num(norm["clip_obs"], 0.0, 1e6, low_open=True)
    ):
        raise ConfigError(f"{bad} normalization: must be null or {{count, clip_obs}}, both finite numbers > 0")


def _check_tensors(tensors: dict[str, torch.Tensor], member: str, dtype: torch.dtype, where: str) -> None:
    for key, t in tensors.items():
        if t.dtype != dtype:
            raise ConfigError(f"{where}: {member} tensor '{key}' is {t.dtype}, expected {dtype}")
        if not torch.isfinite(t).all():
            raise ConfigError(f"{where}: {member} tensor '{key}' holds NaN or inf")


def _check_optimizer(state: Any, where: str) -> None:
    """An optimizer state dict of the form torch writes: {state: {int: {str: tensor | number}}, param_groups:
    [{str: number | bool | null | [numbers]}]}, every number finite."""
    bad = f"{where}: {META} optimizer"
    if not isinstance(state, dict) or set(state) != {"state", "param_groups"}:
        raise ConfigError(f"{bad} must hold exactly 'state' and 'param_groups'")
    if not isinstance(state["state"], dict) or not all(
        _is_int(k, 0, 1 << 20)
        and isinstance(v, dict)
        and all(isinstance(n, str) and (isinstance(x, torch.Tensor) or _is_num(x)) for n, x in v.items())
        for k, v in state["state"].items()
    ):
        raise ConfigError(f"{bad} state must map parameter indices to {{name: tensor or finite number}}")
    groups = state["param_groups"]
    if not isinstance(groups, list) or not 1 <= len(groups) <= 64:
        raise ConfigError(f"{bad} param_groups must be a list of 1 to 64 groups")

    def plain(x: Any) -> bool:
        return x is None or isinstance(x, bool) or _is_num(x)

    for i, group in enumerate(groups):
        if (
            not isinstance(group, dict)
            or not isinstance(group.get("params"), list)
            or not all(_is_int(p, 0, 1 << 20) for p in group["params"])
        ):
            raise ConfigError(f"{bad} param_groups[{i}] must be a mapping with a 'params' list of indices")
        for key, value in group.items():
            if key == "params":
                continue
            ok = isinstance(key, str) and (
                plain(value)
                or (isinstance(value, (list, tuple)) and len(value) <= 16 and all(_is_num(v) for v in value))
            )
            if not ok:
                raise ConfigError(
                    f"{bad} param_groups[{i}].{key}: {str(value)[:40]} must be a finite number, "
                    "true/false, null or a list of finite numbers"
                )


def _parse(path: Path, field: str, raw: dict[str, bytes]) -> Checkpoint:
    where = f"{field}: checkpoint '{path}'"
    try:
        meta = json.loads(raw[META])
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ConfigError(f"{where}: {META} is not valid JSON") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{where}: {META} must hold a JSON object")
    _check_meta(meta, where)
    norm = meta["normalization"]
    needed = [POLICY, OPTIMIZER] + ([VECNORM] if norm is not None else [])
    absent = [n for n in needed if n not in raw]
    if absent or (norm is None and VECNORM in raw):
        raise ConfigError(f"{where}: members do not match {META} (missing '{(absent or [VECNORM])[0]}' or extra)")
    used: set[str] = set()
    try:
        policy = load_tensors(raw[POLICY])
        opt_tensors = load_tensors(raw[OPTIMIZER])
        optimizer = _decode(meta["optimizer"], _Recording(opt_tensors, used))
        vecnorm = load_tensors(raw[VECNORM]) if norm is not None else None
    except (SafetensorError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise ConfigError(
            f"{where} is corrupt ({type(exc).__name__}): not a checkpoint written by experiments.train"
        ) from None
    _check_tensors(policy, POLICY, torch.float32, where)
    _check_tensors(opt_tensors, OPTIMIZER, torch.float32, where)
    if set(opt_tensors) != used:
        raise ConfigError(f"{where}: {OPTIMIZER} holds tensors {META} does not use")
    _check_optimizer(optimizer, where)
    if vecnorm is not None:
        shape = tuple(meta["observation_space"]["shape"])
        if set(vecnorm) != {"mean", "var"} or any(t.shape != shape for t in vecnorm.values()):
            raise ConfigError(f"{where}: {VECNORM} must hold 'mean' and 'var' of shape {shape}")
        _check_tensors(vecnorm, VECNORM, torch.float64, where)
        if (vecnorm["var"] < 0).any():
            raise ConfigError(f"{where}: {VECNORM} var holds negative values")
        vecnorm = {k: t.numpy() for k, t in vecnorm.items()}
    return Checkpoint(path, field, meta, policy, optimizer, vecnorm)


class _Recording(dict):
    """The optimizer tensors by key, noting which keys meta.json's tree uses."""

    def __init__(self, tensors: dict[str, torch.Tensor], used: set[str]):
        super().__init__(tensors)
        self.used = used

    def __getitem__(self, key):
        value = super().__getitem__(key)  # KeyError (unhashable: TypeError) for a key that is not there
        self.used.add(key)
        return value
