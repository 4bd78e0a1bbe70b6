"""The one schema of what a backend returns: `Metrics` of a served window, `MigrationReport` of a plan change, and
their batched forms (`MetricsBatch`, `MigrationBatch`: the same fields with a leading plan axis [N]).

Every list of metric names elsewhere (the surrogate's output columns, the env's info, reports) is derived here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np


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


def _names(cls: type, kind: str) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if (f.type == "np.ndarray") == (kind == "array"))


SCALAR_METRICS = _names(Metrics, "scalar")
"""Metrics' scalar fields, in order (the surrogate's output columns are these, by name)."""
ARRAY_METRICS = _names(Metrics, "array")
"""Metrics' per-device / per-server / per-link arrays."""
INFO_METRICS = tuple(k for k in SCALAR_METRICS if k != "window_s")
"""The scalars an env step reports in info["metrics"] (the window length is the scenario's epoch, not news)."""
MIGRATION_FIELDS = _names(MigrationReport, "scalar")
"""MigrationReport's scalar fields (its one array is link_bytes)."""


@dataclass
class MetricsBatch:
    """Metrics of N plans as arrays: each Metrics field -> [N] (scalars) or [N, ...] (arrays)."""

    fields: dict[str, np.ndarray]

    def __getitem__(self, key: str) -> np.ndarray:
        return self.fields[key]

    def __len__(self) -> int:
        return len(self.fields["e2e_p95_s"])

    def item(self, n: int) -> Metrics:
        return Metrics(**{k: (v[n].copy() if v.ndim > 1 else float(v[n])) for k, v in self.fields.items()})

    @classmethod
    def stack(cls, items: list[Metrics]) -> MetricsBatch:
        """The batch of single-window Metrics (what a single-plan backend's adapter returns)."""
        names = (*SCALAR_METRICS, *ARRAY_METRICS)
        return cls({k: np.asarray([getattr(m, k) for m in items], dtype=np.float64) for k in names})


@dataclass
class MigrationBatch:
    """Migration costs of N plan changes: MIGRATION_FIELDS -> [N], link_bytes -> [N, K] (zeros: nothing moved)."""

    fields: dict[str, np.ndarray]

    @classmethod
    def zeros(cls, n: int, num_links: int) -> MigrationBatch:
        return cls({**{k: np.zeros(n) for k in MIGRATION_FIELDS}, "link_bytes": np.zeros((n, num_links))})

    def __getitem__(self, key: str) -> np.ndarray:
        return self.fields[key]

    def put(self, rows: np.ndarray, report: MigrationReport | MigrationBatch) -> None:
        """Rows := one report (broadcast) or a batch with one row per index."""
        for k in (*MIGRATION_FIELDS, "link_bytes"):
            self.fields[k][rows] = report[k] if isinstance(report, MigrationBatch) else getattr(report, k)

    def item(self, n: int) -> MigrationReport:
        f = self.fields
        return MigrationReport(
            **{k: (int(f[k][n]) if k.startswith("replicas") else float(f[k][n])) for k in MIGRATION_FIELDS},
            link_bytes=f["link_bytes"][n].copy(),
        )


def _jsonable(d: dict) -> dict:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.items()}
