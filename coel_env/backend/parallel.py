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
  `layer_overhead_s` per layer;
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


def serve_parallel(cluster: Cluster, state: ClusterState, bits: int = 16, clients: int | None = None) -> ParallelResult:
    """The tp x pp engine's steady state on `cluster` with every routed expert at `bits` (vLLM's bf16: 16). Under a
    closed-loop workload the engine's `clients` default to workload.concurrency per live server (the requests the
    servers would hold between them); an open loop takes the servers' summed arrival rate."""
    c, hw, m = cluster, cluster.hw, cluster.model
    wl = c.spec.workload
    sb = SurrogateBackend(c)
    live = np.flatnonzero(state.server_up)
    if live.size == 0:
        raise ConfigError("serve_parallel: no live server")
    P = live.size
    layers = stage_layers(m.num_layers, P)
    first_moe = m.first_k_dense
    bounds = np.concatenate([[0], np.cumsum(layers)])
    rate = state.arrival_rate * state.server_up
    weight = rate / rate.sum() if rate.sum() > 0 else state.server_up / state.server_up.sum()
    pop = np.tensordot(weight, state.popularity, axes=1)  # [L_moe, E]: the engine's requests all pass every stage
    I, O = sb.in_mean, sb.out_mean
    grid = sb.batch_grid
    ebytes = float(m.expert_bytes(bits)) * float(sb.slow[bits])
    act = hw.activation_bytes
    ar_lat = hw.allreduce_latency_s
    dec = np.zeros((P, grid.size))
    hop_d = np.zeros((P, grid.size))
    pre = np.zeros(P)
    hop_p = np.zeros(P)
    kv_tokens = np.inf
    goodput = pair_goodput(link_goodput(c.link_bw, state.link_factor, hw.link_efficiency), c.route)
    mem_avail = c.dev_mem * state.memory_avail * hw.gpu_memory_utilization
    expert_total = float(m.num_experts * m.expert_bytes(bits))
    for i, s in enumerate(live):
        gpus = np.flatnonzero(c.dev_server == s)
        G = gpus.size
        lo, hi = bounds[i], bounds[i + 1]
        share = layers[i] / m.num_layers
        moe_rows = slice(max(lo - first_moe, 0), max(hi - first_moe, 0))
        bw = float(sb.gpu_bw[gpus].sum()) * float(state.compute_avail[gpus].mean())
        flops = float(sb.gpu_flops[gpus].sum()) * float(state.compute_avail[gpus].mean())
        pcie = float(sb.pcie_bw[s])
        pop_i = pop[moe_rows]
        n_moe = pop_i.shape[0]
        ne_bytes, ne_flops = sb.ne_bytes * share, sb.ne_flops_tok * share
        kv_tok_i = sb.kv_tok * share
        # micro-batches of the pipeline: m = min(P, B), b = B / m
        micro = grid / np.minimum(P, grid)
        dec[i] = (
            expert_decode_s(pop_i, micro, ebytes, m.expert_params, bw, flops, hw.expert_overhead_s)
            + non_expert_decode_s(micro, I, O, kv_tok_i, ne_bytes, ne_flops, bw, flops)
            + allreduce_s(micro, m.d_model, act, G, pcie, ar_lat, layers[i])
            + hw.layer_overhead_s * layers[i]
        )
        pre[i] = (
            float(expert_decode_s(pop_i, np.array([I]), ebytes, m.expert_params, bw, flops, hw.expert_overhead_s)[0])
            + float(non_expert_prefill_s(I, m.d_model, int(layers[i]), ne_bytes, ne_flops, bw, flops))
            + float(allreduce_s(I, m.d_model, act, G, pcie, ar_lat, layers[i]))
            + hw.layer_overhead_s * layers[i]
        )
        nxt = live[(i + 1) % P]
        one_way = c.pair_latency[s, nxt] + hw.transfer_latency_s if P > 1 else 0.0
        if i < P - 1:
            hop_d[i] = micro * m.d_model * act / goodput[s, nxt] + one_way
            hop_p[i] = I * m.d_model * act / goodput[s, nxt] + one_way
        elif P > 1:
            hop_d[i] = one_way  # the sampled token ids back to the first stage
        weights = share * (m.non_expert_bytes(16)) + n_moe * expert_total
        room = float(mem_avail[gpus].sum()) - weights
        kv_tokens = min(kv_tokens, room / kv_tok_i)
    tpot_grid = np.maximum(np.minimum(P, grid) * np.maximum(dec, hop_d).max(axis=0), (dec + hop_d).sum(axis=0))
    ttft_iso = float((pre + hop_p).sum())
    prefill_work = float(np.maximum(pre, hop_p).max())
    if clients is None:
        clients = (wl.concurrency or 0) * P
    params = sb.params._replace(concurrency=float(clients))
    lam = np.array([float(rate.sum())])
    out = {k: np.zeros(1) for k in ("tpot", "ttft", "wait", "batch", "drop", "served")}
    continuous_batching(
        tpot_grid[None, :],
        np.zeros((1, grid.size)),
        np.array([max(kv_tokens, 0.0) * sb.kv_tok]),
        lam,
        np.array([True]),
        np.zeros(1),
        np.ones(1),
        np.zeros(1),
        np.array([ttft_iso]),
        np.array([prefill_work]),
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
        kv_sequences=float(np.floor(max(kv_tokens, 0.0) / params.held_tokens)),
        dropped_frac=float(out["drop"][0]),
        stages=tuple(int(x) for x in layers),
    )
