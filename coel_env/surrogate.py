"""SurrogateBackend: a fast, vectorized cost model of serving a MoE model on an edge cluster.

Per (plan, server, layer, expert) work runs in one fused numba kernel (`physics.serve_kernel`); the rest
(batching, queueing, link contention, percentiles, energy) is numpy over small [plans, servers] arrays.
Every constant comes from the cluster's HardwareProfile, which calibration replaces.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from coel_env.backend import Metrics, MigrationReport
from coel_env.cluster import Cluster
from coel_env.physics import (
    BITS_INDEX,
    N_SCALARS,
    activation_stats,
    finish_kernel,
    memory_kernel,
    migration_kernel,
    pair_coefficients,
    queue_inflation,
    serve_kernel,
    unit_utilization,
)
from coel_env.plan import DeploymentPlan
from coel_env.specs import LengthDist
from coel_env.state import ClusterState, StateBatch

QUANTILES = (np.arange(8) + 0.5) / 8  # request-length quantile grid for percentiles
ROUTING_PASSES = 3  # unloaded routing, then load-aware re-routing (plans with replica choices only)
MAX_RHO = 0.95  # utilization cap of the queueing model (beyond it requests are dropped)
BITS = (16, 8, 4)  # columns of the unit table, as physics.BITS_INDEX
PRIMARY_CHECK = ("tpot_mean_s", "ttft_mean_s", "e2e_mean_s", "e2e_p95_s", "ttft_p95_s", "tpot_p95_s", "dropped_frac")
SCALAR_FIELDS = (
    "ttft_mean_s", "ttft_p95_s", "tpot_mean_s", "tpot_p95_s", "e2e_mean_s", "e2e_p95_s", "tokens_per_s",
    "request_tokens_per_s", "energy_j", "quality_loss", "dropped_frac", "late_frac", "requests", "window_s",
)


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
        alpha = hw.transfer_latency_s
        self.pair_lat2 = 2.0 * (np.maximum(c.pair_latency, alpha) if hw.emulated_latency else c.pair_latency + alpha)
        np.fill_diagonal(self.pair_lat2, 0.0)  # a server's own experts cross no link
        order = np.argsort(-self.pair_lat2, axis=1, kind="stable")  # [S, S-1] other servers by falling latency
        self.lat_order = np.ascontiguousarray([[o for o in row if o != s] for s, row in enumerate(order)],
                                              dtype=np.int64).reshape(S, S - 1)
        self.route = _routes(c)
        self.unit_p_idle = np.concatenate([c.dev_p_idle, c.cpu_p_idle])
        self.unit_p_max = np.concatenate([c.dev_p_max, c.cpu_p_max])
        self.step_overhead = m.num_layers * hw.layer_overhead_s
        q = hw.quality
        self.qconst = np.array([q.prune_linear, q.prune_knee, q.prune_quadratic, q.fusion_loss * q.fusion_fraction])
        self.kv_tok = m.kv_bytes_per_token()
        self.ne_pre = self._prefill_non_expert()
        self.dev_onehot = (c.dev_server[:, None] == np.arange(S)[None]).astype(np.float64)  # [D, S]
        self._tab_static = self._static_unit_table()
        self._w_slow = np.array([self.ebytes[b] * self.slow[b] for b in BITS])  # [3] per bit-width column
        self._zero_idx = np.zeros(64, dtype=np.int64)
        self._ones = np.ones(64, dtype=np.bool_)
        self._cache_key: tuple | None = None
        self._cache: dict | None = None
        self.current: DeploymentPlan | None = None

    def with_lengths(self, input_len: np.ndarray, output_len: np.ndarray) -> SurrogateBackend:
        """A copy that predicts requests of these lengths (e.g. a real window's realized requests, for fidelity
        reports) instead of the scenario's length distributions: their values at the QUANTILES grid."""
        if len(input_len) == 0 or len(input_len) != len(output_len):
            raise ValueError(f"with_lengths: need equally many (>0) input and output lengths, got "
                             f"{len(input_len)} and {len(output_len)}")
        out = copy.copy(self)
        out.in_q = np.quantile(np.asarray(input_len, dtype=np.float64), QUANTILES, method="inverted_cdf")
        out.out_q = np.quantile(np.asarray(output_len, dtype=np.float64), QUANTILES, method="inverted_cdf")
        out.in_mean, out.out_mean = float(out.in_q.mean()), float(out.out_q.mean())
        out.ne_pre = out._prefill_non_expert()
        out._cache_key, out._cache, out.current = None, None, None
        return out

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
        r = self.migration_arrays(old.device[None], old.tier[None], old.bits[None], new.device[None],
                                  new.tier[None], new.bits[None], state.server_up[None], state.link_factor[None])
        return MigrationReport(**{k: (int(v[0]) if k.startswith("replicas") else float(v[0]))
                                  for k, v in r.items() if k != "link_bytes"}, link_bytes=r["link_bytes"][0])

    def migration_arrays(self, old_dev, old_tier, old_bits, new_dev, new_tier, new_bits, server_up,
                         link_factor) -> dict[str, np.ndarray]:
        """`migration` of N plan pairs on stacked arrays [N, L, E, R], live servers [N, S] and link factors
        [N, K]: MIGRATION_FIELDS -> [N] arrays, link_bytes -> [N, K]."""
        c, hw = self.cluster, self.cluster.hw
        N, S = old_dev.shape[0], c.num_servers
        b = np.zeros((N, S, 3))
        p = np.zeros((N, S, S))
        counts = np.zeros((N, 2), dtype=np.int64)
        for i in range(N):
            migration_kernel(old_dev[i], old_tier[i], old_bits[i], new_dev[i], new_tier[i], new_bits[i],
                             c.dev_server, server_up[i], c.pair_latency, self.ebytes, b[i], p[i], counts[i])
        pair_bw = self._pair_bandwidth(link_factor)
        with np.errstate(divide="ignore", invalid="ignore"):
            net = np.where(p > 0, p / pair_bw + c.pair_latency, 0.0).sum(1)
        local = b[..., 0] / self.pcie_bw
        cloud_bytes = b[..., 2].sum(-1)
        cloud = cloud_bytes / (hw.cloud_bandwidth_gbps * 1e9 / 8) + np.where(cloud_bytes > 0, hw.cloud_latency_s,
                                                                            0.0)
        return dict(bytes_total=b.sum((1, 2)), bytes_local=b[..., 0].sum(-1), bytes_peer=b[..., 1].sum(-1),
                    bytes_cloud=cloud_bytes, time_s=np.maximum((local + net).max(-1, initial=0.0), cloud),
                    replicas_added=counts[:, 0], replicas_removed=counts[:, 1],
                    link_bytes=self._pair_to_links(p + p.transpose(0, 2, 1)) / 2)

    # ---- serving ------------------------------------------------------------------------------------
    def _pair_bandwidth(self, link_factor: np.ndarray) -> np.ndarray:
        """[..., S, S] bottleneck goodput (bytes/s) of each server pair's route for link factors [..., K]; inf on
        the diagonal."""
        c = self.cluster
        S = c.num_servers
        lead = link_factor.shape[:-1]
        out = np.full((*lead, S, S), np.inf)
        if c.num_pairs:
            link = np.maximum(c.link_bw * link_factor * c.hw.link_efficiency, 1.0)
            per_pair = np.where(c.pair_links > 0, link[..., None, :], np.inf).min(-1)
            a, b = c.pair_servers[:, 0], c.pair_servers[:, 1]
            out[..., a, b] = per_pair
            out[..., b, a] = per_pair
        return out

    def _pair_to_links(self, pair_matrix: np.ndarray) -> np.ndarray:
        """Map a [..., S, S] matrix of pair quantities onto physical links [..., K] (each pair once)."""
        c = self.cluster
        if not c.num_pairs:
            return np.zeros((*pair_matrix.shape[:-2], c.num_links))
        a, b = c.pair_servers[:, 0], c.pair_servers[:, 1]
        per_pair = pair_matrix[..., a, b] + pair_matrix[..., b, a]
        return per_pair @ c.pair_links

    def _state_key(self, states) -> tuple:
        """Cache key of a state set: versions (bumped by `touch()`), plus the small arrays' values so that an
        untouched in-place edit of rates, liveness, compute or links is still seen."""
        if isinstance(states, StateBatch):
            return ("batch", id(states), states.version)
        return tuple((id(s), s.version, s.epoch, s.popularity.ctypes.data, s.popularity.shape,
                      s.server_up.tobytes(), s.arrival_rate.tobytes(), s.compute_avail.tobytes(),
                      s.link_factor.tobytes()) for s in states)

    def _state_arrays(self, states: list[ClusterState] | StateBatch) -> dict:
        """Per-state inputs of the kernels [N, ...] (a list of states or a StateBatch), cached while the same
        states (same versions) are served again."""
        key = self._state_key(states)
        if key == self._cache_key:
            return self._cache
        c = self.cluster
        if isinstance(states, StateBatch):
            pop, rate, up = states.popularity, states.arrival_rate, states.server_up
            comp, link_factor = states.compute_avail, states.link_factor
        else:
            pop = np.ascontiguousarray(np.stack([s.popularity for s in states]), dtype=np.float64)
            rate = np.stack([s.arrival_rate for s in states]).astype(np.float64)
            up = np.stack([s.server_up for s in states])
            comp = np.stack([s.compute_avail for s in states]).astype(np.float64)
            link_factor = np.stack([s.link_factor for s in states]).astype(np.float64)
        lam = rate * up
        batch = np.clip(lam * (self.out_mean * self.tpot_ref), 1.0, c.spec.workload.max_batch)
        u_dec, a_dec, u_pre, a_pre = (np.empty_like(pop) for _ in range(4))
        activation_stats(pop, batch, np.full_like(batch, self.in_mean), u_dec, a_dec, u_pre, a_pre)
        # non-expert part of each step on the server's own GPUs (tensor parallel)
        srv_avail = (comp @ self.dev_onehot) / c.gpus_per_server
        kv = batch * (self.in_mean + self.out_mean / 2) * self.kv_tok
        ne_dec = np.maximum((self.ne_bytes + kv) / self.srv_gpu_bw, batch * self.ne_flops_tok / self.srv_gpu_flops)
        self._cache = dict(
            pop=pop, rate=rate, up=up, lam=lam, batch=batch, u_dec=u_dec, a_dec=a_dec, u_pre=u_pre, a_pre=a_pre,
            table=self._unit_table(comp), pair_bw=self._pair_bandwidth(link_factor),
            link_cap=2.0 * np.maximum(c.link_bw * link_factor * c.hw.link_efficiency, 1.0),
            ne_dec=ne_dec / srv_avail, ne_pre=self.ne_pre / srv_avail, contention=self._contention(up),
        )
        self._cache_key = key
        return self._cache

    def _contention(self, up: np.ndarray) -> np.ndarray:
        """Per state: how much longer every step takes when more servers are live than the shared host has cores."""
        hw = self.cluster.hw
        if hw.host_cores is None:
            return np.ones(len(up))
        return np.maximum(up.sum(axis=1) / hw.host_cores, 1.0) ** hw.oversubscription_exponent

    def _prefill_non_expert(self) -> np.ndarray:
        """Seconds of a mean-length prefill's non-expert part (attention, dense weights) per server."""
        m, I = self.cluster.model, self.in_mean
        attn = 4.0 * I * I * m.d_model * m.num_layers
        return np.maximum(self.ne_bytes / self.srv_gpu_bw, (I * self.ne_flops_tok + attn) / self.srv_gpu_flops)

    def _static_unit_table(self) -> np.ndarray:
        """[D, 3 tiers, 3 bit-widths, 6] unit table entries that do not depend on free compute (see _unit_table);
        the GPU read/compute columns are filled per state."""
        c, hw = self.cluster, self.cluster.hw
        D = c.num_devices
        srv = c.dev_server
        tab = np.full((D, 3, 3, 6), np.inf)
        miss = 1.0 - hw.prefetch_hit_rate
        oh = hw.expert_overhead_s
        for j, b in enumerate(BITS):
            w = self.ebytes[b]
            fetch = (0.0, miss * w / self.pcie_bw[srv], miss * (w / self.ssd_bw[srv] + w / self.pcie_bw[srv]))
            for t in range(3):
                tab[:, t, j, 2] = fetch[t] + oh
                if t > 0 and hw.cpu_compute:
                    tab[:, t, j, 3] = w * self.slow[b] / self.cpu_bw[srv]  # dequantizing costs on CPUs too
                    tab[:, t, j, 4] = self.flops_tok / self.cpu_flops[srv]
                    tab[:, t, j, 5] = oh + (miss * w / self.ssd_bw[srv] if t == 2 else 0.0)
        return tab

    def _unit_table(self, compute_avail: np.ndarray) -> np.ndarray:
        """[N, D * 3 tiers * 3 bit-widths, 6] for free compute fractions [N, D]: GPU path (read s/activation,
        compute s/token, fetch+overhead s/activation) and CPU path (same) of an expert replica."""
        N, D = compute_avail.shape
        gb = self.gpu_bw * compute_avail
        gf = self.gpu_flops * compute_avail
        tab = np.empty((N, D, 3, 3, 6))
        tab[:] = self._tab_static
        tab[..., 0] = self._w_slow / gb[:, :, None, None]
        tab[..., 1] = (self.flops_tok / gf)[:, :, None, None]
        return tab.reshape(N, D * 9, 6)

    def serve_batch(self, plans: list[DeploymentPlan], states: ClusterState | list[ClusterState],
                    window_s: float) -> MetricsBatch:
        """Metrics of N plans, each against `states` (one shared state, or one state per plan)."""
        if len(plans) == 1:
            p = plans[0]
            arrays = (p.device[None], p.tier[None], p.bits[None], p.prune[None], p.fuse[None])
        else:
            arrays = tuple(np.stack([getattr(p, f) for p in plans]) for f in ("device", "tier", "bits", "prune",
                                                                                 "fuse"))
        return self.serve_arrays(*arrays, states, window_s)

    def serve_arrays(self, dev, tier, bits, prune, fuse, states, window_s: float) -> MetricsBatch:
        """`serve_batch` on stacked plan arrays [N, L, E, R] and compression [N, P] (no per-plan objects)."""
        c, hw, m = self.cluster, self.cluster.hw, self.cluster.model
        if isinstance(states, StateBatch):
            shared = states.N == 1
            sa = self._state_arrays(states)
        else:
            shared = isinstance(states, ClusterState)
            sa = self._state_arrays([states] if shared else list(states))
        N = dev.shape[0]
        S, D, K = c.num_servers, c.num_devices, c.num_links
        state_idx = self._zeros_idx(N) if shared else np.arange(N, dtype=np.int64)
        prune = np.asarray(prune, dtype=np.float64)
        tok_keep, byte_keep, comm_tok, fuse_frac = (np.empty((N, S, S)) for _ in range(4))
        pair_coefficients(prune, fuse, c.pair_index, sa["pair_bw"], state_idx, hw.wire_bytes(m.d_model),
                          hw.quality.fusion_fraction, tok_keep, byte_keep, comm_tok, fuse_frac)
        outs = [np.zeros((N, S, 6)), np.zeros((N, S, S, 2)), np.zeros((N, S, D + S, 2)), np.zeros((N, S)),
                np.zeros((N, S)), np.zeros((N, S, S))]
        o_time, o_pair, o_busy, o_quality, o_miss, o_cross = outs
        choice = np.zeros(N, dtype=np.int64)
        args = (dev, tier, bits, tok_keep, comm_tok, fuse_frac, state_idx, sa["pop"], sa["u_dec"], sa["a_dec"],
                sa["u_pre"], sa["a_pre"], sa["up"], sa["table"], self.pair_lat2, self.lat_order, c.dev_server,
                BITS_INDEX, self.qloss, hw.routing == "local_first")
        infl = np.ones((N, D + S))
        serve_kernel(*args, infl, self._ones_mask(N), *outs, choice)
        rho = np.empty((N, D + S))
        util_args = (state_idx, o_busy, sa["lam"], sa["batch"], sa["ne_dec"], sa["ne_pre"], c.dev_server,
                     self.out_mean, rho)
        if choice.any():
            # load-aware routing (plans with a replica choice only): route again with unit times scaled by the
            # queueing seen so far (the running max over passes, so that a unit found saturated stays avoided)
            redo = choice > 0
            unit_utilization(*util_args)
            seen = rho.copy()
            for i in range(ROUTING_PASSES - 1):
                queue_inflation(seen, infl)
                for o in outs:
                    o[redo] = 0.0
                serve_kernel(*args, infl, redo, *outs, choice)
                if i < ROUTING_PASSES - 2:
                    unit_utilization(*util_args)
                    np.maximum(seen, rho, out=seen)
        scalars = np.empty((N, N_SCALARS))
        link = np.empty((N, K))
        util = np.empty((N, D))
        finish_kernel(state_idx, o_time, o_pair, o_busy, o_quality, o_miss, o_cross, byte_keep, prune, fuse,
                      c.pair_index, sa["lam"], sa["rate"], sa["batch"], sa["up"], sa["ne_dec"], sa["ne_pre"],
                      sa["link_cap"], self.route, c.dev_server, self.unit_p_idle, self.unit_p_max, self.in_q,
                      self.out_q, hw.wire_bytes(m.d_model), c.spec.workload.slo_s, self.step_overhead, float(window_s),
                      float(m.num_moe_layers * m.top_k), MAX_RHO, self.qconst, rho, hw.serving == "lockstep",
                      sa["contention"], scalars, link, util)
        gpu, cpu, ssd = np.zeros((N, D)), np.zeros((N, S)), np.zeros((N, S))
        memory_kernel(dev, tier, bits, c.dev_server, self.ebytes, gpu, cpu, ssd)
        fields = {name: scalars[:, i] for i, name in enumerate(SCALAR_FIELDS)}
        fields.update(gpu_mem_bytes=gpu, cpu_mem_bytes=cpu, ssd_bytes=ssd, link_bytes=link, device_util=util)
        if choice.any() and dev.shape[-1] > 1 and hw.routing == "load_aware":  # local-first routes as given
            self._prefer_primary(fields, choice > 0, dev, tier, bits, prune, fuse, states, window_s)
        return MetricsBatch(fields)

    def _prefer_primary(self, fields: dict, redo: np.ndarray, dev, tier, bits, prune, fuse, states,
                        window_s: float) -> None:
        """Extra replicas are used where they save requests, or where that is no worse on any latency metric;
        otherwise every expert is served by its primary replica (slot 0), as a controller may always ignore the
        extras. This keeps "adding a replica never makes serving slower" true despite greedy per-server routing."""
        prim = self.serve_arrays(dev[..., :1], tier[..., :1], bits[..., :1], prune, fuse, states, window_s).fields
        worse = np.zeros_like(redo)
        for key in PRIMARY_CHECK:
            worse |= fields[key] > prim[key] * (1 + 1e-12) + 1e-15
        use = redo & worse & (fields["dropped_frac"] >= prim["dropped_frac"] - 1e-12)  # extras that save requests stay
        if use.any():
            for key in (*SCALAR_FIELDS, "link_bytes", "device_util"):
                fields[key][use] = prim[key][use]

    def _ones_mask(self, n: int) -> np.ndarray:
        if self._ones.shape[0] < n:
            self._ones = np.ones(n, dtype=np.bool_)
        return self._ones[:n]

    def _zeros_idx(self, n: int) -> np.ndarray:
        if self._zero_idx.shape[0] < n:
            self._zero_idx = np.zeros(n, dtype=np.int64)
        return self._zero_idx[:n]


def _routes(c: Cluster) -> np.ndarray:
    """[S, S, H] physical links on each server pair's route, padded with -1."""
    S = c.num_servers
    hops = int(c.pair_links.sum(1).max()) if c.num_pairs else 1
    route = -np.ones((S, S, max(hops, 1)), dtype=np.int64)
    for p, (a, b) in enumerate(c.pair_servers):
        links = np.flatnonzero(c.pair_links[p])
        route[a, b, : len(links)] = links
        route[b, a, : len(links)] = links
    return route
