"""PlanBatch: N deployment plans as stacked arrays (the form every vectorized env step works on)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coel_env.plan.deployment import DeploymentPlan


@dataclass
class PlanBatch:
    dev: np.ndarray  # [N, L, E, R] int16, -1 empty
    tier: np.ndarray  # [N, L, E, R] int8
    bits: np.ndarray  # [N, L, E, R] int8 (0 empty)
    prune: np.ndarray  # [N, P] float64
    fuse: np.ndarray  # [N, P] bool

    @classmethod
    def from_plans(cls, plans: list[DeploymentPlan]) -> PlanBatch:
        return cls(
            np.stack([p.device for p in plans]).astype(np.int16),
            np.stack([p.tier for p in plans]).astype(np.int8),
            np.stack([p.bits for p in plans]).astype(np.int8),
            np.stack([p.prune for p in plans]).astype(np.float64),
            np.stack([p.fuse for p in plans]).astype(bool),
        )

    @classmethod
    def tile(cls, plan: DeploymentPlan, n: int) -> PlanBatch:
        return cls.from_plans([plan] * n)

    def __len__(self) -> int:
        return self.dev.shape[0]

    def copy(self) -> PlanBatch:
        return PlanBatch(self.dev.copy(), self.tier.copy(), self.bits.copy(), self.prune.copy(), self.fuse.copy())

    def plan(self, i: int) -> DeploymentPlan:
        """Env i's plan as a DeploymentPlan (copied)."""
        return DeploymentPlan(
            self.dev[i].copy(),
            self.tier[i].copy(),
            self.bits[i].copy(),
            self.prune[i].astype(np.float32),
            self.fuse[i].copy(),
        )

    def set(self, i: int, other: PlanBatch, j: int | None = None) -> None:
        """Row i := other's row j (or the whole single-plan batch `other`)."""
        j = 0 if j is None else j
        self.dev[i], self.tier[i], self.bits[i] = other.dev[j], other.tier[j], other.bits[j]
        self.prune[i], self.fuse[i] = other.prune[j], other.fuse[j]

    def take(self, idx: np.ndarray) -> PlanBatch:
        """Rows idx (copied)."""
        return PlanBatch(self.dev[idx], self.tier[idx], self.bits[idx], self.prune[idx], self.fuse[idx])

    def put(self, idx: np.ndarray, other: PlanBatch) -> None:
        """Rows idx := other's rows."""
        self.dev[idx], self.tier[idx], self.bits[idx] = other.dev, other.tier, other.bits
        self.prune[idx], self.fuse[idx] = other.prune, other.fuse

    def where(self, mask: np.ndarray, other: PlanBatch) -> PlanBatch:
        """Rows of `other` where mask[n] else rows of self."""
        m4 = mask[:, None, None, None]
        m1 = mask[:, None]
        return PlanBatch(
            np.where(m4, other.dev, self.dev),
            np.where(m4, other.tier, self.tier),
            np.where(m4, other.bits, self.bits),
            np.where(m1, other.prune, self.prune),
            np.where(m1, other.fuse, self.fuse),
        )
