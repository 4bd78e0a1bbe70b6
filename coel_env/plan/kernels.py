"""Numba kernels for the per-step hot loops over (env, layer, expert, replica) of the environment."""

from __future__ import annotations

from numba import njit


@njit(cache=True)
def sanitize_kernel(dev, tier, bits, up, dev_server, fb_dev, fb_tier, fb_bits, first_dev, counts):
    """In place, per (env, layer, expert): out-of-range values, duplicate devices, replicas on failed servers,
    experts left without a live replica (given the fallback's live replicas, else one 4-bit CPU-tier replica
    on `first_dev[n]`). counts[n, 0:4] += invalid, duplicate, down, missing."""
    N, L, E, R = dev.shape
    D = dev_server.shape[0]
    for n in range(N):
        for l in range(L):
            for e in range(E):
                alive = 0
                for r in range(R):
                    d = dev[n, l, e, r]
                    if d < 0:
                        if d < -1:
                            counts[n, 0] += 1
                        dev[n, l, e, r] = -1
                        tier[n, l, e, r] = 0
                        bits[n, l, e, r] = 0
                        continue
                    if d >= D:
                        counts[n, 0] += 1
                        dev[n, l, e, r] = -1
                        tier[n, l, e, r] = 0
                        bits[n, l, e, r] = 0
                        continue
                    b = bits[n, l, e, r]
                    if b != 16 and b != 8 and b != 4:
                        counts[n, 0] += 1
                        bits[n, l, e, r] = 16 if b > 8 else (8 if b > 4 else 4)
                    t = tier[n, l, e, r]
                    if t < 0 or t > 2:
                        counts[n, 0] += 1
                        tier[n, l, e, r] = 0 if t < 0 else 2
                    dup = False
                    for q in range(r):
                        if dev[n, l, e, q] == d:
                            dup = True
                    if dup:
                        counts[n, 1] += 1
                        dev[n, l, e, r] = -1
                        tier[n, l, e, r] = 0
                        bits[n, l, e, r] = 0
                        continue
                    if not up[n, dev_server[d]]:
                        counts[n, 2] += 1
                        dev[n, l, e, r] = -1
                        tier[n, l, e, r] = 0
                        bits[n, l, e, r] = 0
                        continue
                    alive += 1
                if alive == 0:
                    counts[n, 3] += 1
                    k = 0
                    for r in range(R):
                        d = fb_dev[n, l, e, r]
                        if d >= 0 and d < D and up[n, dev_server[d]]:
                            dev[n, l, e, k] = d
                            tier[n, l, e, k] = fb_tier[n, l, e, r]
                            bits[n, l, e, k] = fb_bits[n, l, e, r]
                            k += 1
                    if k == 0:
                        dev[n, l, e, 0] = first_dev[n]
                        tier[n, l, e, 0] = 1
                        bits[n, l, e, 0] = 4
                        k = 1
                    for r in range(k, R):
                        dev[n, l, e, r] = -1
                        tier[n, l, e, r] = 0
                        bits[n, l, e, r] = 0


@njit(cache=True)
def remove_dead_kernel(dev, tier, bits, up, dev_server, o_lost, o_orphan, o_old_bits):
    """Drop replicas on failed servers in place; o_orphan[n, l, e] marks experts left with none (o_old_bits: the
    highest precision they had); o_lost[n] counts dropped replicas."""
    N, L, E, R = dev.shape
    for n in range(N):
        for l in range(L):
            for e in range(E):
                left = 0
                hb = 0
                for r in range(R):
                    d = dev[n, l, e, r]
                    if d < 0:
                        continue
                    if up[n, dev_server[d]]:
                        left += 1
                        continue
                    if bits[n, l, e, r] > hb:
                        hb = bits[n, l, e, r]
                    dev[n, l, e, r] = -1
                    tier[n, l, e, r] = 0
                    bits[n, l, e, r] = 0
                    o_lost[n] += 1
                if left == 0:
                    o_orphan[n, l, e] = True
                    o_old_bits[n, l, e] = hb


@njit(cache=True)
def encode_plan_kernel(dev, tier, bits, inv_dev, out):
    """out[n, ((l * E + e) * R + r) * 3 + (0, 1, 2)] = (device + 1) / D, tier / 2, bits / 16."""
    N, L, E, R = dev.shape
    for n in range(N):
        k = 0
        for l in range(L):
            for e in range(E):
                for r in range(R):
                    out[n, k] = (dev[n, l, e, r] + 1) * inv_dev
                    out[n, k + 1] = tier[n, l, e, r] * 0.5
                    out[n, k + 2] = bits[n, l, e, r] * 0.0625
                    k += 3


@njit(cache=True)
def decode_full_kernel(a, D, bit_table, dev, tier, bits):
    """Replica part of the `full` action [N, L*E*R*3] -> plan arrays (device value D = empty slot)."""
    N, L, E, R = dev.shape
    nb = bit_table.shape[0]
    for n in range(N):
        k = 0
        for l in range(L):
            for e in range(E):
                for r in range(R):
                    d = a[n, k]
                    if d >= D or d < 0:
                        dev[n, l, e, r] = -1
                        tier[n, l, e, r] = 0
                        bits[n, l, e, r] = 0
                    else:
                        dev[n, l, e, r] = d
                        tier[n, l, e, r] = min(max(a[n, k + 1], 0), 2)
                        bits[n, l, e, r] = bit_table[min(max(a[n, k + 2], 0), nb - 1)]
                    k += 3


@njit(cache=True)
def differs_kernel(a_dev, a_tier, a_bits, b_dev, b_tier, b_bits, rows, out):
    """out[n] = rows[n] and the replica arrays of plan n differ."""
    N, L, E, R = a_dev.shape
    for n in range(N):
        out[n] = False
        if not rows[n]:
            continue
        done = False
        for l in range(L):
            for e in range(E):
                for r in range(R):
                    if (
                        a_dev[n, l, e, r] != b_dev[n, l, e, r]
                        or a_tier[n, l, e, r] != b_tier[n, l, e, r]
                        or a_bits[n, l, e, r] != b_bits[n, l, e, r]
                    ):
                        out[n] = True
                        done = True
                        break
                if done:
                    break
            if done:
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
def in_range_kernel(a, nvec) -> bool:
    """0 <= a[n, i] < nvec[i] for every entry of a batch of MultiDiscrete actions [N, A]."""
    N, A = a.shape
    for n in range(N):
        for i in range(A):
            if a[n, i] < 0 or a[n, i] >= nvec[i]:
                return False
    return True
