"""DeploymentPolicy: run an exported policy with numpy + onnxruntime only (no SB3, no pickle).

The directory must hold exactly `integrity.json`, `policy.json` and the ONNX file, as regular files (no symlinks, the
directory itself neither), each matching the SHA-256 that `integrity.json` lists for it; every refusal is one
`PolicyLoadError` line. Files are read once and the verified bytes are what gets parsed and run.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np

from coel_env.errors import CoELError

POLICY_FORMAT = "coel-deployment-policy"  # keep in sync with agents.export
POLICY_VERSION = 2
META_NAME, INTEGRITY_NAME, INTEGRITY_FORMAT = "policy.json", "integrity.json", "coel-policy-integrity"
REQUIRED = ("format", "version", "algorithm", "onnx", "onnx_sha256", "observation", "action", "env")


class PolicyLoadError(CoELError):
    """A deployment-policy directory is missing, malformed or tampered with."""


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
        raise PolicyLoadError(f"policy: '{directory}' has no {INTEGRITY_NAME} (exported by an older version or "
                              "incomplete; re-export with python -m experiments.export)")
    for name, entry in sorted(entries.items()):
        if entry.is_symlink():
            raise PolicyLoadError(f"policy: '{name}' in '{directory}' is a symlink (refused)")
        if not entry.is_file(follow_symlinks=False):
            raise PolicyLoadError(f"policy: '{name}' in '{directory}' is not a regular file")
    integrity = _parse_json(_read_regular(directory / INTEGRITY_NAME), INTEGRITY_NAME, directory)
    listed = integrity.get("sha256")
    if integrity.get("format") != INTEGRITY_FORMAT or not isinstance(listed, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in listed.items()):
        raise PolicyLoadError(f"policy: {INTEGRITY_NAME} in '{directory}' is malformed (want format "
                              f"{INTEGRITY_FORMAT!r} and a 'sha256' object of file name -> hex digest)")
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
            raise PolicyLoadError(f"policy: '{name}' in '{directory}' does not match its SHA-256 in {INTEGRITY_NAME} "
                                  "(tampered?)")
        files[name] = data
    if META_NAME not in files:
        raise PolicyLoadError(f"policy: '{directory}' has no {META_NAME}")
    return files


class DeploymentPolicy:
    """Maps an observation to the exported actor's deterministic action (masks applied for discrete actions)."""

    def __init__(self, directory: str | Path):
        import onnxruntime as ort

        self.directory = Path(directory)
        files = read_verified(self.directory)
        self.meta = self._check_meta(_parse_json(files[META_NAME], META_NAME, self.directory), files, self.directory)
        onnx = files[self.meta["onnx"]]
        if hashlib.sha256(onnx).hexdigest() != self.meta["onnx_sha256"]:
            raise PolicyLoadError(f"policy: {self.meta['onnx']} does not match onnx_sha256 in policy.json (tampered?)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(onnx, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            name = type(exc).__name__
            raise PolicyLoadError(f"policy: {self.meta['onnx']} is not a valid ONNX model ({name})") from None
        try:
            self._decode_meta(self.meta)
        except (KeyError, TypeError, ValueError) as exc:
            raise PolicyLoadError(f"policy: policy.json has a malformed observation, normalization or action entry "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None

    def _decode_meta(self, meta: dict) -> None:
        self.obs_dim = int(np.prod(meta["observation"]["shape"]))
        norm = meta.get("normalization")
        self._norm = None if not norm else (np.asarray(norm["mean"], np.float64), np.asarray(norm["var"], np.float64),
                                            float(norm["clip"]), float(norm["epsilon"]))
        act = meta["action"]
        self.action_type = act["type"]
        if self.action_type == "MultiDiscrete":
            self.nvec = np.asarray(act["nvec"], dtype=np.int64)
            self._splits = np.cumsum(self.nvec)[:-1]
        elif self.action_type == "Box":
            self.low = np.asarray(act["low"], np.float32).reshape(act["shape"])
            self.high = np.asarray(act["high"], np.float32).reshape(act["shape"])

    @staticmethod
    def _check_meta(meta: dict, files: dict[str, bytes], directory: Path) -> dict:
        missing = [k for k in REQUIRED if k not in meta]
        if missing:
            raise PolicyLoadError(f"policy: policy.json lacks field '{missing[0]}'; required: {', '.join(REQUIRED)}")
        if meta["format"] != POLICY_FORMAT or meta["version"] != POLICY_VERSION:
            raise PolicyLoadError(f"policy: format/version {meta['format']!r}/{meta['version']!r} unsupported; "
                                  f"allowed: {POLICY_FORMAT}/{POLICY_VERSION}")
        if not isinstance(meta["action"], dict) or meta["action"].get("type") not in ("MultiDiscrete", "Discrete",
                                                                                       "Box"):
            raise PolicyLoadError("policy: action.type unknown; allowed: MultiDiscrete, Discrete, Box")
        if not isinstance(meta["onnx"], str) or meta["onnx"] not in files or meta["onnx"] == META_NAME:
            raise PolicyLoadError(f"policy: onnx file {meta['onnx']!r} missing from '{directory}'")
        return meta

    @property
    def env_spec(self) -> dict:
        """How the training environment was built (id and kwargs)."""
        return self.meta["env"]

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float64).reshape(-1, self.obs_dim)
        if self._norm is not None:
            mean, var, clip, eps = self._norm
            obs = np.clip((obs - mean) / np.sqrt(var + eps), -clip, clip)
        return obs.astype(np.float32)

    def raw(self, obs: np.ndarray) -> np.ndarray:
        """The actor's raw output (logits or mean) for a batch of observations."""
        return self.session.run(None, {"obs": self.normalize(obs)})[0]

    def act(self, obs: np.ndarray, action_mask: np.ndarray | None = None) -> np.ndarray:
        """Deterministic action(s) for one observation or a batch; `action_mask` as MaskablePPO's (flat bool)."""
        single = np.asarray(obs).ndim == 1
        out = self.raw(obs).astype(np.float64)
        if self.action_type == "Box":
            acts = np.clip(out.reshape(-1, *self.low.shape), self.low, self.high).astype(np.float32)
        else:
            if action_mask is not None:
                mask = np.asarray(action_mask, dtype=bool).reshape(out.shape[0] if not single else 1, -1)
                out = np.where(mask, out, -np.inf)
            if self.action_type == "Discrete":
                acts = out.argmax(-1)
            else:
                acts = np.stack([part.argmax(-1) for part in np.split(out, self._splits, axis=-1)], axis=-1)
        return acts[0] if single else acts

    def __repr__(self) -> str:
        return f"DeploymentPolicy({self.directory}, {self.meta['algorithm']}, {self.action_type})"
