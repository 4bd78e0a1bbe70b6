"""The backend contract: batch first, and the adapter that gives a single-plan backend that contract with N = 1.

Two protocols:
- `Backend` (single plan): `reset / apply / serve` on one DeploymentPlan and ClusterState. The real backend (one
  process per edge server) implements it; so does the surrogate, for scripts and benchmarks.
- `BatchBackend` (what the env core talks to, SB3's VecEnv lesson): `reset_batch / migrate_batch / serve_batch`
  over a PlanBatch and a StateBatch, returning a MigrationBatch / MetricsBatch. The surrogate implements it
  natively for any N; `as_batch_backend` wraps a single-plan backend in `SinglePlanBatch` (max_envs = 1).

The env never asks which backend it has: it calls `as_batch_backend(backend)` once and uses the batch contract.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from coel_env.backend.metrics import Metrics, MetricsBatch, MigrationBatch, MigrationReport
from coel_env.errors import ConfigError
from coel_env.plan.deployment import DeploymentPlan
from coel_env.world.state import ClusterState

if TYPE_CHECKING:
    from coel_env.plan.batch import PlanBatch
    from coel_env.world.state import StateBatch

__all__ = [
    "Backend",
    "BatchBackend",
    "Metrics",
    "MetricsBatch",
    "MigrationBatch",
    "MigrationReport",
    "SinglePlanBatch",
    "as_batch_backend",
]


@runtime_checkable
class Backend(Protocol):
    """Single-plan backend: `SurrogateBackend` (coel_env) and `RealBackend` (real_backend)."""

    name: str

    def reset(self, plan: DeploymentPlan, state: ClusterState) -> None:
        """Install `plan` as the current deployment without charging migration."""

    def apply(self, plan: DeploymentPlan, state: ClusterState) -> MigrationReport:
        """Move from the current deployment to `plan`; return what the move cost."""

    def serve(self, plan: DeploymentPlan, state: ClusterState, window_s: float) -> Metrics:
        """Serve the window's requests with `plan`; return the metrics."""

    def close(self) -> None:
        """Release processes and memory."""


@runtime_checkable
class BatchBackend(Protocol):
    """Batch-first backend: every call covers N envs (rows of a PlanBatch and a StateBatch)."""

    name: str
    max_envs: int | None
    """The most envs one call may cover (None: any number)."""

    def reset_batch(self, plans: PlanBatch, states: StateBatch, rows: np.ndarray) -> None:
        """Install plans[rows] as the current deployments of envs `rows` without charging migration."""

    def migrate_batch(self, old: PlanBatch, new: PlanBatch, states: StateBatch, rows: np.ndarray) -> MigrationBatch:
        """Move envs `rows` (bool [N]) from `old` to `new`; their costs (zeros in the other rows)."""

    def serve_batch(self, plans: PlanBatch, states: StateBatch, window_s: float) -> MetricsBatch:
        """Serve one window in every env, env n with plans[n] against states' row n."""

    def close(self) -> None:
        """Release processes and memory."""


class SinglePlanBatch:
    """The batch contract over a single-plan `Backend` (N = 1): the env core's view of the real backend."""

    max_envs = 1

    def __init__(self, backend: Backend, num_links: int):
        self.backend = backend
        self.name = backend.name
        self.num_links = num_links

    def reset_batch(self, plans: PlanBatch, states: StateBatch, rows: np.ndarray) -> None:
        if np.asarray(rows)[0]:
            self.backend.reset(plans.plan(0), states.views[0])

    def migrate_batch(self, old: PlanBatch, new: PlanBatch, states: StateBatch, rows: np.ndarray) -> MigrationBatch:
        out = MigrationBatch.zeros(1, self.num_links)
        if np.asarray(rows)[0]:  # the backend knows its current deployment (old): it moves from there
            out.put(np.array([0]), self.backend.apply(new.plan(0), states.views[0]))
        return out

    def serve_batch(self, plans: PlanBatch, states: StateBatch, window_s: float) -> MetricsBatch:
        return MetricsBatch.stack([self.backend.serve(plans.plan(0), states.views[0], window_s)])

    def close(self) -> None:
        self.backend.close()


def as_batch_backend(backend: Backend | BatchBackend, num_links: int) -> BatchBackend:
    """`backend` itself when it implements the batch contract, else its N = 1 adapter."""
    if isinstance(backend, BatchBackend):
        return backend
    if not isinstance(backend, Backend):
        raise ConfigError(f"backend: {type(backend).__name__} implements neither Backend nor BatchBackend")
    return SinglePlanBatch(backend, num_links)
