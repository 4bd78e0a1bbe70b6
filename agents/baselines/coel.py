"""`coel`: the seed paper's method (CoEL) as described.

1. Collaboration regions from perceived resources: starting from the server with most demand, a region grows by
   the best-connected server until its GPUs hold a full model copy; at most `max_replicas` regions, remaining
   servers join the region they are best connected to.
2. Horizontal segmentation: each region's copy of every layer is split over its GPUs into sub-models, keeping
   experts with a high inter-layer connection probability (`RoutingModel.affinity`) and the experts a server
   requests most on the same device (a token's path stays on one device); GPU shares follow free memory.
3. Replicas: spare GPU memory gets extra replicas of the hottest experts, on the servers that request them most.
4. Resource-aware routing to the best replica is done by the serving runtime (the backend routes each token to the
   cheapest live replica), so the plan only has to offer good replicas.
5. Intra-server GPU/CPU/SSD scheduling by predicted popularity (an exponential average of observed popularity):
   experts that do not fit a device's GPU go to host RAM, then SSD; the prefetcher hides part of their load.
6. Popularity-based bit-widths: the hottest experts keep 16 bits, colder ones 8 then 4 until the copy fits.
7. Token pruning/fusion on slow remote links (below `compress_below_gbps`).
8. Threshold-triggered updates: re-deploy only when predicted popularity drifted more than `drift_threshold`,
   the live servers changed, or the deployment no longer fits.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from agents.baselines.common import FRACTION, SEED, Arg, PlanBuilder, checked_args, device_speed
from agents.baselines.greedy import popularity_bits
from agents.policy import Policy, needs_repair
from coel_env.plan.deployment import MAX_PRUNE, DeploymentPlan
from coel_env.specs.bounds import MAX_GBS
from coel_env.world.cluster import Cluster
from coel_env.world.state import ClusterState


@njit(cache=True)
def place_layer(
    order: np.ndarray,
    pop: np.ndarray,
    bits: np.ndarray,
    score: np.ndarray,
    speed: np.ndarray,
    demand_per_speed: float,
    balance: float,
    quota: np.ndarray,
    devs: np.ndarray,
    gpu_free: np.ndarray,
    ebytes: np.ndarray,
    dev: np.ndarray,
    tier: np.ndarray,
    plan_bits: np.ndarray,
    assign: np.ndarray,
) -> None:
    """One layer's segmentation (`CoELPolicy._segment`): experts in `order` (hottest first) each to the region GPU
    j (devs[j]) maximizing score[e, j] - balance * finish_j, finish_j = (load_j + pop_e) / speed_j /
    demand_per_speed, among those with quota left and room for its bit-width (bits[e], 0: 4 bits); it stops at
    the first expert no GPU can take. Placed as `PlanBuilder.add` places (the first empty slot of dev[e], no
    second replica on one GPU, gpu_free debited); assign[e, j] = 1 where placed."""
    D = devs.shape[0]
    load = np.zeros(D)
    for e in order:
        bb = bits[e] if bits[e] != 0 else 4
        need = ebytes[bb]
        best, best_v, any_ok = -1, -np.inf, False
        for j in range(D):
            if quota[j] > 0 and gpu_free[devs[j]] >= need:
                any_ok = True
                v = score[e, j] - balance * ((load[j] + pop[e]) / speed[j] / demand_per_speed)
                if best < 0 or v > best_v:
                    best, best_v = j, v
        if not any_ok:
            break
        d = devs[best]
        slot, held = -1, False
        for r in range(dev.shape[1]):
            if dev[e, r] == d:
                held = True
            if slot < 0 and dev[e, r] < 0:
                slot = r
        if slot < 0 or held:
            continue
        dev[e, slot], tier[e, slot], plan_bits[e, slot] = d, 0, bb
        gpu_free[d] -= need
        quota[best] -= 1
        load[best] += pop[e]
        assign[e, best] = 1.0


class CoELPolicy(Policy):
    name = "coel"

    @checked_args(
        seed=SEED,
        drift_threshold=Arg(float, 0, 1e6),
        ema=FRACTION,
        locality=Arg(float, 0, 1e6),
        compress_below_gbps=Arg(float, 0, MAX_GBS),
        prune_ratio=Arg(float, 0, MAX_PRUNE),
        fuse=Arg(bool),
        fill=Arg(float, 0, 1, open_low=True),
        min_region_gbps=Arg(float, 0, MAX_GBS),
        balance=Arg(float, 0, 1e6),
    )
    def __init__(
        self,
        seed: int | None = None,
        drift_threshold: float = 0.05,
        ema: float = 0.5,
        locality: float = 1.0,
        compress_below_gbps: float = 1.0,
        prune_ratio: float = 0.25,
        fuse: bool = True,
        fill: float = 0.97,
        min_region_gbps: float = 0.5,
        balance: float = 1.0,
    ):
        super().__init__(seed)
        self.drift_threshold, self.ema, self.locality = drift_threshold, ema, locality
        self.compress_below_gbps, self.prune_ratio, self.fuse = compress_below_gbps, prune_ratio, fuse
        self.fill, self.min_region_gbps, self.balance = fill, min_region_gbps, balance
        self.affinity: np.ndarray | None = None
        self._pred: np.ndarray | None = None
        self._deployed: tuple[np.ndarray, np.ndarray] | None = None

    def reset(self, cluster: Cluster, seed: int | None = None, scenario=None) -> None:
        super().reset(cluster, seed)
        if scenario is not None:
            self.affinity = scenario.routing.affinity
        self._pred, self._deployed = None, None

    # ---- update rule --------------------------------------------------------------------------------
    def _predict(self, view: ClusterState) -> np.ndarray:
        self._pred = (
            view.popularity.copy() if self._pred is None else self.ema * view.popularity + (1 - self.ema) * self._pred
        )
        return self._pred

    def should_update(self, view, cluster, current) -> bool:
        pred = self._predict(view)
        if current is None or self._deployed is None or needs_repair(current, view, cluster):
            return True
        pop0, up0 = self._deployed
        if not np.array_equal(up0, view.server_up):
            return True
        k = cluster.model.top_k
        drift = 0.5 * np.abs(pred - pop0).sum(-1).mean() / k  # mean total-variation distance per layer
        return bool(drift > self.drift_threshold)

    # ---- planning -----------------------------------------------------------------------------------
    def plan(self, view: ClusterState, cluster: Cluster) -> DeploymentPlan:
        pred = self._pred if self._pred is not None else self._predict(view)
        b = PlanBuilder(view, cluster)
        L, _E, _R = b.plan.device.shape
        S = cluster.num_servers
        rate = view.arrival_rate * view.server_up
        srv_demand = rate[:, None, None] * pred  # [S, L, E]
        bw = cluster.pair_bandwidth(view.link_factor)  # [S, S] perceived goodput, bytes/s (inf on the diagonal)
        regions = self.regions(view, cluster, b.gpu_free, bw, srv_demand)
        for members in regions:
            self._segment(b, view, cluster, members, srv_demand)
        self._replicate(b, cluster, srv_demand)
        for l in range(L):  # intra-server scheduling: what no GPU could hold goes to host RAM / SSD
            for e in np.flatnonzero(~b.plan.valid[l].any(-1)):
                b.add_offloaded(l, int(e), 8)
        plan = b.complete(bits=4)
        if S > 1:
            slow = bw[cluster.pair_servers[:, 0], cluster.pair_servers[:, 1]] * 8 / 1e9 < self.compress_below_gbps
            plan.prune[:] = np.where(slow, self.prune_ratio, 0.0)
            plan.fuse[:] = slow & self.fuse
        self._deployed = (pred.copy(), view.server_up.copy())
        return plan

    def regions(self, view, cluster, gpu_free, bw, srv_demand) -> list[list[int]]:
        """Collaboration regions (lists of live servers), each able to hold one model copy where possible."""
        c = cluster
        L, E = c.model.num_moe_layers, c.model.num_experts
        need = L * E * c.expert_bytes_by_bits[16] / self.fill
        srv_cap = np.bincount(c.dev_server, weights=gpu_free, minlength=c.num_servers)
        live = [s for s in np.argsort(-srv_demand.sum((1, 2)), kind="stable") if view.server_up[s]]
        free, regions = list(live), []
        while free and len(regions) < c.spec.max_replicas:
            region = [free.pop(0)]
            while srv_cap[region].sum() < need and free:
                link = [min(bw[s, r] for r in region) for s in free]
                j = int(np.argmax(link))
                if link[j] * 8 / 1e9 < self.min_region_gbps and srv_cap[region].sum() >= need * 0.25:
                    break
                region.append(free.pop(j))
            regions.append(region)
        for s in free:  # leftover servers join the region they reach best
            j = int(np.argmax([min(bw[s, r] for r in reg) for reg in regions]))
            regions[j].append(s)
        return regions

    def _segment(self, b: PlanBuilder, view, cluster, members, srv_demand) -> None:
        """Split one full copy of every layer over the region's GPUs by affinity and locality."""
        c = cluster
        L, E = c.model.num_moe_layers, c.model.num_experts
        devs = np.flatnonzero(np.isin(c.dev_server, members) & (b.gpu_free > 0))
        if not len(devs):
            return
        pop = srv_demand[members].sum(0)  # [L, E] the region's demand
        bits = popularity_bits(pop, self.fill * b.gpu_free[devs].sum(), b.ebytes)
        share = b.gpu_free[devs] / b.gpu_free[devs].sum()
        speed = np.maximum(device_speed(view, c)[devs], 1e-30)
        local = srv_demand[c.dev_server[devs]]  # [Dr, L, E] demand of each device's server
        local = local / np.maximum(srv_demand.sum(0), 1e-30)[None]
        prev = None
        for l in range(L):
            score = self.locality * local[:, l, :].T  # [E, Dr]
            if prev is not None and self.affinity is not None:
                flow = self.affinity[l - 1].T @ (pop[l - 1][:, None] * prev)  # [E, Dr] mass arriving from d
                score = score + flow / np.maximum(flow.sum(1, keepdims=True), 1e-30)
            assign = np.zeros((E, len(devs)))
            place_layer(
                np.argsort(-pop[l], kind="stable"),
                pop[l],
                bits[l].astype(np.int64),
                np.ascontiguousarray(score, dtype=np.float64),
                speed,
                max(pop[l].sum(), 1e-30) / speed.sum(),
                float(self.balance),
                np.ceil(share * E).astype(np.int64),
                devs,
                b.gpu_free,
                b.ebytes,
                b.plan.device[l],
                b.plan.tier[l],
                b.plan.bits[l],
                assign,
            )
            prev = assign

    def _replicate(self, b: PlanBuilder, cluster, srv_demand) -> None:
        """Extra replicas of the hottest experts on the GPUs of the server requesting them most."""
        c = cluster
        pop = srv_demand.sum(0)
        E = pop.shape[1]
        for flat in np.argsort(-pop, axis=None, kind="stable"):
            l, e = divmod(int(flat), E)
            if b.slot(l, e) < 0:
                continue
            held = b.plan.device[l, e][b.plan.device[l, e] >= 0]
            want = srv_demand[:, l, e].copy()
            want[np.unique(c.dev_server[held])] = -1
            s = int(np.argmax(want))
            if want[s] <= 0:
                continue
            devs = np.flatnonzero(c.dev_server == s)
            d = int(devs[np.argmax(b.gpu_free[devs])])
            b.add(l, e, d, 0, int(b.plan.bits[l, e, 0]) or 8)
