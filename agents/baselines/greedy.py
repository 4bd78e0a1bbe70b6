"""`greedy_popularity`: popular experts on fast GPUs at high precision, cold ones low-bit or offloaded.

Bits follow popularity (the coldest experts are quantized first until everything fits the GPUs); experts are then
placed hottest first on the GPU that finishes its layer soonest (load / speed); spare GPU memory holds second
replicas of the hottest experts on the servers that request them most. Re-plans every `period` epochs.
"""

from __future__ import annotations

import numpy as np

from agents.baselines.common import BITS_DESC, SEED, Arg, PlanBuilder, checked_args, demand, device_speed
from agents.policy import Policy
from coel_env.plan.deployment import DeploymentPlan
from coel_env.world.cluster import Cluster
from coel_env.world.state import ClusterState


def popularity_bits(pop: np.ndarray, capacity: float, ebytes: np.ndarray) -> np.ndarray:
    """Bits per expert (same shape as `pop`): 16 for the hottest, then 8, then 4, so that the total fits
    `capacity`; 0 marks the coldest experts that do not fit even at 4-bit (to be offloaded)."""
    order = np.argsort(-pop, axis=None, kind="stable")
    n = len(order)
    bits = np.zeros(n, dtype=np.int64)
    b16, b8, b4 = ebytes[16], ebytes[8], ebytes[4]
    if n * b16 <= capacity:
        bits[:] = 16
    elif n * b8 <= capacity:
        a = int((capacity - n * b8) // (b16 - b8))
        bits[:a], bits[a:] = 16, 8
    elif n * b4 <= capacity:
        a = int((capacity - n * b4) // (b8 - b4))
        bits[:a], bits[a:] = 8, 4
    else:
        bits[: int(capacity // b4)] = 4
    out = np.zeros(n, dtype=np.int64)
    out[order] = bits
    return out.reshape(pop.shape)


class GreedyPopularityPolicy(Policy):
    name = "greedy_popularity"

    @checked_args(seed=SEED, period=Arg(int, 1), replicate=Arg(bool), fill=Arg(float, 0, 1, open_low=True))
    def __init__(self, seed: int | None = None, period: int = 10, replicate: bool = True, fill: float = 0.97):
        super().__init__(seed)
        self.period, self.replicate, self.fill = period, replicate, fill

    def should_update(self, view, cluster, current) -> bool:
        return super().should_update(view, cluster, current) or self.epoch % self.period == 0

    def plan(self, view: ClusterState, cluster: Cluster) -> DeploymentPlan:
        b = PlanBuilder(view, cluster)
        L, E, _ = b.plan.device.shape
        pop = demand(view, cluster)
        speed = device_speed(view, cluster)
        bits = popularity_bits(pop, self.fill * b.gpu_free.sum(), b.ebytes)
        load = np.zeros((L, cluster.num_devices))
        for flat in np.argsort(-pop, axis=None, kind="stable"):
            l, e = divmod(int(flat), E)
            placed = False
            for bb in [x for x in BITS_DESC if x <= bits[l, e]]:
                w = pop[l, e] * b.ebytes[bb]
                ok = (b.gpu_free >= b.ebytes[bb]) & (speed > 0)
                if not ok.any():
                    continue
                d = int(np.argmin(np.where(ok, (load[l] + w) / np.maximum(speed, 1e-30), np.inf)))
                if b.add(l, e, d, 0, bb):
                    load[l, d] += w
                    placed = True
                    break
            if not placed:
                b.add_offloaded(l, e, 4)
        if self.replicate and cluster.num_servers > 1:
            self._replicate(b, view, cluster, pop)
        return b.complete()

    def _replicate(self, b: PlanBuilder, view: ClusterState, cluster: Cluster, pop: np.ndarray) -> None:
        """Second replicas of the hottest experts on the GPUs of the server that wants them most."""
        rate = (view.arrival_rate * view.server_up)[:, None, None] * view.popularity  # [S, L, E]
        E = pop.shape[1]
        for flat in np.argsort(-pop, axis=None, kind="stable"):
            l, e = divmod(int(flat), E)
            if b.slot(l, e) < 0:
                continue
            have = np.unique(cluster.dev_server[b.plan.device[l, e][b.plan.device[l, e] >= 0]])
            want = rate[:, l, e].copy()
            want[have] = -1
            s = int(np.argmax(want))
            if want[s] <= 0:
                continue
            bb = int(b.plan.bits[l, e, 0])
            devs = np.flatnonzero(cluster.dev_server == s)
            d = int(devs[np.argmax(b.gpu_free[devs])])
            b.add(l, e, d, 0, bb)
