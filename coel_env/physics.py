"""Numba kernels of the surrogate: one fused pass over (plan, server, layer, expert, replica).

Units: bytes, seconds, FLOPs. For every serving server `s` and expert, tokens go to the replica that costs them
least (resource-aware routing). Experts on different devices of a layer run in parallel, experts on one device
serially; a remote expert costs its hidden states there and back plus the link latency, once per layer and
destination. Everything else (batching, queueing, energy, percentiles) is done in numpy on small arrays.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, fastmath=True)
def activation_stats(pop, batch, in_len, u_dec, a_dec, u_pre, a_pre):
    """Per (state, server, layer, expert): chance an expert is used in a decode step / a prefill, and tokens."""
    ns, S, L, E = pop.shape
    for i in range(ns):
        for s in range(S):
            lb = batch[i, s]
            li = in_len[i, s]
            for l in range(L):
                for e in range(E):
                    p = pop[i, s, l, e]
                    if p >= 1.0:
                        u_dec[i, s, l, e] = 1.0
                        u_pre[i, s, l, e] = 1.0
                    elif p <= 0.0:
                        u_dec[i, s, l, e] = 0.0
                        u_pre[i, s, l, e] = 0.0
                    else:
                        lq = np.log1p(-p)
                        u_dec[i, s, l, e] = -np.expm1(lb * lq)
                        u_pre[i, s, l, e] = -np.expm1(li * lq)
                    a_dec[i, s, l, e] = lb * p
                    a_pre[i, s, l, e] = li * p


@njit(cache=True, fastmath=True)
def _replica_cost(u, a, w, slow_b, gpu_bw, gpu_flops, tier, fetch, cpu_read, cpu_flops, cpu_ok,
                  flops_tok, overhead):
    """(time, unit-is-cpu) of serving `a` tokens (expert used with chance `u`) from one replica."""
    gpu = max(u * w * slow_b / gpu_bw, a * flops_tok / gpu_flops) + u * (fetch + overhead)
    if tier == 0 or not cpu_ok:
        return gpu, False
    cpu = max(u * cpu_read, a * flops_tok / cpu_flops) + u * overhead
    if tier == 2:
        cpu += u * fetch  # SSD read before the CPU can use it (fetch holds SSD + PCIe; a slight overcount)
    if cpu < gpu:
        return cpu, True
    return gpu, False


@njit(cache=True, parallel=True, fastmath=True)
def serve_kernel(
    dev, tier, bits, tok_keep, byte_keep, state_idx,
    pop, u_dec, a_dec, u_pre, a_pre, server_up, comp_avail, pair_bw, pair_lat,
    dev_server, gpu_bw, gpu_flops, cpu_bw, cpu_flops, pcie_bw, ssd_bw,
    ebytes, slow, qloss, flops_tok, hidden, hit, cpu_ok, overhead,
    o_time, o_pair_bytes, o_busy, o_quality, o_miss, o_cross,
):
    """Fill, per plan n and server s: o_time[n, s, 0:6] = decode (compute, comm-bandwidth, comm-latency) and
    prefill (same three); o_pair_bytes[n, s, s2, 0:2] one-way bytes per decode step / prefill; o_busy[n, s, u, 0:2]
    busy seconds per unit u (GPUs then CPUs); o_quality, o_miss (expert mass with no live replica), o_cross
    (token mass crossing to s2)."""
    N, L, E, R = dev.shape
    S = server_up.shape[1]
    D = dev_server.shape[0]
    U = D + S
    for job in prange(N * S):
        n = job // S
        s = job % S
        si = state_idx[n]
        if not server_up[si, s]:
            continue
        acc_d = np.zeros(U)
        acc_p = np.zeros(U)
        touched = np.zeros(U, dtype=np.bool_)
        bytes_d = np.zeros(S)
        bytes_p = np.zeros(S)
        none_d = np.ones(S)
        none_p = np.ones(S)
        quality = 0.0
        miss = 0.0
        for l in range(L):
            for e in range(E):
                p = pop[si, s, l, e]
                if p <= 0.0:
                    continue
                ud = u_dec[si, s, l, e]
                ad = a_dec[si, s, l, e]
                up = u_pre[si, s, l, e]
                ap = a_pre[si, s, l, e]
                best_d = np.inf
                best_p = np.inf
                rd = -1
                rp = -1
                loc_d = 0.0
                loc_p = 0.0
                cpu_d = False
                cpu_p = False
                for r in range(R):
                    d = dev[n, l, e, r]
                    if d < 0:
                        continue
                    sd = dev_server[d]
                    if not server_up[si, sd]:
                        continue
                    b = bits[n, l, e, r]
                    t = tier[n, l, e, r]
                    w = ebytes[b]
                    if t == 0:
                        fetch = 0.0
                        cread = 0.0
                    elif t == 1:
                        fetch = (1.0 - hit) * w / pcie_bw[sd]
                        cread = w / cpu_bw[sd]
                    else:
                        fetch = (1.0 - hit) * (w / ssd_bw[sd] + w / pcie_bw[sd])
                        cread = w / cpu_bw[sd]
                    gb = gpu_bw[d] * comp_avail[si, d]
                    gf = gpu_flops[d] * comp_avail[si, d]
                    keep = 1.0
                    comm_d = 0.0
                    comm_p = 0.0
                    if sd != s:
                        keep = tok_keep[n, s, sd]
                        bw = pair_bw[si, s, sd]
                        comm_d = 2.0 * ad * hidden * byte_keep[n, s, sd] / bw + 2.0 * pair_lat[s, sd] * ud
                        comm_p = 2.0 * ap * hidden * byte_keep[n, s, sd] / bw + 2.0 * pair_lat[s, sd] * up
                    td, cd = _replica_cost(ud, ad * keep, w, slow[b], gb, gf, t, fetch, cread, cpu_flops[sd],
                                           cpu_ok, flops_tok, overhead)
                    tp, cp = _replica_cost(up, ap * keep, w, slow[b], gb, gf, t, fetch, cread, cpu_flops[sd],
                                           cpu_ok, flops_tok, overhead)
                    if td + comm_d < best_d:
                        best_d = td + comm_d
                        rd = r
                        loc_d = td
                        cpu_d = cd
                    if tp + comm_p < best_p:
                        best_p = tp + comm_p
                        rp = r
                        loc_p = tp
                        cpu_p = cp
                if rd < 0:
                    miss += p
                    continue
                d = dev[n, l, e, rd]
                sd = dev_server[d]
                unit = D + sd if cpu_d else d
                acc_d[unit] += loc_d
                touched[unit] = True
                quality += p * qloss[bits[n, l, e, rd]]
                if sd != s:
                    bytes_d[sd] += ad * hidden * byte_keep[n, s, sd]
                    none_d[sd] *= 1.0 - ud
                    o_cross[n, s, sd] += p
                d = dev[n, l, e, rp]
                sd = dev_server[d]
                unit = D + sd if cpu_p else d
                acc_p[unit] += loc_p
                touched[unit] = True
                if sd != s:
                    bytes_p[sd] += ap * hidden * byte_keep[n, s, sd]
                    none_p[sd] *= 1.0 - up
            # close the layer: devices in parallel, transfers serial on the sender's path
            mx_d = 0.0
            mx_p = 0.0
            for u in range(U):
                if touched[u]:
                    if acc_d[u] > mx_d:
                        mx_d = acc_d[u]
                    if acc_p[u] > mx_p:
                        mx_p = acc_p[u]
                    o_busy[n, s, u, 0] += acc_d[u]
                    o_busy[n, s, u, 1] += acc_p[u]
                    acc_d[u] = 0.0
                    acc_p[u] = 0.0
                    touched[u] = False
            o_time[n, s, 0] += mx_d
            o_time[n, s, 3] += mx_p
            lat_d = 0.0
            lat_p = 0.0
            for s2 in range(S):
                if bytes_d[s2] > 0.0 or none_d[s2] < 1.0:
                    o_time[n, s, 1] += 2.0 * bytes_d[s2] / pair_bw[si, s, s2]
                    lat_d = max(lat_d, 2.0 * pair_lat[s, s2] * (1.0 - none_d[s2]))
                    o_pair_bytes[n, s, s2, 0] += bytes_d[s2]
                    bytes_d[s2] = 0.0
                    none_d[s2] = 1.0
                if bytes_p[s2] > 0.0 or none_p[s2] < 1.0:
                    o_time[n, s, 4] += 2.0 * bytes_p[s2] / pair_bw[si, s, s2]
                    lat_p = max(lat_p, 2.0 * pair_lat[s, s2] * (1.0 - none_p[s2]))
                    o_pair_bytes[n, s, s2, 1] += bytes_p[s2]
                    bytes_p[s2] = 0.0
                    none_p[s2] = 1.0
            o_time[n, s, 2] += lat_d
            o_time[n, s, 5] += lat_p
        o_quality[n, s] = quality
        o_miss[n, s] = miss


@njit(cache=True)
def migration_kernel(old_dev, old_tier, old_bits, new_dev, new_tier, new_bits, dev_server, server_up,
                     pair_lat, ebytes, o_bytes, o_pair, o_counts):
    """Per new replica absent from the old plan, pick its source: a local copy (same server) with >= bits,
    else the nearest live peer with >= bits, else the cloud. o_bytes[s, 0:3] = local/peer/cloud bytes into
    server s; o_pair[src, dst] network bytes; o_counts = (added, removed)."""
    L, E, R = new_dev.shape
    for l in range(L):
        for e in range(E):
            for r in range(R):
                d = new_dev[l, e, r]
                if d < 0:
                    continue
                b = new_bits[l, e, r]
                present = False
                for q in range(R):
                    if old_dev[l, e, q] == d and old_tier[l, e, q] == new_tier[l, e, r] and old_bits[l, e, q] == b:
                        present = True
                if present:
                    continue
                o_counts[0] += 1
                dst = dev_server[d]
                w = ebytes[b]
                best_src = -1
                best_lat = np.inf
                for q in range(R):
                    od = old_dev[l, e, q]
                    if od < 0 or old_bits[l, e, q] < b:
                        continue
                    src = dev_server[od]
                    if not server_up[src]:
                        continue
                    lat = 0.0 if src == dst else pair_lat[src, dst] + 1.0
                    if lat < best_lat:
                        best_lat = lat
                        best_src = src
                if best_src == dst:
                    o_bytes[dst, 0] += w
                elif best_src >= 0:
                    o_bytes[dst, 1] += w
                    o_pair[best_src, dst] += w
                else:
                    o_bytes[dst, 2] += w
            for q in range(R):
                od = old_dev[l, e, q]
                if od < 0:
                    continue
                kept = False
                for r in range(R):
                    if new_dev[l, e, r] == od and new_tier[l, e, r] == old_tier[l, e, q] and \
                            new_bits[l, e, r] == old_bits[l, e, q]:
                        kept = True
                if not kept:
                    o_counts[1] += 1


@njit(cache=True)
def memory_kernel(dev, tier, bits, dev_server, ebytes, o_gpu, o_cpu, o_ssd):
    """Expert bytes per GPU [N, D], per server in CPU RAM and on SSD [N, S] for a batch of plans."""
    N, L, E, R = dev.shape
    for n in range(N):
        for l in range(L):
            for e in range(E):
                for r in range(R):
                    d = dev[n, l, e, r]
                    if d < 0:
                        continue
                    w = ebytes[bits[n, l, e, r]]
                    t = tier[n, l, e, r]
                    if t == 0:
                        o_gpu[n, d] += w
                    elif t == 1:
                        o_cpu[n, dev_server[d]] += w
                    else:
                        o_ssd[n, dev_server[d]] += w
