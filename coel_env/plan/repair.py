"""Deterministic, vectorized repair of proposed plans (never an assertion: checkers step random actions).

Order: sanitize out-of-range values -> drop duplicate replicas of an expert on one device -> drop replicas on
failed servers -> give every expert without a replica its current replicas back (else one on the first live GPU)
-> memory passes, least popular replicas first, until every device/tier fits: GPU 16->8 bits, GPU 8->4, GPU->CPU
tier, CPU 16->8, CPU 8->4, CPU->SSD tier, drop extra (never the last) SSD replicas, SSD 16->8->4. What is left
over is reported as `infeasible` (the plan is still served).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from coel_env.backend.physics import memory_kernel
from coel_env.plan.batch import PlanBatch
from coel_env.plan.deployment import MAX_PRUNE
from coel_env.plan.kernels import sanitize_kernel, slots, within_kernel
from coel_env.world.cluster import Cluster

REPAIR_KINDS: tuple[str, ...] = (
    "invalid_value",
    "duplicate",
    "down_server",
    "missing_expert",
    "bits_downgraded",
    "moved_to_cpu",
    "moved_to_ssd",
    "replica_dropped",
    "infeasible",
)
_K = {k: i for i, k in enumerate(REPAIR_KINDS)}
TOL = 1 + 1e-9


def usage_of(pb: PlanBatch, cluster: Cluster) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expert bytes per GPU [N, D], CPU RAM [N, S], SSD [N, S] (numba)."""
    N = len(pb)
    g = np.zeros((N, cluster.num_devices))
    c = np.zeros((N, cluster.num_servers))
    s = np.zeros((N, cluster.num_servers))
    memory_kernel(pb.dev, pb.tier, pb.bits, cluster.dev_server, cluster.expert_bytes_by_bits, g, c, s)
    return g, c, s


def fits(usage: tuple, cluster: Cluster, gpu_cap: np.ndarray) -> bool:
    """Every GPU (capacities [N, D]), host RAM and SSD of every env holds the expert bytes `usage` puts there
    (`usage_of`), within TOL."""
    gpu, cpu, ssd = usage
    return fits_kernel(gpu, gpu_cap, cpu, cluster.cpu_expert_capacity, ssd, cluster.ssd_bytes, TOL)


@njit(cache=True)
def fits_kernel(gpu, gpu_cap, cpu, cpu_cap, ssd, ssd_cap, tol) -> bool:
    """gpu <= gpu_cap * tol [N, D], cpu <= cpu_cap * tol and ssd <= ssd_cap * tol [N, S] (caps [S]) everywhere."""
    N, D = gpu.shape
    for n in range(N):
        for d in range(D):
            if not gpu[n, d] <= gpu_cap[n, d] * tol:
                return False
        for s in range(cpu.shape[1]):
            if not (cpu[n, s] <= cpu_cap[s] * tol and ssd[n, s] <= ssd_cap[s] * tol):
                return False
    return True


def repair(
    pb: PlanBatch,
    cluster: Cluster,
    gpu_cap: np.ndarray,
    up: np.ndarray,
    priority: np.ndarray,
    fallback: PlanBatch | None,
) -> tuple[PlanBatch, np.ndarray, tuple]:
    """Repair `pb` in place against GPU capacities [N, D], live servers [N, S] and expert priority [N, L, E]
    (popularity; low goes first). Returns (pb, counts [N, len(REPAIR_KINDS)], memory usage of the result)."""
    N = len(pb)
    counts = np.zeros((N, len(REPAIR_KINDS)), dtype=np.int64)
    pr = pb.prune
    if pr.size and not within_kernel(pr, 0.0, MAX_PRUNE):  # a NaN or inf is out of range too
        bad_c = ~np.isfinite(pr) | (pr < 0) | (pr > MAX_PRUNE)
        counts[:, _K["invalid_value"]] += bad_c.sum(1)
        pb.prune[:] = np.clip(np.nan_to_num(pr), 0.0, MAX_PRUNE)
    fb = fallback if fallback is not None else pb
    first_dev = cluster.first_gpu[np.argmax(up, axis=1)]
    sanitize_kernel(
        *slots(pb.dev, pb.tier, pb.bits), up, cluster.dev_server, *slots(fb.dev, fb.tier, fb.bits), first_dev, counts
    )
    usage = usage_of(pb, cluster)
    if _memory_passes(pb, cluster, gpu_cap, priority, counts, usage):
        usage = usage_of(pb, cluster)
    return pb, counts, usage


def _memory_passes(
    pb: PlanBatch, cluster: Cluster, gpu_cap: np.ndarray, priority: np.ndarray, counts: np.ndarray, usage: tuple
) -> bool:
    """The memory passes, in place; False (nothing done) when everything fits."""
    dev, tier, bits = pb.dev, pb.tier, pb.bits
    N = dev.shape[0]
    D, S = cluster.num_devices, cluster.num_servers
    if fits(usage, cluster, gpu_cap):
        return False
    gpu, cpu, ssd = usage
    cpu_cap = np.broadcast_to(cluster.cpu_expert_capacity, (N, S))
    ssd_cap = np.broadcast_to(cluster.ssd_bytes, (N, S))
    n_of = np.broadcast_to(np.arange(N)[:, None, None, None], dev.shape)
    eb = cluster.expert_bytes_by_bits
    valid = dev >= 0
    d = np.where(valid, dev, 0).astype(np.int64)
    gid = n_of * D + d  # GPU group of each replica
    sid = n_of * S + cluster.dev_server[d]  # server group
    prio = np.broadcast_to(priority[..., None], dev.shape)
    used = {0: gpu.ravel().copy(), 1: cpu.ravel().copy(), 2: ssd.ravel().copy()}
    cap = {0: (gpu_cap * TOL).ravel(), 1: (cpu_cap * TOL).ravel(), 2: (ssd_cap * TOL).ravel()}
    group = {0: gid, 1: sid, 2: sid}

    def downgrade(t: int, b_from: int, b_to: int) -> None:
        over = used[t] - cap[t]
        if not (over > 0).any():
            return
        elig = valid & (tier == t) & (bits == b_from) & (over[group[t]] > 0)
        sel = _shed(elig, group[t], prio, np.full(dev.shape, eb[b_from] - eb[b_to]), over)
        if sel is None:
            return
        bits.reshape(-1)[sel] = b_to
        used[t] -= np.bincount(group[t].reshape(-1)[sel], minlength=used[t].size) * (eb[b_from] - eb[b_to])
        counts[:, _K["bits_downgraded"]] += np.bincount(n_of.reshape(-1)[sel], minlength=N)

    def move(t: int, t_to: int, kind: str) -> None:
        over = used[t] - cap[t]
        if not (over > 0).any():
            return
        elig = valid & (tier == t) & (over[group[t]] > 0)
        size = eb[bits]
        sel = _shed(elig, group[t], prio, size, over)
        if sel is None:
            return
        tier.reshape(-1)[sel] = t_to
        w = size.reshape(-1)[sel]
        used[t] -= np.bincount(group[t].reshape(-1)[sel], weights=w, minlength=used[t].size)
        used[t_to] += np.bincount(group[t_to].reshape(-1)[sel], weights=w, minlength=used[t_to].size)
        counts[:, _K[kind]] += np.bincount(n_of.reshape(-1)[sel], minlength=N)

    def drop_extra(t: int) -> None:
        over = used[t] - cap[t]
        if not (over > 0).any():
            return
        first = np.argmax(valid, axis=-1)[..., None] == np.arange(dev.shape[-1])
        elig = valid & ~first & (tier == t) & (over[group[t]] > 0)
        size = eb[bits]
        sel = _shed(elig, group[t], prio, size, over)
        if sel is None:
            return
        used[t] -= np.bincount(group[t].reshape(-1)[sel], weights=size.reshape(-1)[sel], minlength=used[t].size)
        dev.reshape(-1)[sel] = -1
        tier.reshape(-1)[sel] = 0
        bits.reshape(-1)[sel] = 0
        valid.reshape(-1)[sel] = False
        counts[:, _K["replica_dropped"]] += np.bincount(n_of.reshape(-1)[sel], minlength=N)

    downgrade(0, 16, 8)
    downgrade(0, 8, 4)
    move(0, 1, "moved_to_cpu")
    downgrade(1, 16, 8)
    downgrade(1, 8, 4)
    move(1, 2, "moved_to_ssd")
    drop_extra(2)
    downgrade(2, 16, 8)
    downgrade(2, 8, 4)
    left = np.concatenate([(used[t] - cap[t]).reshape(N, -1) for t in (0, 1, 2)], 1)
    counts[:, _K["infeasible"]] += (left > 0).sum(1)
    return True


def _shed(
    elig: np.ndarray, group: np.ndarray, prio: np.ndarray, saving: np.ndarray, over: np.ndarray
) -> np.ndarray | None:
    """Flat indices of the fewest lowest-priority eligible replicas per group whose savings cover `over`."""
    idx = np.flatnonzero(elig)
    if idx.size == 0:
        return None
    g = group.reshape(-1)[idx]
    p = prio.reshape(-1)[idx]
    s = saving.reshape(-1)[idx].astype(np.float64)
    order = np.lexsort((p, g))
    g, s, idx = g[order], s[order], idx[order]
    excl = np.cumsum(s) - s
    start = np.empty(g.size, dtype=bool)
    start[0] = True
    start[1:] = g[1:] != g[:-1]
    base = np.maximum.accumulate(np.where(start, excl, 0.0))
    sel = (excl - base) < over[g]
    return idx[sel] if sel.any() else None
