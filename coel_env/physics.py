"""Numba kernels of the surrogate: one fused pass over (plan, server, layer, expert, replica).

Units: bytes, seconds, FLOPs. For every serving server `s`, each expert's tokens go to the replica (and GPU or CPU
path) that raises the layer time least given the experts already placed, with unit times scaled by the queueing
the previous routing pass caused (load-aware routing); the layer time is what that router optimizes: max over
GPUs (in parallel) + CPU-path time (serial: the step waits for it) + transfer bandwidth time + the expected
largest round-trip latency among the destinations used. Everything else (batching, queueing, drops, energy,
percentiles) is done on small arrays in `finish_kernel`.
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


@njit(cache=True, fastmath=True)
def _expected_max_latency(order, lat, none):
    """E[max latency over the destinations used] when destination order[i] (by falling latency lat) goes unused
    with probability none[order[i]] independently: sum_i lat_i (1 - none_i) prod_{j < i} none_j."""
    out = 0.0
    free = 1.0
    for i in range(order.shape[0]):
        k = order[i]
        out += lat[k] * (1.0 - none[k]) * free
        free *= none[k]
    return out


@njit(cache=True, fastmath=True)
def _fused_keep(p, tokens, keep, frac):
    """Share of an expert's crossing tokens still sent after fusion: a step's `tokens` tokens each use the expert
    with probability p and survive pruning with `keep`; fusion merges `frac` of a message's rows for that expert but
    needs two of them, so per token the saving is frac * P(another of the step's tokens joins) =
    frac * (1 - (1 - p keep)^(tokens / p - 1))."""
    n = tokens / p  # tokens in the step
    if n <= 1.0:
        return 1.0
    return 1.0 - frac * -np.expm1((n - 1.0) * np.log1p(-min(p * keep, 1.0 - 1e-12)))


BITS_INDEX = np.zeros(17, dtype=np.int64)  # bits -> column of the unit table
BITS_INDEX[16], BITS_INDEX[8], BITS_INDEX[4] = 0, 1, 2


@njit(cache=True, fastmath=True)
def serve_kernel(
    dev, tier, bits, tok_keep, comm_tok, fuse_frac, state_idx,
    pop, u_dec, a_dec, u_pre, a_pre, server_up, table, pair_lat2, lat_order, dev_server, bits_index, qloss,
    local_first, infl, todo, o_time, o_pair_bytes, o_busy, o_quality, o_miss, o_cross, o_choice,
):
    """Fill, per plan n and server s: o_time[n, s, 0:6] = decode (compute, comm-bandwidth, comm-latency) and
    prefill (same three); o_pair_bytes[n, s, s2, 0:2] tokens sent to s2 per decode step / prefill, before
    compression; o_busy[n, s, u, 0:2] busy seconds per unit u (GPUs then CPUs); o_quality, o_miss (expert mass
    with no live replica), o_cross (token mass crossing to s2); o_choice[n] = 1 if some expert had two or more
    live replicas (its routing depends on `infl`). Plans with todo[n] False are skipped.

    A layer takes max over GPUs of their expert time (GPUs run in parallel; a GPU-path fetch from RAM/SSD is
    serial on its GPU) + the CPU-path time (the step waits for a CPU/SSD expert whenever a token uses it) + the
    bandwidth part of every transfer + the largest round-trip latency among the destinations used. The router
    sends each expert's tokens to the replica (and path) that raises this layer time least, given the experts
    already placed, with unit times scaled by infl[n, u] (>= 1: the queueing each unit already sees), ties
    broken by the replica's own cost; decode and prefill are costed on the chosen replica. With `local_first`
    (the real backend's dispatcher) the server is fixed first: itself if it holds a live replica, else the live
    holder with the lowest round-trip latency (ties: lowest index); the router chooses among that server's replicas.

    table[si, key, 0:6] holds per (device, tier, bits) key = (d * 3 + tier) * 3 + bits_index the GPU path
    (read s per activation, compute s per token, fetch+overhead s per activation) then the same for the CPU path.
    comm_tok[n, s, s2] = round-trip seconds per token crossing (bandwidth part), fuse_frac[n, s, s2] its fusion
    fraction (`_fused_keep`: fusion needs two tokens of an expert in a message); pair_lat2 = round-trip latency;
    lat_order[s] = the other servers by falling pair_lat2[s]."""
    N, L, E, R = dev.shape
    S = server_up.shape[1]
    D = dev_server.shape[0]
    U = D + S
    dev_up = np.zeros(D, dtype=np.bool_)  # per device, for server s: live, token keep, comm s/token, latency
    dev_keep = np.zeros(D)
    dev_ct = np.zeros(D)
    dev_lat = np.zeros(D)
    dev_fuse = np.zeros(D)
    for job in range(N * S):
        n = job // S
        s = job % S
        si = state_idx[n]
        if not todo[n] or not server_up[si, s]:
            continue
        acc_d = np.zeros(U)
        acc_p = np.zeros(U)
        pacc = np.zeros(D)  # load-scaled GPU decode time, as the router sees it
        touched = np.zeros(U, dtype=np.bool_)
        tok_d = np.zeros(S)
        tok_p = np.zeros(S)
        none_d = np.ones(S)
        none_p = np.ones(S)
        cross = np.zeros(S)
        quality = 0.0
        miss = 0.0
        choice = False
        pop_s = pop[si, s]
        ud_s = u_dec[si, s]
        ad_s = a_dec[si, s]
        up_s = u_pre[si, s]
        ap_s = a_pre[si, s]
        tab = table[si]
        inf_n = infl[n]
        scaled = False  # unit times scaled by load (a re-routing pass); else the router's view is acc_d itself
        for u in range(U):
            if inf_n[u] != 1.0:
                scaled = True
        pv = pacc if scaled else acc_d
        lat_s = pair_lat2[s]
        order = lat_order[s]
        for d in range(D):
            sd = dev_server[d]
            dev_up[d] = server_up[si, sd]
            dev_keep[d] = tok_keep[n, s, sd]  # 1 for the own server (the diagonals are neutral)
            dev_ct[d] = comm_tok[n, s, sd]
            dev_fuse[d] = fuse_frac[n, s, sd]
            dev_lat[d] = pair_lat2[s, sd]
        for l in range(L):
            dev_l = dev[n, l]
            tier_l = tier[n, l]
            bits_l = bits[n, l]
            pmx = 0.0  # router's view of the GPU max
            mxg_p = 0.0  # prefill GPU max
            lat_run = 0.0  # expected largest decode round-trip latency so far (recomputed when dirty)
            lat_dirty = False
            for e in range(E):
                p = pop_s[l, e]
                if p <= 0.0:
                    continue
                ud = ud_s[l, e]
                ad = ad_s[l, e]
                live = 0
                rd = -1
                for r in range(R):
                    d = dev_l[e, r]
                    if d >= 0 and dev_up[d]:
                        live += 1
                        if rd >= 0:
                            break  # a choice: the full loop below
                        rd = r
                if live == 0:
                    miss += p
                    continue
                if live == 1:  # no choice: only the path (GPU or CPU) is decided
                    d = dev_l[e, rd]
                    key_best = (d * 3 + tier_l[e, rd]) * 3 + bits_index[bits_l[e, rd]]
                    akeep = ad * dev_keep[d]
                    gd = max(ud * tab[key_best, 0], akeep * tab[key_best, 1]) + ud * tab[key_best, 2]
                    gpu_best = True
                    t_best = gd
                    if tier_l[e, rd] > 0:
                        cd = max(ud * tab[key_best, 3], akeep * tab[key_best, 4]) + ud * tab[key_best, 5]
                        if max(pv[d] + gd * inf_n[d] - pmx, 0.0) > cd * inf_n[D + dev_server[d]]:
                            gpu_best = False
                            t_best = cd
                else:
                    choice = True
                    if lat_dirty:
                        lat_run = _expected_max_latency(order, lat_s, none_d)
                        lat_dirty = False
                    target = -1  # local-first: the one server whose replicas are considered
                    if local_first:
                        for r in range(R):
                            d = dev_l[e, r]
                            if d >= 0 and dev_up[d]:
                                sd = dev_server[d]
                                if sd == s:
                                    target = s
                                    break
                                if target < 0 or lat_s[sd] < lat_s[target] or (
                                        lat_s[sd] == lat_s[target] and sd < target):
                                    target = sd
                    best = np.inf
                    best_own = np.inf
                    rd = -1
                    key_best = 0
                    t_best = 0.0
                    gpu_best = True
                    for r in range(R):
                        d = dev_l[e, r]
                        if d < 0:
                            continue
                        if not dev_up[d]:
                            continue
                        sd = dev_server[d]
                        if target >= 0 and sd != target:
                            continue
                        key = (d * 3 + tier_l[e, r]) * 3 + bits_index[bits_l[e, r]]
                        akeep = ad * dev_keep[d]
                        gd = max(ud * tab[key, 0], akeep * tab[key, 1]) + ud * tab[key, 2]
                        cd = max(ud * tab[key, 3], akeep * tab[key, 4]) + ud * tab[key, 5]
                        comm = ad * dev_ct[d]
                        if dev_fuse[d] > 0.0:
                            comm *= _fused_keep(p, ad, dev_keep[d], dev_fuse[d])
                        lat = dev_lat[d]
                        dlat = 0.0
                        if sd != s and ud > 0.0:
                            keep_none = none_d[sd]
                            none_d[sd] = keep_none * (1.0 - ud)
                            dlat = _expected_max_latency(order, lat_s, none_d) - lat_run
                            none_d[sd] = keep_none
                        pg = gd * inf_n[d]
                        pc = cd * inf_n[D + sd]
                        dg = max(pv[d] + pg - pmx, 0.0)
                        use_gpu = dg <= pc
                        inc = (dg if use_gpu else pc) + comm + dlat
                        own = (pg if use_gpu else pc) + comm + lat * ud
                        if inc < best or (inc == best and own < best_own):
                            best = inc
                            best_own = own
                            rd = r
                            key_best = key
                            gpu_best = use_gpu
                            t_best = gd if use_gpu else cd
                d = dev_l[e, rd]
                sd = dev_server[d]
                up = up_s[l, e]
                ap = ap_s[l, e]
                if gpu_best:
                    acc_d[d] += t_best
                    touched[d] = True
                    if scaled:
                        pacc[d] += t_best * inf_n[d]
                    pmx = max(pmx, pv[d])
                else:
                    acc_d[D + sd] += t_best
                    touched[D + sd] = True
                # prefill on the same replica, on the path that raises the prefill layer time least
                akeep = ap * dev_keep[d]
                gp = max(up * tab[key_best, 0], akeep * tab[key_best, 1]) + up * tab[key_best, 2]
                cpu_p = False
                cp = 0.0
                if tier_l[e, rd] > 0:  # GPU-tier experts have no CPU path
                    cp = max(up * tab[key_best, 3], akeep * tab[key_best, 4]) + up * tab[key_best, 5]
                    cpu_p = max(acc_p[d] + gp - mxg_p, 0.0) > cp
                if cpu_p:
                    acc_p[D + sd] += cp
                    touched[D + sd] = True
                else:
                    acc_p[d] += gp
                    mxg_p = max(mxg_p, acc_p[d])
                    touched[d] = True
                quality += p * qloss[bits_l[e, rd]]
                # own-server entries accumulate too and are ignored when the layer closes
                if dev_fuse[d] > 0.0:
                    tok_d[sd] += ad * _fused_keep(p, ad, dev_keep[d], dev_fuse[d])
                    tok_p[sd] += ap * _fused_keep(p, ap, dev_keep[d], dev_fuse[d])
                else:
                    tok_d[sd] += ad
                    tok_p[sd] += ap
                none_d[sd] *= 1.0 - ud
                none_p[sd] *= 1.0 - up
                cross[sd] += p
                if sd != s:
                    lat_dirty = True
            # close the layer: GPUs in parallel, CPU-path work and transfers serial
            mx_d = 0.0
            mx_p = 0.0
            for u in range(U):
                if touched[u]:
                    if u < D:
                        mx_d = max(mx_d, acc_d[u])
                        mx_p = max(mx_p, acc_p[u])
                        if scaled:
                            pacc[u] = 0.0
                    else:
                        mx_d += acc_d[u]
                        mx_p += acc_p[u]
                    o_busy[n, s, u, 0] += acc_d[u]
                    o_busy[n, s, u, 1] += acc_p[u]
                    acc_d[u] = 0.0
                    acc_p[u] = 0.0
                    touched[u] = False
            o_time[n, s, 0] += mx_d
            o_time[n, s, 3] += mx_p
            tok_d[s] = 0.0
            tok_p[s] = 0.0
            none_d[s] = 1.0
            none_p[s] = 1.0
            o_time[n, s, 2] += _expected_max_latency(order, lat_s, none_d)
            o_time[n, s, 5] += _expected_max_latency(order, lat_s, none_p)
            for s2 in range(S):
                if none_d[s2] < 1.0 or tok_d[s2] > 0.0:
                    o_time[n, s, 1] += tok_d[s2] * comm_tok[n, s, s2]
                    o_pair_bytes[n, s, s2, 0] += tok_d[s2]
                    tok_d[s2] = 0.0
                    none_d[s2] = 1.0
                if none_p[s2] < 1.0 or tok_p[s2] > 0.0:
                    o_time[n, s, 4] += tok_p[s2] * comm_tok[n, s, s2]
                    o_pair_bytes[n, s, s2, 1] += tok_p[s2]
                    tok_p[s2] = 0.0
                    none_p[s2] = 1.0
        o_quality[n, s] = quality
        o_miss[n, s] = miss
        if choice:
            o_choice[n] = 1
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
                      tok_keep, byte_keep, comm_tok, fuse_frac):
    """Per plan and ordered server pair: fraction of tokens (and bytes) kept by pruning, round-trip seconds per
    routed token (bandwidth part) and the fusion fraction (0 without fusion; `_fused_keep` applies it per expert)."""
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
                    fuse_frac[n, s, s2] = 0.0
                    continue
                keep = 1.0 - prune[n, p]
                tok_keep[n, s, s2] = keep
                byte_keep[n, s, s2] = keep
                comm_tok[n, s, s2] = 2.0 * hidden * keep / pair_bw[si, s, s2]
                fuse_frac[n, s, s2] = fusion_fraction if fuse[n, p] else 0.0


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
def unit_utilization(state_idx, o_busy, lam, batch, ne_dec, ne_pre, dev_server, out_mean, o_rho):
    """o_rho[n, u]: offered utilization of every unit (GPUs, then CPUs) by all servers' requests, the non-expert
    part of each request on its own server's GPUs included."""
    N, S, U = o_busy.shape[0], o_busy.shape[1], o_busy.shape[2]
    D = dev_server.shape[0]
    for n in range(N):
        si = state_idx[n]
        for u in range(U):
            o_rho[n, u] = 0.0
        for s in range(S):
            ls = lam[si, s]
            if ls <= 0.0:
                continue
            k = (out_mean - 1.0) / batch[si, s]  # the prefill step yields the first token
            for u in range(U):
                o_rho[n, u] += ls * (o_busy[n, s, u, 1] + k * o_busy[n, s, u, 0])
        for d in range(D):
            s = dev_server[d]
            o_rho[n, d] += lam[si, s] * (ne_pre[si, s] + (out_mean - 1.0) * ne_dec[si, s] / batch[si, s])


@njit(cache=True, fastmath=True)
def queue_inflation(rho, out):
    """The router's load-aware scale of each unit's time: the M/D/1 sojourn factor 1 + rho / (2 (1 - rho)),
    uncapped (a saturated unit's marginal work costs drops, not just waiting), at most 1e6 (rho >= 1)."""
    for n in range(rho.shape[0]):
        for u in range(rho.shape[1]):
            r = rho[n, u]
            out[n, u] = 1e6 if r >= 1.0 else min(1.0 + r / (2.0 * (1.0 - r)), 1e6)


@njit(cache=True, fastmath=True)
def _lockstep(busy_n, lam_n, ne_dec_n, ne_pre_n, comm_d, comm_p, overhead, out_mean, tpot, ttft):
    """Lock-step serving (expert parallelism: every live server runs each step and all meet at every MoE layer).
    Server s's step waits for the slowest active server and for every unit's work from all active servers. Server
    s2 is active with probability a = 1 - exp(-lam * e2e) (Little); mean-field over the others: decode step =
    max(E[max of the isolated steps of s and the active others], own non-expert + transfers + the busiest unit's
    expected work); a prefill meets the others' typical step (1 prefill + O-1 decode steps per request).
    tpot/ttft: isolated step times in, lock-step times out."""
    S, U = busy_n.shape[0], busy_n.shape[1]
    act = np.zeros(S)
    typ = np.zeros(S)
    for s in range(S):
        if lam_n[s] > 0.0:
            act[s] = -np.expm1(-lam_n[s] * (ttft[s] + (out_mean - 1.0) * tpot[s]))
        typ[s] = (ttft[s] + (out_mean - 1.0) * tpot[s]) / out_mean
    order = np.argsort(-typ)
    new_d = np.empty(S)
    new_p = np.empty(S)
    for s in range(S):
        # expected max of own step and the active others' typical steps (falling order)
        e_d = 0.0
        e_p = 0.0
        free_d = 1.0
        free_p = 1.0
        for i in range(S):
            k = order[i]
            if k == s or act[k] <= 0.0:
                continue
            if typ[k] > tpot[s]:
                e_d += typ[k] * act[k] * free_d
                free_d *= 1.0 - act[k]
            if typ[k] > ttft[s]:
                e_p += typ[k] * act[k] * free_p
                free_p *= 1.0 - act[k]
        e_d += tpot[s] * free_d
        e_p += ttft[s] * free_p
        w_d = 0.0
        w_p = 0.0
        for u in range(U):
            other = 0.0
            for s2 in range(S):
                if s2 != s:
                    other += act[s2] * busy_n[s2, u, 0]
            w_d = max(w_d, busy_n[s, u, 0] + other)
            w_p = max(w_p, busy_n[s, u, 1] + other)
        new_d[s] = max(e_d, ne_dec_n[s] + comm_d[s] + overhead + w_d)
        new_p[s] = max(e_p, ne_pre_n[s] + comm_p[s] + overhead + w_p)
    for s in range(S):
        tpot[s] = new_d[s]
        ttft[s] = new_p[s]


@njit(cache=True, fastmath=True)
def finish_kernel(state_idx, o_time, o_pair, o_busy, o_quality, o_miss, o_cross, byte_keep, prune, fuse,
                  pair_index, lam, rate, batch, up, ne_dec, ne_pre, link_cap, route, dev_server, p_idle, p_max,
                  in_q, out_q, hidden, slo, overhead, window, lm, max_rho, qconst, rho, lockstep, contention,
                  o_scalars, o_link, o_util):
    """Batching, link contention, queueing, percentiles, energy and quality per plan (see surrogate.py).
    rho[n, u] receives each unit's utilization (`unit_utilization`). A server's requests queue behind the busiest
    unit they use (M/D/1, utilization capped at max_rho); transfers are slowed by the same factor of the busiest link
    on their routes; the share of requests beyond the capacity of that bottleneck, unit or link, is dropped, and
    dropped requests carry no bytes. o_link = bytes per link in the window, both directions summed.
    qconst = (prune_linear, prune_knee, prune_quadratic, fusion_loss * fusion_fraction). With `lockstep` the
    servers' steps are coupled (`_lockstep`); contention[si] stretches every step (servers sharing host cores)."""
    unit_utilization(state_idx, o_busy, lam, batch, ne_dec, ne_pre, dev_server, out_q.mean(), rho)
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
                tokens = o_pair[n, s, s2, 1] + (O - 1.0) * o_pair[n, s, s2, 0] / batch[si, s]
                b = tokens * hidden * byte_keep[n, s, s2]
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
        comm_d = np.zeros(S)
        comm_p = np.zeros(S)
        rho_l = np.zeros(S)  # busiest link on the routes of each server's transfers
        for s in range(S):
            r_l = 0.0
            for s2 in range(S):
                if per_req[s, s2] > 0.0:
                    for h in range(H):
                        k = route[s, s2, h]
                        if k < 0:
                            break
                        r_l = max(r_l, link[k] / link_cap[si, k])
            rho_l[s] = r_l
            r_c = min(r_l, max_rho)
            inflate = 1.0 + r_c / (2.0 * (1.0 - r_c))  # the servers' M/D/1 waiting factor, on the transfers
            comm_d[s] = o_time[n, s, 1] * inflate + o_time[n, s, 2]
            comm_p[s] = o_time[n, s, 4] * inflate + o_time[n, s, 5]
            tpot[s] = o_time[n, s, 0] + comm_d[s] + ne_dec[si, s] + overhead
            ttft[s] = o_time[n, s, 3] + comm_p[s] + ne_pre[si, s] + overhead
        if lockstep:
            _lockstep(o_busy[n], lam[si], ne_dec[si], ne_pre[si], comm_d, comm_p, overhead, O, tpot, ttft)
        for s in range(S):
            tpot[s] *= contention[si]
            ttft[s] *= contention[si]
        rho_unit = rho[n]
        served = np.zeros(S)
        drop = np.zeros(S)
        qual = np.zeros(S)
        for s in range(S):
            # the bottleneck: the busiest unit this server's requests use (its own GPUs always: non-expert part)
            rho_s = 0.0
            if lam[si, s] > 0.0:
                for u in range(U):
                    used = o_busy[n, s, u, 0] > 0.0 or o_busy[n, s, u, 1] > 0.0 or (u < D and dev_server[u] == s)
                    if used:
                        rho_s = max(rho_s, rho_unit[u])
            rho_c = min(rho_s, max_rho)
            queue = 1.0 + rho_c / (2.0 * (1.0 - rho_c))
            ttft[s] *= queue
            tpot[s] *= queue
            if up[si, s]:
                miss_drop = 1.0 - np.exp(-(I + O - 1.0) * o_miss[n, s])  # every routed token
                drop[s] = 1.0 - (1.0 - miss_drop) / max(rho_s, rho_l[s], 1.0)
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
        # bytes the served requests carry (the offered load above decided contention and drops)
        for k in range(K):
            o_link[n, k] = 0.0
        for s in range(S):
            for s2 in range(S):
                if per_req[s, s2] > 0.0:
                    r = lam[si, s] * (1.0 - drop[s]) * per_req[s, s2] * 2.0 * window
                    for h in range(H):
                        k = route[s, s2, h]
                        if k < 0:
                            break
                        o_link[n, k] += r
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

