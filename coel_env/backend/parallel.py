"""vLLM's own parallelism — the seed paper's measured baselines — under the surrogate's continuous batching.

CoEL's method is expert placement (`ep`: attention on the request's server, experts where the plan puts them; the
`SurrogateBackend`). The paper's measurements are vLLM's: one server with two GPUs runs tensor parallel (`tp`), two or
three servers run pipeline parallel (`pp`, vLLM multi-node). `serve_parallel` models that engine: the live servers
are pipeline stages in index order holding contiguous layer blocks (vLLM's even split, the remainder to the first
stages), and each stage runs tensor parallel over its GPUs (weights, KV heads and FLOPs split; two all-reduces per
layer over PCIe). One engine serves the whole cluster's requests, with one scheduler (vLLM's multi-node engine).

Per stage i (servers' GPUs G_i, layers L_i, micro-batch b):
- decode: experts `sum_e u_e(b) * (max(bytes_e * slowdown / (G bw), b p_e * 2 params_e / (G FLOP/s)) + overhead)`
  (u_e(b) = 1 - (1 - p_e)^b), non-expert part `non_expert_decode_s` with the stage's share of weights and KV,
  2 L_i all-reduces of b d activation bytes (ring: 2 (G - 1) / G of it over PCIe, plus `allreduce_latency_s`),
  `layer_overhead_s` per layer (a prefill step: `prefill_layer_overhead_s`);
- the hop to stage i + 1: b d activation bytes over the pair's goodput plus its one-way latency;
- a decode step of the pipeline (vLLM keeps P = stages micro-batches in flight): with m = min(P, B) micro-batches
  of b = B / m, TPOT(B) = max(m * the slowest stage-or-hop, sum of stages and hops + the sampled token's way back);
- prefill of a mean-length prompt: the same terms at I tokens (attention FLOPs as `non_expert_prefill_s`);
- KV room: each stage's GPU memory * gpu_memory_utilization minus its weights, per token the stage's layers' share of
  `kv_bytes_per_token`; the engine's sequences are the least over stages (every sequence has KV in every stage).
The batch, the queue wait and saturation are `physics.continuous_batching`'s (one engine, so one "server").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coel_env.backend.physics import continuous_batching, request_latency
from coel_env.backend.surrogate import SurrogateBackend, non_expert_decode_s, non_expert_prefill_s
from coel_env.errors import ConfigError
from coel_env.world.cluster import Cluster, link_goodput, pair_goodput
from coel_env.world.state import ClusterState


@dataclass(frozen=True)
class ParallelResult:
    """Steady state of the tp/pp engine under the scenario's workload (all times in seconds)."""

    tokens_per_s: float  # generated tokens/s of the whole engine
    ttft_s: float  # first token, admission wait included
    tpot_s: float
    e2e_s: float  # mean end-to-end latency: wait + ttft + (O - 1) * tpot
    batch: float  # sequences decoding together
    kv_sequences: float  # sequences the KV cache of the tightest stage holds
    dropped_frac: float  # admission drops (open loop past saturation)
    stages: tuple[int, ...]  # layers per pipeline stage


def stage_layers(num_layers: int, stages: int) -> np.ndarray:
    """vLLM's contiguous split of the layers over pipeline stages: even, the remainder to the first stages."""
    base, extra = divmod(num_layers, stages)
    return np.array([base + (1 if i < extra else 0) for i in range(stages)], dtype=np.int64)


def expert_decode_s(
    pop: np.ndarray, b: np.ndarray, expert_bytes: float, params: float, bw, flops, overhead
) -> np.ndarray:
    """[G] expert seconds of a tp stage's decode step at micro-batches b [G] for popularity pop [L_i, E]:
    sum_e u_e(b) (max(bytes / bw, b p 2 params / flops) + overhead) (bw, flops: the stage's GPUs summed)."""
    p = pop.reshape(-1)[None, :]
    bb = np.asarray(b, dtype=np.float64)[:, None]
    used = -np.expm1(bb * np.log1p(-np.minimum(p, 1.0 - 1e-12)))  # physics.use_probability
    per = np.maximum(expert_bytes / bw, bb * p * 2.0 * params / flops) + overhead
    return (used * per).sum(axis=1)


def allreduce_s(tokens, d_model: int, act_bytes: int, gpus: int, pcie_bw: float, latency: float, layers: int):
    """2 all-reduces per layer of a tp stage: ring volume 2 (G - 1) / G * tokens * d * bytes over PCIe + latency."""
    if gpus <= 1:
        return np.zeros_like(np.asarray(tokens, dtype=np.float64))
    vol = 2.0 * (gpus - 1) / gpus * np.asarray(tokens, dtype=np.float64) * d_model * act_bytes
    return 2.0 * layers * (vol / pcie_bw + latency)


def pipeline_tpot(stage_s: np.ndarray, hop_s: np.ndarray, batches: np.ndarray) -> np.ndarray:
    """Decode step of a P-stage pipeline at running batches B [G]: vLLM keeps m = min(P, B) micro-batches of B / m in
    flight, so TPOT = max(m * the slowest stage-or-hop, sum of stages and hops) (stage_s, hop_s [P, G]: a stage's
    step and the hop after it at that micro-batch; the last hop returns the sampled tokens to the first stage)."""
    m = np.minimum(stage_s.shape[0], batches)
    return np.maximum(m * np.maximum(stage_s, hop_s).max(axis=0), (stage_s + hop_s).sum(axis=0))


def stage_weights(m, lo: int, hi: int, first: bool, last: bool, expert_bytes: float) -> tuple[float, float]:
    """(bytes held, bytes a decode step reads) of the pipeline stage holding layers [lo, hi), 16-bit non-expert
    weights: its layers' own weights and routed experts, the embedding on the first stage (a step gathers its rows,
    reading none of the table) and the final norm and LM head on the last (read every step)."""
    own = 2.0 * sum(m.layer_params(i) for i in range(lo, hi))
    experts = max(hi - max(lo, m.first_k_dense), 0) * m.num_experts * expert_bytes
    head = 2.0 * (m.embedding_params + m.d_model) if last else 0.0
    embed = 2.0 * m.embedding_params if first and not (last and m.tie_word_embeddings) else 0.0
    return own + experts + head + embed, own + head


def serve_parallel(cluster: Cluster, state: ClusterState, bits: int = 16, clients: int | None = None) -> ParallelResult:
    """The tp x pp engine's steady state on `cluster` with every routed expert at `bits` (vLLM's bf16: 16). Under a
    closed-loop workload the engine's `clients` default to workload.concurrency per server; an open loop takes the
    servers' summed arrival rate. A failed server is a dead pipeline stage: the engine serves nothing (all dropped);
    a model that leaves no KV room for one sequence on some stage serves nothing either."""
    c, hw, m = cluster, cluster.hw, cluster.model
    wl = c.spec.workload
    P = c.num_servers
    if m.num_layers < P:
        raise ConfigError(f"serve_parallel: {P} pipeline stages for {m.num_layers} layers; at most one per layer")
    sb = SurrogateBackend(c)
    layers = stage_layers(m.num_layers, P)
    bounds = np.concatenate([[0], np.cumsum(layers)])
    rate = np.asarray(state.arrival_rate, dtype=np.float64)
    weight = rate / rate.sum() if rate.sum() > 0 else np.full(P, 1.0 / P)
    pop = np.tensordot(weight, state.popularity, axes=1)  # [L_moe, E]: every request passes every stage
    I, O = sb.in_mean, sb.out_mean
    grid = sb.batch_grid
    micro = grid / np.minimum(P, grid)  # sequences per micro-batch at each running batch
    ebytes = float(m.expert_bytes(bits))
    read_bytes = ebytes * float(sb.slow[bits])
    # fused MoE (HardwareProfile.grouped_expert_bits): one kernel per layer, no per-expert fixed cost
    expert_fixed_s = 0.0 if bits in hw.grouped_expert_bits else hw.expert_overhead_s
    act = hw.activation_bytes
    # vLLM hands a stage boundary the hidden states and the residual stream (IntermediateTensors)
    hop_bytes = 2 * m.d_model * act
    dec = np.zeros((P, grid.size))
    hop_d = np.zeros((P, grid.size))
    pre = np.zeros(P)
    hop_p = np.zeros(P)
    kv_tokens = np.inf
    goodput = pair_goodput(link_goodput(c.link_bw, state.link_factor, hw.link_efficiency), c.route)
    for s in range(P):
        gpus = np.flatnonzero(c.dev_server == s)
        G = gpus.size
        lo, hi = int(bounds[s]), int(bounds[s + 1])
        # tensor parallel: every GPU does 1/G of every op, so the slowest GPU sets the pace (and the tightest memory)
        avail = np.asarray(state.compute_avail, dtype=np.float64)[gpus]
        bw = G * float((sb.gpu_bw[gpus] * avail).min())
        flops = G * float((sb.gpu_flops[gpus] * avail).min())
        pcie = float(sb.pcie_bw[s])
        pop_i = pop[max(lo - m.first_k_dense, 0) : max(hi - m.first_k_dense, 0)]
        held, ne_read = stage_weights(m, lo, hi, s == 0, s == P - 1, ebytes)
        kv_tok_i = sb.kv_tok * layers[s] / m.num_layers
        # a latent (MLA) cache is kept whole on every tensor-parallel rank; KV heads are split, or copied when
        # there are fewer heads than GPUs
        kv_split = 1 if m.kv_cache_dim is not None else min(G, m.num_kv_heads)
        kv_tok_gpu = kv_tok_i / kv_split
        dec[s] = (
            expert_decode_s(pop_i, micro, read_bytes, m.expert_params, bw, flops, expert_fixed_s)
            + non_expert_decode_s(micro, I, O, kv_tok_gpu * G, ne_read, ne_read, bw, flops)
            + allreduce_s(micro, m.d_model, act, G, pcie, hw.allreduce_latency_s, layers[s])
            + hw.layer_overhead_s * layers[s]
        )
        pre[s] = (
            float(expert_decode_s(pop_i, np.array([I]), read_bytes, m.expert_params, bw, flops, expert_fixed_s)[0])
            + float(non_expert_prefill_s(I, m.d_model, int(layers[s]), ne_read, ne_read, bw, flops))
            + float(allreduce_s(I, m.d_model, act, G, pcie, hw.allreduce_latency_s, layers[s]))
            + hw.prefill_layer_overhead * layers[s]
        )
        nxt = (s + 1) % P
        one_way = c.pair_latency[s, nxt] + hw.transfer_latency_s if P > 1 else 0.0
        if s < P - 1:
            hop_d[s] = micro * hop_bytes / goodput[s, nxt] + one_way
            hop_p[s] = I * hop_bytes / goodput[s, nxt] + one_way
        elif P > 1:
            hop_d[s] = one_way  # the sampled token ids back to the first stage
        mem = c.dev_mem[gpus] * np.asarray(state.memory_avail, dtype=np.float64)[gpus] * hw.gpu_memory_utilization
        room = float(mem.min()) - held / G  # per GPU: its share of the weights, the rest for its share of the KV
        kv_tokens = min(kv_tokens, max(room, 0.0) / kv_tok_gpu)
    tpot_grid = pipeline_tpot(dec, hop_d, grid)
    ttft_iso = float((pre + hop_p).sum())
    prefill_work = float(np.maximum(pre, hop_p).max())  # a prefill's time on the busiest stage or hop
    prefill_var = float(np.maximum(pre - hw.prefill_layer_overhead * layers, 0.0).sum())  # less fixed overheads
    if clients is None:
        clients = (wl.concurrency or 0) * P
    params = sb.params._replace(concurrency=float(clients))
    seqs = float(np.floor(kv_tokens / params.held_tokens))
    if not np.all(state.server_up) or seqs < 1:
        return ParallelResult(0.0, np.inf, np.inf, np.inf, 0.0, seqs, 1.0, tuple(int(x) for x in layers))
    lam = np.array([float(rate.sum())])
    out = {k: np.zeros(1) for k in ("tpot", "ttft", "wait", "batch", "drop", "served")}
    continuous_batching(
        tpot_grid[None, :],
        np.zeros((1, grid.size)),
        np.array([kv_tokens * sb.kv_tok]),
        lam,
        np.array([True]),
        np.zeros(1),
        np.ones(1),
        np.zeros(1),
        np.array([ttft_iso]),
        np.array([prefill_work]),
        np.array([prefill_var]),
        params,
        I,
        O,
        out["tpot"],
        out["ttft"],
        out["wait"],
        out["batch"],
        out["drop"],
        out["served"],
    )
    tpot, ttft, wait = float(out["tpot"][0]), float(out["ttft"][0]), float(out["wait"][0])
    served = float(out["served"][0]) if params.concurrency > 0 else float(lam[0] * (1.0 - out["drop"][0]))
    return ParallelResult(
        tokens_per_s=served * O,
        ttft_s=wait + ttft,
        tpot_s=tpot,
        e2e_s=wait + float(request_latency(ttft, tpot, O)),
        batch=float(out["batch"][0]),
        kv_sequences=seqs,
        dropped_frac=float(out["drop"][0]),
        stages=tuple(int(x) for x in layers),
    )
