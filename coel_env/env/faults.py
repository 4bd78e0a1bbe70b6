"""Faults and resource pressure after the dynamics, batched: no expert is ever lost.

Replicas on failed servers are gone (a rejoining server starts empty). An expert whose every replica was there is
restored on the live GPU with the most free memory (round-robin over live GPUs, most free first) at its former
precision; the copy comes from a live peer if one still holds it, else from the cloud (the migration cost says
which). Then, if a device or tier no longer fits (failures or shrinking free memory), the repair memory passes run.
"""

from __future__ import annotations

import numpy as np

from coel_env.plan.batch import PlanBatch
from coel_env.plan.kernels import remove_dead_kernel, slots
from coel_env.plan.repair import REPAIR_KINDS, _memory_passes, fits, usage_of
from coel_env.world.cluster import Cluster


def handle_faults(
    pb: PlanBatch, cluster: Cluster, up: np.ndarray, gpu_cap: np.ndarray, priority: np.ndarray, usage: tuple
) -> tuple[PlanBatch, np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple]:
    """`pb` fixed for live servers `up` [N, S] and GPU capacities [N, D] (a copy if anything changes); `usage` is
    pb's memory usage. Returns (plans, changed [N], replicas lost [N], experts restored [N], memory-pass counts
    [N, kinds], usage of the returned plans)."""
    N = len(pb)
    lost = np.zeros(N, dtype=np.int64)
    restored = np.zeros(N, dtype=np.int64)
    counts = np.zeros((N, len(REPAIR_KINDS)), dtype=np.int64)
    changed = np.zeros(N, dtype=bool)
    if np.count_nonzero(up) < up.size:  # some server is down
        new = pb.copy()
        orphan = np.zeros(pb.dev.shape[:3], dtype=bool)
        old_bits = np.zeros(pb.dev.shape[:3], dtype=np.int8)
        remove_dead_kernel(*slots(new.dev, new.tier, new.bits), up, cluster.dev_server, lost, *slots(orphan, old_bits))
        changed = lost > 0
        if np.count_nonzero(changed):
            pb = new
            dev, tier, bits = pb.dev, pb.tier, pb.bits
            if orphan.any():
                restored = orphan.reshape(N, -1).sum(1)
                gpu = usage_of(pb, cluster)[0]
                live = up[:, cluster.dev_server]
                free = np.where(live, gpu_cap - gpu, -np.inf)
                by_free = np.argsort(-free, axis=1, kind="stable")  # live GPUs, most free first
                nlive = np.maximum(live.sum(1), 1)
                n_idx, l_idx, e_idx = np.nonzero(orphan)
                j = np.arange(n_idx.size) - np.searchsorted(n_idx, n_idx)  # rank of the orphan within its env
                dev[n_idx, l_idx, e_idx, 0] = by_free[n_idx, j % nlive[n_idx]]
                tier[n_idx, l_idx, e_idx, 0] = 0
                bits[n_idx, l_idx, e_idx, 0] = old_bits[n_idx, l_idx, e_idx]
            usage = usage_of(pb, cluster)
    if not fits(usage, cluster, gpu_cap):
        if not np.count_nonzero(changed):
            pb = pb.copy()
        _memory_passes(pb, cluster, gpu_cap, priority, counts, usage)
        changed |= counts[:, :-1].sum(1) > 0
        usage = usage_of(pb, cluster)
    return pb, changed, lost, restored, counts, usage
