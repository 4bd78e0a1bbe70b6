"""FastMoE: a single-device decode engine for the same MoE model (the GPU speed path).

Static KV cache, fused QKV and gate/up projections, routed experts stacked per layer and run as one grouped
matmul (`torch._grouped_mm`: only the experts that received tokens are read) or, for tiny batches, as a gathered
batched GEMV; the whole decode step is captured once in a CUDA graph and replayed per token.
Same weights and math as `model.MoETransformer` (tests compare the two).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from real_backend.model import MoEConfig, WeightSource, expert_names, layer_prefix, router_name

EXPERT_MODES = ("grouped", "gather", "loop")


class FastMoE:
    def __init__(
        self,
        cfg: MoEConfig,
        source: WeightSource,
        device="cuda",
        dtype=torch.bfloat16,
        max_batch: int = 1,
        max_len: int = 1024,
        expert_mode: str = "grouped",
    ):
        if cfg.first_k_dense:
            raise ValueError("FastMoE: dense leading layers are not supported")
        if expert_mode not in EXPERT_MODES:
            raise ValueError(f"expert_mode '{expert_mode}' unknown; allowed: {', '.join(EXPERT_MODES)}")
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        self.max_batch, self.max_len, self.expert_mode = max_batch, max_len, expert_mode
        dev = self.device
        ne = source.non_expert(dev, dtype)
        self.embed = ne["model.embed_tokens.weight"]
        self.lm_head = self.embed if cfg.tie_word_embeddings else ne["lm_head.weight"]
        self.norm = ne["model.norm.weight"]
        self.layers = []
        for i in range(cfg.num_layers):
            p = layer_prefix(i)
            a = f"{p}self_attn."
            lay = {
                "ln1": ne[f"{p}input_layernorm.weight"],
                "ln2": ne[f"{p}post_attention_layernorm.weight"],
                "qkv": torch.cat([ne[f"{a}{n}_proj.weight"] for n in "qkv"]),
                "qkv_b": torch.cat([ne[f"{a}{n}_proj.bias"] for n in "qkv"]) if cfg.attn_bias else None,
                "o": ne[f"{a}o_proj.weight"],
                "router": ne[router_name(cfg, i)],
            }
            if cfg.d_ff_shared:
                s = f"{p}mlp.shared_expert."
                lay["sh_gu"] = torch.cat([ne[f"{s}gate_proj.weight"], ne[f"{s}up_proj.weight"]])
                lay["sh_d"] = ne[f"{s}down_proj.weight"]
                lay["sh_g"] = ne.get(f"{p}mlp.shared_expert_gate.weight")
            w13, w2 = [], []
            for e in range(cfg.num_experts):
                names = list(expert_names(cfg, i, e))
                w = source.get(names, dev, dtype)
                w13.append(torch.cat([w[names[0]], w[names[1]]]))
                w2.append(w[names[2]])
            lay["w13"], lay["w2"] = torch.stack(w13), torch.stack(w2)
            del w13, w2
            self.layers.append(lay)
        hd = cfg.head_dim
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=dev, dtype=torch.float32) / hd))
        freqs = torch.arange(max_len, device=dev, dtype=torch.float32)[:, None] * inv[None]
        emb = torch.cat([freqs, freqs], -1)
        self.cos, self.sin = emb.cos().to(dtype), emb.sin().to(dtype)
        shape = (max_batch, cfg.num_kv_heads, max_len, hd)
        self.k_cache = [torch.zeros(shape, device=dev, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v_cache = [torch.zeros(shape, device=dev, dtype=dtype) for _ in range(cfg.num_layers)]
        self.graph: torch.cuda.CUDAGraph | None = None
        self._static: dict = {}

    # ---- pieces -----------------------------------------------------------------------------------------
    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.rms_eps)).to(x.dtype) * w

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin

    def _experts(self, lay: dict, h: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
        """Weighted routed-expert output for tokens h [N, d] with experts idx [N, k]."""
        N, k = idx.shape
        E, f = self.cfg.num_experts, self.cfg.d_ff_expert
        flat = idx.reshape(-1)
        if self.expert_mode == "gather":  # batched GEMV on gathered weights (small N·k)
            xs = h.repeat_interleave(k, 0)
            gu = torch.bmm(lay["w13"][flat], xs[:, :, None])[..., 0]
            a = F.silu(gu[:, :f]) * gu[:, f:]
            y = torch.bmm(lay["w2"][flat], a[:, :, None])[..., 0]
            return (y.view(N, k, -1) * wts[..., None]).sum(1)
        if self.expert_mode == "loop":
            out = torch.zeros_like(h)
            for e in flat.unique().tolist():
                tok, slot = (idx == e).nonzero(as_tuple=True)
                gu = h[tok] @ lay["w13"][e].T
                out.index_add_(0, tok, ((F.silu(gu[:, :f]) * gu[:, f:]) @ lay["w2"][e].T) * wts[tok, slot, None])
            return out
        order = flat.argsort(stable=True)
        tok = order // k
        counts = torch.zeros(E, dtype=torch.int32, device=h.device).index_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32)
        )
        offs = counts.cumsum(0, dtype=torch.int32)
        gu = torch._grouped_mm(h[tok], lay["w13"].transpose(-2, -1), offs=offs)
        a = F.silu(gu[:, :f]) * gu[:, f:]
        y = torch._grouped_mm(a, lay["w2"].transpose(-2, -1), offs=offs)
        y = y * wts.reshape(-1)[order, None]
        return torch.zeros_like(h).index_add_(0, tok, y)

    def _mlp(self, lay: dict, h: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        probs = F.linear(h, lay["router"]).float().softmax(-1)
        wts, idx = probs.topk(cfg.top_k, -1)
        if cfg.norm_topk_prob:
            wts = wts / wts.sum(-1, keepdim=True)
        out = self._experts(lay, h, idx, wts.to(h.dtype))
        if cfg.d_ff_shared:
            f = cfg.d_ff_shared
            gu = F.linear(h, lay["sh_gu"])
            s = F.linear(F.silu(gu[:, :f]) * gu[:, f:], lay["sh_d"])
            if lay["sh_g"] is not None:
                s = torch.sigmoid(F.linear(h, lay["sh_g"])) * s
            out = out + s
        return out

    def _qkv(self, lay, h):
        cfg = self.cfg
        qkv = F.linear(h, lay["qkv"], lay["qkv_b"])
        nq, nk = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return qkv[..., :nq], qkv[..., nq : nq + nk], qkv[..., nq + nk :]

    # ---- prefill / decode ---------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] (equal lengths) -> logits of the last position [B, V]; fills the cache at 0..T-1."""
        cfg = self.cfg
        B, T = ids.shape
        H, Hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        x = F.embedding(ids, self.embed).view(B * T, -1)
        cos, sin = self.cos[:T], self.sin[:T]
        for i, lay in enumerate(self.layers):
            h = self._rms(x, lay["ln1"])
            q, k, v = self._qkv(lay, h)
            q = self._rope(q.view(B, T, H, hd).transpose(1, 2), cos, sin)
            k = self._rope(k.view(B, T, Hkv, hd).transpose(1, 2), cos, sin)
            v = v.view(B, T, Hkv, hd).transpose(1, 2)
            self.k_cache[i][:B, :, :T] = k
            self.v_cache[i][:B, :, :T] = v
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != H)
            x = x + F.linear(o.transpose(1, 2).reshape(B * T, H * hd), lay["o"])
            x = x + self._mlp(lay, self._rms(x, lay["ln2"]))
        last = self._rms(x.view(B, T, -1)[:, -1], self.norm)
        return F.linear(last, self.lm_head).float()

    def _decode(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token per sequence: ids [B], positions [B] (device tensors) -> logits [B, V]."""
        cfg = self.cfg
        B = ids.shape[0]
        H, Hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        x = F.embedding(ids, self.embed)
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]  # [B, 1, 1, hd]
        mask = (torch.arange(self.max_len, device=ids.device)[None] <= pos[:, None])[:, None, None]
        bidx = torch.arange(B, device=ids.device)
        for i, lay in enumerate(self.layers):
            h = self._rms(x, lay["ln1"])
            q, k, v = self._qkv(lay, h)
            q = self._rope(q.view(B, H, 1, hd), cos, sin)
            k = self._rope(k.view(B, Hkv, 1, hd), cos, sin)
            kc, vc = self.k_cache[i][:B], self.v_cache[i][:B]
            kc[bidx, :, pos] = k[:, :, 0]
            vc[bidx, :, pos] = v.view(B, Hkv, hd)
            o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=Hkv != H)
            x = x + F.linear(o.reshape(B, H * hd), lay["o"])
            x = x + self._mlp(lay, self._rms(x, lay["ln2"]))
        return F.linear(self._rms(x, self.norm), self.lm_head).float()

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, V]; replays the CUDA graph when one was captured for this batch size."""
        st = self._static
        if self.graph is not None and ids.shape[0] == st["ids"].shape[0]:
            st["ids"].copy_(ids)
            st["pos"].copy_(pos)
            self.graph.replay()
            return st["out"]
        return self._decode(ids, pos)

    @torch.no_grad()
    def capture(self, batch: int, compile: bool = False) -> None:
        """Capture the decode step for `batch` sequences in a CUDA graph (CUDA only); `compile` first fuses its
        small elementwise kernels with torch.compile (inductor), which cuts the per-kernel launch cost."""
        ids = torch.zeros(batch, dtype=torch.long, device=self.device)
        pos = torch.zeros(batch, dtype=torch.long, device=self.device)
        fn = torch.compile(self._decode, dynamic=False) if compile else self._decode
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn(ids, pos)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fn(ids, pos)
        self.graph, self._static = g, {"ids": ids, "pos": pos, "out": out}

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new: int) -> torch.Tensor:
        """Greedy generation: ids [B, T] -> new tokens [B, max_new]."""
        B, T = ids.shape
        out = torch.empty(B, max_new, dtype=torch.long, device=ids.device)
        nxt = self.prefill(ids).argmax(-1)
        out[:, 0] = nxt
        pos = torch.full((B,), T, dtype=torch.long, device=ids.device)
        for t in range(1, max_new):
            nxt = self.decode(nxt, pos).argmax(-1)
            out[:, t] = nxt
            pos += 1
        return out
