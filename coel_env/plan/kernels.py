"""Numba kernels for the per-step hot loops over (env, layer, expert, replica) of the environment.

Replica kernels take plan arrays [N, L, E, R] as views: `slots` [N, L * E, R] (one index per expert) or `flat`
[N, L * E * R]; fewer index dimensions let numba compile tighter loops (several times faster than 4-D indexing).
"""

from __future__ import annotations

import numpy as np
from numba import njit


def slots(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Plan arrays [N, L, E, R] (or [N, L, E]) as views [N, L * E, R] (or [N, L * E]); ValueError where that would
    need a copy (kernels write through the views)."""
    return tuple([a.reshape(a.shape[0], a.shape[1] * a.shape[2], *a.shape[3:], copy=False) for a in arrays])


def flat(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Plan arrays [N, ...] as views [N, L * E * R]; ValueError where that would need a copy."""
    return tuple([a.reshape(a.shape[0], -1, copy=False) for a in arrays])


@njit(cache=True)
def sanitize_kernel(dev, tier, bits, up, dev_server, fb_dev, fb_tier, fb_bits, first_dev, counts):
    """In place, per (env, expert) of `slots` views [N, L * E, R]: out-of-range values, duplicate devices, replicas
    on failed servers, experts left without a live replica (given the fallback's live replicas, else one 4-bit
    CPU-tier replica on `first_dev[n]`). counts[n, 0:4] += invalid, duplicate, down, missing."""
    N, M, R = dev.shape
    D = dev_server.shape[0]
    for n in range(N):
        for m in range(M):
            alive = 0
            for r in range(R):
                d = dev[n, m, r]
                if d < 0:
                    if d < -1:
                        counts[n, 0] += 1
                    dev[n, m, r] = -1
                    tier[n, m, r] = 0
                    bits[n, m, r] = 0
                    continue
                if d >= D:
                    counts[n, 0] += 1
                    dev[n, m, r] = -1
                    tier[n, m, r] = 0
                    bits[n, m, r] = 0
                    continue
                b = bits[n, m, r]
                if b != 16 and b != 8 and b != 4:
                    counts[n, 0] += 1
                    bits[n, m, r] = 16 if b > 8 else (8 if b > 4 else 4)
                t = tier[n, m, r]
                if t < 0 or t > 2:
                    counts[n, 0] += 1
                    tier[n, m, r] = 0 if t < 0 else 2
                dup = False
                for q in range(r):
                    if dev[n, m, q] == d:
                        dup = True
                if dup:
                    counts[n, 1] += 1
                    dev[n, m, r] = -1
                    tier[n, m, r] = 0
                    bits[n, m, r] = 0
                    continue
                if not up[n, dev_server[d]]:
                    counts[n, 2] += 1
                    dev[n, m, r] = -1
                    tier[n, m, r] = 0
                    bits[n, m, r] = 0
                    continue
                alive += 1
            if alive == 0:
                counts[n, 3] += 1
                k = 0
                for r in range(R):
                    d = fb_dev[n, m, r]
                    if d >= 0 and d < D and up[n, dev_server[d]]:
                        dev[n, m, k] = d
                        tier[n, m, k] = fb_tier[n, m, r]
                        bits[n, m, k] = fb_bits[n, m, r]
                        k += 1
                if k == 0:
                    dev[n, m, 0] = first_dev[n]
                    tier[n, m, 0] = 1
                    bits[n, m, 0] = 4
                    k = 1
                for r in range(k, R):
                    dev[n, m, r] = -1
                    tier[n, m, r] = 0
                    bits[n, m, r] = 0


@njit(cache=True)
def remove_dead_kernel(dev, tier, bits, up, dev_server, o_lost, o_orphan, o_old_bits):
    """Drop replicas on failed servers in place (`slots` views [N, L * E, R]); o_orphan[n, m] marks experts left
    with none (o_old_bits: the highest precision they had); o_lost[n] counts dropped replicas."""
    N, M, R = dev.shape
    for n in range(N):
        for m in range(M):
            left = 0
            hb = 0
            for r in range(R):
                d = dev[n, m, r]
                if d < 0:
                    continue
                if up[n, dev_server[d]]:
                    left += 1
                    continue
                if bits[n, m, r] > hb:
                    hb = bits[n, m, r]
                dev[n, m, r] = -1
                tier[n, m, r] = 0
                bits[n, m, r] = 0
                o_lost[n] += 1
            if left == 0:
                o_orphan[n, m] = True
                o_old_bits[n, m] = hb


@njit(cache=True)
def encode_plan_kernel(dev, tier, bits, inv_dev, out):
    """out[n, 3 j + (0, 1, 2)] = (device + 1) / D, tier / 2, bits / 16 of replica j of `flat` views [N, L * E * R]."""
    N, J = dev.shape
    for n in range(N):
        for j in range(J):
            out[n, 3 * j] = (dev[n, j] + 1) * inv_dev
            out[n, 3 * j + 1] = tier[n, j] * 0.5
            out[n, 3 * j + 2] = bits[n, j] * 0.0625


@njit(cache=True)
def decode_full_kernel(a, D, bit_table, dev, tier, bits):
    """Replica part of the `full` action [N, L*E*R*3] -> plan arrays (`flat` views [N, L * E * R]; device value
    D = empty slot)."""
    N, J = dev.shape
    nb = bit_table.shape[0]
    for n in range(N):
        for j in range(J):
            d = a[n, 3 * j]
            if d >= D or d < 0:
                dev[n, j] = -1
                tier[n, j] = 0
                bits[n, j] = 0
            else:
                dev[n, j] = d
                tier[n, j] = min(max(a[n, 3 * j + 1], 0), 2)
                bits[n, j] = bit_table[min(max(a[n, 3 * j + 2], 0), nb - 1)]


@njit(cache=True)
def differs_kernel(a_dev, a_tier, a_bits, b_dev, b_tier, b_bits, rows, out):
    """out[n] = rows[n] and the replica arrays of plan n differ (`flat` views [N, L * E * R])."""
    N, J = a_dev.shape
    for n in range(N):
        out[n] = False
        if not rows[n]:
            continue
        for j in range(J):
            if a_dev[n, j] != b_dev[n, j] or a_tier[n, j] != b_tier[n, j] or a_bits[n, j] != b_bits[n, j]:
                out[n] = True
                break


@njit(cache=True)
def apply_edits_kernel(a, K, F, bit_table, prune_levels, P, dev, tier, bits, prune, fuse, invalid):
    """`EditCodec.decode_batch` in place: per env n, the K edits of validated actions a [N, K * F + 1] applied in
    order to the plan copy (dev, tier, bits [N, L, E, R], prune, fuse [N, P]); invalid[n] += edits that do not
    apply. Ops (actions.EDIT_OPS): 0 noop, 1 move, 2 replicate, 3 drop, 4 set_tier, 5 set_bits, 6 set_compression."""
    N = a.shape[0]
    R = dev.shape[3]
    for n in range(N):
        for k in range(K):
            o = k * F
            op, l, e, r, d = a[n, o], a[n, o + 1], a[n, o + 2], a[n, o + 3], a[n, o + 4]
            t, b, p, lv, fu = a[n, o + 5], a[n, o + 6], a[n, o + 7], a[n, o + 8], a[n, o + 9]
            occupied = dev[n, l, e, r] >= 0
            n_rep = 0
            on_dev = False
            first_free = -1
            for q in range(R):
                dq = dev[n, l, e, q]
                if dq >= 0:
                    n_rep += 1
                elif first_free < 0:
                    first_free = q
                if dq == d:
                    on_dev = True
            ok = True
            if op == 1:  # move
                if occupied and not on_dev:
                    dev[n, l, e, r] = d
                else:
                    ok = False
            elif op == 2:  # replicate into the first empty slot
                if first_free >= 0 and not on_dev:
                    dev[n, l, e, first_free] = d
                    tier[n, l, e, first_free] = t
                    bits[n, l, e, first_free] = bit_table[b]
                else:
                    ok = False
            elif op == 3:  # drop (never the last replica)
                if occupied and n_rep > 1:
                    dev[n, l, e, r] = -1
                    tier[n, l, e, r] = 0
                    bits[n, l, e, r] = 0
                else:
                    ok = False
            elif op == 4:
                if occupied:
                    tier[n, l, e, r] = t
                else:
                    ok = False
            elif op == 5:
                if occupied:
                    bits[n, l, e, r] = bit_table[b]
                else:
                    ok = False
            elif op == 6:
                if P > 0:
                    prune[n, p] = prune_levels[lv]
                    fuse[n, p] = fu == 1
                else:
                    ok = False
            if not ok:
                invalid[n] += 1


@njit(cache=True)
def multi_replica_kernel(dev, out):
    """out[n] = some expert of plan n (`slots` view [N, L * E, R]) has two or more replicas."""
    N, M, R = dev.shape
    for n in range(N):
        out[n] = False
        for m in range(M):
            k = 0
            for r in range(R):
                k += dev[n, m, r] >= 0
            if k > 1:
                out[n] = True
                break


@njit(cache=True)
def within_kernel(x, lo, hi) -> bool:
    """lo <= x[n, i] <= hi for every entry of x [N, A] (False for NaN)."""
    N, A = x.shape
    for n in range(N):
        ok = True
        for i in range(A):
            ok &= (x[n, i] >= lo) & (x[n, i] <= hi)
        if not ok:
            return False
    return True


@njit(cache=True)
def in_range_kernel(a, nvec) -> bool:
    """0 <= a[n, i] < nvec[i] for every entry of a batch of MultiDiscrete actions [N, A] (a row's test has no
    branch, so it vectorizes)."""
    N, A = a.shape
    for n in range(N):
        ok = True
        for i in range(A):
            ok &= (a[n, i] >= 0) & (a[n, i] < nvec[i])
        if not ok:
            return False
    return True
