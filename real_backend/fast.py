"""The server processes' decode fast path (issue 19): static KV slots, batched decode attention, grouped experts.

- `SlotPool` / `SlotCache`: one static KV buffer per layer [slots, Hkv, max_len, hd] for a serve's sequences; a
  sequence's `SlotCache` is a `model.KVCache` whose buffers are views of its slot, so the generic (prefill) path and
  the fast decode step share one cache. Active sequences sit in slots 0..B-1 in order (`compact` after finishes).
- `FastDecoder.decode`: one decode step of B sequences with no per-sequence Python in the layer loop (one masked
  SDPA over the slots, cache writes by index; MLP and dispatch as the model's own `_mlp`).
- `GroupedExperts`: a server's 16-bit GPU-tier experts of a layer stacked [E_local, 2f, d] / [E_local, d, f] and
  computed as two `torch._grouped_mm` over rows sorted by expert, with fixed shapes and no host sync (padding slots
  -1 are masked); the store's replicas become views of the stacks (no second copy). Layers with any expert on the
  CPU/SSD tiers, quantized, or on another GPU of the server keep the generic per-expert path (`ExpertStore`).
`FAST_ENV=0` turns all of it off (the generic path; for before/after measurements).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from real_backend.model import KVCache, MoETransformer, apply_rope, layer_prefix, rms_norm, sdpa_no_cudnn
from real_backend.quant import QTensor
from real_backend.tiers import TIER_GPU, ExpertStore

FAST_ENV = "COEL_REAL_FAST"  # "0": generic path only (no slots, no grouped experts)
GRAPH_ENV = "COEL_REAL_GRAPHS"  # "0": fast decode steps without CUDA graphs
GRAPH_CACHE = 8  # captured batch sizes kept at once
KV_BUDGET_FRAC = 0.5  # a serve's KV slots may take at most this share of the free GPU memory (else: generic path)
KV_BUDGET_CPU_BYTES = 2 << 30


def fast_enabled() -> bool:
    return os.environ.get(FAST_ENV, "1") != "0"


class SlotPool:
    """Static KV buffers for `slots` sequences of up to `max_len` tokens, one (k, v) pair per layer."""

    def __init__(self, num_layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, device, dtype):
        shape = (slots, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.slots, self.max_len = slots, max_len

    @staticmethod
    def nbytes(num_layers, slots, kv_heads, max_len, head_dim, dtype) -> int:
        return 2 * num_layers * slots * kv_heads * max_len * head_dim * torch.empty(0, dtype=dtype).element_size()

    def move(self, src: int, dst: int, length: int) -> None:
        for buf in (*self.k, *self.v):
            buf[dst, :, :length] = buf[src, :, :length]


class SlotCache(KVCache):
    """A sequence's KV cache inside a `SlotPool` slot (the generic path appends into it as into any KVCache)."""

    def __init__(self, pool: SlotPool, slot: int):
        super().__init__(len(pool.k))
        self.pool = pool
        self.bind(slot)

    def bind(self, slot: int) -> None:
        self.slot = slot
        self.kbuf = [k[slot] for k in self.pool.k]
        self.vbuf = [v[slot] for v in self.pool.v]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.filled[layer] + k.shape[1] > self.pool.max_len:
            raise RuntimeError(f"SlotCache: sequence longer than the slot ({self.pool.max_len} tokens)")
        return super().append(layer, k, v)


def make_pool(model: MoETransformer, requests: list[dict], max_batch: int) -> SlotPool | None:
    """A slot pool for a serve's requests (None: fast path off, nothing to serve, or over the memory budget)."""
    if not fast_enabled() or not requests or model.cfg.first_k_dense:  # FastDecoder: MoE layers only
        return None
    cfg = model.cfg
    slots = min(max_batch, len(requests))
    max_len = max(len(r["prompt"]) + int(r["max_new"]) for r in requests)
    max_len = -(-max_len // 16) * 16
    need = SlotPool.nbytes(cfg.num_layers, slots, cfg.num_kv_heads, max_len, cfg.head_dim, model.dtype)
    if model.device.type == "cuda":
        budget = KV_BUDGET_FRAC * torch.cuda.mem_get_info(model.device)[0]
    else:
        budget = KV_BUDGET_CPU_BYTES
    if need > budget:
        return None
    return SlotPool(cfg.num_layers, slots, cfg.num_kv_heads, max_len, cfg.head_dim, model.device, model.dtype)


def compact(active: list, pool: SlotPool) -> list:
    """Move sequences so that the B active ones occupy slots 0..B-1; returns them in slot order."""
    B = len(active)
    used = {q.cache.slot for q in active}
    holes = [s for s in range(B) if s not in used]
    movers = [q for q in active if q.cache.slot >= B]
    for q, s in zip(movers, holes):
        pool.move(q.cache.slot, s, q.cache.length)
        q.cache.bind(s)
    return sorted(active, key=lambda q: q.cache.slot)


def advance(seqs: list, num_layers: int) -> None:
    """Every sequence's cache holds one more token (a decode step wrote it in every layer)."""
    for q in seqs:
        q.cache.length += 1
        q.cache.filled = [q.cache.length] * num_layers


class FastDecoder:
    """Batched decode step over a `SlotPool` for the model's non-expert part (weights shared with `model`)."""

    def __init__(self, model: MoETransformer):
        self.model = model
        cfg, w = model.cfg, model.w
        nq, nk = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.split = (nq, nq + nk)
        self.qkv, self.qkv_b = [], []
        for i in range(cfg.num_layers):  # fused q/k/v; the model's own tensors become views of it (no copy kept)
            a = f"{layer_prefix(i)}self_attn."
            names = [f"{a}{n}_proj.weight" for n in "qkv"]
            fused = torch.cat([w[n] for n in names])
            for n, part in zip(names, fused.split([nq, nk, nk])):
                w[n] = part
            self.qkv.append(fused)
            bn = [f"{a}{n}_proj.bias" for n in "qkv"]
            if bn[0] in w:
                fb = torch.cat([w[n] for n in bn])
                for n, part in zip(bn, fb.split([nq, nk, nk])):
                    w[n] = part
                self.qkv_b.append(fb)
            else:
                self.qkv_b.append(None)
        self._rope_len = 0
        self.pool: SlotPool | None = None
        self._graph_cache: dict = {}

    def _rope_table(self, n: int) -> None:
        if n <= self._rope_len:
            return
        cfg, m = self.model.cfg, self.model
        dim = cfg.head_dim
        pos = torch.arange(n, device=m.device)
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, device=m.device, dtype=torch.float32) / dim))
        emb = torch.cat([pos.float()[:, None] * inv[None]] * 2, -1)  # as model.rope_cos_sin
        self.cos, self.sin = emb.cos().to(m.dtype), emb.sin().to(m.dtype)
        self._rope_len = n

    def _pre(self, i: int, h: torch.Tensor, st: dict):
        """Layer i up to the routed experts (device ops only): attention, router, shared expert.
        Returns (h after attention, the MLP input, expert ids, gate weights, shared-expert output or None)."""
        m, cfg = self.model, self.model.cfg
        w, p = m.w, layer_prefix(i)
        B = h.shape[0]
        H, Hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        a, b = self.split
        x = rms_norm(h, w[f"{p}input_layernorm.weight"], cfg.rms_eps)
        qkv = F.linear(x, self.qkv[i], self.qkv_b[i])
        q = apply_rope(qkv[:, :a].view(B, H, hd), st["cos"], st["sin"])
        k = apply_rope(qkv[:, a:b].view(B, Hkv, hd), st["cos"], st["sin"])
        v = qkv[:, b:].view(B, Hkv, hd)
        K, V = self.pool.k[i], self.pool.v[i]
        K[st["bidx"], :, st["pos"]] = k
        V[st["bidx"], :, st["pos"]] = v
        T = st["T"]
        Ks, Vs = K[:B, :, :T], V[:B, :, :T]
        if Hkv != H:
            Ks, Vs = Ks.repeat_interleave(H // Hkv, 1), Vs.repeat_interleave(H // Hkv, 1)
        o = F.scaled_dot_product_attention(q[:, :, None], Ks, Vs, attn_mask=st["mask"])  # [B, H, 1, hd]
        h = h + F.linear(o.reshape(B, H * hd), w[f"{p}self_attn.o_proj.weight"])
        x = rms_norm(h, w[f"{p}post_attention_layernorm.weight"], cfg.rms_eps)
        l = i - cfg.first_k_dense
        idx, wts = m.route(i, x, None if st["r"] is None else st["r"][:, l])
        s = None
        if cfg.d_ff_shared:
            s = F.linear(
                F.silu(F.linear(x, w[f"{p}mlp.shared_expert.gate_proj.weight"]))
                * F.linear(x, w[f"{p}mlp.shared_expert.up_proj.weight"]),
                w[f"{p}mlp.shared_expert.down_proj.weight"],
            )
            if cfg.shared_expert_gate:
                s = torch.sigmoid(F.linear(x, w[f"{p}mlp.shared_expert_gate.weight"])) * s
        return h, x, idx, wts, s

    def _graphs(self, B: int, forced: bool):
        """CUDA graphs of every layer's device part for B sequences (attention over the whole slot with a mask,
        so one capture serves every step); None where not possible (CPU, dense layers) or when capture fails."""
        m, cfg = self.model, self.model.cfg
        key = (B, forced, self.pool.max_len, id(self.pool))
        if key in self._graph_cache:
            return self._graph_cache[key]
        g = None
        if m.device.type == "cuda" and not cfg.first_k_dense and os.environ.get(GRAPH_ENV, "1") != "0":
            try:
                g = self._capture(B, forced)
            except Exception as exc:  # any capture failure: the eager step, said once
                import sys

                print(f"fast path: CUDA graph capture failed ({exc!r}); eager decode steps", file=sys.stderr)
        if len(self._graph_cache) >= GRAPH_CACHE:
            self._graph_cache.clear()
        self._graph_cache[key] = g
        return g

    def _capture(self, B: int, forced: bool) -> dict:
        m, cfg = self.model, self.model.cfg
        dev, L = m.device, cfg.num_layers
        st = self.static_state(B, forced)
        hin = [torch.zeros(B, cfg.d_model, dtype=m.dtype, device=dev) for _ in range(L)]
        saved = [(k[:B].clone(), v[:B].clone()) for k, v in zip(self.pool.k, self.pool.v)]  # warm-up writes
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), sdpa_no_cudnn():
            for i in range(L):
                self._pre(i, hin[i], st)
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        graphs, outs = [], []
        with sdpa_no_cudnn():
            for i in range(L):
                gr = torch.cuda.CUDAGraph()
                with torch.cuda.graph(gr, pool=pool):
                    outs.append(self._pre(i, hin[i], st))
                graphs.append(gr)
        for (k, v), (k0, v0) in zip(zip(self.pool.k, self.pool.v), saved):
            k[:B].copy_(k0)
            v[:B].copy_(v0)
        return {"st": st, "hin": hin, "graphs": graphs, "outs": outs}

    def static_state(self, B: int, forced: bool) -> dict:
        """The step inputs of captured graphs for B sequences (attention over the whole slot, masked)."""
        m, cfg = self.model, self.model.cfg
        dev, ml = m.device, self.pool.max_len
        return {
            "pos": torch.zeros(B, dtype=torch.long, device=dev),
            "bidx": torch.arange(B, device=dev),
            "cos": torch.zeros(B, 1, cfg.head_dim, dtype=m.dtype, device=dev),
            "sin": torch.zeros(B, 1, cfg.head_dim, dtype=m.dtype, device=dev),
            "mask": torch.zeros(B, 1, 1, ml, dtype=m.dtype, device=dev),
            "r": torch.zeros(B, cfg.num_moe_layers, cfg.top_k, dtype=torch.long, device=dev) if forced else None,
            "T": ml,
        }

    def fill_state(self, st: dict, pos: torch.Tensor, routes: torch.Tensor | None) -> None:
        """Write a step's positions (and forced routes) into the static inputs of `static_state`."""
        st["pos"].copy_(pos)
        st["cos"].copy_(self.cos[pos][:, None])
        st["sin"].copy_(self.sin[pos][:, None])
        pad = torch.arange(self.pool.max_len, device=pos.device)[None] > pos[:, None]
        st["mask"].copy_(torch.zeros_like(st["mask"]).masked_fill(pad[:, None, None], -torch.inf))
        if routes is not None:
            st["r"].copy_(routes)

    def eager_state(self, lengths: list[int], pos: torch.Tensor, routes: torch.Tensor | None) -> dict:
        """A step's inputs for eager layers: attention over the longest sequence + 1 (no mask if equal lengths)."""
        m, B, T = self.model, len(lengths), max(lengths) + 1
        mask = None  # equal lengths: nothing to mask, the fused kernels apply
        if min(lengths) != max(lengths):
            pad = torch.arange(T, device=m.device)[None] > pos[:, None]
            mask = torch.zeros(B, 1, 1, T, dtype=m.dtype, device=m.device).masked_fill(pad[:, None, None], -torch.inf)
        return {
            "pos": pos,
            "bidx": torch.arange(B, device=m.device),
            "cos": self.cos[pos][:, None],
            "sin": self.sin[pos][:, None],
            "mask": mask,
            "r": None if routes is None else routes.to(m.device),
            "T": T,
        }

    @torch.no_grad()
    def decode(self, seqs: list, pool: SlotPool, experts, routes: torch.Tensor | None) -> torch.Tensor:
        """One new token for each sequence (in slots 0..B-1, in order): logits [B, V] (float32)."""
        m, cfg = self.model, self.model.cfg
        w = m.w
        B = len(seqs)
        if pool is not self.pool:
            self.pool, self._graph_cache = pool, {}
        lengths = [q.cache.length for q in seqs]
        self._rope_table(pool.max_len)
        dev = m.device
        ids = torch.tensor([q.out[-1] for q in seqs], device=dev)
        pos = torch.tensor(lengths, device=dev)
        gr = self._graphs(B, routes is not None)
        h = F.embedding(ids, w["model.embed_tokens.weight"])
        if gr is not None:
            st = gr["st"]
            self.fill_state(st, pos, routes)
            for i in range(cfg.num_layers):
                gr["hin"][i].copy_(h)
                gr["graphs"][i].replay()
                hm, x, idx, wts, s = gr["outs"][i]
                y = experts(i - cfg.first_k_dense, x, idx, wts)
                h = hm + (y if s is None else y + s)
        else:
            st = self.eager_state(lengths, pos, routes)
            with sdpa_no_cudnn():
                for i in range(cfg.num_layers):
                    hm, x, idx, wts, s = self._pre(i, h, st)
                    y = experts(i - cfg.first_k_dense, x, idx, wts)
                    h = hm + (y if s is None else y + s)
        advance(seqs, cfg.num_layers)
        h = rms_norm(h, w["model.norm.weight"], cfg.rms_eps)
        return F.linear(h, w["lm_head.weight"]).float()


class GroupedExperts:
    """A server's experts per layer as stacked weights, computed with grouped GEMMs (no host sync)."""

    def __init__(self, store: ExpertStore, num_layers: int, num_experts: int, device: torch.device):
        self.store, self.L, self.E, self.device = store, num_layers, num_experts, device
        self.version = -1
        self.layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.pairs = torch.zeros((), dtype=torch.long, device=device)  # (row, expert) pairs computed (tier stats)

    def refresh(self) -> None:
        """Re-stack after the store changed (reset / migration): a layer is grouped when every expert this server
        holds there is computed from a 16-bit replica in GPU memory on the server's first device."""
        if self.store.version == self.version:
            return
        self.layers = [self._stack(l) for l in range(self.L)]
        self.version = self.store.version

    def _stack(self, l: int):
        reps = [self.store.best(l, e) for e in range(self.E)]
        held = [(e, r) for e, r in enumerate(reps) if r is not None]
        if not fast_enabled() or not held:
            return None
        dev = self.store.devices
        if any(r.tier != TIER_GPU or r.bits != 16 or dev[r.device] != self.device for _, r in held):
            return None
        f = held[0][1].weights[0].shape[0]
        dt = self.store.dtype  # the compute dtype (16-bit replicas are bf16; the CPU computes in fp32)
        w13 = torch.stack([torch.cat([r.weights[0].data, r.weights[1].data]) for _, r in held]).to(dt)
        w2 = torch.stack([r.weights[2].data for _, r in held]).to(dt)
        if w13.stride(1) * w13.element_size() % 16 or w2.stride(1) * w2.element_size() % 16:
            return None  # grouped GEMM needs 16-byte strides
        pos = torch.full((self.E,), len(held), dtype=torch.long, device=self.device)
        for i, (e, r) in enumerate(held):
            pos[e] = i
            g, u, d = r.weights
            if g.data.dtype != dt:
                continue  # a stack in another dtype than the replica's (CPU): both kept
            r.weights = (  # the replica's tensors become views of the stacks: one copy of the weights in memory
                QTensor(16, w13[i, :f], None, g.shape, 0),
                QTensor(16, w13[i, f:], None, u.shape, 0),
                QTensor(16, w2[i], None, d.shape, 0),
            )
        return w13, w2, pos

    def has(self, layer: int) -> bool:
        return self.layers[layer] is not None

    def combine(self, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """sum_j w[:, j] * expert_{ids[:, j]}(x) per row; x [N, d], ids [N, k] long (-1: slot unused), w [N, k]."""
        w13, w2, pos = self.layers[layer]
        k = ids.shape[1]
        El, f = w13.shape[0], w2.shape[2]
        flat = ids.reshape(-1)
        valid = flat >= 0
        lp = torch.where(valid, pos[flat.clamp(min=0)], El)  # local expert position; El: the padding group
        order = lp.argsort(stable=True)
        counts = torch.zeros(El + 1, dtype=torch.int32, device=x.device).index_add_(
            0, lp, torch.ones_like(lp, dtype=torch.int32)
        )
        offs = counts[:El].cumsum(0, dtype=torch.int32)
        tok = order // k
        xs = x[tok]
        gu = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offs)
        act = F.silu(gu[:, :f]) * gu[:, f:]
        y = torch._grouped_mm(act, w2.transpose(-2, -1), offs=offs)  # rows past offs[-1] (padding): undefined
        keep = valid[order]
        y = torch.where(keep[:, None], y * w.reshape(-1)[order, None].to(y.dtype), 0)
        self.pairs += keep.sum()
        return torch.zeros_like(x).index_add_(0, tok, y.to(x.dtype))
