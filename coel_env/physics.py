"""Numba kernels of the surrogate: one fused pass over (plan, server, layer, expert, replica).

Units: bytes, seconds, FLOPs. For every serving server `s` and expert, tokens go to the replica that costs them
least (resource-aware routing). Experts on different devices of a layer run in parallel, experts on one device
serially; a remote expert costs its hidden states there and back plus the link latency, once per layer and
destination. Everything else (batching, queueing, energy, percentiles) is done in numpy on small arrays.
"""

from __future__ import annotations

import numpy as np
from numba import njit


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
                        # a batch of one uses the expert with probability p itself: skip two transcendentals
                        u_dec[i, s, l, e] = p if lb == 1.0 else -np.expm1(lb * lq)
                        u_pre[i, s, l, e] = p if li == 1.0 else -np.expm1(li * lq)
                    a_dec[i, s, l, e] = lb * p
                    a_pre[i, s, l, e] = li * p


BITS_INDEX = np.zeros(17, dtype=np.int64)  # bits -> column of the unit table
BITS_INDEX[16], BITS_INDEX[8], BITS_INDEX[4] = 0, 1, 2


@njit(cache=True, fastmath=True)
def serve_kernel(
    dev, tier, bits, tok_keep, comm_tok, state_idx,
    pop, u_dec, a_dec, u_pre, a_pre, server_up, table, pair_lat2, dev_server, bits_index, qloss,
    o_time, o_pair_bytes, o_busy, o_quality, o_miss, o_cross,
):
    """Fill, per plan n and server s: o_time[n, s, 0:6] = decode (compute, comm-bandwidth, comm-latency) and
    prefill (same three); o_pair_bytes[n, s, s2, 0:2] tokens sent to s2 per decode step / prefill, before
    compression; o_busy[n, s, u, 0:2] busy seconds per unit u (GPUs then CPUs); o_quality, o_miss (expert mass
    with no live replica), o_cross (token mass crossing to s2).

    table[si, key, 0:6] holds per (device, tier, bits) key = (d * 3 + tier) * 3 + bits_index the GPU path
    (read s per activation, compute s per token, fetch+overhead s per activation) then the same for the CPU path.
    comm_tok[n, s, s2] = round-trip seconds per token crossing (bandwidth part); pair_lat2 = round-trip latency."""
    N, L, E, R = dev.shape
    S = server_up.shape[1]
    D = dev_server.shape[0]
    U = D + S
    dev_up = np.zeros(D, dtype=np.bool_)  # per device, for server s: live, token keep, comm s/token, latency
    dev_keep = np.zeros(D)
    dev_ct = np.zeros(D)
    dev_lat = np.zeros(D)
    for job in range(N * S):
        n = job // S
        s = job % S
        si = state_idx[n]
        if not server_up[si, s]:
            continue
        acc_d = np.zeros(U)
        acc_p = np.zeros(U)
        touched = np.zeros(U, dtype=np.bool_)
        tok_d = np.zeros(S)
        tok_p = np.zeros(S)
        none_d = np.ones(S)
        none_p = np.ones(S)
        cross = np.zeros(S)
        quality = 0.0
        miss = 0.0
        pop_s = pop[si, s]
        ud_s = u_dec[si, s]
        ad_s = a_dec[si, s]
        up_s = u_pre[si, s]
        ap_s = a_pre[si, s]
        tab = table[si]
        for d in range(D):
            sd = dev_server[d]
            dev_up[d] = server_up[si, sd]
            dev_keep[d] = tok_keep[n, s, sd]  # 1 for the own server (the diagonals are neutral)
            dev_ct[d] = comm_tok[n, s, sd]
            dev_lat[d] = pair_lat2[s, sd]
        for l in range(L):
            dev_l = dev[n, l]
            tier_l = tier[n, l]
            bits_l = bits[n, l]
            for e in range(E):
                p = pop_s[l, e]
                if p <= 0.0:
                    continue
                ud = ud_s[l, e]
                ad = ad_s[l, e]
                best = np.inf
                rd = -1
                key_best = 0
                gd_best = 0.0
                cd_best = 0.0
                for r in range(R):
                    d = dev_l[e, r]
                    if d < 0:
                        continue
                    if not dev_up[d]:
                        continue
                    key = (d * 3 + tier_l[e, r]) * 3 + bits_index[bits_l[e, r]]
                    akeep = ad * dev_keep[d]
                    gd = max(ud * tab[key, 0], akeep * tab[key, 1]) + ud * tab[key, 2]
                    cd = max(ud * tab[key, 3], akeep * tab[key, 4]) + ud * tab[key, 5]
                    cost = min(gd, cd) + (ad * dev_ct[d] + dev_lat[d] * ud)
                    if cost < best:
                        best = cost
                        rd = r
                        key_best = key
                        gd_best = gd
                        cd_best = cd
                if rd < 0:
                    miss += p
                    continue
                # tokens follow the replica chosen for decode; prefill is costed on the same replica
                d = dev_l[e, rd]
                sd = dev_server[d]
                up = up_s[l, e]
                ap = ap_s[l, e]
                akeep = ap * dev_keep[d]
                gp = max(up * tab[key_best, 0], akeep * tab[key_best, 1]) + up * tab[key_best, 2]
                cp = max(up * tab[key_best, 3], akeep * tab[key_best, 4]) + up * tab[key_best, 5]
                if gd_best <= cd_best:
                    acc_d[d] += gd_best
                    touched[d] = True
                else:
                    acc_d[D + sd] += cd_best
                    touched[D + sd] = True
                if gp <= cp:
                    acc_p[d] += gp
                    touched[d] = True
                else:
                    acc_p[D + sd] += cp
                    touched[D + sd] = True
                quality += p * qloss[bits_l[e, rd]]
                # own-server entries accumulate too and are ignored when the layer closes
                tok_d[sd] += ad
                tok_p[sd] += ap
                none_d[sd] *= 1.0 - ud
                none_p[sd] *= 1.0 - up
                cross[sd] += p
            # close the layer: devices in parallel, transfers serial on the sender's path
            mx_d = 0.0
            mx_p = 0.0
            for u in range(U):
                if touched[u]:
                    mx_d = max(mx_d, acc_d[u])
                    mx_p = max(mx_p, acc_p[u])
                    o_busy[n, s, u, 0] += acc_d[u]
                    o_busy[n, s, u, 1] += acc_p[u]
                    acc_d[u] = 0.0
                    acc_p[u] = 0.0
                    touched[u] = False
            o_time[n, s, 0] += mx_d
            o_time[n, s, 3] += mx_p
            lat_d = 0.0
            lat_p = 0.0
            tok_d[s] = 0.0
            tok_p[s] = 0.0
            none_d[s] = 1.0
            none_p[s] = 1.0
            for s2 in range(S):
                if none_d[s2] < 1.0 or tok_d[s2] > 0.0:
                    o_time[n, s, 1] += tok_d[s2] * comm_tok[n, s, s2]
                    lat_d = max(lat_d, pair_lat2[s, s2] * (1.0 - none_d[s2]))
                    o_pair_bytes[n, s, s2, 0] += tok_d[s2]
                    tok_d[s2] = 0.0
                    none_d[s2] = 1.0
                if none_p[s2] < 1.0 or tok_p[s2] > 0.0:
                    o_time[n, s, 4] += tok_p[s2] * comm_tok[n, s, s2]
                    lat_p = max(lat_p, pair_lat2[s, s2] * (1.0 - none_p[s2]))
                    o_pair_bytes[n, s, s2, 1] += tok_p[s2]
                    tok_p[s2] = 0.0
                    none_p[s2] = 1.0
            o_time[n, s, 2] += lat_d
            o_time[n, s, 5] += lat_p
        o_quality[n, s] = quality
        o_miss[n, s] = miss
        for s2 in range(S):
            if s2 != s:
                o_cross[n, s, s2] = cross[s2]


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


@njit(cache=True)
def pair_coefficients(prune, fuse, pair_index, pair_bw, state_idx, hidden, fusion_fraction,
                      tok_keep, byte_keep, comm_tok):
    """Per plan and ordered server pair: fraction of tokens kept by pruning, of bytes kept by pruning+fusion,
    and round-trip seconds per routed token (bandwidth part)."""
    N = prune.shape[0]
    S = pair_index.shape[0]
    for n in range(N):
        si = state_idx[n]
        for s in range(S):
            for s2 in range(S):
                p = pair_index[s, s2]
                if p < 0:
                    tok_keep[n, s, s2] = 1.0
                    byte_keep[n, s, s2] = 1.0
                    comm_tok[n, s, s2] = 0.0
                    continue
                keep = 1.0 - prune[n, p]
                bk = keep * (1.0 - fusion_fraction) if fuse[n, p] else keep
                tok_keep[n, s, s2] = keep
                byte_keep[n, s, s2] = bk
                comm_tok[n, s, s2] = 2.0 * hidden * bk / pair_bw[si, s, s2]


@njit(cache=True)
def _weighted_quantile(values, weights, q):
    order = np.argsort(values)
    total = 0.0
    for i in range(values.size):
        total += weights[i]
    if total <= 0.0:
        return values[order[-1]] if values.size else 0.0
    acc = 0.0
    for i in range(values.size):
        acc += weights[order[i]]
        if acc >= q * total:
            return values[order[i]]
    return values[order[-1]]


N_SCALARS = 14  # see surrogate.SCALAR_FIELDS


@njit(cache=True, fastmath=True)
def finish_kernel(state_idx, o_time, o_pair, o_busy, o_quality, o_miss, o_cross, byte_keep, prune, fuse,
                  pair_index, lam, rate, batch, up, ne_dec, ne_pre, link_cap, route, dev_server, p_idle, p_max,
                  in_q, out_q, hidden, slo, overhead, window, lm, max_rho, qconst,
                  o_scalars, o_link, o_util):
    """Batching, link contention, queueing, percentiles, energy and quality per plan (see surrogate.py).
    qconst = (prune_linear, prune_knee, prune_quadratic, fusion_loss * fusion_fraction)."""
    N, S = o_time.shape[0], o_time.shape[1]
    D = dev_server.shape[0]
    U = D + S
    K = link_cap.shape[1]
    H = route.shape[2]
    Q = in_q.size
    I = in_q.mean()
    O = out_q.mean()
    for n in range(N):
        si = state_idx[n]
        link = np.zeros(K)
        per_req = np.zeros((S, S))
        for s in range(S):
            for s2 in range(S):
                if s2 == s:
                    continue
                b = (o_pair[n, s, s2, 1] + O * o_pair[n, s, s2, 0] / batch[si, s]) * hidden * byte_keep[n, s, s2]
                per_req[s, s2] = b
                if b > 0.0:
                    r = lam[si, s] * b * 2.0
                    for h in range(H):
                        k = route[s, s2, h]
                        if k < 0:
                            break
                        link[k] += r
        tpot = np.zeros(S)
        ttft = np.zeros(S)
        for s in range(S):
            rho = 0.0
            for s2 in range(S):
                if per_req[s, s2] > 0.0:
                    for h in range(H):
                        k = route[s, s2, h]
                        if k < 0:
                            break
                        rho = max(rho, link[k] / link_cap[si, k])
            inflate = 1.0 / (1.0 - min(rho, max_rho))
            tpot[s] = o_time[n, s, 0] + o_time[n, s, 1] * inflate + o_time[n, s, 2] + ne_dec[si, s] + overhead
            ttft[s] = o_time[n, s, 3] + o_time[n, s, 4] * inflate + o_time[n, s, 5] + ne_pre[si, s] + overhead
        # utilization of every unit (GPUs, then CPUs) and each server's load-weighted view of it
        rho_unit = np.zeros(U)
        ne_busy = np.zeros(S)
        for s in range(S):
            ne_busy[s] = lam[si, s] * (ne_pre[si, s] + O * ne_dec[si, s] / batch[si, s])
            for u in range(U):
                rho_unit[u] += lam[si, s] * (o_busy[n, s, u, 1] + O * o_busy[n, s, u, 0] / batch[si, s])
        for d in range(D):
            rho_unit[d] += ne_busy[dev_server[d]]
        served = np.zeros(S)
        drop = np.zeros(S)
        qual = np.zeros(S)
        for s in range(S):
            num = 0.0
            den = 0.0
            for u in range(U):
                w = lam[si, s] * (o_busy[n, s, u, 1] + O * o_busy[n, s, u, 0] / batch[si, s])
                if u < D and dev_server[u] == s:
                    w += ne_busy[s]
                num += w * rho_unit[u]
                den += w
            rho_s = num / den if den > 0.0 else 0.0
            rho_c = min(rho_s, max_rho)
            queue = 1.0 + rho_c / (2.0 * (1.0 - rho_c))
            ttft[s] *= queue
            tpot[s] *= queue
            if up[si, s]:
                miss_drop = 1.0 - np.exp(-(I + O) * o_miss[n, s])
                drop[s] = 1.0 - (1.0 - miss_drop) / max(rho_s, 1.0)
            else:
                drop[s] = 1.0
            served[s] = rate[si, s] * (1.0 - drop[s])
            q = o_quality[n, s] / lm
            for s2 in range(S):
                p = pair_index[s, s2]
                if p >= 0 and o_cross[n, s, s2] > 0.0:
                    pr = prune[n, p]
                    loss = qconst[0] * pr + qconst[2] * max(pr - qconst[1], 0.0) ** 2
                    if fuse[n, p]:
                        loss += qconst[3]
                    q += o_cross[n, s, s2] / lm * loss
            qual[s] = q
        # requests on a grid of input x output length quantiles
        e2e = np.empty(S * Q * Q)
        w_e2e = np.empty(S * Q * Q)
        ttft_v = np.empty(S * Q)
        w_ttft = np.empty(S * Q)
        i = 0
        late = 0.0
        speed = 0.0
        for s in range(S):
            for a in range(Q):
                ttft_v[s * Q + a] = ttft[s] * in_q[a] / I
                w_ttft[s * Q + a] = served[s] / Q
                for b in range(Q):
                    v = ttft[s] * in_q[a] / I + (out_q[b] - 1.0) * tpot[s]
                    e2e[i] = v
                    w_e2e[i] = served[s] / (Q * Q)
                    if v > slo:
                        late += w_e2e[i]
                    speed += w_e2e[i] * out_q[b] / v
                    i += 1
        tot = rate[si].sum()
        srv = served.sum()
        srv_safe = max(srv, 1e-30)
        dropped = 0.0
        for s in range(S):
            dropped += rate[si, s] * drop[s]
        energy = 0.0
        for u in range(U):
            util = min(rho_unit[u], 1.0)
            srv_of = dev_server[u] if u < D else u - D
            if up[si, srv_of]:
                energy += p_idle[u] + (p_max[u] - p_idle[u]) * util
            if u < D:
                o_util[n, u] = util
        o_scalars[n, 0] = (served * ttft).sum() / srv_safe
        o_scalars[n, 1] = _weighted_quantile(ttft_v, w_ttft, 0.95)
        o_scalars[n, 2] = (served * tpot).sum() / srv_safe
        o_scalars[n, 3] = _weighted_quantile(tpot, served, 0.95)
        o_scalars[n, 4] = (w_e2e * e2e).sum() / srv_safe
        o_scalars[n, 5] = _weighted_quantile(e2e, w_e2e, 0.95)
        o_scalars[n, 6] = srv * O
        o_scalars[n, 7] = speed / srv_safe
        o_scalars[n, 8] = energy * window
        o_scalars[n, 9] = (served * qual).sum() / srv_safe
        o_scalars[n, 10] = dropped / max(tot, 1e-30)
        o_scalars[n, 11] = (late + dropped) / max(tot, 1e-30)
        o_scalars[n, 12] = tot * window
        o_scalars[n, 13] = window
        for k in range(K):
            o_link[n, k] = link[k] * window / 2.0

