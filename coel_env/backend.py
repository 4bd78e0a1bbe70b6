"""The Backend contract shared by the surrogate and the real backend, and what it returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from coel_env.plan import DeploymentPlan
from coel_env.state import ClusterState


@dataclass
class MigrationReport:
    """What applying a plan cost: bytes by source, wall time and bytes per physical link (both directions)."""

    bytes_total: float = 0.0
    bytes_local: float = 0.0  # moved inside a server (PCIe, SSD)
    bytes_peer: float = 0.0  # copied from another edge server
    bytes_cloud: float = 0.0  # reloaded from the checkpoint store over the WAN
    time_s: float = 0.0
    replicas_added: int = 0
    replicas_removed: int = 0
    link_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))


@dataclass
class Metrics:
    """What serving one window measured (real backend) or predicted (surrogate)."""

    ttft_mean_s: float
    ttft_p95_s: float
    tpot_mean_s: float
    tpot_p95_s: float
    e2e_mean_s: float
    e2e_p95_s: float
    tokens_per_s: float  # generated tokens per second, whole cluster
    request_tokens_per_s: float  # mean per-request generation speed (output tokens / e2e latency)
    energy_j: float
    quality_loss: float  # expected fraction of accuracy lost (quantization + token compression)
    dropped_frac: float  # requests not served (overload, failed servers, missing experts)
    late_frac: float  # requests served later than the SLO (dropped ones included)
    requests: float  # requests that arrived in the window
    window_s: float
    gpu_mem_bytes: np.ndarray  # [D] expert bytes per GPU
    cpu_mem_bytes: np.ndarray  # [S]
    ssd_bytes: np.ndarray  # [S]
    link_bytes: np.ndarray  # [K] bytes carried per physical link in the window, both directions summed
    device_util: np.ndarray  # [D]

    @property
    def slo_attainment(self) -> float:
        return 1.0 - self.late_frac

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))


def _jsonable(d: dict) -> dict:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.items()}


@runtime_checkable
class Backend(Protocol):
    """One protocol, two implementations: `SurrogateBackend` (coel_env) and `RealBackend` (real_backend)."""

    name: str

    def reset(self, plan: DeploymentPlan, state: ClusterState) -> None:
        """Install `plan` as the current deployment without charging migration."""

    def apply(self, plan: DeploymentPlan, state: ClusterState) -> MigrationReport:
        """Move from the current deployment to `plan`; return what the move cost."""

    def serve(self, plan: DeploymentPlan, state: ClusterState, window_s: float) -> Metrics:
        """Serve the window's requests with `plan`; return the metrics."""

    def close(self) -> None:
        """Release processes and memory."""
