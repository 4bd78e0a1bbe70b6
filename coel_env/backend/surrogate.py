"""SurrogateBackend: a fast, vectorized cost model of serving a MoE model on an edge cluster.

A serve is one numba call (`physics.serve_plans`: routing passes over (plan, server, layer, expert, replica), then
batching, queueing, link contention, percentiles, energy and quality on small [plans, servers] arrays). This module
holds the backend and the per-state formulas it evaluates with numpy (batch, non-expert step times, link goodput,
latency, host contention, migration time); the kernels' formulas are in physics.py. Every constant comes from the
cluster's HardwareProfile, which calibration replaces.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np

from coel_env.backend.incremental import MAX_CACHE_BYTES, IncrementalCache, cache_bytes
from coel_env.backend.metrics import SCALAR_METRICS, Metrics, MetricsBatch, MigrationBatch, MigrationReport
from coel_env.backend.physics import (
    ADDED,
    BIT_WIDTHS_ARRAY,
    BITS_INDEX,
    CLOUD,
    LOCAL,
    MAX_RHO,
    N_BITS,
    N_SCALARS,
    N_TIERS,
    PEER,
    REMOVED,
    ROUTING_PASSES,
    UNIT_COLUMNS,
    MigrationOut,
    Outputs,
    Params,
    Plans,
    Replicas,
    States,
    Topology,
    UnitSpecs,
    activation_stats,
    held_kv_tokens,
    migration_kernel,
    serve_plans,
    serve_plans_inc,
    unit_table_kernel,
)
from coel_env.backend.wire import row_round_trip_bytes
from coel_env.plan.deployment import DeploymentPlan
from coel_env.specs import LengthDist
from coel_env.specs.scenario import LENGTH_QUANTILES
from coel_env.world.cluster import Cluster, link_goodput, pair_goodput
from coel_env.world.state import ClusterState, StateBatch

if TYPE_CHECKING:
    from coel_env.plan.batch import PlanBatch

__all__ = [
    "MAX_RHO",
    "QUANTILES",
    "ROUTING_PASSES",
    "MetricsBatch",
    "SurrogateBackend",
    "decode_batch",
    "host_contention",
    "length_quantiles",
    "link_goodput",
    "non_expert_decode_s",
    "non_expert_prefill_s",
    "pair_goodput",
    "round_trip_latency",
    "sample_quantiles",
    "transfer_time_s",
]

QUANTILES = LENGTH_QUANTILES  # request-length quantile grid for percentiles (specs.scenario)


# ---- per-state formulas (numpy; the kernels' formulas are in physics.py) ---------------------------------------
def length_quantiles(dist: LengthDist) -> np.ndarray:
    """Lengths at QUANTILES of a length distribution (`LengthDist.quantiles`, deterministic, so the surrogate stays
    exact)."""
    return dist.quantiles()


def sample_quantiles(lengths: np.ndarray) -> np.ndarray:
    """Realized request lengths at QUANTILES (inverted CDF: every value is one of the lengths)."""
    return np.quantile(np.asarray(lengths, dtype=np.float64), QUANTILES, method="inverted_cdf")


def decode_batch(lam: np.ndarray, out_mean: float, tpot_ref: np.ndarray, max_batch: int) -> np.ndarray:
    """Requests decoding together (Little's law): clip(lam * O * tpot_ref, 1, max_batch), tpot_ref being the
    batch-1 decode step (active weights / the server's GPU bandwidth)."""
    return np.clip(lam * (out_mean * tpot_ref), 1.0, max_batch)


def non_expert_decode_s(
    batch: np.ndarray,
    in_mean: float,
    out_mean: float,
    kv_per_token: float,
    ne_bytes: float,
    ne_flops_tok: float,
    bw: np.ndarray,
    flops: np.ndarray,
) -> np.ndarray:
    """Seconds of a decode step's non-expert part (attention, dense weights) on a server's GPUs (tensor
    parallel: their summed bandwidth and FLOP/s): max((non-expert bytes + KV) / bw, B * 2 * non-expert params /
    FLOP/s), KV = B * (I + O / 2) * KV bytes per token."""
    kv = batch * (in_mean + out_mean / 2) * kv_per_token
    return np.maximum((ne_bytes + kv) / bw, batch * ne_flops_tok / flops)


def non_expert_prefill_s(
    in_mean: float,
    d_model: int,
    num_layers: int,
    ne_bytes: float,
    ne_flops_tok: float,
    bw: np.ndarray,
    flops: np.ndarray,
) -> np.ndarray:
    """Seconds of a mean-length prefill's non-expert part: max(non-expert bytes / bw, (I * 2 * non-expert params +
    attention) / FLOP/s), attention = 4 * I^2 * d_model * layers."""
    attn = 4.0 * in_mean * in_mean * d_model * num_layers
    return np.maximum(ne_bytes / bw, (in_mean * ne_flops_tok + attn) / flops)


def round_trip_latency(pair_latency: np.ndarray, per_message_s: float, emulated: bool) -> np.ndarray:
    """Round-trip seconds between servers: 2 * (route latency + per-message software latency), or
    2 * max(route latency, per-message latency) where the latency is emulated (a shaper's delay absorbs the
    software's); 0 on the diagonal (a server's own experts cross no link)."""
    lat2 = 2.0 * (np.maximum(pair_latency, per_message_s) if emulated else pair_latency + per_message_s)
    np.fill_diagonal(lat2, 0.0)
    return lat2


def host_contention(up: np.ndarray, host_cores: int | None, exponent: float) -> np.ndarray:
    """Per state [N]: how much longer every step takes when more servers are live than the shared host has cores,
    max(live servers / cores, 1)^exponent (1 without a shared host)."""
    if host_cores is None:
        return np.ones(len(up))
    return np.maximum(up.sum(axis=1) / host_cores, 1.0) ** exponent


def transfer_time_s(nbytes: np.ndarray, goodput: np.ndarray | float, latency: np.ndarray | float) -> np.ndarray:
    """Seconds to move nbytes over a path: bytes / goodput + latency (0 when there is nothing to move)."""
    return np.where(nbytes > 0, nbytes / goodput + latency, 0.0)


class SurrogateBackend:
    """Fast cost model implementing both contracts (backend.py): the single-plan `Backend` (`reset / apply /
    serve`) and, natively for any N, the batch-first `BatchBackend` (`reset_batch / migrate_batch / serve_batch`)."""

    name = "surrogate"
    max_envs = None

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
        # a step reads and multiplies the non-expert weights but for the input embedding (a gather of its rows)
        self.ne_flops_tok = 2.0 * m.step_read_params
        self.ne_bytes = 2.0 * m.step_read_params  # 16-bit
        # server aggregates: GPUs of a server work tensor-parallel on the non-expert part
        S = c.num_servers
        self.srv_gpu_bw = np.bincount(c.dev_server, weights=self.gpu_bw, minlength=S)
        self.srv_gpu_flops = np.bincount(c.dev_server, weights=self.gpu_flops, minlength=S)
        active_bytes = m.active_params * 2.0
        self.tpot_ref = active_bytes / self.srv_gpu_bw  # batch-1 decode step, for the batch estimate
        self.route = c.route
        lat2 = round_trip_latency(c.pair_latency, hw.transfer_latency_s, hw.emulated_latency)
        order = np.argsort(-lat2, axis=1, kind="stable")  # [S, S-1] other servers by falling latency
        lat_order = np.ascontiguousarray(
            [[o for o in row if o != s] for s, row in enumerate(order)], dtype=np.int64
        ).reshape(S, S - 1)
        self.topology = Topology(
            dev_server=c.dev_server, pair_index=c.pair_index, route=self.route, lat2=lat2, lat_order=lat_order
        )
        self.units = UnitSpecs(
            dev_server=c.dev_server,
            gpu_bw=self.gpu_bw,
            gpu_flops=self.gpu_flops,
            cpu_bw=self.cpu_bw,
            cpu_flops=self.cpu_flops,
            pcie_bw=self.pcie_bw,
            ssd_bw=self.ssd_bw,
            bit_widths=BIT_WIDTHS_ARRAY,
            expert_bytes=self.ebytes,
            slowdown=self.slow,
            expert_params=float(m.expert_params),
            miss=1.0 - hw.prefetch_hit_rate,
            overhead_s=hw.expert_overhead_s,
            cpu_compute=bool(hw.cpu_compute),
        )
        self.kv_tok = m.kv_bytes_per_token()
        # decode batches at which the continuous-batching model costs a step: 1, 2, 4, ... up to max_batch
        top = int(np.ceil(np.log2(max(c.spec.workload.max_batch, 1))))
        self.batch_grid = 2.0 ** np.arange(top + 1)
        self._zero_idx = np.zeros(64, dtype=np.int64)
        self._cache_key: tuple | None = None
        self._cache: dict | None = None
        self._activation_buffers: tuple[int, list[np.ndarray]] = (0, [])  # (owner id, arrays)
        self.current: DeploymentPlan | None = None
        self.incremental = True  # serve plans again against the same states incrementally (incremental.py)
        self._inc = IncrementalCache()
        self._set_lengths(length_quantiles(c.spec.workload.input_len), length_quantiles(c.spec.workload.output_len))

    def _set_lengths(self, in_q: np.ndarray, out_q: np.ndarray) -> None:
        """Request lengths at the QUANTILES grid, and what depends on them (prefill cost, kernel constants)."""
        c, hw, m = self.cluster, self.cluster.hw, self.cluster.model
        wl = c.spec.workload
        self.in_q, self.out_q = in_q, out_q
        self.in_mean, self.out_mean = float(in_q.mean()), float(out_q.mean())
        self.ne_pre = non_expert_prefill_s(
            self.in_mean, m.d_model, m.num_layers, self.ne_bytes, self.ne_flops_tok, self.srv_gpu_bw, self.srv_gpu_flops
        )
        self.ne_dec_steps = non_expert_decode_s(
            self.batch_grid[None, :],
            self.in_mean,
            self.out_mean,
            self.kv_tok,
            self.ne_bytes,
            self.ne_flops_tok,
            self.srv_gpu_bw[:, None],
            self.srv_gpu_flops[:, None],
        )  # [S, G] a decode step's non-expert seconds at the batches of batch_grid, at full compute
        q = hw.quality
        self.params = Params(
            bits_index=BITS_INDEX,
            expert_bytes=self.ebytes,
            qloss=self.qloss,
            p_idle=np.concatenate([c.dev_p_idle, c.cpu_p_idle]),
            p_max=np.concatenate([c.dev_p_max, c.cpu_p_max]),
            in_q=self.in_q,
            out_q=self.out_q,
            in_mean=self.in_mean,
            out_mean=self.out_mean,
            wire_bytes=row_round_trip_bytes(m.d_model, hw.activation_bytes, hw.row_header_bytes, m.top_k) / 2,
            fusion_fraction=float(q.fusion_fraction),
            slo_s=float(c.spec.workload.slo_s),
            step_overhead_s=m.num_layers * hw.layer_overhead_s,
            prefill_overhead_s=m.num_layers * hw.prefill_layer_overhead,
            handoff_s=m.num_moe_layers * hw.shared_gpu_handoff_s,
            ungrouped_overhead_s=float(hw.ungrouped_layer_overhead_s),
            moe_uses=float(m.num_moe_layers * m.top_k),
            prune_linear=float(q.prune_linear),
            prune_knee=float(q.prune_knee),
            prune_quadratic=float(q.prune_quadratic),
            fusion_loss=float(q.fusion_loss * q.fusion_fraction),
            local_first=hw.routing == "local_first",
            lockstep=hw.serving == "lockstep",
            continuous=hw.serving in ("continuous", "lockstep"),
            batch_grid=self.batch_grid,
            kv_tok=float(self.kv_tok),
            held_tokens=float(held_kv_tokens(self.in_mean, self.out_mean, float(wl.kv_block_tokens))),
            max_seqs=float(wl.max_batch),
            chunk_tokens=float(wl.max_num_batched_tokens),
            chunked=bool(wl.chunked_prefill),
            max_wait_s=float(wl.slo_s if wl.max_queue_wait_s is None else wl.max_queue_wait_s),
            concurrency=float(wl.concurrency or 0),
            prefer_primary=hw.routing == "load_aware",
            grouped_bits=np.isin(np.arange(17), hw.grouped_expert_bits),
        )

    def with_lengths(self, input_len: np.ndarray, output_len: np.ndarray) -> SurrogateBackend:
        """A copy that predicts requests of these lengths (e.g. a real window's realized requests, for fidelity
        reports) instead of the scenario's length distributions: their values at the QUANTILES grid."""
        if len(input_len) == 0 or len(input_len) != len(output_len):
            raise ValueError(
                f"with_lengths: need equally many (>0) input and output lengths, got "
                f"{len(input_len)} and {len(output_len)}"
            )
        out = copy.copy(self)
        out._set_lengths(sample_quantiles(input_len), sample_quantiles(output_len))
        out._cache_key, out._cache, out.current = None, None, None
        out._inc = IncrementalCache()
        return out

    def with_concurrency(self, clients: int) -> SurrogateBackend:
        """A copy that predicts a closed loop of `clients` requests per server always in the system (the workload's
        `concurrency`; 0: open loop at the state's arrival rates), e.g. a real window's closed-loop clients. Call it
        after `with_lengths`, which rebuilds the kernel constants from the scenario."""
        if clients < 0:
            raise ValueError(f"with_concurrency: clients must be >= 0, got {clients}")
        out = copy.copy(self)
        out.params = self.params._replace(concurrency=float(clients))
        out._cache_key, out._cache, out.current = None, None, None
        out._inc = IncrementalCache()
        return out

    # ---- Backend protocol ---------------------------------------------------------------------------
    def reset(self, plan: DeploymentPlan, state: ClusterState) -> None:
        self.current = plan.copy()

    def apply(self, plan: DeploymentPlan, state: ClusterState) -> MigrationReport:
        report = (
            self.migration(self.current, plan, state)
            if self.current is not None
            else MigrationReport(link_bytes=np.zeros(self.cluster.num_links))
        )
        self.current = plan.copy()
        return report

    def serve(self, plan: DeploymentPlan, state: ClusterState, window_s: float) -> Metrics:
        return self.serve_batch([plan], state, window_s).item(0)

    def close(self) -> None:
        self._cache = None
        self._inc.clear()

    # ---- migration ----------------------------------------------------------------------------------
    def migration(self, old: DeploymentPlan, new: DeploymentPlan, state: ClusterState) -> MigrationReport:
        """Cost of moving from `old` to `new`: each new replica copies from a local copy, else the nearest peer
        with at least its precision, else the cloud; transfers into one server serialize."""
        r = self.migration_arrays(
            old.device[None],
            old.tier[None],
            old.bits[None],
            new.device[None],
            new.tier[None],
            new.bits[None],
            state.server_up[None],
            state.link_factor[None],
        )
        return MigrationBatch(r).item(0)

    def migration_arrays(
        self, old_dev, old_tier, old_bits, new_dev, new_tier, new_bits, server_up, link_factor
    ) -> dict[str, np.ndarray]:
        """`migration` of N plan pairs on stacked arrays [N, L, E, R], live servers [N, S] and link factors
        [N, K]: MIGRATION_FIELDS -> [N] arrays, link_bytes -> [N, K]. Time: per server, local copies over PCIe
        plus peer transfers (`transfer_time_s` over the pair's goodput, serial), servers in parallel with the
        cloud download."""
        c, hw = self.cluster, self.cluster.hw
        N, S = old_dev.shape[0], c.num_servers
        out = MigrationOut(bytes=np.zeros((N, S, 3)), pair=np.zeros((N, S, S)), counts=np.zeros((N, 2), np.int64))
        migration_kernel(
            *Replicas(old_dev, old_tier, old_bits),
            *Replicas(new_dev, new_tier, new_bits),
            c.dev_server,
            np.asarray(server_up),
            c.pair_latency,
            self.ebytes,
            *out,
        )
        b, p = out.bytes, out.pair
        with np.errstate(divide="ignore", invalid="ignore"):
            net = transfer_time_s(p, c.pair_bandwidth(link_factor), c.pair_latency).sum(1)
        local = b[..., LOCAL] / self.pcie_bw
        cloud_bytes = b[..., CLOUD].sum(-1)
        cloud = transfer_time_s(cloud_bytes, hw.cloud_bandwidth_gbps * 1e9 / 8, hw.cloud_latency_s)
        return dict(
            bytes_total=b.sum((1, 2)),
            bytes_local=b[..., LOCAL].sum(-1),
            bytes_peer=b[..., PEER].sum(-1),
            bytes_cloud=cloud_bytes,
            time_s=np.maximum((local + net).max(-1, initial=0.0), cloud),
            replicas_added=out.counts[:, ADDED],
            replicas_removed=out.counts[:, REMOVED],
            link_bytes=self.cluster.pair_to_links(p + p.transpose(0, 2, 1)) / 2,
        )

    # ---- serving ------------------------------------------------------------------------------------
    def _state_key(self, states) -> tuple:
        """Cache key of a state set: versions (bumped by `touch()`), plus the small arrays' values so that an
        untouched in-place edit of rates, liveness, compute or links is still seen."""
        if isinstance(states, StateBatch):
            return ("batch", id(states), states.version)
        return tuple(
            (
                id(s),
                s.version,
                s.epoch,
                s.popularity.ctypes.data,
                s.popularity.shape,
                s.server_up.tobytes(),
                s.arrival_rate.tobytes(),
                s.compute_avail.tobytes(),
                s.memory_avail.tobytes(),
                s.link_factor.tobytes(),
            )
            for s in states
        )

    def _state_arrays(self, states: list[ClusterState] | StateBatch) -> dict:
        """Per-state inputs of the kernels [N, ...] (a list of states or a StateBatch), cached while the same
        states (same versions) are served again: the States fields by name, and "states" (the structure). The
        activation arrays (u_dec, a_dec, u_pre, a_pre) are rewritten by the next call for other states: copy what
        you keep."""
        key = self._state_key(states)
        if key == self._cache_key:
            return self._cache
        self._cache_key = self._cache = None  # its activation arrays are reused below
        c = self.cluster
        if isinstance(states, StateBatch):
            pop, rate, up = states.popularity, states.arrival_rate, states.server_up
            comp, link_factor = states.compute_avail, states.link_factor
            memory_avail = states.memory_avail
        else:
            pop = np.ascontiguousarray(np.stack([s.popularity for s in states]), dtype=np.float64)
            rate = np.stack([s.arrival_rate for s in states]).astype(np.float64)
            up = np.stack([s.server_up for s in states])
            comp = np.stack([s.compute_avail for s in states]).astype(np.float64)
            memory_avail = np.stack([s.memory_avail for s in states]).astype(np.float64)
            link_factor = np.stack([s.link_factor for s in states]).astype(np.float64)
        lam = rate * up
        wl = c.spec.workload
        if wl.concurrency:  # closed loop: the routing's reference batch is the clients, the rate Little's of it
            batch = np.clip(np.full_like(lam, float(wl.concurrency)), 1.0, wl.max_batch)
            rate = batch / (self.out_mean * self.tpot_ref)  # the clients' reference rate (dropped where down)
            lam = rate * up
        else:
            batch = decode_batch(lam, self.out_mean, self.tpot_ref, wl.max_batch)
        u_dec, a_dec, u_pre, a_pre = self._activation_arrays(pop.shape)
        activation_stats(pop, batch, np.full_like(batch, self.in_mean), u_dec, a_dec, u_pre, a_pre)
        table = np.empty((len(comp), c.num_devices * N_TIERS * N_BITS, UNIT_COLUMNS))
        unit_table_kernel(*self.units, comp, table)
        # non-expert part of each step on the server's own GPUs (tensor parallel), at their free compute share
        srv_avail = (comp @ c.dev_onehot) / c.gpus_per_server
        ne_dec = non_expert_decode_s(
            batch,
            self.in_mean,
            self.out_mean,
            self.kv_tok,
            self.ne_bytes,
            self.ne_flops_tok,
            self.srv_gpu_bw,
            self.srv_gpu_flops,
        )
        goodput = link_goodput(c.link_bw, link_factor, c.hw.link_efficiency)
        st = States(
            up=up,
            pop=pop,
            u_dec=u_dec,
            a_dec=a_dec,
            u_pre=u_pre,
            a_pre=a_pre,
            table=table,
            pair_bw=pair_goodput(goodput, self.route),
            lam=lam,
            rate=rate,
            batch=batch,
            ne_dec=ne_dec / srv_avail,
            ne_pre=self.ne_pre / srv_avail,
            link_cap=2.0 * goodput,  # both ways
            contention=host_contention(up, c.hw.host_cores, c.hw.oversubscription_exponent),
            ne_dec_grid=self._ne_dec_grid(srv_avail, up),
            kv_room=c.kv_room_at(memory_avail),
        )
        self._cache = dict(st._asdict(), states=st)
        self._cache_key = key
        return self._cache

    def _activation_arrays(self, shape: tuple[int, ...]) -> list[np.ndarray]:
        """Four float arrays of `shape` for `activation_stats`, reused while the shape stays (a copy of this backend
        makes its own): a big scenario's are megabytes each, and fresh ones cost their page faults every serve."""
        owner, arrays = self._activation_buffers
        if owner != id(self) or arrays[0].shape != shape:
            arrays = [np.empty(shape) for _ in range(4)]
            self._activation_buffers = (id(self), arrays)
        return arrays

    def _ne_dec_grid(self, srv_avail: np.ndarray, up: np.ndarray) -> np.ndarray:
        """[Ns, S, G] `non_expert_decode_s` at the batches of batch_grid (continuous batching; zeros otherwise)."""
        if self.cluster.hw.serving not in ("continuous", "lockstep"):
            return np.zeros((*up.shape, 1))
        return self.ne_dec_steps[None] / srv_avail[..., None]

    def serve_batch(
        self,
        plans: PlanBatch | list[DeploymentPlan],
        states: StateBatch | ClusterState | list[ClusterState],
        window_s: float,
    ) -> MetricsBatch:
        """Metrics of N plans (a PlanBatch or a list of DeploymentPlans), each against `states`: a StateBatch
        (row n, or its one row for all), one shared ClusterState, or a list with one state per plan."""
        if not isinstance(plans, (list, tuple)):
            arrays = (plans.dev, plans.tier, plans.bits, plans.prune, plans.fuse)
        elif len(plans) == 1:
            p = plans[0]
            arrays = (p.device[None], p.tier[None], p.bits[None], p.prune[None], p.fuse[None])
        else:
            arrays = tuple(
                np.stack([getattr(p, f) for p in plans]) for f in ("device", "tier", "bits", "prune", "fuse")
            )
        return self.serve_arrays(*arrays, states, window_s)

    def reset_batch(self, plans: PlanBatch, states: StateBatch, rows: np.ndarray) -> None:
        """Nothing to install: the batch contract passes the plans to every call."""

    def migrate_batch(self, old: PlanBatch, new: PlanBatch, states: StateBatch, rows: np.ndarray) -> MigrationBatch:
        """`migration_arrays` of envs `rows` (bool [N]); zeros in the other rows."""
        out = MigrationBatch.zeros(len(new), self.cluster.num_links)
        idx = np.flatnonzero(rows)
        if idx.size:
            r = self.migration_arrays(
                old.dev[idx],
                old.tier[idx],
                old.bits[idx],
                new.dev[idx],
                new.tier[idx],
                new.bits[idx],
                states.server_up[idx],
                states.link_factor[idx],
            )
            out.put(idx, MigrationBatch(r))
        return out

    def serve_arrays(self, dev, tier, bits, prune, fuse, states, window_s: float) -> MetricsBatch:
        """`serve_batch` on stacked plan arrays [N, L, E, R] and compression [N, P] (no per-plan objects)."""
        c = self.cluster
        previous = self._cache
        if isinstance(states, StateBatch):
            shared = states.N == 1
            sa = self._state_arrays(states)
        else:
            shared = isinstance(states, ClusterState)
            sa = self._state_arrays([states] if shared else list(states))
        N = dev.shape[0]
        S, D = c.num_servers, c.num_devices
        plans = Plans(
            dev,
            tier,
            bits,
            np.asarray(prune, dtype=np.float64),
            fuse,
            self._zeros_idx(N) if shared else np.arange(N, dtype=np.int64),
        )
        out = Outputs(
            scalars=np.empty((N, N_SCALARS)),
            link_bytes=np.empty((N, c.num_links)),
            device_util=np.empty((N, D)),
            gpu_mem=np.zeros((N, D)),
            cpu_mem=np.zeros((N, S)),
            ssd_mem=np.zeros((N, S)),
            choice=np.zeros(N, dtype=np.bool_),
        )
        flat = (*plans, *sa["states"], *self.topology, *self.params, float(window_s), *out)
        if sa is previous and self._incremental_ok(dev):
            main, primary, crow = self._inc.get(sa, self.params, dev, tier, bits, fuse, S, D + S)
            serve_plans_inc(*flat, *main, *primary, crow)
        else:
            serve_plans(*flat)
        fields = {name: out.scalars[:, i] for i, name in enumerate(SCALAR_METRICS)}
        fields.update(
            gpu_mem_bytes=out.gpu_mem,
            cpu_mem_bytes=out.cpu_mem,
            ssd_bytes=out.ssd_mem,
            link_bytes=out.link_bytes,
            device_util=out.device_util,
        )
        return MetricsBatch(fields)

    def _incremental_ok(self, dev: np.ndarray) -> bool:
        """Whether a serve of plans shaped like `dev` against the previous serve's states goes incrementally:
        `incremental` on, no continuous batching, and the per-layer terms within MAX_CACHE_BYTES."""
        c = self.cluster
        return (
            self.incremental
            and not self.params.continuous
            and cache_bytes(dev, c.num_servers, c.num_devices + c.num_servers) <= MAX_CACHE_BYTES
        )

    def _zeros_idx(self, n: int) -> np.ndarray:
        if self._zero_idx.shape[0] < n:
            self._zero_idx = np.zeros(n, dtype=np.int64)
        return self._zero_idx[:n]
