"""DeepSeek's Expert Parallelism Load Balancer (EPLB), re-implemented with numpy, and a CoEL adapter.

`rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus) -> (phy2log, log2phy, logcnt)` has the
reference's semantics: with groups divisible among nodes the *hierarchical* policy (1. pack expert groups onto
nodes with balanced packing, 2. replicate experts inside each node, always giving the next replica to the expert
with the heaviest load per replica, 3. pack the node's physical experts onto its GPUs with balanced packing);
otherwise the *global* policy (the same with one group and one node). Physical expert `i` lives on GPU
`i // (num_replicas // num_gpus)`. Ties are broken by a stable sort (lowest index first).

`EPLBPolicy` adapts it to heterogeneous edge servers the way vLLM/SGLang run it (re-balanced every `period`
epochs from observed load): every GPU gets replica slots in proportion to its free memory (as whole "virtual GPUs"
of equal size, since EPLB packs equal-sized GPUs), and the virtual GPUs' packs go to real devices by load scaled
by device speed.
"""

from __future__ import annotations

import math

import numpy as np

from agents.baselines.common import (
    SEED,
    Arg,
    PlanBuilder,
    checked_args,
    demand,
    device_speed,
    highest_bits_that_fit,
    pack_by_speed,
)
from agents.policy import Policy
from coel_env.errors import ConfigError
from coel_env.plan.deployment import DeploymentPlan
from coel_env.specs.bounds import MAX_REPLICAS
from coel_env.world.cluster import Cluster
from coel_env.world.state import ClusterState


# ---- the algorithm -------------------------------------------------------------------------------------------
def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack the n items of each row into `num_packs` packs of exactly n / num_packs items, heaviest item first
    into the lightest pack that still has room. Returns (pack_index, rank_in_pack), both [X, n]."""
    rows, n = weight.shape
    if n % num_packs:
        raise ConfigError(f"eplb: {n} items cannot be split evenly into {num_packs} packs")
    per_pack = n // num_packs
    if per_pack == 1:
        return np.tile(np.arange(n), (rows, 1)), np.zeros((rows, n), dtype=np.int64)
    pack_index = np.full((rows, n), -1, dtype=np.int64)
    rank = np.full((rows, n), -1, dtype=np.int64)
    for i in range(rows):
        load = np.zeros(num_packs)
        items = np.zeros(num_packs, dtype=np.int64)
        for g in np.argsort(-weight[i], kind="stable"):
            p = int(np.argmin(np.where(items < per_pack, load, np.inf)))
            pack_index[i, g], rank[i, g] = p, items[p]
            load[p] += weight[i, g]
            items[p] += 1
    return pack_index, rank


def replicate_experts(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grow each row's `num_log` experts to `num_phy` physical ones, each extra replica going to the expert with
    the largest load per replica. Returns phy2log [X, num_phy], replica rank [X, num_phy], logcnt [X, num_log]."""
    rows, num_log = weight.shape
    if num_phy < num_log:
        raise ConfigError(f"eplb: num_replicas ({num_phy}) must be >= the number of experts ({num_log})")
    phy2log = np.tile(np.arange(num_phy), (rows, 1))
    rank = np.zeros((rows, num_phy), dtype=np.int64)
    logcnt = np.ones((rows, num_log), dtype=np.int64)
    ar = np.arange(rows)
    for i in range(num_log, num_phy):
        hot = np.argmax(weight / logcnt, axis=-1)
        phy2log[:, i] = hot
        rank[:, i] = logcnt[ar, hot]
        logcnt[ar, hot] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def rebalance_experts_hierarchical(
    weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hierarchical EPLB: groups -> nodes, replication inside nodes, physical experts -> GPUs.
    Returns phy2log [L, num_physical], replica rank [L, num_physical], logcnt [L, num_logical]."""
    L, num_log = weight.shape
    for ok, msg in (
        (num_log % num_groups == 0, f"num_groups ({num_groups}) must divide the experts ({num_log})"),
        (num_groups % num_nodes == 0, f"num_nodes ({num_nodes}) must divide num_groups ({num_groups})"),
        (num_gpus % num_nodes == 0, f"num_nodes ({num_nodes}) must divide num_gpus ({num_gpus})"),
        (num_physical % num_gpus == 0, f"num_gpus ({num_gpus}) must divide num_replicas ({num_physical})"),
    ):
        if not ok:
            raise ConfigError(f"eplb: {msg}")
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    per_gpu = num_physical // num_gpus
    log_per_node = num_log // num_nodes
    # 1. expert groups onto nodes; "mlog" numbers the experts node by node
    group_load = weight.reshape(L, num_groups, group_size).sum(-1)
    g_pack, g_rank = balanced_packing(group_load, num_nodes)
    log2mlog = (((g_pack * groups_per_node + g_rank) * group_size)[..., None] + np.arange(group_size)).reshape(L, -1)
    mlog2log = _inverse(log2mlog)
    # 2. replicas inside each node (rows = layer x node)
    mlog_load = np.take_along_axis(weight, mlog2log, -1).reshape(-1, log_per_node)
    phy2mlog, phy_rank, mlogcnt = replicate_experts(mlog_load, num_physical // num_nodes)
    # 3. physical experts onto the node's GPUs
    phy_load = np.take_along_axis(mlog_load / mlogcnt, phy2mlog, -1)
    pack, rank_in_pack = balanced_packing(phy_load, num_gpus // num_nodes)
    pphy2phy = _inverse(pack * per_gpu + rank_in_pack)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, -1)
    pphy2mlog = pphy2mlog.reshape(L, num_nodes, -1) + (np.arange(num_nodes) * log_per_node)[None, :, None]
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog.reshape(L, -1), -1)
    pphy_rank = np.take_along_axis(phy_rank, pphy2phy, -1).reshape(L, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(L, -1), log2mlog, -1)
    return pphy2log, pphy_rank, logcnt


def rebalance_experts(
    weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB entry point. weight [L, num_logical] load statistics. Returns phy2log [L, num_replicas] (logical expert
    of each physical slot), log2phy [L, num_logical, max_count] (slots of each expert, -1 padded) and logcnt
    [L, num_logical] (replicas per expert)."""
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim != 2:
        raise ConfigError(f"eplb: weight must be [layers, experts]; got shape {weight.shape}")
    if num_groups % num_nodes == 0:
        phy2log, rank, logcnt = rebalance_experts_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, rank, logcnt = rebalance_experts_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    L, num_log = weight.shape
    width = int(logcnt.max())
    log2phy = np.full((L, num_log * width), -1, dtype=np.int64)
    np.put_along_axis(log2phy, phy2log * width + rank, np.broadcast_to(np.arange(num_replicas), phy2log.shape), 1)
    return phy2log, log2phy.reshape(L, num_log, width), logcnt


# ---- the adapter ---------------------------------------------------------------------------------------------
def virtual_gpus(slots: np.ndarray, total: int) -> tuple[int, np.ndarray]:
    """Split per-device slot counts into equal virtual GPUs: (slots per virtual GPU, virtual GPUs per device),
    using as many slots as possible up to `total` (EPLB packs equal-sized GPUs only)."""
    slots = np.minimum(slots, total)
    pos = slots[slots > 0]
    if not len(pos):
        return 1, np.zeros_like(slots)
    best = (0, 1, np.zeros_like(slots))
    for m in range(1, int(pos.max()) + 1):
        n = slots // m
        used = min(int(n.sum()) * m, total - total % m)
        if used > best[0]:
            best = (used, m, n)
    _, m, n = best
    # trim virtual GPUs (from the devices with most) until the slots fit `total`
    while int(n.sum()) * m > total:
        n[int(np.argmax(n))] -= 1
    return m, n


class EPLBPolicy(Policy):
    """EPLB on a heterogeneous edge cluster, re-balanced every `period` epochs (and after failures)."""

    name = "eplb"

    @checked_args(seed=SEED, period=Arg(int, 1), redundancy=Arg(float, 0, MAX_REPLICAS))
    def __init__(self, seed: int | None = None, period: int = 10, redundancy: float = 1.0):
        super().__init__(seed)
        self.period, self.redundancy = period, redundancy

    def should_update(self, view, cluster, current) -> bool:
        return super().should_update(view, cluster, current) or self.epoch % self.period == 0

    def plan(self, view: ClusterState, cluster: Cluster) -> DeploymentPlan:
        b = PlanBuilder(view, cluster)
        L, E, R = b.plan.device.shape
        m = cluster.model
        load = demand(view, cluster)
        speed = device_speed(view, cluster)
        live = np.flatnonzero(view.device_up & (b.gpu_free > 0))
        # bits: the highest precision at which one copy of every expert fits all GPUs together
        bits = int(highest_bits_that_fit(np.array([L * E]), np.array([b.gpu_free[live].sum()]), b.ebytes)[0]) or 4
        slots = np.floor(b.gpu_free[live] / (L * b.ebytes[bits])).astype(np.int64)  # per device and layer
        want = min(E * min(R, 1 + math.ceil(self.redundancy)), int(slots.sum()))
        k = min(E, want)  # logical experts on GPUs per layer (the rest are offloaded)
        per_vgpu, n_v = virtual_gpus(slots, max(want, k))
        G = int(n_v.sum())
        num_phy = G * per_vgpu
        if num_phy < k:  # not even one GPU slot per expert: keep the hottest on GPUs
            k = num_phy
        hot = np.argsort(-load, axis=-1, kind="stable")[:, :k]  # [L, k] logical ids kept on GPUs
        vgpu_dev = np.repeat(live, n_v)  # [G]
        if k > 0 and G > 0:
            w = np.take_along_axis(load, hot, -1)
            nodes = cluster.dev_server[vgpu_dev]
            uniq, per_node = np.unique(nodes, return_counts=True)
            homogeneous = (
                len(uniq) > 1
                and (per_node == per_node[0]).all()
                and (np.diff(nodes) >= 0).all()
                and (k % m.num_expert_groups == 0)
            )
            num_nodes = len(uniq) if homogeneous else 1
            groups = m.num_expert_groups if k == E else 1
            phy2log, _, logcnt = rebalance_experts(w, num_phy, groups, num_nodes, G)
            hier = homogeneous and groups % num_nodes == 0
            self._place(b, view, cluster, hot, phy2log, logcnt, w, vgpu_dev, per_vgpu, speed, bits, hier)
        for l in range(L):  # experts without a GPU replica: host RAM / SSD
            for e in np.flatnonzero(~b.plan.valid[l].any(-1)):
                b.add_offloaded(l, int(e), bits)
        return b.complete(bits=4)

    def _place(self, b, view, cluster, hot, phy2log, logcnt, w, vgpu_dev, per_vgpu, speed, bits, by_node) -> None:
        """Map each layer's virtual GPUs (packs of `per_vgpu` physical experts) onto devices by load / speed."""
        L, num_phy = phy2log.shape
        G = num_phy // per_vgpu
        devs, cap = np.unique(vgpu_dev, return_counts=True)
        for l in range(L):
            phy_load = w[l][phy2log[l]] / logcnt[l][phy2log[l]]
            pack_load = phy_load.reshape(G, per_vgpu).sum(-1)
            if by_node:  # hierarchical: virtual GPU g stays on its node; pack within the node's devices
                target = np.empty(G, dtype=np.int64)
                for s in np.unique(cluster.dev_server[vgpu_dev]):
                    gs = np.flatnonzero(cluster.dev_server[vgpu_dev] == s)
                    ds = np.flatnonzero(cluster.dev_server[devs] == s)
                    target[gs] = devs[ds][pack_by_speed(pack_load[gs], speed[devs[ds]], cap[ds])]
            else:
                target = devs[pack_by_speed(pack_load, speed[devs], cap)]
            for i in range(num_phy):
                e = int(hot[l, phy2log[l, i]])
                b.add(l, e, int(target[i // per_vgpu]), 0, bits)  # extra replicas beyond R / duplicates drop
