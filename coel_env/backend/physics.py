"""Numba side of the surrogate: its formulas, the named structures its kernels take, and the kernels.

Units: bytes, seconds, FLOPs. For every serving server `s`, each expert's tokens go to the replica (and GPU or CPU
path) that raises the layer time least given the experts already placed, with unit times scaled by the queueing
the previous routing pass caused (load-aware routing); the layer time is what that router optimizes: max over
GPUs (in parallel) + CPU-path time (serial: the step waits for it) + transfer bandwidth time + the expected
largest round-trip latency among the destinations used. Everything else (batching, queueing, drops, energy,
percentiles) is done on small arrays in `finish`.

Layout: the formulas (one small function per equation; each docstring states its equation as the README's
"Backends -> Surrogate" paragraph does; numba inlines them), the structures (NamedTuples of arrays and scalars)
with the named columns of the arrays that keep a small fixed last axis, then the kernels, which take structures.
The three kernels Python calls (`serve_plans` per serve, `unit_table_kernel` per state, `migration_kernel`) take
the structures' fields flat, `serve_plans(*plans, *states, *topology, *params, window_s, *outputs)`, and rebuild
them: numba types a flat argument list in C but a NamedTuple in Python, ~0.2 us per array (a tenth of a small
serve). Everything the kernels call lives in this file: numba's cache is keyed on the timestamp of a kernel's own
file, so a formula edited in another module would leave stale compiled kernels behind.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from coel_env.backend.metrics import SCALAR_METRICS
from coel_env.specs import BIT_WIDTHS
from coel_env.specs.model import BITS_INDEX as BITS_INDEX  # re-exported: Params.bits_index, a unit-row's last digit
from coel_env.world.cluster import TIERS

# ---- index constants ----------------------------------------------------------------------------------------------
GPU_TIER, CPU_TIER, SSD_TIER = 0, 1, 2  # values of DeploymentPlan.tier
N_TIERS, N_BITS = 3, 3  # tiers and bit-widths per GPU in the unit table
if TIERS != ("gpu", "cpu", "ssd") or len(BIT_WIDTHS) != N_BITS:  # compiled kernels hold these constants
    raise ImportError("coel_env.backend.physics: update the tier / bit-width constants to cluster.TIERS and BIT_WIDTHS")
BIT_WIDTHS_ARRAY = np.array(BIT_WIDTHS, dtype=np.int64)

# unit table [Ns, D * N_TIERS * N_BITS, UNIT_COLUMNS] (`unit_row`, `unit_table`): two paths of three columns,
# seconds per activation to read the weights, per token to compute, per activation of fixed cost (fetch + overhead)
READ_S, COMPUTE_S, FIXED_S = 0, 1, 2
GPU_PATH, CPU_PATH = 0, 3  # first column of each path
UNIT_COLUMNS = 6

DECODE, PREFILL = 0, 1  # phase axis of ServeOut.time, .pair_tokens and .busy
EXPERT_S, TRANSFER_S, LATENCY_S = 0, 1, 2  # ServeOut.time parts: expert time, transfer bandwidth time, latency
LOCAL, PEER, CLOUD = 0, 1, 2  # MigrationOut.bytes sources
ADDED, REMOVED = 0, 1  # MigrationOut.counts

# columns of Outputs.scalars [N, N_SCALARS]: the Metrics scalars (metrics.SCALAR_METRICS), by name
TTFT_MEAN_S = SCALAR_METRICS.index("ttft_mean_s")
TTFT_P95_S = SCALAR_METRICS.index("ttft_p95_s")
TPOT_MEAN_S = SCALAR_METRICS.index("tpot_mean_s")
TPOT_P95_S = SCALAR_METRICS.index("tpot_p95_s")
E2E_MEAN_S = SCALAR_METRICS.index("e2e_mean_s")
E2E_P95_S = SCALAR_METRICS.index("e2e_p95_s")
TOKENS_PER_S = SCALAR_METRICS.index("tokens_per_s")
REQUEST_TOKENS_PER_S = SCALAR_METRICS.index("request_tokens_per_s")
ENERGY_J = SCALAR_METRICS.index("energy_j")
QUALITY_LOSS = SCALAR_METRICS.index("quality_loss")
DROPPED_FRAC = SCALAR_METRICS.index("dropped_frac")
LATE_FRAC = SCALAR_METRICS.index("late_frac")
REQUESTS = SCALAR_METRICS.index("requests")
WINDOW_S = SCALAR_METRICS.index("window_s")
N_SCALARS = len(SCALAR_METRICS)

ROUTING_PASSES = 3  # unloaded routing, then load-aware re-routing (plans with replica choices only)
MAX_RHO = 0.95  # utilization cap of the queueing model (beyond it requests are dropped)
MAX_INFLATION = 1e6  # the router's scale of a saturated unit (rho >= 1)

# per-layer terms of a routing pass [.., S, L, layer_terms_size(U, S)] (`route_pass`'s `terms`, incremental.py):
# the layer's additions to ServeOut (time parts, quality, miss), whether it had a replica choice, whether its routing
# depends on the unit inflation (a choice or a GPU/CPU path decision), then busy [U] per phase, rows [S] per phase,
# cross [S]
LT_EXPERT_D, LT_EXPERT_P, LT_TRANSFER_D, LT_TRANSFER_P, LT_LATENCY_D, LT_LATENCY_P = 0, 1, 2, 3, 4, 5
LT_QUALITY, LT_MISS, LT_CHOICE, LT_LOADED = 6, 7, 8, 9
LT_BUSY = 10  # busy_d[u] at LT_BUSY + u, busy_p[u] at LT_BUSY + U + u, then rows_d, rows_p, cross [S] each


# ---- formulas -----------------------------------------------------------------------------------------------------
@njit(cache=True, fastmath=True)
def use_probability(p: float, n: float, log1m_p: float) -> float:
    """Chance that n tokens, each using an expert with probability p, use it at least once (batch-aware):
    1 - (1 - p)^n = -expm1(n log1p(-p)), with log1m_p = log1p(-p); p itself for n = 1."""
    return p if n == 1.0 else -np.expm1(n * log1m_p)


@njit(cache=True, fastmath=True)
def kept_use_probability(u: float, p: float, n: float, keep: float) -> float:
    """Chance that n tokens use an expert of a server to which pruning keeps `keep` of the rows: a token's row
    crosses (and the expert runs for it) with probability p * keep, so `use_probability`(p * keep, n); u (the
    unpruned chance) for keep = 1."""
    if keep >= 1.0:
        return u
    pk = p * keep
    return pk if n == 1.0 else use_probability(pk, n, np.log1p(-pk))


@njit(cache=True)
def expert_read_s(weight_bytes: float, slowdown: float, goodput: float) -> float:
    """Seconds to read an expert's weights once: bytes(bits) * dequant slowdown / (memory bandwidth * efficiency),
    `goodput` being that product (times the free share of the unit)."""
    return weight_bytes * slowdown / goodput


@njit(cache=True)
def expert_compute_s(params: float, flops: float) -> float:
    """Seconds of compute per token: 2 * params / (peak FLOP/s * efficiency), `flops` being that product."""
    return 2.0 * params / flops


@njit(cache=True)
def gpu_fetch_s(tier: int, weight_bytes: float, miss: float, pcie_bw: float, ssd_bw: float) -> float:
    """Seconds to bring an offloaded expert to the GPU per activation, only on a prefetch miss (miss = 1 - hit
    rate): 0 in GPU memory, miss * bytes / PCIe from CPU RAM, miss * (bytes / SSD + bytes / PCIe) from SSD."""
    if tier == GPU_TIER:
        return 0.0
    if tier == CPU_TIER:
        return miss * weight_bytes / pcie_bw
    return miss * (weight_bytes / ssd_bw + weight_bytes / pcie_bw)


@njit(cache=True)
def cpu_fetch_s(tier: int, weight_bytes: float, miss: float, ssd_bw: float) -> float:
    """Seconds to bring an offloaded expert into CPU RAM for the CPU path (Fiddler) per activation: the SSD read
    miss * bytes / SSD for an SSD expert, 0 for one in RAM."""
    return miss * weight_bytes / ssd_bw if tier == SSD_TIER else 0.0


@njit(cache=True, fastmath=True)
def expert_time(uses: float, tokens: float, read_s: float, compute_s: float, fixed_s: float) -> float:
    """Roofline time of an expert in a step (or prefill) on one path: max(uses * read, tokens * compute) + uses *
    fixed; `uses` = the chance the step uses it (the weights are read and fetched once per step that does)."""
    return max(uses * read_s, tokens * compute_s) + uses * fixed_s


@njit(cache=True, fastmath=True)
def path_time(tab: np.ndarray, row: int, path: int, uses: float, tokens: float) -> float:
    """`expert_time` of the unit-table row `row` on `path` (GPU_PATH or CPU_PATH)."""
    return expert_time(uses, tokens, tab[row, path + READ_S], tab[row, path + COMPUTE_S], tab[row, path + FIXED_S])


@njit(cache=True, fastmath=True)
def gpu_path_time(tab: np.ndarray, row: int, uses: float, tokens: float, grouped: bool) -> float:
    """`path_time` on the GPU path; on a grouped layer (`grouped_layers`: one grouped GEMM computes the layer's
    experts, as fused-MoE kernels do) without the per-expert fixed cost."""
    if grouped:
        return expert_time(uses, tokens, tab[row, GPU_PATH + READ_S], tab[row, GPU_PATH + COMPUTE_S], 0.0)
    return path_time(tab, row, GPU_PATH, uses, tokens)


@njit(cache=True)
def table_row(d: int, tier: int, j: int) -> int:
    """Row of the unit table for GPU d, `tier` and the j-th of BIT_WIDTHS: (d * N_TIERS + tier) * N_BITS + j."""
    return (d * N_TIERS + tier) * N_BITS + j


@njit(cache=True)
def unit_row(d: int, tier: int, bits: int, bits_index: np.ndarray) -> int:
    """`table_row` of a replica on GPU d in `tier` at `bits` (bits_index: BITS_INDEX)."""
    return table_row(d, tier, bits_index[bits])


@njit(cache=True)
def transfer_s_per_token(wire_bytes: float, keep: float, goodput: float) -> float:
    """Bandwidth seconds of one dispatched row (a token sent to a remote server, `wire.py`): its hidden state there
    and the combined result back, minus pruning: 2 * row_bytes * (1 - prune) / link goodput (the round-trip latency
    is `expected_max_latency`'s)."""
    return 2.0 * wire_bytes * keep / goodput


@njit(cache=True, fastmath=True)
def fused_share(p: float, tokens: float, keep: float, frac: float) -> float:
    """Share of a message's rows still sent after fusion: a step's `tokens / p` tokens each join the message with
    probability p (a token with an expert at the destination; in the router's cost, with that expert) and survive
    pruning with `keep`; fusion merges `frac` of the message's rows but needs two of them, so per token the saving is
    frac * P(another of the step's tokens joins) = frac * (1 - (1 - p keep)^(tokens / p - 1))."""
    n = tokens / p  # tokens in the step
    if n <= 1.0:
        return 1.0
    return 1.0 - frac * -np.expm1((n - 1.0) * np.log1p(-min(p * keep, 1.0 - 1e-12)))


@njit(cache=True, fastmath=True)
def destination_share(mass: float, k: float) -> float:
    """Share of a layer's tokens that send a row to a destination holding experts of routing mass `mass` (the sum
    of their inclusion probabilities; k = top_k, the layer's total): a token's k choices as k draws each landing
    there with probability mass / k, 1 - (1 - mass / k)^k — exact (1) when the destination holds every expert, and
    within a few percent of top-k routing otherwise (tests/backend/test_wire.py)."""
    if mass <= 0.0 or k <= 0.0:
        return 0.0
    if mass >= k:
        return 1.0
    return -np.expm1(k * np.log1p(-mass / k))


@njit(cache=True, fastmath=True)
def expected_max_latency(order: np.ndarray, lat: np.ndarray, none: np.ndarray) -> float:
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
def per_request(prefill: float, decode: float, out_mean: float, batch: float) -> float:
    """A request's share of a quantity paid per prefill and per decode step, each decode step shared by a batch of
    B requests: prefill + (O - 1) * decode / B (the prefill yields the first of O output tokens)."""
    return prefill + (out_mean - 1.0) * decode / batch


@njit(cache=True, fastmath=True)
def md1_factor(rho: float) -> float:
    """M/D/1 sojourn factor of a unit (or link) at utilization rho: 1 + rho / (2 (1 - rho))."""
    return 1.0 + rho / (2.0 * (1.0 - rho))


@njit(cache=True, fastmath=True)
def drop_share(routed_tokens: float, miss: float, rho: float) -> float:
    """Share of a server's requests dropped: those that route a token to an expert with no live replica,
    P_miss = 1 - exp(-tokens * miss) (miss: such experts' mass per token), and those beyond the capacity of the
    bottleneck (unit or link) at utilization rho: 1 - (1 - P_miss) / max(rho, 1)."""
    miss_drop = 1.0 - np.exp(-routed_tokens * miss)
    return 1.0 - (1.0 - miss_drop) / max(rho, 1.0)


@njit(cache=True, fastmath=True)
def unit_power(p_idle: float, p_max: float, util: float) -> float:
    """Watts of a unit: P_idle + (P_max - P_idle) * utilization."""
    return p_idle + (p_max - p_idle) * util


@njit(cache=True, fastmath=True)
def pair_quality_loss(
    prune: float, fused: bool, linear: float, knee: float, quadratic: float, fusion_loss: float
) -> float:
    """Quality loss of a token crossing a compressed link: linear * prune + quadratic * max(prune - knee, 0)^2,
    plus fusion_loss (= fusion loss * fusion fraction) with fusion."""
    loss = linear * prune + quadratic * max(prune - knee, 0.0) ** 2
    if fused:
        loss += fusion_loss
    return loss


@njit(cache=True, fastmath=True)
def prefill_s(ttft_mean: float, in_len: float, in_mean: float) -> float:
    """Time to first token of a request of in_len input tokens: ttft (of the mean length I) * in_len / I."""
    return ttft_mean * in_len / in_mean


@njit(cache=True, fastmath=True)
def request_latency(ttft: float, tpot: float, out_len: float) -> float:
    """End-to-end seconds of a request: ttft + (out_len - 1) * tpot."""
    return ttft + (out_len - 1.0) * tpot


@njit(cache=True, fastmath=True)
def busy_probability(lam: float, seconds: float) -> float:
    """Chance a server has a request in flight (Little, Poisson arrivals): 1 - exp(-lam * e2e)."""
    return -np.expm1(-lam * seconds)


@njit(cache=True)
def held_kv_tokens(in_mean: float, out_mean: float, block: float) -> float:
    """KV tokens a running sequence holds on average: its prompt and half its output (it grows from I to I + O),
    in whole blocks: ceil((I + O / 2) / block) * block."""
    return np.ceil((in_mean + out_mean / 2.0) / block) * block


@njit(cache=True)
def kv_sequences(kv_bytes: float, kv_tok: float, held: float, max_seqs: float) -> float:
    """Sequences a server runs at once under continuous batching: min(max_num_seqs, floor(KV bytes / (KV bytes per
    token * tokens held per sequence))); 0 when the plan leaves no room for one."""
    if kv_bytes <= 0.0:
        return 0.0
    return min(max_seqs, np.floor(kv_bytes / (kv_tok * held)))


@njit(cache=True, fastmath=True)
def interp_log2(grid: np.ndarray, values: np.ndarray, b: float) -> float:
    """values (given at the batch sizes grid, ascending) at batch b, piecewise linear in log2(b), clamped."""
    G = grid.shape[0]
    if b <= grid[0]:
        return values[0]
    for g in range(1, G):
        if b <= grid[g]:
            w = (np.log2(b) - np.log2(grid[g - 1])) / (np.log2(grid[g]) - np.log2(grid[g - 1]))
            return values[g - 1] + w * (values[g] - values[g - 1])
    return values[G - 1]


@njit(cache=True)
def erlang_c_wait(c: float, a: float, service: float) -> float:
    """Mean queue wait of M/M/c (c slots, offered load a = lam * service < c): C(c, a) * service / (c - a), the
    Erlang-C probability of waiting from the Erlang-B recursion B_k = a B_(k-1) / (k + a B_(k-1)), B_0 = 1,
    C = B_c / (1 - (a / c) (1 - B_c)). inf when a >= c."""
    if a >= c:
        return np.inf
    if a <= 0.0:
        return 0.0
    erl_b = 1.0
    for k in range(1, int(c) + 1):
        erl_b = a * erl_b / (k + a * erl_b)
    wait_p = erl_b / (1.0 - (a / c) * (1.0 - erl_b))
    return wait_p * service / (c - a)


@njit(cache=True, fastmath=True)
def prefill_in_steps(
    ttft_iso: float, tpot: float, in_len: float, chunk_tokens: float, batch: float, chunked: bool
) -> float:
    """Time to first token without queueing under continuous batching: with chunked prefill the prompt rides in
    ceil(I / max(token budget - B, 1)) steps beside the B decodes, each step also a decode step:
    ttft_iso + n * tpot; without, the prefill waits for the running step: ttft_iso + tpot / 2."""
    if chunked:
        return ttft_iso + np.ceil(in_len / max(chunk_tokens - batch, 1.0)) * tpot
    return ttft_iso + 0.5 * tpot


# ---- structures ---------------------------------------------------------------------------------------------------
class Plans(NamedTuple):
    """N plans to serve (DeploymentPlan arrays stacked), each against one row of States."""

    dev: np.ndarray  # [N, L, E, R] GPU of each replica slot, -1: empty
    tier: np.ndarray  # [N, L, E, R] GPU_TIER, CPU_TIER or SSD_TIER
    bits: np.ndarray  # [N, L, E, R] 16, 8 or 4
    prune: np.ndarray  # [N, P] token pruning ratio per logical link
    fuse: np.ndarray  # [N, P] token fusion per logical link
    state: np.ndarray  # [N] row of States each plan is served against


class States(NamedTuple):
    """Per-state inputs [Ns, ...] of the kernels (SurrogateBackend._state_arrays, cached per state set)."""

    up: np.ndarray  # [Ns, S] live servers
    pop: np.ndarray  # [Ns, S, L, E] chance a token of server s uses expert e of layer l
    u_dec: np.ndarray  # [Ns, S, L, E] chance a decode step uses it (`use_probability` over the batch)
    a_dec: np.ndarray  # [Ns, S, L, E] tokens a decode step routes to it: batch * p
    u_pre: np.ndarray  # [Ns, S, L, E] the same two for a mean-length prefill
    a_pre: np.ndarray
    table: np.ndarray  # [Ns, D * N_TIERS * N_BITS, UNIT_COLUMNS] the unit table (`unit_table`)
    pair_bw: np.ndarray  # [Ns, S, S] bottleneck goodput of each server pair's route, bytes/s (inf on the diagonal)
    lam: np.ndarray  # [Ns, S] served arrival rate, requests/s (0 when down; a closed loop: Little's of its clients)
    rate: np.ndarray  # [Ns, S] offered arrival rate
    batch: np.ndarray  # [Ns, S] decode batch (`surrogate.decode_batch`)
    ne_dec: np.ndarray  # [Ns, S] non-expert seconds of a decode step
    ne_pre: np.ndarray  # [Ns, S] non-expert seconds of a mean-length prefill
    link_cap: np.ndarray  # [Ns, K] bytes/s of each physical link, both directions
    contention: np.ndarray  # [Ns] stretch of every step from shared host cores (`surrogate.host_contention`)
    ne_dec_grid: np.ndarray  # [Ns, S, G] non-expert decode step at the batches of Params.batch_grid (continuous)
    kv_room: np.ndarray  # [Ns, S] GPU bytes for KV before experts (`Cluster.kv_room_at`)


class Topology(NamedTuple):
    """The cluster's index arrays and round-trip latencies (built once per backend)."""

    dev_server: np.ndarray  # [D] server of each GPU
    pair_index: np.ndarray  # [S, S] logical link of a server pair, -1 on the diagonal
    route: np.ndarray  # [S, S, H] physical links of each pair's route, padded with -1
    lat2: np.ndarray  # [S, S] round-trip latency, s (0 on the diagonal)
    lat_order: np.ndarray  # [S, S - 1] the other servers by falling lat2


class Params(NamedTuple):
    """Constants of the hardware profile, model and workload (built once per backend)."""

    bits_index: np.ndarray  # [17] BITS_INDEX
    expert_bytes: np.ndarray  # [17] bytes of one expert per bit-width
    qloss: np.ndarray  # [17] quality loss of one expert use per bit-width
    p_idle: np.ndarray  # [U] idle watts per unit (GPUs, then CPUs)
    p_max: np.ndarray  # [U]
    in_q: np.ndarray  # [Q] request input lengths at the quantile grid
    out_q: np.ndarray  # [Q] output lengths
    in_mean: float  # mean of in_q (the prefill the state arrays cost)
    out_mean: float
    wire_bytes: float  # one-way bytes of a routed token's hidden state
    fusion_fraction: float  # share of a message's rows for one expert that fusion merges
    slo_s: float  # end-to-end deadline of a request
    step_overhead_s: float  # fixed seconds per step (layers * per-layer overhead)
    ungrouped_overhead_s: float  # fixed seconds per step per layer some GPU computes expert by expert
    prefill_overhead_s: float  # fixed seconds per step that runs a prefill (layers * prefill_layer_overhead_s)
    handoff_s: float  # lock-step on one shared GPU: seconds per step per hand-off (MoE layers * shared_gpu_handoff_s)
    moe_uses: float  # expert uses per token: MoE layers * top_k
    prune_linear: float  # pair_quality_loss constants
    prune_knee: float
    prune_quadratic: float
    fusion_loss: float  # fusion loss * fusion fraction
    local_first: bool  # routing: the real dispatcher's (own server first, else the nearest holder)
    lockstep: bool  # serving: every live server runs each step (`lockstep_steps`), continuous batching too
    continuous: bool  # serving: continuous batching per server (`continuous_batching`; also with lockstep)
    batch_grid: np.ndarray  # [G] batch sizes 1, 2, 4, ... at which `decode_grid` costs the decode step
    kv_tok: float  # KV-cache bytes per token (all layers)
    held_tokens: float  # KV tokens a running sequence holds on average, whole blocks (`held_kv_tokens`)
    max_seqs: float  # workload max_batch (vLLM max_num_seqs)
    chunk_tokens: float  # workload max_num_batched_tokens
    chunked: bool  # chunked prefill
    max_wait_s: float  # admission: the longest queue wait before a request is dropped
    concurrency: float  # closed-loop requests per server (0: open loop, Poisson arrivals)
    prefer_primary: bool  # load-aware routing: a plan's extra replicas are used only where that is no worse
    grouped_bits: np.ndarray  # [17] bool: experts of these bit-widths run in one grouped kernel (`grouped_layers`)


class StepModel(NamedTuple):
    """One server's decode step as a function of the batch (`decode_step_at`; continuous batching)."""

    grid: np.ndarray  # [G] Params.batch_grid
    expert: np.ndarray  # [G] expert seconds of a decode step at each batch of grid (`decode_grid`)
    non_expert: np.ndarray  # [G] non-expert seconds (States.ne_dec_grid)
    transfer_ref: float  # decode transfer bandwidth seconds at the reference batch
    batch_ref: float  # that batch (States.batch)
    fixed: float  # round-trip latency + per-step overhead
    ttft_iso: float  # prefill seconds without queueing or decode interference


class UnitSpecs(NamedTuple):
    """Rates of every unit (vendor numbers times the profile's efficiencies) and expert sizes: `unit_table`."""

    dev_server: np.ndarray  # [D]
    gpu_bw: np.ndarray  # [D] memory bandwidth * memory_efficiency, bytes/s
    gpu_flops: np.ndarray  # [D] peak * compute_efficiency, FLOP/s
    cpu_bw: np.ndarray  # [S]
    cpu_flops: np.ndarray  # [S]
    pcie_bw: np.ndarray  # [S] PCIe bandwidth * pcie_efficiency
    ssd_bw: np.ndarray  # [S]
    bit_widths: np.ndarray  # [N_BITS] BIT_WIDTHS
    expert_bytes: np.ndarray  # [17] bytes of one expert per bit-width
    slowdown: np.ndarray  # [17] dequantization slowdown per bit-width
    expert_params: float
    miss: float  # 1 - prefetch hit rate
    overhead_s: float  # fixed seconds per expert activation
    cpu_compute: bool  # CPU-tier experts may run on the CPU (Fiddler)


class PairTerms(NamedTuple):
    """Per plan and ordered server pair [N, S, S] (`pair_terms`); neutral on the diagonal."""

    keep: np.ndarray  # share of tokens (and bytes) pruning keeps
    transfer_s: np.ndarray  # `transfer_s_per_token`
    fuse_frac: np.ndarray  # fusion fraction (0 without fusion; `fused_share` applies it per expert)


class ServeOut(NamedTuple):
    """What a routing pass (`route_pass`) accumulates per plan n and serving server s."""

    time: np.ndarray  # [N, S, 2 phases, 3 parts] decode step / prefill: EXPERT_S, TRANSFER_S, LATENCY_S
    pair_tokens: np.ndarray  # [N, S, S, 2 phases] rows to s2 per decode step / prefill (fused, not yet pruned)
    busy: np.ndarray  # [N, S, U, 2 phases] busy seconds of each unit (GPUs, then CPUs)
    quality: np.ndarray  # [N, S] sum over experts of p * qloss(bits)
    miss: np.ndarray  # [N, S] expert mass with no live replica
    cross: np.ndarray  # [N, S, S] token mass crossing to s2
    choice: np.ndarray  # [N] bool: some expert had two or more live replicas (its routing depends on the load)
    chosen: np.ndarray  # [N, S, L, E] the decode step's replica slot r and path: 2 r + (1 on the CPU path); -1 none


class Outputs(NamedTuple):
    """Results of `serve_plans` per plan."""

    scalars: np.ndarray  # [N, N_SCALARS] SCALAR_METRICS
    link_bytes: np.ndarray  # [N, K] bytes per physical link in the window, both directions
    device_util: np.ndarray  # [N, D]
    gpu_mem: np.ndarray  # [N, D] expert bytes per GPU (`memory_kernel`)
    cpu_mem: np.ndarray  # [N, S]
    ssd_mem: np.ndarray  # [N, S]
    choice: np.ndarray  # [N] bool: ServeOut.choice


class Replicas(NamedTuple):
    """Expert replicas of N plans [N, L, E, R] (Plans' first three fields): `migration_kernel`."""

    dev: np.ndarray
    tier: np.ndarray
    bits: np.ndarray


class MigrationOut(NamedTuple):
    """Per plan pair: `migration_kernel`."""

    bytes: np.ndarray  # [N, S, 3] bytes into each server from LOCAL, PEER and CLOUD copies
    pair: np.ndarray  # [N, S, S] network bytes src -> dst
    counts: np.ndarray  # [N, 2] replicas ADDED, REMOVED


def _bounds(*structs: type) -> tuple[int, ...]:
    """Where each structure's fields start in a flat argument list holding them in order, and where it ends."""
    out = [0]
    for s in structs:
        out.append(out[-1] + len(s._fields))
    return tuple(out)


# flat entries (`serve_plans`, `unit_table_kernel`, `migration_kernel`): where each structure's fields start
_P0, _P1, _P2, _P3, _P4 = _bounds(Plans, States, Topology, Params)  # then window_s, then Outputs
_P5 = _P4 + 1
_U0, _U1 = _bounds(UnitSpecs)  # then compute_avail, out
_U2 = _U1 + 1
_M0, _M1, _M2 = _bounds(Replicas, Replicas)  # then dev_server, server_up, pair_lat, expert_bytes, MigrationOut
_M3, _M4, _M5, _M6 = _M2 + 1, _M2 + 2, _M2 + 3, _M2 + 4


# ---- kernels ------------------------------------------------------------------------------------------------------
@njit(cache=True, fastmath=True)
def activation_stats(
    pop: np.ndarray,
    batch: np.ndarray,
    in_len: np.ndarray,
    u_dec: np.ndarray,
    a_dec: np.ndarray,
    u_pre: np.ndarray,
    a_pre: np.ndarray,
) -> None:
    """Per (state, server, layer, expert): chance an expert is used in a decode step / a prefill
    (`use_probability`), and tokens routed to it (n * p). Two passes per (state, server): every log1p(-p) first
    (into u_pre), then the use probabilities from them: the same calls on the same values as one pass (bit for
    bit), ~1.3x faster (the libm calls of one pass overlap less)."""
    ns, S, L, E = pop.shape
    for i in range(ns):
        for s in range(S):
            lb = batch[i, s]
            li = in_len[i, s]
            for l in range(L):
                for e in range(E):
                    p = pop[i, s, l, e]
                    u_pre[i, s, l, e] = 0.0 if p >= 1.0 or p <= 0.0 else np.log1p(-p)
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
                        lq = u_pre[i, s, l, e]
                        u_dec[i, s, l, e] = use_probability(p, lb, lq)
                        u_pre[i, s, l, e] = use_probability(p, li, lq)
                    a_dec[i, s, l, e] = lb * p
                    a_pre[i, s, l, e] = li * p


@njit(cache=True)
def unit_table(units: UnitSpecs, compute_avail: np.ndarray, out: np.ndarray) -> None:
    """out[n, table_row(d, tier, j)] for free compute shares compute_avail [N, D]: the GPU path (`expert_read_s`
    and `expert_compute_s` at the free share, `gpu_fetch_s` + overhead) and the CPU path (Fiddler: read and compute
    on the host, `cpu_fetch_s` + overhead; inf for GPU-tier experts or without cpu_compute)."""
    dev_server, gpu_bw, gpu_flops, cpu_bw, cpu_flops = (
        units.dev_server,
        units.gpu_bw,
        units.gpu_flops,
        units.cpu_bw,
        units.cpu_flops,
    )
    pcie_bw, ssd_bw, bit_widths, expert_bytes, slowdown = (
        units.pcie_bw,
        units.ssd_bw,
        units.bit_widths,
        units.expert_bytes,
        units.slowdown,
    )
    params, miss, oh = units.expert_params, units.miss, units.overhead_s
    N, D = compute_avail.shape
    for n in range(N):
        for d in range(D):
            srv = dev_server[d]
            gb = gpu_bw[d] * compute_avail[n, d]
            gf = gpu_flops[d] * compute_avail[n, d]
            for t in range(N_TIERS):
                for j in range(N_BITS):
                    b = bit_widths[j]
                    w = expert_bytes[b]
                    row = out[n, table_row(d, t, j)]
                    row[GPU_PATH + READ_S] = expert_read_s(w, slowdown[b], gb)
                    row[GPU_PATH + COMPUTE_S] = expert_compute_s(params, gf)
                    row[GPU_PATH + FIXED_S] = gpu_fetch_s(t, w, miss, pcie_bw[srv], ssd_bw[srv]) + oh
                    if t != GPU_TIER and units.cpu_compute:  # dequantizing costs on CPUs too
                        row[CPU_PATH + READ_S] = expert_read_s(w, slowdown[b], cpu_bw[srv])
                        row[CPU_PATH + COMPUTE_S] = expert_compute_s(params, cpu_flops[srv])
                        row[CPU_PATH + FIXED_S] = oh + cpu_fetch_s(t, w, miss, ssd_bw[srv])
                    else:
                        row[CPU_PATH + READ_S] = np.inf
                        row[CPU_PATH + COMPUTE_S] = np.inf
                        row[CPU_PATH + FIXED_S] = np.inf


@njit(cache=True)
def grouped_layers(plans: Plans, grouped_bits: np.ndarray, out: np.ndarray) -> None:
    """out[n, d, l]: GPU d computes its experts of layer l with one grouped kernel (a fused-MoE kernel, the real
    backend's grouped GEMM: no per-expert fixed cost): it holds some there, all in GPU memory at bit-widths b with
    grouped_bits[b] (HardwareProfile.grouped_expert_bits; none: every use pays expert_overhead_s)."""
    N, L, E, R = plans.dev.shape
    D = out.shape[1]
    held = np.zeros(D, dtype=np.bool_)
    ok = np.ones(D, dtype=np.bool_)
    for n in range(N):
        for l in range(L):
            held[:] = False
            ok[:] = True
            for e in range(E):
                for r in range(R):
                    d = plans.dev[n, l, e, r]
                    if d < 0:
                        continue
                    held[d] = True
                    if plans.tier[n, l, e, r] != GPU_TIER or not grouped_bits[plans.bits[n, l, e, r]]:
                        ok[d] = False
            for d in range(D):
                out[n, d, l] = held[d] and ok[d]


@njit(cache=True)
def ungrouped_layer_counts(plans: Plans, grouped_bits: np.ndarray, out: np.ndarray) -> None:
    """out[n]: layers of plan n where some GPU holds experts it cannot compute as one grouped kernel (one of them
    off the GPU tier or at a bit-width outside grouped_bits, `grouped_layers`' rule): the real dispatcher's
    per-expert path, which syncs with the host to sort rows by expert, runs there at every step."""
    N, L, E, R = plans.dev.shape
    for n in range(N):
        count = 0
        for l in range(L):
            mixed = False
            for e in range(E):
                for r in range(R):
                    d = plans.dev[n, l, e, r]
                    if d >= 0 and (plans.tier[n, l, e, r] != GPU_TIER or not grouped_bits[plans.bits[n, l, e, r]]):
                        mixed = True
                        break
                if mixed:
                    break
            count += mixed
        out[n] = count


@njit(cache=True)
def pair_terms(plans: Plans, st: States, topo: Topology, params: Params, out: PairTerms) -> None:
    """Per plan and ordered server pair: share of tokens (and bytes) kept by pruning, `transfer_s_per_token` and
    the fusion fraction (0 without fusion)."""
    state, prune, fuse, pair_index, pair_bw = plans.state, plans.prune, plans.fuse, topo.pair_index, st.pair_bw
    keep_o, transfer_o, fuse_o = out.keep, out.transfer_s, out.fuse_frac
    wire, frac = params.wire_bytes, params.fusion_fraction
    N = prune.shape[0]
    S = pair_index.shape[0]
    for n in range(N):
        si = state[n]
        for s in range(S):
            for s2 in range(S):
                p = pair_index[s, s2]
                if p < 0:
                    keep_o[n, s, s2] = 1.0
                    transfer_o[n, s, s2] = 0.0
                    fuse_o[n, s, s2] = 0.0
                    continue
                keep = 1.0 - prune[n, p]
                keep_o[n, s, s2] = keep
                transfer_o[n, s, s2] = transfer_s_per_token(wire, keep, pair_bw[si, s, s2])
                fuse_o[n, s, s2] = frac if fuse[n, p] else 0.0


@njit(cache=True, fastmath=True)
def route_pass(
    plans: Plans,
    pairs: PairTerms,
    st: States,
    topo: Topology,
    params: Params,
    infl: np.ndarray,
    todo: np.ndarray,
    grouped: np.ndarray,
    out: ServeOut,
    layers: np.ndarray,
    terms: np.ndarray,
    trow: np.ndarray,
) -> None:
    """One routing pass: accumulate `out` for every plan n with todo[n] and every live server s.

    Layers are independent within a pass (each layer's additions to `out` are summed layer by layer, in order):
    only the layers with layers[n, s, l] are routed (all where `layers` is empty), and where `terms` is not empty
    each routed layer's additions are also written to terms[trow[n], s, l] (the LT_* layout: incremental.py).

    A layer takes max over GPUs of their expert time (GPUs run in parallel; a GPU-path fetch from RAM/SSD is
    serial on its GPU) + the CPU-path time (the step waits for a CPU/SSD expert whenever a token uses it) + the
    bandwidth part of every transfer + the largest round-trip latency among the destinations used. The router
    sends each expert's tokens to the replica (and path) that raises this layer time least, given the experts
    already placed, with unit times scaled by infl[n, u] (>= 1: the queueing each unit already sees), ties
    broken by the replica's own cost; decode and prefill are costed on the chosen replica. With `local_first`
    (the real backend's dispatcher) the server is fixed first: itself if it holds a live replica, else the live
    holder with the lowest round-trip latency (ties: lowest index); the router chooses among that server's replicas.
    Expert times are `path_time` of the unit table (`gpu_path_time` on a grouped layer, grouped [N, D, L]), with
    uses `kept_use_probability` (a pruned row runs no expert);
    transfers are per-destination (`wire.py`): a token crosses to a server once per layer whatever number of its
    experts it uses there, E[rows to s2] = tokens * `destination_share`(the routing mass sent to s2, top_k),
    `pairs.transfer_s` per row (`fused_share` of it with fusion), plus `expected_max_latency`; the router prices an
    expert's tokens that newly cross."""
    N, L, E, R = plans.dev.shape
    S = st.up.shape[1]
    D = topo.dev_server.shape[0]
    U = D + S
    dev, tier, bits, state = plans.dev, plans.tier, plans.bits, plans.state
    up_srv, table = st.up, st.table
    keep, transfer_s, fuse_frac = pairs.keep, pairs.transfer_s, pairs.fuse_frac
    dev_server, lat2, lat_order = topo.dev_server, topo.lat2, topo.lat_order
    bits_index, qloss, local_first = params.bits_index, params.qloss, params.local_first
    o_time, o_pair, o_busy, o_choice = out.time, out.pair_tokens, out.busy, out.choice
    dev_up = np.zeros(D, dtype=np.bool_)  # per device, for server s: live, token keep, s/token, latency, fusion
    dev_keep = np.zeros(D)
    dev_ct = np.zeros(D)
    dev_lat = np.zeros(D)
    dev_fuse = np.zeros(D)
    every_layer = layers.shape[0] == 0
    record = terms.shape[0] > 0
    for job in range(N * S):
        n = job // S
        s = job % S
        si = state[n]
        if not todo[n] or not up_srv[si, s]:
            continue
        acc_d = np.zeros(U)
        acc_p = np.zeros(U)
        pacc = np.zeros(D)  # load-scaled GPU decode time, as the router sees it
        touched = np.zeros(U, dtype=np.bool_)
        tok_d = np.zeros(S)
        tok_p = np.zeros(S)
        none_d = np.ones(S)
        none_p = np.ones(S)
        token_mass = np.zeros(S)  # per destination: routing mass (sum of p) of the experts sent there (this layer)
        cross = np.zeros(S)  # token mass crossing to each server: this layer's, and the total
        cross_tot = np.zeros(S)
        quality = 0.0
        miss = 0.0
        choice = False
        pop_s = st.pop[si, s]
        ud_s = st.u_dec[si, s]
        ad_s = st.a_dec[si, s]
        up_s = st.u_pre[si, s]
        ap_s = st.a_pre[si, s]
        tab = table[si]
        inf_n = infl[n]
        scaled = False  # unit times scaled by load (a re-routing pass); else the router's view is acc_d itself
        for u in range(U):
            if inf_n[u] != 1.0:
                scaled = True
        pv = pacc if scaled else acc_d
        batch_d = st.batch[si, s]  # tokens of a decode step / a mean-length prefill
        batch_p = params.in_mean
        lat_s = lat2[s]
        order = lat_order[s]
        for d in range(D):
            sd = dev_server[d]
            dev_up[d] = up_srv[si, sd]
            dev_keep[d] = keep[n, s, sd]  # 1 for the own server (the diagonals are neutral)
            dev_ct[d] = transfer_s[n, s, sd]
            dev_fuse[d] = fuse_frac[n, s, sd]
            dev_lat[d] = lat_s[sd]
        for l in range(L):
            if not every_layer and not layers[n, s, l]:
                continue
            dev_l = dev[n, l]
            tier_l = tier[n, l]
            bits_l = bits[n, l]
            quality_l = 0.0
            miss_l = 0.0
            choice_l = False
            loaded_l = False  # the layer's routing depends on infl (a replica choice or a GPU/CPU path decision)
            k_l = 0.0  # experts a token uses in this layer: the sum of its inclusion probabilities (top_k)
            for e in range(E):
                k_l += pop_s[l, e]
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
                    miss_l += p
                    continue
                if live == 1:  # no choice: only the path (GPU or CPU) is decided
                    d = dev_l[e, rd]
                    key_best = unit_row(d, tier_l[e, rd], bits_l[e, rd], bits_index)
                    akeep = ad * dev_keep[d]
                    udk = kept_use_probability(ud, p, batch_d, dev_keep[d])
                    gd = gpu_path_time(tab, key_best, udk, akeep, grouped[n, d, l])
                    gpu_best = True
                    t_best = gd
                    if tier_l[e, rd] != GPU_TIER:
                        loaded_l = True
                        cd = path_time(tab, key_best, CPU_PATH, udk, akeep)
                        if max(pv[d] + gd * inf_n[d] - pmx, 0.0) > cd * inf_n[D + dev_server[d]]:
                            gpu_best = False
                            t_best = cd
                else:
                    choice_l = True
                    loaded_l = True
                    if lat_dirty:
                        lat_run = expected_max_latency(order, lat_s, none_d)
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
                                if (
                                    target < 0
                                    or lat_s[sd] < lat_s[target]
                                    or (lat_s[sd] == lat_s[target] and sd < target)
                                ):
                                    target = sd
                    best = np.inf
                    best_own = np.inf
                    udk = ud
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
                        key = unit_row(d, tier_l[e, r], bits_l[e, r], bits_index)
                        akeep = ad * dev_keep[d]
                        udk_r = kept_use_probability(ud, p, batch_d, dev_keep[d])
                        gd = gpu_path_time(tab, key, udk_r, akeep, grouped[n, d, l])
                        cd = path_time(tab, key, CPU_PATH, udk_r, akeep)
                        # tokens that newly cross to sd (a token crosses once, whatever number of experts it uses)
                        m0 = token_mass[sd]
                        comm = batch_d * (destination_share(m0 + p, k_l) - destination_share(m0, k_l)) * dev_ct[d]
                        if dev_fuse[d] > 0.0:
                            comm *= fused_share(p, ad, dev_keep[d], dev_fuse[d])
                        lat = dev_lat[d]
                        dlat = 0.0
                        if sd != s and udk_r > 0.0:
                            keep_none = none_d[sd]
                            none_d[sd] = keep_none * (1.0 - udk_r)
                            dlat = expected_max_latency(order, lat_s, none_d) - lat_run
                            none_d[sd] = keep_none
                        pg = gd * inf_n[d]
                        pc = cd * inf_n[D + sd]
                        dg = max(pv[d] + pg - pmx, 0.0)
                        use_gpu = dg <= pc
                        inc = (dg if use_gpu else pc) + comm + dlat
                        own = (pg if use_gpu else pc) + comm + lat * udk_r
                        if inc < best or (inc == best and own < best_own):
                            best = inc
                            best_own = own
                            udk = udk_r
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
                upk = kept_use_probability(up, p, batch_p, dev_keep[d])
                gp = gpu_path_time(tab, key_best, upk, akeep, grouped[n, d, l])
                cpu_p = False
                cp = 0.0
                if tier_l[e, rd] != GPU_TIER:  # GPU-tier experts have no CPU path
                    cp = path_time(tab, key_best, CPU_PATH, upk, akeep)
                    cpu_p = max(acc_p[d] + gp - mxg_p, 0.0) > cp
                if cpu_p:
                    acc_p[D + sd] += cp
                    touched[D + sd] = True
                else:
                    acc_p[d] += gp
                    mxg_p = max(mxg_p, acc_p[d])
                    touched[d] = True
                quality_l += p * qloss[bits_l[e, rd]]
                if params.continuous:  # what `decode_grid` costs at other batches
                    out.chosen[n, s, l, e] = 2 * rd + (0 if gpu_best else 1)
                # own-server entries accumulate too and are ignored when the layer closes
                token_mass[sd] += p
                none_d[sd] *= 1.0 - udk
                none_p[sd] *= 1.0 - upk
                cross[sd] += p
                if sd != s:
                    lat_dirty = True
            # close the layer: GPUs in parallel, CPU-path work and transfers serial
            tr = trow[n] if record else 0
            mx_d = 0.0
            mx_p = 0.0
            for u in range(U):
                if record:
                    terms[tr, s, l, LT_BUSY + u] = acc_d[u]
                    terms[tr, s, l, LT_BUSY + U + u] = acc_p[u]
                if touched[u]:
                    if u < D:
                        mx_d = max(mx_d, acc_d[u])
                        mx_p = max(mx_p, acc_p[u])
                        if scaled:
                            pacc[u] = 0.0
                    else:
                        mx_d += acc_d[u]
                        mx_p += acc_p[u]
                    o_busy[n, s, u, DECODE] += acc_d[u]
                    o_busy[n, s, u, PREFILL] += acc_p[u]
                    acc_d[u] = 0.0
                    acc_p[u] = 0.0
                    touched[u] = False
            o_time[n, s, DECODE, EXPERT_S] += mx_d
            o_time[n, s, PREFILL, EXPERT_S] += mx_p
            none_d[s] = 1.0
            none_p[s] = 1.0
            token_mass[s] = 0.0
            for s2 in range(S):  # per-destination dispatch: one row per token and destination (`destination_rows`)
                q = destination_share(token_mass[s2], k_l)
                if q > 0.0:
                    tok_d[s2] = batch_d * q
                    tok_p[s2] = batch_p * q
                    frac = fuse_frac[n, s, s2]
                    if frac > 0.0:
                        tok_d[s2] *= fused_share(q, tok_d[s2], keep[n, s, s2], frac)
                        tok_p[s2] *= fused_share(q, tok_p[s2], keep[n, s, s2], frac)
                token_mass[s2] = 0.0
            lat_d = expected_max_latency(order, lat_s, none_d)
            lat_p = expected_max_latency(order, lat_s, none_p)
            o_time[n, s, DECODE, LATENCY_S] += lat_d
            o_time[n, s, PREFILL, LATENCY_S] += lat_p
            tr_d = 0.0  # the layer's transfer bandwidth seconds
            tr_p = 0.0
            for s2 in range(S):
                rows_d = 0.0
                rows_p = 0.0
                if none_d[s2] < 1.0 or tok_d[s2] > 0.0:
                    rows_d = tok_d[s2]
                    tr_d += rows_d * transfer_s[n, s, s2]
                    o_pair[n, s, s2, DECODE] += rows_d
                    tok_d[s2] = 0.0
                    none_d[s2] = 1.0
                if none_p[s2] < 1.0 or tok_p[s2] > 0.0:
                    rows_p = tok_p[s2]
                    tr_p += rows_p * transfer_s[n, s, s2]
                    o_pair[n, s, s2, PREFILL] += rows_p
                    tok_p[s2] = 0.0
                    none_p[s2] = 1.0
                if record:
                    terms[tr, s, l, LT_BUSY + 2 * U + s2] = rows_d
                    terms[tr, s, l, LT_BUSY + 2 * U + S + s2] = rows_p
                    terms[tr, s, l, LT_BUSY + 2 * U + 2 * S + s2] = cross[s2]
                cross_tot[s2] += cross[s2]
                cross[s2] = 0.0
            o_time[n, s, DECODE, TRANSFER_S] += tr_d
            o_time[n, s, PREFILL, TRANSFER_S] += tr_p
            quality += quality_l
            miss += miss_l
            choice = choice or choice_l
            if record:
                t = terms[tr, s, l]
                t[LT_EXPERT_D], t[LT_EXPERT_P], t[LT_TRANSFER_D], t[LT_TRANSFER_P] = mx_d, mx_p, tr_d, tr_p
                t[LT_LATENCY_D], t[LT_LATENCY_P], t[LT_QUALITY], t[LT_MISS] = lat_d, lat_p, quality_l, miss_l
                t[LT_CHOICE] = 1.0 if choice_l else 0.0
                t[LT_LOADED] = 1.0 if loaded_l else 0.0
        out.quality[n, s] = quality
        out.miss[n, s] = miss
        if choice:
            o_choice[n] = True
        for s2 in range(S):
            if s2 != s:
                out.cross[n, s, s2] = cross_tot[s2]


@njit(cache=True)
def migration_source(
    old_dev: np.ndarray,
    old_tier: np.ndarray,
    old_bits: np.ndarray,
    bits: int,
    dst: int,
    dev_server: np.ndarray,
    server_up: np.ndarray,
    pair_lat: np.ndarray,
) -> int:
    """The one migration source rule (surrogate and real backend): the replica slot q (of an expert's old replicas
    [R]) a new copy of `bits` bits on server `dst` is made from, or -1 (the cloud / checkpoint store). Candidates:
    old replicas with >= `bits` bits on live servers (server_up [S]). Chosen: the lexicographic minimum of
    (latency key, tier, -bits, device), the latency key being 0 on `dst` itself (a local requantize / copy) and
    pair_lat[src, dst] + 1 for a peer: a local copy first, else the nearest peer; on equal latency the fastest
    tier, then the highest precision, then the lowest device (deterministic, whatever the replica order).
    (`migration_source_at` on the replicas reshaped to [1, 1, 1, R].)"""
    R = old_dev.shape[0]
    return migration_source_at(
        np.ascontiguousarray(old_dev).reshape(1, 1, 1, R),
        np.ascontiguousarray(old_tier).reshape(1, 1, 1, R),
        np.ascontiguousarray(old_bits).reshape(1, 1, 1, R),
        0,
        0,
        0,
        bits,
        dst,
        dev_server,
        server_up,
        pair_lat,
    )


@njit(cache=True, inline="always")
def migration_source_at(
    old_dev: np.ndarray,
    old_tier: np.ndarray,
    old_bits: np.ndarray,
    n: int,
    l: int,
    e: int,
    bits: int,
    dst: int,
    dev_server: np.ndarray,
    server_up: np.ndarray,
    pair_lat: np.ndarray,
) -> int:
    """`migration_source` of expert (l, e) of plan n in stacked replicas [N, L, E, R] (indexed in place: a view per
    expert costs more than this rule's work)."""
    best = -1
    best_lat, best_tier, best_bits, best_dev = 0.0, 0, 0, 0
    for q in range(old_dev.shape[3]):
        od, ot, ob = old_dev[n, l, e, q], old_tier[n, l, e, q], old_bits[n, l, e, q]
        if od < 0 or ob < bits:
            continue
        src = dev_server[od]
        if not server_up[src]:
            continue
        lat = 0.0 if src == dst else pair_lat[src, dst] + 1.0
        if best >= 0:
            if lat != best_lat:
                if lat > best_lat:
                    continue
            elif ot != best_tier:
                if ot > best_tier:
                    continue
            elif ob != best_bits:
                if ob < best_bits:
                    continue
            elif od >= best_dev:
                continue
        best, best_lat, best_tier, best_bits, best_dev = q, lat, ot, ob, od
    return best


@njit(cache=True)
def migration(
    old: Replicas,
    new: Replicas,
    dev_server: np.ndarray,
    server_up: np.ndarray,
    pair_lat: np.ndarray,
    expert_bytes: np.ndarray,
    out: MigrationOut,
) -> None:
    """Per plan pair n and new replica absent from the old plan, pick its source by `migration_source` (a local
    copy with >= bits, else the nearest live peer with >= bits, server_up [N, S], else the cloud) and add its bytes."""
    N, L, E, R = new.dev.shape
    odv, otr, obt, ndv, ntr, nbt = old.dev, old.tier, old.bits, new.dev, new.tier, new.bits
    for n in range(N):  # indexed element by element: a view per expert costs more than the expert's work
        up_n = server_up[n]
        for l in range(L):
            for e in range(E):
                for r in range(R):
                    d = ndv[n, l, e, r]
                    if d < 0:
                        continue
                    t, b = ntr[n, l, e, r], nbt[n, l, e, r]
                    present = False
                    for q in range(R):
                        if odv[n, l, e, q] == d and otr[n, l, e, q] == t and obt[n, l, e, q] == b:
                            present = True
                    if present:
                        continue
                    out.counts[n, ADDED] += 1
                    dst = dev_server[d]
                    w = expert_bytes[b]
                    src_q = migration_source_at(odv, otr, obt, n, l, e, b, dst, dev_server, up_n, pair_lat)
                    best_src = dev_server[odv[n, l, e, src_q]] if src_q >= 0 else -1
                    if best_src == dst:
                        out.bytes[n, dst, LOCAL] += w
                    elif best_src >= 0:
                        out.bytes[n, dst, PEER] += w
                        out.pair[n, best_src, dst] += w
                    else:
                        out.bytes[n, dst, CLOUD] += w
                for q in range(R):
                    od = odv[n, l, e, q]
                    if od < 0:
                        continue
                    kept = False
                    for r in range(R):
                        if (
                            ndv[n, l, e, r] == od
                            and ntr[n, l, e, r] == otr[n, l, e, q]
                            and nbt[n, l, e, r] == obt[n, l, e, q]
                        ):
                            kept = True
                    if not kept:
                        out.counts[n, REMOVED] += 1


@njit(cache=True)
def memory_kernel(
    dev: np.ndarray,
    tier: np.ndarray,
    bits: np.ndarray,
    dev_server: np.ndarray,
    ebytes: np.ndarray,
    o_gpu: np.ndarray,
    o_cpu: np.ndarray,
    o_ssd: np.ndarray,
) -> None:
    """Expert bytes per GPU [N, D], per server in CPU RAM and on SSD [N, S] for a batch of plans (positional:
    coel_env.plan.repair calls it too)."""
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
                    if t == GPU_TIER:
                        o_gpu[n, d] += w
                    elif t == CPU_TIER:
                        o_cpu[n, dev_server[d]] += w
                    else:
                        o_ssd[n, dev_server[d]] += w


@njit(cache=True)
def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The smallest value whose cumulative weight (values ascending) reaches q of the total."""
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


@njit(cache=True, fastmath=True)
def plan_utilization(
    busy_n: np.ndarray,
    lam: np.ndarray,
    batch: np.ndarray,
    ne_pre: np.ndarray,
    ne_dec: np.ndarray,
    dev_server: np.ndarray,
    out_mean: float,
    rho_n: np.ndarray,
) -> None:
    """rho_n[u]: offered utilization of every unit (GPUs, then CPUs) by one plan's servers at decode batches
    batch [S]: sum over servers of lam * `per_request` busy seconds, the non-expert part of each request on its own
    server's GPUs included."""
    S, U = busy_n.shape[0], busy_n.shape[1]
    D = dev_server.shape[0]
    for u in range(U):
        rho_n[u] = 0.0
    for s in range(S):
        ls = lam[s]
        if ls <= 0.0:
            continue
        b = batch[s]
        for u in range(U):
            rho_n[u] += ls * per_request(busy_n[s, u, PREFILL], busy_n[s, u, DECODE], out_mean, b)
    for d in range(D):
        s = dev_server[d]
        rho_n[d] += lam[s] * per_request(ne_pre[s], ne_dec[s], out_mean, batch[s])


@njit(cache=True, fastmath=True)
def unit_utilization(
    plans: Plans, busy: np.ndarray, st: States, dev_server: np.ndarray, out_mean: float, rho: np.ndarray
) -> None:
    """`plan_utilization` of every plan at its state's decode batch (States.batch)."""
    for n in range(busy.shape[0]):
        si = plans.state[n]
        plan_utilization(busy[n], st.lam[si], st.batch[si], st.ne_pre[si], st.ne_dec[si], dev_server, out_mean, rho[n])


@njit(cache=True, fastmath=True)
def queue_inflation(rho: np.ndarray, out: np.ndarray) -> None:
    """The router's load-aware scale of each unit's time: `md1_factor`, uncapped (a saturated unit's marginal work
    costs drops, not just waiting), at most MAX_INFLATION (rho >= 1)."""
    for n in range(rho.shape[0]):
        for u in range(rho.shape[1]):
            r = rho[n, u]
            out[n, u] = MAX_INFLATION if r >= 1.0 else min(md1_factor(r), MAX_INFLATION)


@njit(cache=True, fastmath=True)
def lockstep_steps(
    busy_n: np.ndarray,
    lam_n: np.ndarray,
    ne_dec_n: np.ndarray,
    ne_pre_n: np.ndarray,
    comm_d: np.ndarray,
    comm_p: np.ndarray,
    overhead: float,
    overhead_p: float,
    out_mean: float,
    up_n: np.ndarray,
    handoff: float,
    tpot: np.ndarray,
    ttft: np.ndarray,
) -> None:
    """Lock-step serving (expert parallelism: every live server runs each step and all meet at every MoE layer).
    Server s's step waits for the slowest active server and for every unit's work from all active servers. Server
    s2 is active with probability a = `busy_probability`(lam, e2e); mean-field over the others: decode step =
    max(E[max of the isolated steps of s and the active others], own non-expert + transfers + the busiest unit's
    expected work); a prefill meets the others' typical step (1 prefill + O-1 decode steps per request). Servers
    sharing one GPU add to a decode step `handoff` seconds per hand-off to each other live server: 1 + a of them
    (the graph-replayed decode layers sync with the host at every exchange; the eager prefill's per-layer cost is
    `overhead_p`).
    tpot/ttft: isolated step times in, lock-step times out."""
    S, U = busy_n.shape[0], busy_n.shape[1]
    act = np.zeros(S)
    typ = np.zeros(S)
    for s in range(S):
        e2e = request_latency(ttft[s], tpot[s], out_mean)
        if lam_n[s] > 0.0:
            act[s] = busy_probability(lam_n[s], e2e)
        typ[s] = e2e / out_mean
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
                    other += act[s2] * busy_n[s2, u, DECODE]
            w_d = max(w_d, busy_n[s, u, DECODE] + other)
            w_p = max(w_p, busy_n[s, u, PREFILL] + other)
        turns = 0.0
        for s2 in range(S):
            if s2 != s and up_n[s2]:
                turns += 1.0 + act[s2]
        new_d[s] = max(e_d, ne_dec_n[s] + comm_d[s] + overhead + w_d) + turns * handoff
        new_p[s] = max(e_p, ne_pre_n[s] + comm_p[s] + overhead_p + w_p)
    for s in range(S):
        tpot[s] = new_d[s]
        ttft[s] = new_p[s]


@njit(cache=True, fastmath=True)
def _add_on_route(route: np.ndarray, s: int, s2: int, amount: float, link: np.ndarray) -> None:
    """link[k] += amount on every physical link k of the route s -> s2 (route [S, S, H], padded with -1)."""
    for h in range(route.shape[2]):
        k = route[s, s2, h]
        if k < 0:
            break
        link[k] += amount


@njit(cache=True, fastmath=True)
def decode_grid(
    plans: Plans,
    keep: np.ndarray,
    st: States,
    topo: Topology,
    params: Params,
    chosen: np.ndarray,
    grouped: np.ndarray,
    out: np.ndarray,
) -> None:
    """out[n, s, g]: expert seconds of server s's decode step at batch B = batch_grid[g], on the replicas and paths
    the routing chose (`chosen`): each expert at `path_time` with uses `use_probability`(p keep, B) and tokens B p keep,
    a layer the max over GPUs plus the CPU-path work (as `route_pass` closes a layer)."""
    N, L, E, _ = plans.dev.shape
    S = st.up.shape[1]
    dev_server = topo.dev_server
    D = dev_server.shape[0]
    U = D + S
    grid = params.batch_grid
    G = grid.shape[0]
    acc = np.zeros((U, G))
    touched = np.zeros(U, dtype=np.bool_)
    for n in range(N):
        si = plans.state[n]
        tab = st.table[si]
        for s in range(S):
            out[n, s, :] = 0.0
            if not st.up[si, s]:
                continue
            for l in range(L):
                for e in range(E):
                    c = chosen[n, s, l, e]
                    if c < 0:
                        continue
                    r = c // 2
                    path = CPU_PATH if c % 2 else GPU_PATH
                    d = plans.dev[n, l, e, r]
                    sd = dev_server[d]
                    key = unit_row(d, plans.tier[n, l, e, r], plans.bits[n, l, e, r], params.bits_index)
                    p = st.pop[si, s, l, e]
                    kp = keep[n, s, sd]
                    lq = np.log1p(-min(p * kp, 1.0 - 1e-12))
                    unit = d if path == GPU_PATH else D + sd
                    grp = path == GPU_PATH and grouped[n, d, l]
                    for g in range(G):
                        b = grid[g]
                        u_b = use_probability(p * kp, b, lq)
                        if grp:
                            acc[unit, g] += gpu_path_time(tab, key, u_b, b * p * kp, True)
                        else:
                            acc[unit, g] += path_time(tab, key, path, u_b, b * p * kp)
                    touched[unit] = True
                for g in range(G):
                    mx = 0.0
                    cpu = 0.0
                    for u in range(U):
                        if touched[u]:
                            if u < D:
                                mx = max(mx, acc[u, g])
                            else:
                                cpu += acc[u, g]
                    out[n, s, g] += mx + cpu
                for u in range(U):
                    if touched[u]:
                        acc[u, :] = 0.0
                        touched[u] = False


@njit(cache=True, fastmath=True)
def decode_step_at(m: StepModel, b: float) -> float:
    """Decode step seconds at batch b: experts (`decode_grid`) + non-expert part (KV reads, attention) at b, both
    `interp_log2` on the batch grid, + transfers (bandwidth time grows with the tokens: transfer_ref * b / B_ref)
    + `fixed` (round-trip latency and per-step overhead)."""
    return (
        interp_log2(m.grid, m.expert, b)
        + interp_log2(m.grid, m.non_expert, b)
        + m.transfer_ref * b / m.batch_ref
        + m.fixed
    )


@njit(cache=True, fastmath=True)
def sequence_s(m: StepModel, b: float, params: Params, in_mean: float, out_mean: float, prefill_share: float) -> float:
    """Seconds a request holds a batch slot at batch b: `prefill_in_steps` + (O - 1) decode steps, the decode
    steps stretched by the server's share of time in prefills, 1 / (1 - prefill_share)."""
    step = decode_step_at(m, b)
    pre = prefill_in_steps(m.ttft_iso, step, in_mean, params.chunk_tokens, b, params.chunked)
    return pre + (out_mean - 1.0) * step / (1.0 - prefill_share)


@njit(cache=True, fastmath=True)
def synchronized_rounds(params: Params, batch: float) -> bool:
    """A closed loop of `batch` running equal-length requests whose prompts fit one step's token budget runs in
    rounds: its clients start together and finish together, so each round is one prefill step of the batch, then
    O - 1 decode steps at that batch, and no prefill shares a decode step (vLLM's benchmark with --max-concurrency
    and fixed lengths at small concurrency; the calibration's saturating windows). Varied lengths, or prompts the
    scheduler admits over several steps, drift apart into the steady state of `continuous_batching`."""
    in_q, out_q = params.in_q, params.out_q
    one_step = batch * in_q[0] <= max(params.chunk_tokens, in_q[0])
    same = in_q.max() == in_q.min() and out_q.max() == out_q.min()
    return params.concurrency > 0.0 and same and one_step


@njit(cache=True, fastmath=True)
def round_prefill_s(ttft_iso: float, prefill_var: float, batch: float) -> float:
    """One prefill step of `batch` requests: one request's (ttft_iso) + (batch - 1) times its work that grows with
    the tokens (prefill_var: expert, transfer and non-expert seconds); the per-step overheads and latency once."""
    return ttft_iso + (batch - 1.0) * prefill_var


@njit(cache=True, fastmath=True)
def busy_slots_share(
    m: StepModel, b: float, params: Params, in_mean: float, out_mean: float, prefill_work: float, upper: float
) -> float:
    """The GPUs' share of time in prefills when b slots are always busy: the root in [0, upper] of
    share = b / `sequence_s`(b, share) * prefill_work (the admitted rate times a prefill's GPU work; the right side
    falls as the share grows, so there is one root; bisection)."""
    lo, hi = 0.0, upper
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if mid > b / sequence_s(m, b, params, in_mean, out_mean, mid) * prefill_work:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


@njit(cache=True, fastmath=True)
def continuous_batching(
    expert: np.ndarray,
    non_expert: np.ndarray,
    kv_bytes: np.ndarray,
    lam: np.ndarray,
    up: np.ndarray,
    transfer_ref: np.ndarray,
    batch_ref: np.ndarray,
    fixed: np.ndarray,
    ttft_iso: np.ndarray,
    prefill_work: np.ndarray,
    prefill_var: np.ndarray,
    params: Params,
    in_mean: float,
    out_mean: float,
    tpot: np.ndarray,
    ttft: np.ndarray,
    wait: np.ndarray,
    batch: np.ndarray,
    admit_drop: np.ndarray,
    served: np.ndarray,
) -> None:
    """Continuous batching per server s of one plan (vLLM/SGLang semantics). Slots: c = `kv_sequences` of the
    KV bytes the plan leaves. The running batch is the fixed point of Little's law B = lam * `sequence_s`(B),
    1 <= B <= c (bisection; `sequence_s` grows with B). If lam * `sequence_s`(c) >= c the server saturates: it
    serves mu = c / `sequence_s`(c) requests/s, admission drops the rest (1 - mu / lam) and the admitted wait
    max_wait_s; otherwise the wait is `erlang_c_wait`(c, lam * S, S). Decode steps share the GPUs with prefills:
    prefill_share = lam * prefill_work (at most MAX_RHO). A server with no KV room for one sequence serves nothing.
    With a closed-loop workload (`concurrency` C requests per server always in the system, as a benchmark that
    submits them all at once) b = min(C, c) slots are busy, the server completes b / S(b) requests/s (`served`;
    0 otherwise) and the C - b waiting ones wait (C - b) / that rate; equal lengths whose b prompts fit one step run
    in `synchronized_rounds` (prefill_var: a prefill's seconds that grow with its tokens, `round_prefill_s`).
    Out: tpot (stretched by prefills), ttft without the wait (`prefill_in_steps`), wait, batch, admit_drop, served."""
    S = lam.shape[0]
    grid = params.batch_grid
    for s in range(S):
        cap = kv_sequences(kv_bytes[s], params.kv_tok, params.held_tokens, params.max_seqs)
        share = min(lam[s] * prefill_work[s], MAX_RHO) if up[s] else 0.0
        m = StepModel(grid, expert[s], non_expert[s], transfer_ref[s], batch_ref[s], fixed[s], ttft_iso[s])
        b = 1.0
        admit_drop[s] = 0.0
        wait[s] = 0.0
        served[s] = 0.0
        first = -1.0  # a round's batched prefill (`synchronized_rounds`), else the steady state's
        if not up[s] or cap < 1.0:
            admit_drop[s] = 1.0
        elif params.concurrency > 0.0:  # closed loop: `concurrency` requests always in the system
            b = min(params.concurrency, cap)
            if synchronized_rounds(params, b):
                share = 0.0
                first = round_prefill_s(m.ttft_iso, prefill_var[s], b)
                svc = first + (out_mean - 1.0) * decode_step_at(m, b)
            else:
                share = busy_slots_share(m, b, params, in_mean, out_mean, prefill_work[s], MAX_RHO)
                svc = sequence_s(m, b, params, in_mean, out_mean, share)
            served[s] = b / svc
            wait[s] = (params.concurrency - b) / served[s]  # the clients beyond the slots wait their turn
        elif lam[s] > 0.0:
            svc = sequence_s(m, cap, params, in_mean, out_mean, share)
            # the smallest batch where lam * S(B) <= B (S can jump with chunked prefill: scan up from 1 by 1.25x)
            lo, hi = 0.0, -1.0
            probe = 1.0
            while probe < cap * 1.25:
                bb = min(probe, cap)
                if lam[s] * sequence_s(m, bb, params, in_mean, out_mean, share) <= bb:
                    hi = bb
                    break
                lo = bb
                probe *= 1.25
            if hi < 0.0 or lam[s] * prefill_work[s] >= MAX_RHO:  # saturated: every slot (or the GPUs) busy
                b = cap
                share = busy_slots_share(m, cap, params, in_mean, out_mean, prefill_work[s], share)
                svc = sequence_s(m, cap, params, in_mean, out_mean, share)
                admit_drop[s] = max(1.0 - cap / svc / lam[s], 0.0)
                wait[s] = params.max_wait_s
            else:
                if lo >= 1.0:  # bisection between the last batch above the line and the first one below
                    for _ in range(40):
                        mid = 0.5 * (lo + hi)
                        if lam[s] * sequence_s(m, mid, params, in_mean, out_mean, share) > mid:
                            lo = mid
                        else:
                            hi = mid
                    b = 0.5 * (lo + hi)
                svc = sequence_s(m, b, params, in_mean, out_mean, share)
                wait[s] = min(erlang_c_wait(cap, lam[s] * svc, svc), params.max_wait_s)
        step = decode_step_at(m, b)
        batch[s] = b
        tpot[s] = step / (1.0 - share)
        if first < 0.0:
            first = prefill_in_steps(m.ttft_iso, step, in_mean, params.chunk_tokens, b, params.chunked)
        ttft[s] = first


@njit(cache=True, fastmath=True)
def closed_loop_link_slowdown(
    rho_l: np.ndarray, lam: np.ndarray, offered: np.ndarray, tpot: np.ndarray, ttft: np.ndarray, wait: np.ndarray
) -> bool:
    """A closed loop's clients behind an overloaded link (utilization rho > 1 on their busiest route) slow down
    rather than drop: the link caps their completions at lam / rho, and by Little's law (C = lam W) every request
    takes rho times as long (its steps wait for the link). Scaling each server by its own busiest link's rho brings
    every link within capacity (each of its senders is scaled by at least its rho). Returns whether any was."""
    slowed = False
    for s in range(lam.shape[0]):
        f = rho_l[s]
        if f > 1.0:
            lam[s] /= f
            offered[s] /= f
            tpot[s] *= f
            ttft[s] *= f
            wait[s] *= f
            slowed = True
    return slowed


@njit(cache=True, fastmath=True)
def busiest_link(per_req: np.ndarray, rates: np.ndarray, route: np.ndarray, cap: np.ndarray, rho_l: np.ndarray) -> None:
    """rho_l[s]: utilization of the busiest physical link on server s's routes, the links loaded (both directions)
    by every server's rates [S] * bytes per request per_req [S, S] (capacities cap [K])."""
    S, H = per_req.shape[0], route.shape[2]
    link = np.zeros(cap.shape[0])
    for s in range(S):
        for s2 in range(S):
            if per_req[s, s2] > 0.0:
                _add_on_route(route, s, s2, rates[s] * per_req[s, s2] * 2.0, link)
    for s in range(S):
        r_l = 0.0
        for s2 in range(S):
            if per_req[s, s2] > 0.0:
                for h in range(H):
                    k = route[s, s2, h]
                    if k < 0:
                        break
                    r_l = max(r_l, link[k] / cap[k])
        rho_l[s] = r_l


@njit(cache=True, fastmath=True)
def finish(
    plans: Plans,
    keep: np.ndarray,
    so: ServeOut,
    st: States,
    topo: Topology,
    params: Params,
    window: float,
    rho: np.ndarray,
    grid: np.ndarray,
    out: Outputs,
) -> None:
    """Batching, link contention, queueing, percentiles, energy and quality per plan.
    rho[n, u] receives each unit's utilization (`unit_utilization`). A server's requests queue behind the busiest
    unit they use (`md1_factor`, utilization capped at MAX_RHO); transfers are slowed by the same factor of the
    busiest link on their routes; `drop_share` drops the requests beyond the capacity of that bottleneck, unit or
    link, and dropped requests carry no bytes. out.link_bytes = bytes per link in the window, both directions summed.
    With `lockstep` the servers' steps are coupled (`lockstep_steps`), and that serving batches continuously too:
    each server's coupled / isolated step ratio scales its step model, and its KV slots are max_batch whatever
    the plan places (the real backend). Host contention (servers sharing cores) stretches every part of a step.
    With `continuous` (continuous batching) none of the M/D/1 factors apply: each server's
    batch, admission drops and queue wait come from `continuous_batching` (host contention inside its step model),
    links and units carry the admitted requests (`busiest_link`, `plan_utilization` at the running batch) and
    `drop_share` drops what they cannot carry. Requests are costed on a grid of input x output length quantiles
    (`prefill_s`, `request_latency`), energy per unit with `unit_power`, transfer quality with `pair_quality_loss`."""
    state, prune, fuse = plans.state, plans.prune, plans.fuse
    o_time, o_pair, o_busy, o_quality, o_miss, o_cross = so.time, so.pair_tokens, so.busy, so.quality, so.miss, so.cross
    up, lam_all, rate, batch_all, ne_dec, ne_pre = st.up, st.lam, st.rate, st.batch, st.ne_dec, st.ne_pre
    link_cap, contention = st.link_cap, st.contention
    dev_server, pair_index, route = topo.dev_server, topo.pair_index, topo.route
    in_q, out_q, p_idle, p_max = params.in_q, params.out_q, params.p_idle, params.p_max
    wire, slo, lm = params.wire_bytes, params.slo_s, params.moe_uses
    ungrouped = np.zeros(plans.dev.shape[0])
    if params.ungrouped_overhead_s > 0.0:
        ungrouped_layer_counts(plans, params.grouped_bits, ungrouped)
    N, S = o_time.shape[0], o_time.shape[1]
    D = dev_server.shape[0]
    U = D + S
    K = link_cap.shape[1]
    Q = in_q.size
    # numba's means of the grids; the routing passes use numpy's (params.in_mean / out_mean), an ulp apart at
    # times: kept as recorded in the golden outputs (a weighted p95 at a cumulative-weight boundary can flip)
    I = in_q.mean()
    O = out_q.mean()
    unit_utilization(plans, o_busy, st, dev_server, O, rho)
    for n in range(N):
        si = state[n]
        lam, batch = lam_all[si], batch_all[si]
        # fixed seconds of a decode / prefill step: per layer, and per layer some GPU runs on the per-expert path
        overhead = params.step_overhead_s + ungrouped[n] * params.ungrouped_overhead_s
        overhead_p = params.prefill_overhead_s + ungrouped[n] * params.ungrouped_overhead_s
        # bytes per request to each other server, and the offered load of every link (both directions)
        per_req = np.zeros((S, S))
        for s in range(S):
            for s2 in range(S):
                if s2 == s:
                    continue
                tokens = per_request(o_pair[n, s, s2, PREFILL], o_pair[n, s, s2, DECODE], O, batch[s])
                per_req[s, s2] = tokens * wire * keep[n, s, s2]
        # isolated step times: expert time + transfers (slowed by their busiest link) + non-expert part
        tpot = np.zeros(S)
        ttft = np.zeros(S)
        comm_d = np.zeros(S)
        comm_p = np.zeros(S)
        rho_l = np.zeros(S)  # busiest link on the routes of each server's transfers
        busiest_link(per_req, lam, route, link_cap[si], rho_l)
        for s in range(S):
            r_l = rho_l[s]
            # the servers' M/D/1 waiting factor on the transfers (continuous batching: link overload drops instead)
            inflate = 1.0 if params.continuous else md1_factor(min(r_l, MAX_RHO))
            comm_d[s] = o_time[n, s, DECODE, TRANSFER_S] * inflate + o_time[n, s, DECODE, LATENCY_S]
            comm_p[s] = o_time[n, s, PREFILL, TRANSFER_S] * inflate + o_time[n, s, PREFILL, LATENCY_S]
            tpot[s] = o_time[n, s, DECODE, EXPERT_S] + comm_d[s] + ne_dec[si, s] + overhead
            ttft[s] = o_time[n, s, PREFILL, EXPERT_S] + comm_p[s] + ne_pre[si, s] + overhead_p
        wait = np.zeros(S)  # admission queue wait (continuous batching)
        offered = rate[si]  # requests/s arriving per server
        closed_rate = np.zeros(S)
        admit_drop = np.zeros(S)
        couple_d = np.ones(S)  # lock-step: a server's step / its isolated step (`lockstep_steps`)
        couple_p = np.ones(S)
        if params.lockstep:
            iso_d = tpot.copy()
            iso_p = ttft.copy()
            lockstep_steps(
                o_busy[n],
                lam,
                ne_dec[si],
                ne_pre[si],
                comm_d,
                comm_p,
                overhead,
                overhead_p,
                O,
                up[si],
                params.handoff_s,
                tpot,
                ttft,
            )
            for s in range(S):
                couple_d[s] = tpot[s] / iso_d[s] if iso_d[s] > 0.0 else 1.0
                couple_p[s] = ttft[s] / iso_p[s] if iso_p[s] > 0.0 else 1.0
        if params.continuous:
            kv_bytes = st.kv_room[si].copy()
            if params.lockstep:  # the real backend: KV slots for max_batch sequences whatever the plan
                kv_bytes[:] = np.inf
            for d in range(D):
                kv_bytes[dev_server[d]] -= out.gpu_mem[n, d]
            c_host = contention[si]  # shared host cores stretch every part of a step, inside the fixed point
            fixed = np.empty(S)
            transfer_d = np.empty(S)  # decode transfer bandwidth seconds at the reference batch
            prefill_work = np.empty(S)  # GPU seconds of a prefill (what decode steps share the server with)
            prefill_var = np.empty(S)  # its seconds that grow with the tokens (`round_prefill_s`)
            run_batch = np.empty(S)
            expert_grid = grid[n] * c_host
            ne_grid = st.ne_dec_grid[si] * c_host
            for s in range(S):  # lock-step coupling scales a server's whole step model (mean field)
                fixed[s] = (o_time[n, s, DECODE, LATENCY_S] + overhead) * c_host * couple_d[s]
                transfer_d[s] = o_time[n, s, DECODE, TRANSFER_S] * c_host * couple_d[s]
                # a prefill's GPU work, and what an eager prefill step costs beyond a decode step's overhead
                extra_p = max(overhead_p - overhead, 0.0)
                var_p = o_time[n, s, PREFILL, EXPERT_S] + o_time[n, s, PREFILL, TRANSFER_S] + ne_pre[si, s]
                prefill_var[s] = var_p * c_host * couple_p[s]
                prefill_work[s] = (o_time[n, s, PREFILL, EXPERT_S] + ne_pre[si, s] + extra_p) * c_host * couple_p[s]
                expert_grid[s] *= couple_d[s]
                ne_grid[s] *= couple_d[s]
            continuous_batching(
                expert_grid,
                ne_grid,
                kv_bytes,
                lam,
                up[si],
                transfer_d,
                batch,
                fixed,
                ttft * c_host,
                prefill_work,
                prefill_var,
                params,
                I,
                O,
                tpot,
                ttft,
                wait,
                run_batch,
                admit_drop,
                closed_rate,
            )
            if params.concurrency > 0.0:  # a closed loop's rate is what its servers complete; a server that cannot
                # serve keeps its clients' reference rate (rate[si]), all of it dropped
                offered = np.where(closed_rate > 0.0, closed_rate, rate[si])
                lam = closed_rate
            admitted = lam * (1.0 - admit_drop)  # links and units carry the admitted requests
            busiest_link(per_req, admitted, route, link_cap[si], rho_l)
            if params.concurrency > 0.0 and closed_loop_link_slowdown(rho_l, lam, offered, tpot, ttft, wait):
                admitted = lam * (1.0 - admit_drop)
                busiest_link(per_req, admitted, route, link_cap[si], rho_l)
            # units' decode work at the running batch: each server's per-step busy seconds scaled as its expert
            # step (`decode_grid`) scales from the reference batch, the non-expert part at the running batch
            busy_run = o_busy[n].copy()
            ne_dec_run = np.empty(S)
            for s in range(S):
                ref = interp_log2(params.batch_grid, grid[n, s], batch[s])
                scale = interp_log2(params.batch_grid, grid[n, s], run_batch[s]) / ref if ref > 0.0 else 1.0
                for u in range(U):
                    busy_run[s, u, DECODE] *= scale
                ne_dec_run[s] = interp_log2(params.batch_grid, st.ne_dec_grid[si, s], run_batch[s])
            plan_utilization(busy_run, admitted, run_batch, ne_pre[si], ne_dec_run, dev_server, O, rho[n])
        else:
            for s in range(S):
                tpot[s] *= contention[si]
                ttft[s] *= contention[si]
        # queueing behind the bottleneck, drops, quality
        rho_unit = rho[n]
        served = np.zeros(S)
        drop = np.zeros(S)
        qual = np.zeros(S)
        for s in range(S):
            # the bottleneck: the busiest unit this server's requests use (its own GPUs always: non-expert part)
            rho_s = 0.0
            if lam[s] > 0.0:
                for u in range(U):
                    used = (
                        o_busy[n, s, u, DECODE] > 0.0
                        or o_busy[n, s, u, PREFILL] > 0.0
                        or (u < D and dev_server[u] == s)
                    )
                    if used:
                        rho_s = max(rho_s, rho_unit[u])
            if not params.continuous:  # continuous batching queues at admission (`continuous_batching`)
                queue = md1_factor(min(rho_s, MAX_RHO))
                ttft[s] *= queue
                tpot[s] *= queue
            ds = drop_share(I + O - 1.0, o_miss[n, s], max(rho_s, rho_l[s]))
            if admit_drop[s] > 0.0:  # admission drops first, then the routing/capacity share of the admitted
                ds = 1.0 - (1.0 - admit_drop[s]) * (1.0 - ds)
            drop[s] = ds if up[si, s] else 1.0
            served[s] = offered[s] * (1.0 - drop[s])
            q = o_quality[n, s] / lm
            for s2 in range(S):
                p = pair_index[s, s2]
                if p >= 0 and o_cross[n, s, s2] > 0.0:
                    loss = pair_quality_loss(
                        prune[n, p],
                        fuse[n, p],
                        params.prune_linear,
                        params.prune_knee,
                        params.prune_quadratic,
                        params.fusion_loss,
                    )
                    q += o_cross[n, s, s2] / lm * loss
            qual[s] = q
        # bytes the served requests carry (the offered load above decided contention and drops)
        link_n = out.link_bytes[n]
        for k in range(K):
            link_n[k] = 0.0
        for s in range(S):
            for s2 in range(S):
                if per_req[s, s2] > 0.0:
                    _add_on_route(route, s, s2, lam[s] * (1.0 - drop[s]) * per_req[s, s2] * 2.0 * window, link_n)
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
                pre = prefill_s(ttft[s], in_q[a], I)
                if params.continuous:
                    pre += wait[s]
                ttft_v[s * Q + a] = pre
                w_ttft[s * Q + a] = served[s] / Q
                for b in range(Q):
                    v = request_latency(pre, tpot[s], out_q[b])
                    e2e[i] = v
                    w_e2e[i] = served[s] / (Q * Q)
                    if v > slo:
                        late += w_e2e[i]
                    speed += w_e2e[i] * out_q[b] / v
                    i += 1
        tot = offered.sum()
        srv = served.sum()
        srv_safe = max(srv, 1e-30)
        dropped = 0.0
        for s in range(S):
            dropped += offered[s] * drop[s]
        energy = 0.0
        for u in range(U):
            util = min(rho_unit[u], 1.0)
            srv_of = dev_server[u] if u < D else u - D
            if up[si, srv_of]:
                energy += unit_power(p_idle[u], p_max[u], util)
            if u < D:
                out.device_util[n, u] = util
        sc = out.scalars[n]
        sc[TTFT_MEAN_S] = (
            (served * (wait + ttft)).sum() / srv_safe if params.continuous else (served * ttft).sum() / srv_safe
        )
        sc[TTFT_P95_S] = _weighted_quantile(ttft_v, w_ttft, 0.95)
        sc[TPOT_MEAN_S] = (served * tpot).sum() / srv_safe
        sc[TPOT_P95_S] = _weighted_quantile(tpot, served, 0.95)
        sc[E2E_MEAN_S] = (w_e2e * e2e).sum() / srv_safe
        sc[E2E_P95_S] = _weighted_quantile(e2e, w_e2e, 0.95)
        sc[TOKENS_PER_S] = srv * O
        sc[REQUEST_TOKENS_PER_S] = speed / srv_safe
        sc[ENERGY_J] = energy * window
        sc[QUALITY_LOSS] = (served * qual).sum() / srv_safe
        sc[DROPPED_FRAC] = dropped / max(tot, 1e-30)
        sc[LATE_FRAC] = (late + dropped) / max(tot, 1e-30)
        sc[REQUESTS] = tot * window
        sc[WINDOW_S] = window


# Metrics compared by `prefer_primary` (Outputs.scalars columns): a plan's extra replicas must not make any of
# these worse, unless they save requests
PRIMARY_CHECK = np.array(
    [TPOT_MEAN_S, TTFT_MEAN_S, E2E_MEAN_S, E2E_P95_S, TTFT_P95_S, TPOT_P95_S, DROPPED_FRAC], dtype=np.int64
)


@njit(cache=True, fastmath=True)
def serve_setup(plans: Plans, st: States, topo: Topology, params: Params) -> tuple[PairTerms, ServeOut, np.ndarray]:
    """What a serve of N plans starts from: `pair_terms`, zeroed ServeOut (the decode step's choices kept for
    continuous batching only: a [1, 1, 1, 1] stub otherwise) and `grouped_layers` [N, D, L]."""
    N, L, E = plans.dev.shape[0], plans.dev.shape[1], plans.dev.shape[2]
    S = st.up.shape[1]
    D = topo.dev_server.shape[0]
    U = D + S
    pairs = PairTerms(np.empty((N, S, S)), np.empty((N, S, S)), np.empty((N, S, S)))
    pair_terms(plans, st, topo, params, pairs)
    so = ServeOut(
        np.zeros((N, S, 2, 3)),
        np.zeros((N, S, S, 2)),
        np.zeros((N, S, U, 2)),
        np.zeros((N, S)),
        np.zeros((N, S)),
        np.zeros((N, S, S)),
        np.zeros(N, dtype=np.bool_),
        np.full((N, S, L, E) if params.continuous else (1, 1, 1, 1), -1, np.int16),
    )
    grouped = np.zeros((N, D, L), dtype=np.bool_)
    if params.grouped_bits.any():
        grouped_layers(plans, params.grouped_bits, grouped)
    return pairs, so, grouped


@njit(cache=True)
def raise_seen(rho: np.ndarray, seen: np.ndarray, redo: np.ndarray) -> bool:
    """The routing passes' running max of each unit's utilization: seen = max(seen, rho); a plan none of whose
    units grew leaves redo (the next pass would see the same inflation and repeat this one exactly). Returns
    whether any plan is left to route again."""
    any_redo = False
    for n in range(rho.shape[0]):
        grew = False
        for u in range(rho.shape[1]):
            if rho[n, u] > seen[n, u]:
                seen[n, u] = rho[n, u]
                grew = True
        if not grew:
            redo[n] = False
        any_redo = any_redo or redo[n]
    return any_redo


@njit(cache=True, fastmath=True)
def serve_core(plans: Plans, st: States, topo: Topology, params: Params, window: float, out: Outputs) -> None:
    """Serve N plans: `pair_terms`, a `route_pass`, then for plans with replica choices up to ROUTING_PASSES - 1
    passes re-routed with unit times scaled by `queue_inflation` of the utilization earlier passes caused
    (running max: a unit found saturated stays avoided; a plan whose running max did not grow would repeat its
    last pass exactly, so its later passes are skipped), then `memory_kernel`, `decode_grid` (continuous batching)
    and `finish`."""
    N = plans.dev.shape[0]
    S = st.up.shape[1]
    D = topo.dev_server.shape[0]
    U = D + S
    pairs, so, grouped = serve_setup(plans, st, topo, params)
    infl = np.ones((N, U))
    every, no_terms, no_rows = np.zeros((0, 0, 0), np.bool_), np.zeros((0, 0, 0, 0)), np.zeros(0, np.int64)
    route_pass(plans, pairs, st, topo, params, infl, np.ones(N, dtype=np.bool_), grouped, so, every, no_terms, no_rows)
    rho = np.empty((N, U))
    redo = so.choice.copy()
    if redo.any():
        unit_utilization(plans, so.busy, st, topo.dev_server, params.out_mean, rho)
        seen = rho.copy()
        for i in range(ROUTING_PASSES - 1):
            queue_inflation(seen, infl)
            for n in range(N):
                if redo[n]:
                    so.time[n] = 0.0
                    so.pair_tokens[n] = 0.0
                    so.busy[n] = 0.0
                    so.quality[n] = 0.0
                    so.miss[n] = 0.0
                    so.cross[n] = 0.0
                    if params.continuous:
                        so.chosen[n] = -1
            route_pass(plans, pairs, st, topo, params, infl, redo, grouped, so, every, no_terms, no_rows)
            if i < ROUTING_PASSES - 2:
                unit_utilization(plans, so.busy, st, topo.dev_server, params.out_mean, rho)
                if not raise_seen(rho, seen, redo):
                    break
    memory_kernel(
        plans.dev, plans.tier, plans.bits, topo.dev_server, params.expert_bytes, out.gpu_mem, out.cpu_mem, out.ssd_mem
    )
    grid = np.zeros((N, S, params.batch_grid.shape[0]))
    if params.continuous:
        decode_grid(plans, pairs.keep, st, topo, params, so.chosen, grouped, grid)
    finish(plans, pairs.keep, so, st, topo, params, window, rho, grid, out)
    out.choice[:] = so.choice


@njit(cache=True)
def primary_preferred(full: np.ndarray, prim: np.ndarray, cols: np.ndarray, dropped: int) -> bool:
    """`prefer_primary`'s rule on one plan's scalars (strict IEEE arithmetic, as numpy evaluates it): the primary
    replicas are served instead when the full plan is worse on some metric of `cols` (beyond 1e-12 relative and
    1e-15 absolute) and does not save requests (its dropped share is not below the primary's by more than 1e-12)."""
    worse = False
    for c in cols:
        if full[c] > prim[c] * (1 + 1e-12) + 1e-15:
            worse = True
    return worse and full[dropped] >= prim[dropped] - 1e-12


@njit(cache=True)
def primary_subset(plans: Plans, idx: np.ndarray, out: Outputs) -> tuple[Plans, Outputs]:
    """Plans idx with their primary replicas only (slot 0), and Outputs to serve them into (`prefer_primary`)."""
    _, L, E, _ = plans.dev.shape
    M = idx.shape[0]
    dev = np.empty((M, L, E, 1), dtype=plans.dev.dtype)
    tier = np.empty((M, L, E, 1), dtype=plans.tier.dtype)
    bits = np.empty((M, L, E, 1), dtype=plans.bits.dtype)
    for j in range(M):
        n = idx[j]
        dev[j, :, :, 0] = plans.dev[n, :, :, 0]
        tier[j, :, :, 0] = plans.tier[n, :, :, 0]
        bits[j, :, :, 0] = plans.bits[n, :, :, 0]
    sub = Plans(dev, tier, bits, plans.prune[idx], plans.fuse[idx], plans.state[idx])
    S, D, K = out.cpu_mem.shape[1], out.gpu_mem.shape[1], out.link_bytes.shape[1]
    prim = Outputs(
        np.empty((M, out.scalars.shape[1])),
        np.empty((M, K)),
        np.empty((M, D)),
        np.zeros((M, D)),
        np.zeros((M, S)),
        np.zeros((M, S)),
        np.zeros(M, dtype=np.bool_),
    )
    return sub, prim


@njit(cache=True)
def adopt_primary(out: Outputs, prim: Outputs, idx: np.ndarray) -> None:
    """Plan idx[j]'s scalars, link bytes and device utilization become its primary-only serve's (`prim` row j)
    where `primary_preferred` says so (its memory stays)."""
    for j in range(idx.shape[0]):
        n = idx[j]
        if primary_preferred(out.scalars[n], prim.scalars[j], PRIMARY_CHECK, DROPPED_FRAC):
            out.scalars[n] = prim.scalars[j]
            out.link_bytes[n] = prim.link_bytes[j]
            out.device_util[n] = prim.device_util[j]


@njit(cache=True, fastmath=True)
def prefer_primary(plans: Plans, st: States, topo: Topology, params: Params, window: float, out: Outputs) -> None:
    """Extra replicas are used where they save requests, or where that is no worse on any latency metric
    (PRIMARY_CHECK, `primary_preferred`); otherwise every expert is served by its primary replica (slot 0), as a
    controller may always ignore the extras: the scalars, link bytes and device utilization of the primary-only
    plan replace the plan's (its memory stays). This keeps "adding a replica never makes serving slower" true
    despite greedy per-server routing. Only plans with a replica choice (out.choice) are served again."""
    idx = np.flatnonzero(out.choice)
    if idx.shape[0] == 0:
        return
    sub, prim = primary_subset(plans, idx, out)
    serve_core(sub, st, topo, params, window, prim)
    adopt_primary(out, prim, idx)


@njit(cache=True, fastmath=True)
def serve_plans(*flat) -> None:
    """Serve N plans, called with flat fields: serve_plans(*plans, *states, *topology, *params, window_s, *outputs):
    `serve_core`, then (load-aware routing, Params.prefer_primary) `prefer_primary` for plans with replica choices."""
    plans, st, topo = Plans(*flat[_P0:_P1]), States(*flat[_P1:_P2]), Topology(*flat[_P2:_P3])
    params, window, out = Params(*flat[_P3:_P4]), flat[_P4], Outputs(*flat[_P5:])
    serve_core(plans, st, topo, params, window, out)
    if params.prefer_primary and plans.dev.shape[3] > 1:
        prefer_primary(plans, st, topo, params, window, out)


@njit(cache=True)
def unit_table_kernel(*flat) -> None:
    """`unit_table` on flat fields: unit_table_kernel(*units, compute_avail, out)."""
    unit_table(UnitSpecs(*flat[_U0:_U1]), flat[_U1], flat[_U2])


@njit(cache=True)
def migration_kernel(*flat) -> None:
    """`migration` on flat fields: migration_kernel(*old, *new, dev_server, server_up, pair_lat, expert_bytes, *out)."""
    migration(
        Replicas(*flat[_M0:_M1]),
        Replicas(*flat[_M1:_M2]),
        flat[_M2],
        flat[_M3],
        flat[_M4],
        flat[_M5],
        MigrationOut(*flat[_M6:]),
    )


# ---- incremental evaluation (incremental.py drives it) ----------------------------------------------------------
# Here rather than in incremental.py: numba's cache is keyed on a kernel's own file, and these inline route_pass
# and finish.
class LayerCache(NamedTuple):
    """Per cache row c: the plan last served there and its first routing pass's per-layer terms (`route_pass`)."""

    dev: np.ndarray  # [M, L, E, R]
    tier: np.ndarray  # [M, L, E, R]
    bits: np.ndarray  # [M, L, E, R]
    prune: np.ndarray  # [M, P]
    fuse: np.ndarray  # [M, P]
    state: np.ndarray  # [M] States row the terms were computed against; -1: none
    terms: np.ndarray  # [M, S, L, layer_terms_size(U, S)]


_I0 = _P5 + len(Outputs._fields)  # serve_plans_inc: then the main LayerCache, the primary one, then crow
_I1 = _I0 + len(LayerCache._fields)
_I2 = _I1 + len(LayerCache._fields)


@njit(cache=True)
def layer_terms_size(U: int, S: int) -> int:
    """Length of a layer's terms (LT_* layout): LT_BUSY + busy [U] per phase + rows [S] per phase + cross [S]."""
    return LT_BUSY + 2 * U + 3 * S


@njit(cache=True)
def changed_layers(plans: Plans, cache: LayerCache, crow: np.ndarray, out: np.ndarray) -> None:
    """out[n, :, l] := layer l of plan n differs from the plan of cache row crow[n] (every layer where that row
    holds no terms for plan n's state row or its compression differs); then the row holds plan n."""
    N, L, E, R = plans.dev.shape
    for n in range(N):
        c = crow[n]
        every = cache.state[c] != plans.state[n]
        for p in range(plans.prune.shape[1]):
            if cache.prune[c, p] != plans.prune[n, p] or cache.fuse[c, p] != plans.fuse[n, p]:
                every = True
            cache.prune[c, p] = plans.prune[n, p]
            cache.fuse[c, p] = plans.fuse[n, p]
        cache.state[c] = plans.state[n]
        for l in range(L):
            diff = every
            for e in range(E):
                for r in range(R):
                    d, t, b = plans.dev[n, l, e, r], plans.tier[n, l, e, r], plans.bits[n, l, e, r]
                    if cache.dev[c, l, e, r] != d or cache.tier[c, l, e, r] != t or cache.bits[c, l, e, r] != b:
                        diff = True
                        cache.dev[c, l, e, r], cache.tier[c, l, e, r], cache.bits[c, l, e, r] = d, t, b
            out[n, :, l] = diff


@njit(cache=True)
def sum_layer_terms(
    state: np.ndarray,
    up: np.ndarray,
    todo: np.ndarray,
    crow: np.ndarray,
    first: np.ndarray,
    later: np.ndarray,
    so: ServeOut,
) -> None:
    """ServeOut of plans n with todo[n] from per-layer terms, summed layer by layer in order as `route_pass` sums
    them (no fastmath: the same additions, exactly): first[crow[n]] (the first pass's), or where `later` is not
    empty (a re-routing pass) later[n] for the layers whose routing depends on the load (LT_LOADED). The first
    pass's sum also sets so.choice."""
    N, S, U = so.busy.shape[0], so.busy.shape[1], so.busy.shape[2]
    L = first.shape[2]
    rerouted = later.shape[0] > 0
    for n in range(N):
        if not todo[n]:
            continue
        c = crow[n]
        choice = False
        for s in range(S):
            so.time[n, s] = 0.0
            so.pair_tokens[n, s] = 0.0
            so.busy[n, s] = 0.0
            so.quality[n, s] = 0.0
            so.miss[n, s] = 0.0
            so.cross[n, s] = 0.0
            if not up[state[n], s]:
                continue
            cross = np.zeros(S)
            for l in range(L):
                t = first[c, s, l]
                if rerouted and t[LT_LOADED] != 0.0:
                    t = later[n, s, l]
                choice = choice or t[LT_CHOICE] != 0.0
                so.time[n, s, DECODE, EXPERT_S] += t[LT_EXPERT_D]
                so.time[n, s, PREFILL, EXPERT_S] += t[LT_EXPERT_P]
                so.time[n, s, DECODE, LATENCY_S] += t[LT_LATENCY_D]
                so.time[n, s, PREFILL, LATENCY_S] += t[LT_LATENCY_P]
                so.time[n, s, DECODE, TRANSFER_S] += t[LT_TRANSFER_D]
                so.time[n, s, PREFILL, TRANSFER_S] += t[LT_TRANSFER_P]
                so.quality[n, s] += t[LT_QUALITY]
                so.miss[n, s] += t[LT_MISS]
                for u in range(U):
                    so.busy[n, s, u, DECODE] += t[LT_BUSY + u]
                    so.busy[n, s, u, PREFILL] += t[LT_BUSY + U + u]
                for s2 in range(S):
                    so.pair_tokens[n, s, s2, DECODE] += t[LT_BUSY + 2 * U + s2]
                    so.pair_tokens[n, s, s2, PREFILL] += t[LT_BUSY + 2 * U + S + s2]
                    cross[s2] += t[LT_BUSY + 2 * U + 2 * S + s2]
            for s2 in range(S):
                if s2 != s:
                    so.cross[n, s, s2] = cross[s2]
        if not rerouted:
            so.choice[n] = choice


@njit(cache=True, fastmath=True)
def serve_core_inc(
    plans: Plans,
    st: States,
    topo: Topology,
    params: Params,
    window: float,
    out: Outputs,
    cache: LayerCache,
    crow: np.ndarray,
) -> None:
    """`serve_core` (without continuous batching) routing only what changed: the first pass routes the layers of
    plan n that differ from cache row crow[n]'s plan (`changed_layers`), keeps their terms there and sums every
    layer's (`sum_layer_terms`); a re-routing pass routes only the layers whose routing depends on the load
    (LT_LOADED: a replica choice or a GPU/CPU path decision; the others route as in the first pass, exactly).
    Then the same utilization checks, `memory_kernel` and `finish`: the same Outputs, bit for bit."""
    N, L = plans.dev.shape[0], plans.dev.shape[1]
    S = st.up.shape[1]
    D = topo.dev_server.shape[0]
    U = D + S
    pairs, so, grouped = serve_setup(plans, st, topo, params)
    changed = np.zeros((N, S, L), dtype=np.bool_)
    changed_layers(plans, cache, crow, changed)
    infl = np.ones((N, U))
    every = np.ones(N, dtype=np.bool_)
    no_terms = np.zeros((0, 0, 0, 0))
    route_pass(plans, pairs, st, topo, params, infl, every, grouped, so, changed, cache.terms, crow)
    sum_layer_terms(plans.state, st.up, every, crow, cache.terms, no_terms, so)
    rho = np.empty((N, U))
    redo = so.choice.copy()
    if redo.any():
        loaded = np.zeros((N, S, L), dtype=np.bool_)
        for n in range(N):
            loaded[n] = cache.terms[crow[n], :, :, LT_LOADED] != 0.0
        later = np.empty((N, S, L, cache.terms.shape[3]))
        rows = np.arange(N)
        unit_utilization(plans, so.busy, st, topo.dev_server, params.out_mean, rho)
        seen = rho.copy()
        for i in range(ROUTING_PASSES - 1):
            queue_inflation(seen, infl)
            route_pass(plans, pairs, st, topo, params, infl, redo, grouped, so, loaded, later, rows)
            sum_layer_terms(plans.state, st.up, redo, crow, cache.terms, later, so)
            if i < ROUTING_PASSES - 2:
                unit_utilization(plans, so.busy, st, topo.dev_server, params.out_mean, rho)
                if not raise_seen(rho, seen, redo):
                    break
    memory_kernel(
        plans.dev, plans.tier, plans.bits, topo.dev_server, params.expert_bytes, out.gpu_mem, out.cpu_mem, out.ssd_mem
    )
    grid = np.zeros((N, S, params.batch_grid.shape[0]))
    finish(plans, pairs.keep, so, st, topo, params, window, rho, grid, out)
    out.choice[:] = so.choice


@njit(cache=True, fastmath=True)
def prefer_primary_inc(
    plans: Plans,
    st: States,
    topo: Topology,
    params: Params,
    window: float,
    out: Outputs,
    cache: LayerCache,
    crow: np.ndarray,
) -> None:
    """`prefer_primary` with the primary-replica plans served by `serve_core_inc` on their own cache (rows crow)."""
    idx = np.flatnonzero(out.choice)
    if idx.shape[0] == 0:
        return
    sub, prim = primary_subset(plans, idx, out)
    serve_core_inc(sub, st, topo, params, window, prim, cache, crow[idx])
    adopt_primary(out, prim, idx)


@njit(cache=True, fastmath=True)
def serve_plans_inc(*flat) -> None:
    """`serve_plans` evaluated incrementally (`serve_core_inc`, `prefer_primary_inc`), called with flat fields:
    serve_plans_inc(*plans, *states, *topology, *params, window_s, *outputs, *cache, *primary_cache, crow)."""
    plans, st, topo = Plans(*flat[_P0:_P1]), States(*flat[_P1:_P2]), Topology(*flat[_P2:_P3])
    params, window, out = Params(*flat[_P3:_P4]), flat[_P4], Outputs(*flat[_P5:_I0])
    cache, primary, crow = LayerCache(*flat[_I0:_I1]), LayerCache(*flat[_I1:_I2]), flat[_I2]
    serve_core_inc(plans, st, topo, params, window, out, cache, crow)
    if params.prefer_primary and plans.dev.shape[3] > 1:
        prefer_primary_inc(plans, st, topo, params, window, out, primary, crow)
