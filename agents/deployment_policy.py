"""DeploymentPolicy: run an exported policy with numpy + onnxruntime only (no SB3, no pickle).

The directory must hold exactly `integrity.json`, `policy.json` and the ONNX file, as regular files (no symlinks, the
directory itself neither), each matching the SHA-256 that `integrity.json` lists for it; every refusal is one
`PolicyLoadError` line. Files are read once and the verified bytes are what gets parsed and run. The ONNX model must
carry all its weights (external-data tensors are refused: they would be read from files no hash covers) and its
input/output shapes must match policy.json. Observations and masks given to `act`/`raw` are checked too (shape,
numeric, finite): a bad one is one `PolicyInputError` line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from coel_env.errors import CoELError

POLICY_FORMAT = "coel-deployment-policy"  # keep in sync with agents.export
POLICY_VERSION = 2
META_NAME, INTEGRITY_NAME, INTEGRITY_FORMAT = "policy.json", "integrity.json", "coel-policy-integrity"
REQUIRED = ("format", "version", "algorithm", "onnx", "onnx_sha256", "observation", "action", "env")


MAX_DIM = 1 << 20  # observation entries, action logits / entries
MAX_CATEGORIES = 2**31 - 1
ONNX_FLOAT = 1  # onnx.TensorProto.FLOAT
ONNX_EXTERNAL = 1  # onnx.TensorProto.EXTERNAL


class PolicyLoadError(CoELError):
    """A deployment-policy directory is missing, malformed or tampered with."""


class PolicyInputError(CoELError):
    """An observation or action mask given to a DeploymentPolicy does not fit it (shape, type, NaN/inf)."""


def _read_regular(path: Path) -> bytes:
    """The bytes of `path`, refusing a symlink or anything but a regular file (checked on the opened file)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if os.path.islink(path):
            raise PolicyLoadError(f"policy: '{path.name}' in '{path.parent}' is a symlink (refused)") from None
        raise PolicyLoadError(f"policy: cannot read '{path}' ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise PolicyLoadError(f"policy: '{path.name}' in '{path.parent}' is not a regular file")
        return f.read()


def _parse_json(data: bytes, name: str, directory: Path) -> dict:
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        where = f" ({exc.msg} at line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise PolicyLoadError(f"policy: '{directory / name}' is not valid JSON{where}") from None
    if not isinstance(obj, dict):
        raise PolicyLoadError(f"policy: '{directory / name}' must hold a JSON object")
    return obj


def read_verified(directory: str | Path) -> dict[str, bytes]:
    """Every file of a policy directory, by name, after checking the set of files and their SHA-256 against
    `integrity.json` (PolicyLoadError otherwise)."""
    directory = Path(directory)
    if os.path.islink(directory):
        raise PolicyLoadError(f"policy: '{directory}' is a symlink (refused; pass the real directory)")
    if not directory.is_dir():
        raise PolicyLoadError(f"policy: '{directory}' is not a directory")
    with os.scandir(directory) as it:
        entries = {e.name: e for e in it}
    if INTEGRITY_NAME not in entries:
        raise PolicyLoadError(
            f"policy: '{directory}' has no {INTEGRITY_NAME} (exported by an older version or "
            "incomplete; re-export with python -m experiments.export)"
        )
    for name, entry in sorted(entries.items()):
        if entry.is_symlink():
            raise PolicyLoadError(f"policy: '{name}' in '{directory}' is a symlink (refused)")
        if not entry.is_file(follow_symlinks=False):
            raise PolicyLoadError(f"policy: '{name}' in '{directory}' is not a regular file")
    integrity = _parse_json(_read_regular(directory / INTEGRITY_NAME), INTEGRITY_NAME, directory)
    listed = integrity.get("sha256")
    if (
        integrity.get("format") != INTEGRITY_FORMAT
        or not isinstance(listed, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in listed.items())
    ):
        raise PolicyLoadError(
            f"policy: {INTEGRITY_NAME} in '{directory}' is malformed (want format "
            f"{INTEGRITY_FORMAT!r} and a 'sha256' object of file name -> hex digest)"
        )
    present = set(entries) - {INTEGRITY_NAME}
    extra, missing = sorted(present - set(listed)), sorted(set(listed) - present)
    if extra:
        raise PolicyLoadError(f"policy: '{extra[0]}' in '{directory}' is not listed in {INTEGRITY_NAME} (refused)")
    if missing:
        raise PolicyLoadError(f"policy: '{missing[0]}' listed in {INTEGRITY_NAME} is missing from '{directory}'")
    files = {}
    for name in sorted(listed):
        data = _read_regular(directory / name)
        if hashlib.sha256(data).hexdigest() != listed[name]:
            raise PolicyLoadError(
                f"policy: '{name}' in '{directory}' does not match its SHA-256 in {INTEGRITY_NAME} (tampered?)"
            )
        files[name] = data
    if META_NAME not in files:
        raise PolicyLoadError(f"policy: '{directory}' has no {META_NAME}")
    return files


def _is_int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _int_list(value: Any, low: int, high: int, max_len: int = MAX_DIM) -> list[int] | None:
    """`value` if it is a non-empty list (at most `max_len` long) of ints in [low, high]; else None."""
    if not isinstance(value, list) or not 1 <= len(value) <= max_len or not all(_is_int(v, low, high) for v in value):
        return None
    return value


def _float_array(value: Any, size: int, what: str) -> np.ndarray:
    """`value` (a JSON list of `size` numbers, no NaN) as float64, or PolicyLoadError naming `what`."""
    ok = (
        isinstance(value, list)
        and len(value) == size
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )
    arr = np.asarray(value, dtype=np.float64) if ok else None
    if arr is None or np.isnan(arr).any():
        raise PolicyLoadError(f"policy: policy.json {what} must be a list of {size} numbers (no NaN)")
    return arr


def _finite(value: Any, positive: bool = True) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > 0 if positive else value >= 0)
    )


def _onnx_tensors(model) -> Iterator[Any]:
    """Every TensorProto of an ONNX ModelProto: initializers (dense and sparse) and node attributes, in the main
    graph, its subgraphs and the model's functions."""
    graphs, nodes = [model.graph], []
    for fn in model.functions:
        nodes.extend(fn.node)
    while graphs or nodes:
        if graphs:
            g = graphs.pop()
            yield from g.initializer
            for sp in g.sparse_initializer:
                yield sp.values
                yield sp.indices
            nodes.extend(g.node)
            continue
        for attr in nodes.pop().attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sp in [attr.sparse_tensor] * attr.HasField("sparse_tensor") + list(attr.sparse_tensors):
                yield sp.values
                yield sp.indices
            if attr.HasField("g"):
                graphs.append(attr.g)
            graphs.extend(attr.graphs)


def _dims(value_info) -> tuple[int, list[int | None]] | None:
    """(element type, dims with None for a symbolic dim) of a tensor ValueInfoProto, or None if it has no shape."""
    if not value_info.type.HasField("tensor_type"):
        return None
    tt = value_info.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return tt.elem_type, [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]


def check_onnx(data: bytes, name: str, obs_dim: int, act_dim: int) -> None:
    """Refuse an ONNX model that is not self-contained (external-data tensors) or whose input `obs` is not a float
    batch [B, obs_dim] and first output not [B, act_dim] (PolicyLoadError, one line)."""
    try:
        import onnx
    except ImportError:  # a declared dependency; without it the model cannot be checked, so it is not run
        raise PolicyLoadError(
            f"policy: the onnx package is needed to check {name} before running it (pip install onnx)"
        ) from None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise PolicyLoadError(f"policy: {name} is not a valid ONNX model ({type(exc).__name__})") from None
    for tensor in _onnx_tensors(model):
        if tensor.data_location == ONNX_EXTERNAL or len(tensor.external_data):
            where = next((e.value for e in tensor.external_data if e.key == "location"), "?")
            raise PolicyLoadError(
                f"policy: {name} tensor '{tensor.name}' references external data ('{where}'): "
                "refused, all weights must be inside the verified ONNX file"
            )
    graph = model.graph
    weights = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if [i.name for i in inputs] != ["obs"] or not graph.output:
        raise PolicyLoadError(
            f"policy: {name} must take one input 'obs' and give an output; it takes "
            f"{[i.name for i in inputs]} and gives {len(graph.output)} output(s)"
        )
    for label, info, want in (
        ("input 'obs'", inputs[0], obs_dim),
        (f"output '{graph.output[0].name}'", graph.output[0], act_dim),
    ):
        got = _dims(info)
        if got is None or got[0] != ONNX_FLOAT or len(got[1]) != 2 or got[1][1] != want or got[1][0] == 0:
            shape = None if got is None else ["B" if d is None else d for d in got[1]]
            raise PolicyLoadError(
                f"policy: {name} {label} has shape {shape} (element type "
                f"{None if got is None else got[0]}); policy.json wants float32 [B, {want}]"
            )


class DeploymentPolicy:
    """Maps an observation to the exported actor's deterministic action (masks applied for discrete actions)."""

    def __init__(self, directory: str | Path):
        import onnxruntime as ort

        self.directory = Path(directory)
        files = read_verified(self.directory)
        self.meta = self._check_meta(_parse_json(files[META_NAME], META_NAME, self.directory), files, self.directory)
        self._decode_meta(self.meta)
        onnx = files[self.meta["onnx"]]
        if hashlib.sha256(onnx).hexdigest() != self.meta["onnx_sha256"]:
            raise PolicyLoadError(f"policy: {self.meta['onnx']} does not match onnx_sha256 in policy.json (tampered?)")
        check_onnx(onnx, self.meta["onnx"], self.obs_dim, self.act_dim)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(onnx, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            name = type(exc).__name__
            raise PolicyLoadError(f"policy: {self.meta['onnx']} is not a valid ONNX model ({name})") from None

    def _decode_meta(self, meta: dict) -> None:
        """Check and decode policy.json's observation, normalization and action entries (PolicyLoadError)."""
        obs = meta["observation"]
        shape = _int_list(obs.get("shape"), 1, MAX_DIM, max_len=1) if isinstance(obs, dict) else None
        if shape is None or obs.get("dtype", "float32") != "float32":
            raise PolicyLoadError(
                f"policy: policy.json has a malformed observation entry (want shape [n] with "
                f"1 <= n <= {MAX_DIM}, dtype float32): {str(obs)[:80]}"
            )
        self.obs_dim = shape[0]
        norm = meta.get("normalization")
        self._norm = None
        if norm is not None:
            if not isinstance(norm, dict) or not _finite(norm.get("clip")) or not _finite(norm.get("epsilon")):
                raise PolicyLoadError(
                    "policy: policy.json normalization must have mean, var, and finite clip > 0 and epsilon > 0"
                )
            mean = _float_array(norm.get("mean"), self.obs_dim, "normalization.mean")
            var = _float_array(norm.get("var"), self.obs_dim, "normalization.var")
            if not (np.isfinite(mean).all() and np.isfinite(var).all() and (var >= 0).all()):
                raise PolicyLoadError("policy: policy.json normalization.mean/var must be finite, var >= 0")
            self._norm = (mean, var, float(norm["clip"]), float(norm["epsilon"]))
        act = meta["action"]
        self.action_type = act["type"]
        if self.action_type == "MultiDiscrete":
            nvec = _int_list(act.get("nvec"), 1, MAX_CATEGORIES)
            if nvec is None or sum(nvec) > MAX_DIM:
                raise PolicyLoadError(
                    f"policy: policy.json action.nvec must be a non-empty list of integers >= 1 "
                    f"(at most {MAX_DIM} logits in all)"
                )
            self.nvec = np.asarray(nvec, dtype=np.int64)
            self._splits = np.cumsum(self.nvec)[:-1]
            self.act_dim = int(self.nvec.sum())
        elif self.action_type == "Discrete":
            if not _is_int(act.get("n"), 1, MAX_DIM):
                raise PolicyLoadError(f"policy: policy.json action.n must be an integer in [1, {MAX_DIM}]")
            self.act_dim = act["n"]
        else:
            shape = _int_list(act.get("shape"), 1, MAX_DIM, max_len=8)
            if shape is None or math.prod(shape) > MAX_DIM:
                raise PolicyLoadError(
                    f"policy: policy.json action.shape must be a non-empty list of integers >= 1 "
                    f"(at most {MAX_DIM} entries in all)"
                )
            self.act_dim = math.prod(shape)
            self.low = _float_array(act.get("low"), self.act_dim, "action.low").astype(np.float32).reshape(shape)
            self.high = _float_array(act.get("high"), self.act_dim, "action.high").astype(np.float32).reshape(shape)
            if (self.low > self.high).any():
                raise PolicyLoadError("policy: policy.json action.low must be <= action.high")

    @staticmethod
    def _check_meta(meta: dict, files: dict[str, bytes], directory: Path) -> dict:
        missing = [k for k in REQUIRED if k not in meta]
        if missing:
            raise PolicyLoadError(f"policy: policy.json lacks field '{missing[0]}'; required: {', '.join(REQUIRED)}")
        if meta["format"] != POLICY_FORMAT or type(meta["version"]) is not int or meta["version"] != POLICY_VERSION:
            raise PolicyLoadError(
                f"policy: format/version {meta['format']!r}/{meta['version']!r} unsupported; "
                f"allowed: {POLICY_FORMAT}/{POLICY_VERSION}"
            )
        if not isinstance(meta["action"], dict) or meta["action"].get("type") not in (
            "MultiDiscrete",
            "Discrete",
            "Box",
        ):
            raise PolicyLoadError("policy: action.type unknown; allowed: MultiDiscrete, Discrete, Box")
        if (
            not isinstance(meta["onnx"], str)
            or meta["onnx"] not in files
            or meta["onnx"] in (META_NAME, INTEGRITY_NAME)
        ):
            raise PolicyLoadError(f"policy: onnx file {meta['onnx']!r} missing from '{directory}'")
        if not isinstance(meta["onnx_sha256"], str):
            raise PolicyLoadError("policy: policy.json onnx_sha256 must be a hex digest")
        if not isinstance(meta["env"], dict):
            raise PolicyLoadError("policy: policy.json env must be an object (the env the policy was trained for)")
        return meta

    @property
    def env_spec(self) -> dict:
        """How the training environment was built (id and kwargs)."""
        return self.meta["env"]

    def _batch(self, obs: Any) -> tuple[np.ndarray, bool]:
        """`obs` as a float64 batch [B, obs_dim] and whether it was one observation; PolicyInputError if it is not
        a finite numeric [obs_dim] or [B, obs_dim] array."""
        want = f"expected shape ({self.obs_dim},) or a batch (B, {self.obs_dim}) of finite numbers"
        if isinstance(obs, dict):
            raise PolicyInputError(
                f"policy: observation is a dict (keys {sorted(map(str, obs))[:4]}); {want} "
                "(flatten the env's Dict observation first, as agents.deployed.DeployedAgent does)"
            )
        try:
            arr = np.asarray(obs)
        except (ValueError, TypeError):
            raise PolicyInputError(f"policy: observation ({type(obs).__name__}) is not an array; {want}") from None
        if arr.dtype.kind not in "biuf":
            raise PolicyInputError(f"policy: observation has dtype {arr.dtype} (not numeric); {want}")
        if not (
            (arr.ndim == 1 and arr.shape[0] == self.obs_dim)
            or (arr.ndim == 2 and arr.shape[0] >= 1 and arr.shape[1] == self.obs_dim)
        ):
            raise PolicyInputError(f"policy: observation has shape {arr.shape}; {want}")
        x = arr.astype(np.float64).reshape(-1, self.obs_dim)
        bad = ~np.isfinite(x)
        if bad.any():
            raise PolicyInputError(
                f"policy: observation holds NaN or inf (entry {np.argwhere(bad)[0].tolist()}); {want}"
            )
        return x, arr.ndim == 1

    def _normalized(self, x: np.ndarray) -> np.ndarray:
        if self._norm is not None:
            mean, var, clip, eps = self._norm
            x = np.clip((x - mean) / np.sqrt(var + eps), -clip, clip)
        return x.astype(np.float32)

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        """One observation or a batch, checked, as the float32 batch the ONNX actor takes."""
        return self._normalized(self._batch(obs)[0])

    def _run(self, x: np.ndarray) -> np.ndarray:
        try:
            out = self.session.run(None, {"obs": self._normalized(x)})[0]
        except Exception as exc:  # onnxruntime's own exception types
            raise PolicyInputError(
                f"policy: the ONNX actor failed on a batch of {x.shape[0]} ({type(exc).__name__})"
            ) from None
        out = np.asarray(out)
        if out.shape != (x.shape[0], self.act_dim):
            raise PolicyInputError(
                f"policy: the ONNX actor returned shape {out.shape}; policy.json wants ({x.shape[0]}, {self.act_dim})"
            )
        if not np.isfinite(out).all():
            raise PolicyInputError("policy: the ONNX actor returned NaN or inf for this observation")
        return out

    def raw(self, obs: np.ndarray) -> np.ndarray:
        """The actor's raw output (logits or mean) for one observation or a batch, as a batch [B, out]."""
        return self._run(self._batch(obs)[0])

    def _mask(self, action_mask: Any, rows: int) -> np.ndarray:
        want = (
            f"expected {self.act_dim} flags (one per logit) per observation, shape ({self.act_dim},) or "
            f"({rows}, {self.act_dim})"
        )
        try:
            m = np.asarray(action_mask)
        except (ValueError, TypeError):
            raise PolicyInputError(
                f"policy: action_mask ({type(action_mask).__name__}) is not an array; {want}"
            ) from None
        if m.dtype.kind not in "biuf" or (m.dtype.kind == "f" and not np.isfinite(m).all()):
            raise PolicyInputError(f"policy: action_mask has dtype {m.dtype} or NaN/inf; {want}")
        if m.size != rows * self.act_dim or m.ndim > 2 or (m.ndim == 2 and m.shape[0] != rows):
            raise PolicyInputError(f"policy: action_mask has shape {m.shape}; {want}")
        mask = m.astype(bool).reshape(rows, self.act_dim)
        parts = np.split(mask, self._splits, axis=-1) if self.action_type == "MultiDiscrete" else [mask]
        for i, part in enumerate(parts):
            if not part.any(axis=-1).all():
                which = f"component {i}" if self.action_type == "MultiDiscrete" else "the action"
                raise PolicyInputError(f"policy: action_mask allows no value for {which}; {want}")
        return mask

    def act(self, obs: np.ndarray, action_mask: np.ndarray | None = None) -> np.ndarray:
        """Deterministic action(s) for one observation or a batch; `action_mask` as MaskablePPO's (flat bool)."""
        x, single = self._batch(obs)
        out = self._run(x).astype(np.float64)
        if self.action_type == "Box":
            acts = np.clip(out.reshape(-1, *self.low.shape), self.low, self.high).astype(np.float32)
        else:
            if action_mask is not None:
                out = np.where(self._mask(action_mask, x.shape[0]), out, -np.inf)
            if self.action_type == "Discrete":
                acts = out.argmax(-1)
            else:
                acts = np.stack([part.argmax(-1) for part in np.split(out, self._splits, axis=-1)], axis=-1)
        return acts[0] if single else acts

    def __repr__(self) -> str:
        return f"DeploymentPolicy({self.directory}, {self.meta['algorithm']}, {self.action_type})"
