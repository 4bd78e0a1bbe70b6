"""`random`: a fresh valid random deployment (random devices, tiers, bits, replicas, compression) each epoch."""

from __future__ import annotations

import numpy as np

from agents.baselines.common import BITS_DESC, FRACTION, SEED, Arg, PlanBuilder, checked_args
from agents.policy import Policy
from coel_env.plan.deployment import MAX_PRUNE, DeploymentPlan
from coel_env.world.cluster import Cluster
from coel_env.world.state import ClusterState

TIER_PROBS = np.array([0.7, 0.2, 0.1])  # gpu, cpu, ssd


class RandomPolicy(Policy):
    """Valid random plans; updates with probability `update_prob` each epoch (always on the first)."""

    name = "random"

    @checked_args(seed=SEED, update_prob=FRACTION, max_prune=Arg(float, 0, MAX_PRUNE))
    def __init__(self, seed: int | None = None, update_prob: float = 0.5, max_prune: float = 0.5):
        super().__init__(seed)
        self.update_prob, self.max_prune = update_prob, max_prune

    def should_update(self, view, cluster, current) -> bool:
        return super().should_update(view, cluster, current) or bool(self.rng.random() < self.update_prob)

    def plan(self, view: ClusterState, cluster: Cluster) -> DeploymentPlan:
        rng = self.rng
        b = PlanBuilder(view, cluster)
        L, E, R = b.plan.device.shape
        live = np.flatnonzero(view.device_up)
        reps = rng.integers(1, R + 1, size=(L, E))
        for r in range(R):
            for flat in rng.permutation(L * E):
                l, e = divmod(int(flat), E)
                if reps[l, e] <= r:
                    continue
                for _ in range(4):
                    d = int(rng.choice(live))
                    tier = int(rng.choice(3, p=TIER_PROBS))
                    if b.add(l, e, d, tier, int(rng.choice(BITS_DESC))):
                        break
        b.complete(bits=4)
        P = cluster.num_pairs
        b.plan.prune[:] = rng.uniform(0, self.max_prune, size=P) * (rng.random(P) < 0.5)
        b.plan.fuse[:] = rng.random(P) < 0.5
        return b.plan
