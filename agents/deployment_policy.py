"""DeploymentPolicy: run an exported policy with numpy + onnxruntime only (no SB3, no pickle)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from coel_env.errors import CoELError, read_json_object

POLICY_FORMAT = "coel-deployment-policy"  # keep in sync with agents.export
POLICY_VERSION = 1
REQUIRED = ("format", "version", "algorithm", "onnx", "onnx_sha256", "observation", "action", "env")


class PolicyLoadError(CoELError):
    """A deployment-policy directory is missing, malformed or tampered with."""


class DeploymentPolicy:
    """Maps an observation to the exported actor's deterministic action (masks applied for discrete actions)."""

    def __init__(self, directory: str | Path):
        import onnxruntime as ort

        self.directory = Path(directory)
        self.meta = self._read_meta(self.directory)
        onnx_path = self.directory / self.meta["onnx"]
        digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
        if digest != self.meta["onnx_sha256"]:
            raise PolicyLoadError(f"policy: {onnx_path.name} does not match onnx_sha256 in policy.json (tampered?)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            name = type(exc).__name__
            raise PolicyLoadError(f"policy: {onnx_path.name} is not a valid ONNX model ({name})") from None
        self.obs_dim = int(np.prod(self.meta["observation"]["shape"]))
        norm = self.meta.get("normalization")
        self._norm = None if not norm else (np.asarray(norm["mean"], np.float64), np.asarray(norm["var"], np.float64),
                                            float(norm["clip"]), float(norm["epsilon"]))
        act = self.meta["action"]
        self.action_type = act["type"]
        if self.action_type == "MultiDiscrete":
            self.nvec = np.asarray(act["nvec"], dtype=np.int64)
            self._splits = np.cumsum(self.nvec)[:-1]
        elif self.action_type == "Box":
            self.low = np.asarray(act["low"], np.float32).reshape(act["shape"])
            self.high = np.asarray(act["high"], np.float32).reshape(act["shape"])

    @staticmethod
    def _read_meta(directory: Path) -> dict:
        if not directory.is_dir():
            raise PolicyLoadError(f"policy: '{directory}' is not a directory")
        if not (directory / "policy.json").is_file():
            raise PolicyLoadError(f"policy: '{directory}' has no policy.json")
        meta = read_json_object(directory / "policy.json", "policy", PolicyLoadError)
        missing = [k for k in REQUIRED if k not in meta]
        if missing:
            raise PolicyLoadError(f"policy: policy.json lacks field '{missing[0]}'; required: {', '.join(REQUIRED)}")
        if meta["format"] != POLICY_FORMAT or meta["version"] != POLICY_VERSION:
            raise PolicyLoadError(f"policy: format/version {meta['format']!r}/{meta['version']!r} unsupported; "
                                  f"allowed: {POLICY_FORMAT}/{POLICY_VERSION}")
        if meta["action"].get("type") not in ("MultiDiscrete", "Discrete", "Box"):
            raise PolicyLoadError(f"policy: action.type {meta['action'].get('type')!r} unknown; "
                                  "allowed: MultiDiscrete, Discrete, Box")
        if Path(meta["onnx"]).name != meta["onnx"] or not (directory / meta["onnx"]).is_file():
            raise PolicyLoadError(f"policy: onnx file '{meta['onnx']}' missing from '{directory}'")
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
