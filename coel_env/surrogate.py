"""SurrogateBackend: a fast, vectorized cost model of serving a MoE model on an edge cluster.

Per (plan, server, layer, expert) work runs in one fused numba kernel (`physics.serve_kernel`); the rest
(batching, queueing, link contention, percentiles, energy) is numpy over small [plans, servers] arrays.
Every constant comes from the cluster's HardwareProfile, which calibration replaces.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coel_env.backend import Metrics, MigrationReport
from coel_env.cluster import Cluster
from coel_env.physics import activation_stats, memory_kernel, migration_kernel, serve_kernel
from coel_env.plan import DeploymentPlan
from coel_env.specs import LengthDist
from coel_env.state import ClusterState

QUANTILES = (np.arange(8) + 0.5) / 8  # request-length quantile grid for percentiles
MAX_RHO = 0.95


def length_quantiles(dist: LengthDist) -> np.ndarray:
    """Lengths at QUANTILES of a length distribution (deterministic, so the surrogate stays exact)."""
    from scipy.stats import norm

    if dist.dist == "fixed" or dist.spread == 0:
        return np.full(len(QUANTILES), dist.mean)
    if dist.dist == "uniform":
        return dist.mean * (1 + dist.spread * (2 * QUANTILES - 1))
    z = norm.ppf(QUANTILES)
    return dist.mean * np.exp(dist.spread * z - dist.spread**2 / 2)


@dataclass
class MetricsBatch:
    """Metrics of N plans as arrays (what `serve_batch` returns); `item(n)` gives one Metrics."""

    fields: dict[str, np.ndarray]

    def __getitem__(self, key: str) -> np.ndarray:
        return self.fields[key]

    def __len__(self) -> int:
        return len(self.fields["e2e_p95_s"])

    def item(self, n: int) -> Metrics:
        return Metrics(**{k: (v[n].copy() if v.ndim > 1 else float(v[n])) for k, v in self.fields.items()})


class SurrogateBackend:
    """Fast cost model implementing the Backend protocol (plus `serve_batch` for many plans at once)."""

    name = "surrogate"

    def __init__(self, cluster: Cluster):
        self.cluster = c = cluster
        hw, m = c.hw, c.model
        self.gpu_bw = c.dev_bw * hw.memory_efficiency
        self.gpu_flops = c.dev_flops * hw.compute_efficiency
        self.cpu_bw = c.cpu_bw * hw.memory_efficiency
        self.cpu_flops = c.cpu_flops * hw.compute_efficiency
        self.pcie_bw = c.pcie_bw * hw.pcie_efficiency
        self.ssd_bw = c.ssd_bw.copy()
        self.ebytes = c.expert_bytes_by_bits.copy()
        self.slow = np.ones(17)
        self.qloss = np.zeros(17)
        for b, v in hw.dequant_slowdown.items():
            self.slow[b] = v
        for b, v in hw.quality.loss_per_bits.items():
            self.qloss[b] = v
        self.flops_tok = 2.0 * m.expert_params
        self.ne_flops_tok = 2.0 * m.non_expert_params
        self.ne_bytes = float(m.non_expert_bytes(16))
        self.in_q = length_quantiles(c.spec.workload.input_len)
        self.out_q = length_quantiles(c.spec.workload.output_len)
        self.in_mean, self.out_mean = float(self.in_q.mean()), float(self.out_q.mean())
        # server aggregates: GPUs of a server work tensor-parallel on the non-expert part
        S = c.num_servers
        self.srv_gpu_bw = np.bincount(c.dev_server, weights=self.gpu_bw, minlength=S)
        self.srv_gpu_flops = np.bincount(c.dev_server, weights=self.gpu_flops, minlength=S)
        active_bytes = m.active_params * 2.0
        self.tpot_ref = active_bytes / self.srv_gpu_bw  # batch-1 decode step, for the batch estimate
        self._cache_key: tuple | None = None
        self._cache: dict | None = None
        self.current: DeploymentPlan | None = None

    # ---- Backend protocol ---------------------------------------------------------------------------
    def reset(self, plan: DeploymentPlan, state: ClusterState) -> None:
        self.current = plan.copy()

    def apply(self, plan: DeploymentPlan, state: ClusterState) -> MigrationReport:
        report = self.migration(self.current, plan, state) if self.current is not None else MigrationReport(
            link_bytes=np.zeros(self.cluster.num_links))
        self.current = plan.copy()
        return report

    def serve(self, plan: DeploymentPlan, state: ClusterState, window_s: float) -> Metrics:
        return self.serve_batch([plan], state, window_s).item(0)

    def close(self) -> None:
        self._cache = None

    # ---- migration ----------------------------------------------------------------------------------
    def migration(self, old: DeploymentPlan, new: DeploymentPlan, state: ClusterState) -> MigrationReport:
        """Cost of moving from `old` to `new`: each new replica copies from a local copy, else the nearest peer
        with at least its precision, else the cloud; transfers into one server serialize."""
        c, hw = self.cluster, self.cluster.hw
        S = c.num_servers
        o_bytes = np.zeros((S, 3))
        o_pair = np.zeros((S, S))
        counts = np.zeros(2, dtype=np.int64)
        migration_kernel(old.device, old.tier, old.bits, new.device, new.tier, new.bits, c.dev_server,
                         state.server_up, c.pair_latency, self.ebytes, o_bytes, o_pair, counts)
        pair_bw = self._pair_bandwidth(state.link_factor)
        with np.errstate(divide="ignore", invalid="ignore"):
            net = np.where(o_pair > 0, o_pair / pair_bw + c.pair_latency, 0.0).sum(0)
        local = o_bytes[:, 0] / self.pcie_bw
        cloud_bytes = o_bytes[:, 2].sum()
        cloud = cloud_bytes / (hw.cloud_bandwidth_gbps * 1e9 / 8) + (hw.cloud_latency_s if cloud_bytes else 0.0)
        link_bytes = self._pair_to_links(o_pair + o_pair.T) / 2
        return MigrationReport(
            bytes_total=float(o_bytes.sum()), bytes_local=float(o_bytes[:, 0].sum()),
            bytes_peer=float(o_bytes[:, 1].sum()), bytes_cloud=float(cloud_bytes),
            time_s=float(max((local + net).max(initial=0.0), cloud)),
            replicas_added=int(counts[0]), replicas_removed=int(counts[1]), link_bytes=link_bytes,
        )

    # ---- serving ------------------------------------------------------------------------------------
    def _pair_bandwidth(self, link_factor: np.ndarray) -> np.ndarray:
        """[S, S] bottleneck goodput (bytes/s) of each server pair's route; inf on the diagonal."""
        c = self.cluster
        S = c.num_servers
        out = np.full((S, S), np.inf)
        if c.num_pairs:
            link = np.maximum(c.link_bw * link_factor * c.hw.link_efficiency, 1.0)
            per_pair = np.where(c.pair_links > 0, link[None, :], np.inf).min(1)
            a, b = c.pair_servers[:, 0], c.pair_servers[:, 1]
            out[a, b] = per_pair
            out[b, a] = per_pair
        return out

    def _pair_to_links(self, pair_matrix: np.ndarray) -> np.ndarray:
        """Map a [..., S, S] matrix of pair quantities onto physical links [..., K] (each pair once)."""
        c = self.cluster
        if not c.num_pairs:
            return np.zeros((*pair_matrix.shape[:-2], c.num_links))
        a, b = c.pair_servers[:, 0], c.pair_servers[:, 1]
        per_pair = pair_matrix[..., a, b] + pair_matrix[..., b, a]
        return per_pair @ c.pair_links

    def _state_arrays(self, states: list[ClusterState]) -> dict:
        """Per-state inputs of the kernel, cached while the same states are served again."""
        key = tuple((id(s), s.epoch, s.popularity.ctypes.data) for s in states)
        if key == self._cache_key:
            return self._cache
        c = self.cluster
        wl = c.spec.workload
        pop = np.ascontiguousarray(np.stack([s.popularity for s in states]), dtype=np.float64)
        lam = np.stack([s.arrival_rate * s.server_up for s in states])
        batch = np.clip(lam * (self.out_mean * self.tpot_ref), 1.0, wl.max_batch)
        in_len = np.full_like(batch, self.in_mean)
        u_dec, a_dec, u_pre, a_pre = (np.empty_like(pop) for _ in range(4))
        activation_stats(pop, batch, in_len, u_dec, a_dec, u_pre, a_pre)
        self._cache = dict(
            pop=pop, rate=np.stack([s.arrival_rate for s in states]), u_dec=u_dec, a_dec=a_dec, u_pre=u_pre, a_pre=a_pre, lam=lam, batch=batch,
            up=np.stack([s.server_up for s in states]),
            comp=np.stack([s.compute_avail for s in states]),
            link_factor=np.stack([s.link_factor for s in states]),
            pair_bw=np.stack([self._pair_bandwidth(s.link_factor) for s in states]),
        )
        self._cache_key = key
        return self._cache

    def serve_batch(self, plans: list[DeploymentPlan], states: ClusterState | list[ClusterState],
                    window_s: float) -> MetricsBatch:
        """Metrics of N plans, each against `states` (one shared state, or one state per plan)."""
        dev = np.stack([p.device for p in plans])
        tier = np.stack([p.tier for p in plans])
        bits = np.stack([p.bits for p in plans])
        prune = np.stack([p.prune for p in plans]).astype(np.float64)
        fuse = np.stack([p.fuse for p in plans])
        return self.serve_arrays(dev, tier, bits, prune, fuse, states, window_s)

    def serve_arrays(self, dev, tier, bits, prune, fuse, states, window_s: float) -> MetricsBatch:
        """`serve_batch` on stacked plan arrays [N, L, E, R] and compression [N, P] (no per-plan objects)."""
        c, hw = self.cluster, self.cluster.hw
        shared = isinstance(states, ClusterState)
        st_list = [states] if shared else list(states)
        sa = self._state_arrays(st_list)
        N = dev.shape[0]
        S, D = c.num_servers, c.num_devices
        state_idx = np.zeros(N, dtype=np.int64) if shared else np.arange(N, dtype=np.int64)
        ff = hw.quality.fusion_fraction
        tok_keep = np.ones((N, S, S))
        byte_keep = np.ones((N, S, S))
        if c.num_pairs:
            keep = 1.0 - prune
            pair = c.pair_index
            mask = pair >= 0
            tok_keep[:, mask] = keep[:, pair[mask]]
            byte_keep[:, mask] = (keep * (1.0 - ff * fuse))[:, pair[mask]]
        o_time = np.zeros((N, S, 6))
        o_pair = np.zeros((N, S, S, 2))
        o_busy = np.zeros((N, S, D + S, 2))
        o_quality = np.zeros((N, S))
        o_miss = np.zeros((N, S))
        o_cross = np.zeros((N, S, S))
        m = c.model
        serve_kernel(
            dev, tier, bits, tok_keep, byte_keep, state_idx,
            sa["pop"], sa["u_dec"], sa["a_dec"], sa["u_pre"], sa["a_pre"], sa["up"], sa["comp"],
            sa["pair_bw"], c.pair_latency + hw.transfer_latency_s,
            c.dev_server, self.gpu_bw, self.gpu_flops, self.cpu_bw, self.cpu_flops, self.pcie_bw, self.ssd_bw,
            self.ebytes, self.slow, self.qloss, self.flops_tok, float(m.hidden_bytes), hw.prefetch_hit_rate,
            hw.cpu_compute, hw.expert_overhead_s,
            o_time, o_pair, o_busy, o_quality, o_miss, o_cross,
        )
        o_gpu = np.zeros((N, D))
        o_cpu = np.zeros((N, S))
        o_ssd = np.zeros((N, S))
        memory_kernel(dev, tier, bits, c.dev_server, self.ebytes, o_gpu, o_cpu, o_ssd)
        sel = state_idx
        return self._finish(sa, sel, o_time, o_pair, o_busy, o_quality, o_miss, o_cross, prune, fuse,
                            o_gpu, o_cpu, o_ssd, window_s)

    def _finish(self, sa, sel, o_time, o_pair, o_busy, o_quality, o_miss, o_cross, prune, fuse,
                o_gpu, o_cpu, o_ssd, window_s) -> MetricsBatch:
        c, hw, m = self.cluster, self.cluster.hw, self.cluster.model
        S, D = c.num_servers, c.num_devices
        lam = sa["lam"][sel]  # [N, S] requests/s of live servers
        B = sa["batch"][sel]
        comp = sa["comp"][sel]
        I, O = self.in_mean, self.out_mean
        lm = m.num_moe_layers * m.top_k
        # non-expert part of each step on the server's own GPUs (tensor parallel)
        srv_avail = np.stack([np.bincount(c.dev_server, weights=row, minlength=S) for row in comp]) / \
            c.gpus_per_server
        kv = B * (I + O / 2) * m.kv_bytes_per_token()
        ne_dec = np.maximum((self.ne_bytes + kv) / self.srv_gpu_bw, B * self.ne_flops_tok / self.srv_gpu_flops)
        attn = 4.0 * I * I * m.d_model * m.num_layers
        ne_pre = np.maximum(self.ne_bytes / self.srv_gpu_bw, (I * self.ne_flops_tok + attn) / self.srv_gpu_flops)
        ne_dec, ne_pre = ne_dec / srv_avail, ne_pre / srv_avail
        overhead = m.num_layers * hw.layer_overhead_s
        # link contention: bytes/s over each physical link (both directions, there and back)
        per_req = o_pair[..., 1] + O * o_pair[..., 0] / B[:, :, None]  # [N, S, S] one-way bytes per request
        rate = lam[:, :, None] * per_req * 2.0
        link_rate = self._pair_to_links(rate)  # [N, K]
        link_cap = 2.0 * np.maximum(c.link_bw * sa["link_factor"][sel] * hw.link_efficiency, 1.0)
        rho_link = link_rate / link_cap
        if c.num_pairs:
            pair_rho = np.where(c.pair_links[None] > 0, rho_link[:, None, :], 0.0).max(-1)  # [N, P]
            rho_pair = np.zeros((len(sel), S, S))
            mask = c.pair_index >= 0
            rho_pair[:, mask] = pair_rho[:, c.pair_index[mask]]
            rho_comm = np.where(per_req > 0, rho_pair, 0.0).max(-1)
        else:
            rho_comm = np.zeros_like(lam)
        comm_inflate = 1.0 / (1.0 - np.minimum(rho_comm, MAX_RHO))
        tpot0 = o_time[..., 0] + o_time[..., 1] * comm_inflate + o_time[..., 2] + ne_dec + overhead
        pre0 = o_time[..., 3] + o_time[..., 4] * comm_inflate + o_time[..., 5] + ne_pre + overhead
        # device utilization (units: GPUs then CPUs) and queueing
        busy = lam[:, :, None] * (o_busy[..., 1] + O * o_busy[..., 0] / B[:, :, None])  # [N, S, U]
        ne_busy = lam * (ne_pre + O * ne_dec / B)  # [N, S] on the server's own GPUs
        rho_unit = busy.sum(1)
        rho_unit[:, :D] += ne_busy[:, c.dev_server]
        share = busy.copy()
        share[:, :, :D] += np.where(c.dev_server[None, None, :] == np.arange(S)[None, :, None],
                                    ne_busy[:, :, None], 0.0)
        weight = share.sum(-1)
        rho_srv = np.where(weight > 0, (share * rho_unit[:, None, :]).sum(-1) / np.maximum(weight, 1e-30), 0.0)
        overload = np.maximum(rho_srv, 1.0)
        rho_c = np.minimum(rho_srv, MAX_RHO)
        queue = 1.0 + rho_c / (2.0 * (1.0 - rho_c))
        ttft = pre0 * queue
        tpot = tpot0 * queue
        # requests: quantile grid of input x output lengths per server
        qi = self.in_q / I
        e2e = ttft[..., None, None] * qi[None, None, :, None] + \
            (self.out_q[None, None, None, :] - 1) * tpot[..., None, None]  # [N, S, Q, Q]
        up = sa["up"][sel]
        total_rate = sa["rate"][sel]  # arrivals, failed servers included (all dropped)
        miss_drop = 1.0 - np.exp(-(I + O) * o_miss)
        drop = np.where(up, 1.0 - (1.0 / overload) * (1.0 - miss_drop), 1.0)
        served = total_rate * (1.0 - drop)
        Q = len(QUANTILES) ** 2
        w = np.repeat(served[..., None] / Q, Q, axis=-1).reshape(len(sel), -1)
        flat = e2e.reshape(len(sel), -1)
        wsum = np.maximum(w.sum(-1), 1e-30)
        tot = np.maximum(total_rate.sum(-1), 1e-30)
        late = ((w * (flat > c.spec.workload.slo_s)).sum(-1) + (total_rate * drop).sum(-1)) / tot
        out_tok = (self.out_q[None, None, None, :] * np.ones_like(e2e)).reshape(len(sel), -1)
        srv_w = np.maximum(served.sum(-1), 1e-30)
        qual = (o_quality / lm)
        if c.num_pairs:
            ql = hw.quality
            comp_loss = ql.prune_linear * prune + ql.prune_quadratic * np.maximum(prune - ql.prune_knee, 0) ** 2 \
                + ql.fusion_loss * ql.fusion_fraction * fuse
            loss_pair = np.zeros((len(sel), S, S))
            mask = c.pair_index >= 0
            loss_pair[:, mask] = comp_loss[:, c.pair_index[mask]]
            qual = qual + (o_cross / lm * loss_pair).sum(-1)
        util = np.minimum(rho_unit, 1.0)
        gpu_up = up[:, c.dev_server]
        energy = ((c.dev_p_idle + (c.dev_p_max - c.dev_p_idle) * util[:, :D]) * gpu_up).sum(-1) + \
            ((c.cpu_p_idle + (c.cpu_p_max - c.cpu_p_idle) * util[:, D:]) * up).sum(-1)
        fields = dict(
            ttft_mean_s=(served * ttft).sum(-1) / srv_w,
            ttft_p95_s=_weighted_quantile(ttft, served, 0.95),
            tpot_mean_s=(served * tpot).sum(-1) / srv_w,
            tpot_p95_s=_weighted_quantile(tpot, served, 0.95),
            e2e_mean_s=(w * flat).sum(-1) / wsum,
            e2e_p95_s=_weighted_quantile(flat, w, 0.95),
            tokens_per_s=(served * O).sum(-1),
            request_tokens_per_s=(w * out_tok / flat).sum(-1) / wsum,
            energy_j=energy * window_s,
            quality_loss=(served * qual).sum(-1) / srv_w,
            dropped_frac=(total_rate * drop).sum(-1) / tot,
            late_frac=late,
            requests=tot * window_s,
            window_s=np.full(len(sel), float(window_s)),
            gpu_mem_bytes=o_gpu, cpu_mem_bytes=o_cpu, ssd_bytes=o_ssd,
            link_bytes=link_rate * window_s / 2.0,
            device_util=util[:, :D],
        )
        return MetricsBatch(fields)


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> np.ndarray:
    """Row-wise weighted quantile of [N, M] values."""
    order = np.argsort(values, axis=-1)
    v = np.take_along_axis(values, order, -1)
    w = np.take_along_axis(weights, order, -1)
    cw = np.cumsum(w, -1)
    total = cw[:, -1:]
    idx = (cw < q * np.maximum(total, 1e-30)).sum(-1)
    idx = np.minimum(idx, values.shape[-1] - 1)
    return v[np.arange(len(v)), idx]
