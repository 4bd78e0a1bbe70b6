"""A Qwen2-MoE / Mixtral style MoE transformer in plain PyTorch, with Hugging Face tensor names.

Weights live in a flat dict keyed by Hugging Face names, so a local safetensors checkpoint loads as is and seeded
random weights (the default) are generated tensor by tensor: each tensor's generator is seeded from
(seed, name), so a server process can build only the experts it holds and still match every other process.
The routed-expert computation is a pluggable callable, which is how `server.py` sends tokens to remote experts.
"""

from __future__ import annotations

import contextlib
import json
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from coel_env.atomic import atomic_path, atomic_write_json
from coel_env.errors import ConfigError
from coel_env.specs import ModelSpec

ARCHS = ("qwen2_moe", "mixtral")
# experts(layer, x [T, d], idx [T, k], weight [T, k]) -> weighted sum of the routed experts' outputs [T, d]
ExpertFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MoEConfig:
    """Architecture of the MoE transformer (what a Hugging Face config.json says)."""

    arch: str
    num_layers: int
    num_experts: int
    top_k: int
    d_model: int
    d_ff_expert: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    d_ff_shared: int = 0
    shared_expert_gate: bool = False
    first_k_dense: int = 0
    d_ff_dense: int = 0
    attn_bias: bool = False
    tie_word_embeddings: bool = False
    rope_theta: float = 1e6
    rms_eps: float = 1e-6
    norm_topk_prob: bool = False

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense

    @classmethod
    def from_spec(cls, spec: ModelSpec, arch: str | None = None) -> MoEConfig:
        """A config for a coel_env ModelSpec; Qwen2-MoE style when it has a shared expert, else Mixtral style."""
        arch = arch or ("qwen2_moe" if spec.d_ff_shared else "mixtral")
        if arch not in ARCHS:
            raise ConfigError(f"model.arch: unknown '{arch}'; allowed: {', '.join(ARCHS)}")
        if spec.attn_params_per_layer is not None:
            raise ConfigError(
                f"model: {spec.name} uses latent attention (MLA), which the real backend lacks; "
                f"allowed: standard multi-head/GQA models ({', '.join(ARCHS)})"
            )
        return cls(
            arch=arch,
            num_layers=spec.num_layers,
            num_experts=spec.num_experts,
            top_k=spec.top_k,
            d_model=spec.d_model,
            d_ff_expert=spec.d_ff_expert,
            num_heads=spec.num_heads,
            num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            vocab_size=spec.vocab_size,
            d_ff_shared=spec.d_ff_shared,
            shared_expert_gate=spec.shared_expert_gate,
            first_k_dense=spec.first_k_dense,
            d_ff_dense=spec.d_ff_dense,
            attn_bias=spec.attn_bias or arch == "qwen2_moe",  # HF's Qwen2-MoE always has q/k/v biases
            tie_word_embeddings=spec.tie_word_embeddings,
            rms_eps=1e-6 if arch == "qwen2_moe" else 1e-5,
            norm_topk_prob=arch == "mixtral",
        )

    @classmethod
    def from_hf_config(cls, path: str | Path) -> MoEConfig:
        """Read a Hugging Face config.json (file or checkpoint directory) of a qwen2_moe or mixtral model."""
        p = Path(path)
        p = p / "config.json" if p.is_dir() else p
        if not p.is_file():
            raise ConfigError(f"model: no config.json at '{path}'")
        cfg = json.loads(p.read_text())
        arch = cfg.get("model_type", "")
        if arch not in ARCHS:
            raise ConfigError(f"model: {p}: model_type '{arch}' unsupported; allowed: {', '.join(ARCHS)}")
        heads = cfg["num_attention_heads"]
        qwen = arch == "qwen2_moe"
        return cls(
            arch=arch,
            num_layers=cfg["num_hidden_layers"],
            num_experts=cfg["num_experts"] if qwen else cfg["num_local_experts"],
            top_k=cfg["num_experts_per_tok"],
            d_model=cfg["hidden_size"],
            d_ff_expert=cfg["moe_intermediate_size"] if qwen else cfg["intermediate_size"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"],
            d_ff_shared=cfg.get("shared_expert_intermediate_size", 0) if qwen else 0,
            shared_expert_gate=qwen and bool(cfg.get("shared_expert_intermediate_size")),
            attn_bias=qwen,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_theta=float(cfg.get("rope_theta", 1e6)),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)) if qwen else True,
        )

    def hf_config_dict(self) -> dict:
        """A config.json for transformers (used by the GPU baseline and by saved checkpoints)."""
        base = dict(
            model_type=self.arch,
            hidden_size=self.d_model,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            vocab_size=self.vocab_size,
            num_experts_per_tok=self.top_k,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=4096,
            head_dim=self.head_dim,
        )
        if self.arch == "qwen2_moe":
            base.update(
                num_experts=self.num_experts,
                moe_intermediate_size=self.d_ff_expert,
                shared_expert_intermediate_size=self.d_ff_shared,
                intermediate_size=self.d_ff_shared or 1,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                output_router_logits=False,
            )
        else:
            base.update(num_local_experts=self.num_experts, intermediate_size=self.d_ff_expert)
        return base


# ---- tensor names --------------------------------------------------------------------------------------
def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def expert_names(cfg: MoEConfig, moe_layer: int, expert: int) -> tuple[str, str, str]:
    """HF names of (gate, up, down) projections of routed expert `expert` in MoE layer `moe_layer`."""
    p = layer_prefix(cfg.first_k_dense + moe_layer)
    if cfg.arch == "mixtral":
        q = f"{p}block_sparse_moe.experts.{expert}."
        return f"{q}w1.weight", f"{q}w3.weight", f"{q}w2.weight"
    q = f"{p}mlp.experts.{expert}."
    return f"{q}gate_proj.weight", f"{q}up_proj.weight", f"{q}down_proj.weight"


def router_name(cfg: MoEConfig, layer: int) -> str:
    return f"{layer_prefix(layer)}{'block_sparse_moe' if cfg.arch == 'mixtral' else 'mlp'}.gate.weight"


def non_expert_shapes(cfg: MoEConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor except the routed experts."""
    d, hd = cfg.d_model, cfg.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_layers):
        p = layer_prefix(i)
        out[f"{p}input_layernorm.weight"] = (d,)
        out[f"{p}post_attention_layernorm.weight"] = (d,)
        for n, rows in (("q", cfg.num_heads), ("k", cfg.num_kv_heads), ("v", cfg.num_kv_heads)):
            out[f"{p}self_attn.{n}_proj.weight"] = (rows * hd, d)
            if cfg.attn_bias:
                out[f"{p}self_attn.{n}_proj.bias"] = (rows * hd,)
        out[f"{p}self_attn.o_proj.weight"] = (d, cfg.num_heads * hd)
        if i < cfg.first_k_dense:
            f = cfg.d_ff_dense
            out.update(
                {
                    f"{p}mlp.gate_proj.weight": (f, d),
                    f"{p}mlp.up_proj.weight": (f, d),
                    f"{p}mlp.down_proj.weight": (d, f),
                }
            )
            continue
        out[router_name(cfg, i)] = (cfg.num_experts, d)
        if cfg.d_ff_shared:
            f = cfg.d_ff_shared
            out.update(
                {
                    f"{p}mlp.shared_expert.gate_proj.weight": (f, d),
                    f"{p}mlp.shared_expert.up_proj.weight": (f, d),
                    f"{p}mlp.shared_expert.down_proj.weight": (d, f),
                }
            )
            if cfg.shared_expert_gate:
                out[f"{p}mlp.shared_expert_gate.weight"] = (1, d)
    return out


def expert_shapes(cfg: MoEConfig) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    f, d = cfg.d_ff_expert, cfg.d_model
    return (f, d), (f, d), (d, f)


# ---- weights -------------------------------------------------------------------------------------------
def _tensor_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def random_tensor(
    name: str,
    shape: tuple[int, ...],
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The seeded random value of one named tensor (identical in every process for the same seed)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device, dtype=dtype)
    g = torch.Generator(device=device).manual_seed(_tensor_seed(seed, name))
    std = 1.0 if "embed_tokens" in name else (0.02 if name.endswith(".bias") else 1.0 / math.sqrt(shape[-1]))
    t = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * std
    return t.to(dtype)


def random_weights(
    cfg: MoEConfig, seed: int, names: list[str] | None = None, device="cpu", dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """Seeded random weights with HF names: the non-expert tensors, or exactly `names` (experts included)."""
    shapes = non_expert_shapes(cfg)
    if names is None:
        names = list(shapes)
    eshape = dict(zip(("gate", "up", "down"), expert_shapes(cfg)))
    out = {}
    for n in names:
        shape = shapes.get(n)
        if shape is None:  # a routed expert: gate/up or down projection
            is_down = n.endswith(("down_proj.weight", "w2.weight"))
            shape = eshape["down" if is_down else "gate"]
        out[n] = random_tensor(n, shape, seed, device, dtype)
    return out


class WeightSource:
    """Where weights come from: seeded random (default) or a local safetensors checkpoint (HF names)."""

    def __init__(self, cfg: MoEConfig, seed: int = 0, checkpoint: str | Path | None = None, gen_device: str = "cpu"):
        """`gen_device`: where random weights are drawn ("cpu": identical on every machine; "cuda": fast for
        large models, but CUDA's generator gives other values than the CPU's for the same seed)."""
        self.cfg, self.seed, self.gen_device = cfg, seed, gen_device
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self._index: dict[str, Path] | None = None
        if self.checkpoint is not None:
            files = sorted(self.checkpoint.glob("*.safetensors"))
            if not files:
                raise ConfigError(f"checkpoint: no *.safetensors files in '{self.checkpoint}'")
            from safetensors import safe_open

            self._index = {}
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():  # noqa: SIM118 (safe_open has no __iter__)
                        self._index[k] = f

    def get(self, names: list[str], device="cpu", dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        if self._index is None:
            w = random_weights(self.cfg, self.seed, names, self.gen_device, dtype)
            return {k: v.to(device) for k, v in w.items()}
        from safetensors import safe_open

        missing = [n for n in names if n not in self._index]
        if missing:
            raise ConfigError(
                f"checkpoint: tensor '{missing[0]}' missing from '{self.checkpoint}' ({len(missing)} missing)"
            )
        out = {}
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self._index[n], []).append(n)
        for f, ns in by_file.items():
            with safe_open(str(f), framework="pt", device=str(device)) as h:
                for n in ns:
                    out[n] = h.get_tensor(n).to(dtype)
        return out

    def non_expert(self, device="cpu", dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
        return self.get(list(non_expert_shapes(self.cfg)), device, dtype)

    def expert(self, moe_layer: int, expert: int, device="cpu", dtype=torch.bfloat16) -> tuple[torch.Tensor, ...]:
        names = expert_names(self.cfg, moe_layer, expert)
        w = self.get(list(names), device, dtype)
        return tuple(w[n] for n in names)


def save_checkpoint(cfg: MoEConfig, seed: int, path: str | Path) -> Path:
    """Write the seeded random model as a HF-style checkpoint (config.json + model.safetensors).

    Atomic per file (coel_env.atomic): a crash or Ctrl-C leaves no half-written file, and config.json, which makes
    the folder a checkpoint, is removed first and written last, so an interrupted overwrite is no checkpoint rather
    than new weights under an old config."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    names = list(non_expert_shapes(cfg)) + [
        n for l in range(cfg.num_moe_layers) for e in range(cfg.num_experts) for n in expert_names(cfg, l, e)
    ]
    weights = random_weights(cfg, seed, names)
    (path / "config.json").unlink(missing_ok=True)
    with atomic_path(path / "model.safetensors", suffix=".safetensors") as tmp:
        save_file(weights, str(tmp))
    atomic_write_json(path / "config.json", cfg.hf_config_dict())
    return path


# ---- forward -------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope_cos_sin(cfg: MoEConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    freqs = positions.float()[:, None] * inv[None]
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [H, T, hd]; HF's rotate-half convention."""
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], -1)
    return x * cos + rot * sin


def sdpa_no_cudnn():
    """SDPA without the cuDNN backend on CUDA: cuDNN builds a new plan for every new key length (about 3 ms of host
    time per call on an H200, most of a server's decode step when measured); flash / memory-efficient do not."""
    if not torch.cuda.is_available():
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [H, n, hd] (the last n positions) over k, v [H, T, hd]: causal attention without an explicit mask where
    none is needed (a single new token sees everything; a fresh prompt is plain causal), so fused kernels apply."""
    n, T = q.shape[1], k.shape[1]
    if n == 1:
        return F.scaled_dot_product_attention(q[None], k[None], v[None])[0]
    if n == T:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
    mask = torch.ones(n, T, dtype=torch.bool, device=q.device).tril(T - n)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask)[0]


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


class KVCache:
    """Per-sequence KV cache: one (k, v) buffer [Hkv, capacity, hd] per layer, grown by doubling (amortized O(1)
    appends instead of a copy of the whole cache per token)."""

    def __init__(self, num_layers: int):
        self.kbuf: list[torch.Tensor | None] = [None] * num_layers
        self.vbuf: list[torch.Tensor | None] = [None] * num_layers
        self.filled = [0] * num_layers
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add k, v [Hkv, n, hd]; return the layer's whole cache (views)."""
        n, t = k.shape[1], self.filled[layer]
        buf = self.kbuf[layer]
        if buf is None or t + n > buf.shape[1]:
            cap = max(2 * (0 if buf is None else buf.shape[1]), t + n, 16)
            kb = k.new_empty(k.shape[0], cap, k.shape[2])
            vb = v.new_empty(v.shape[0], cap, v.shape[2])
            if t:
                kb[:, :t], vb[:, :t] = self.kbuf[layer][:, :t], self.vbuf[layer][:, :t]
            self.kbuf[layer], self.vbuf[layer] = kb, vb
        self.kbuf[layer][:, t : t + n] = k
        self.vbuf[layer][:, t : t + n] = v
        self.filled[layer] = t + n
        return self.kv(layer)

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.filled[layer]
        return self.kbuf[layer][:, :t], self.vbuf[layer][:, :t]

    def truncate(self, layer: int, length: int) -> None:
        """Forget the layer's entries beyond `length` (e.g. to time one step repeatedly)."""
        self.filled[layer] = min(self.filled[layer], length)


class MoETransformer:
    """The non-expert part of the model plus routing; routed experts are computed by `experts` (an ExpertFn).

    Sequences are ragged: a step takes a list of token chunks (one per sequence, prompt or next token), runs
    attention per sequence and every MLP/MoE op over all tokens of the step at once (vLLM-style flattening).
    """

    def __init__(
        self, cfg: MoEConfig, weights: dict[str, torch.Tensor], device="cpu", dtype: torch.dtype = torch.float32
    ):
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        self.w = {k: v.to(self.device, dtype) for k, v in weights.items()}
        if cfg.tie_word_embeddings:
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]

    def _attention(self, i: int, x: torch.Tensor, chunks: list[int], caches: list[KVCache]) -> torch.Tensor:
        cfg, w, p = self.cfg, self.w, layer_prefix(i)
        hd, H, Hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        q = F.linear(x, w[f"{p}self_attn.q_proj.weight"], w.get(f"{p}self_attn.q_proj.bias"))
        k = F.linear(x, w[f"{p}self_attn.k_proj.weight"], w.get(f"{p}self_attn.k_proj.bias"))
        v = F.linear(x, w[f"{p}self_attn.v_proj.weight"], w.get(f"{p}self_attn.v_proj.bias"))
        if len(chunks) > 1 and all(n == 1 for n in chunks):
            return F.linear(self._decode_attention(i, q, k, v, caches), w[f"{p}self_attn.o_proj.weight"])
        outs, start = [], 0
        for n, cache in zip(chunks, caches):
            pos = torch.arange(cache.length, cache.length + n, device=x.device)
            cos, sin = rope_cos_sin(cfg, pos, x.dtype)
            qs = apply_rope(q[start : start + n].view(n, H, hd).transpose(0, 1), cos, sin)
            ks = apply_rope(k[start : start + n].view(n, Hkv, hd).transpose(0, 1), cos, sin)
            vs = v[start : start + n].view(n, Hkv, hd).transpose(0, 1)
            K, V = cache.append(i, ks, vs)
            rep = H // Hkv
            K, V = K.repeat_interleave(rep, 0), V.repeat_interleave(rep, 0)
            o = _causal_attention(qs, K, V)
            outs.append(o.transpose(0, 1).reshape(n, H * hd))
            start += n
        return F.linear(torch.cat(outs), w[f"{p}self_attn.o_proj.weight"])

    def _decode_attention(
        self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, caches: list[KVCache]
    ) -> torch.Tensor:
        """One new token for each of B sequences at once: rope for all, caches padded to the longest, one SDPA
        call (masking the padding, if any) instead of a dozen small ops per sequence."""
        cfg = self.cfg
        hd, H, Hkv, B = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, len(caches)
        lengths = [c.length for c in caches]
        pos = torch.tensor(lengths, device=q.device)
        cos, sin = rope_cos_sin(cfg, pos, q.dtype)  # [B, hd]
        qs = apply_rope(q.view(B, H, hd), cos[:, None], sin[:, None])
        ks = apply_rope(k.view(B, Hkv, hd), cos[:, None], sin[:, None])
        vs = v.view(B, Hkv, hd)
        T = max(lengths) + 1
        K = q.new_zeros(B, Hkv, T, hd)
        V = q.new_zeros(B, Hkv, T, hd)
        for b, c in enumerate(caches):
            kb, vb = c.append(i, ks[b, :, None], vs[b, :, None])
            K[b, :, : kb.shape[1]], V[b, :, : vb.shape[1]] = kb, vb
        rep = H // Hkv
        K, V = K.repeat_interleave(rep, 1), V.repeat_interleave(rep, 1)
        mask = None  # equal lengths: nothing padded, the fused kernels apply
        if min(lengths) != max(lengths):  # padded keys get -inf (an additive mask keeps the fused GPU kernels)
            pad = torch.arange(T, device=q.device)[None] > pos[:, None]
            mask = torch.zeros(B, 1, 1, T, dtype=q.dtype, device=q.device).masked_fill(pad[:, None, None], -torch.inf)
        o = F.scaled_dot_product_attention(qs[:, :, None], K, V, attn_mask=mask)  # [B, H, 1, hd]
        return o.reshape(B, H * hd)

    def route(self, i: int, x: torch.Tensor, forced: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert ids [T, k] and gate weights [T, k]; `forced` ids (from traces) replace the router's."""
        logits = F.linear(x, self.w[router_name(self.cfg, i)]).float()
        probs = logits.softmax(-1)
        if forced is None:
            wts, idx = probs.topk(self.cfg.top_k, -1)
        else:
            idx = forced.to(x.device, torch.long)
            wts = probs.gather(-1, idx)
        if self.cfg.norm_topk_prob:
            wts = wts / wts.sum(-1, keepdim=True)
        return idx, wts.to(x.dtype)

    def _mlp(self, i: int, x: torch.Tensor, routes: torch.Tensor | None, experts: ExpertFn) -> torch.Tensor:
        cfg, w, p = self.cfg, self.w, layer_prefix(i)
        if i < cfg.first_k_dense:
            return swiglu(x, w[f"{p}mlp.gate_proj.weight"], w[f"{p}mlp.up_proj.weight"], w[f"{p}mlp.down_proj.weight"])
        l = i - cfg.first_k_dense
        idx, wts = self.route(i, x, None if routes is None else routes[:, l])
        out = experts(l, x, idx, wts)
        if cfg.d_ff_shared:
            s = swiglu(
                x,
                w[f"{p}mlp.shared_expert.gate_proj.weight"],
                w[f"{p}mlp.shared_expert.up_proj.weight"],
                w[f"{p}mlp.shared_expert.down_proj.weight"],
            )
            if cfg.shared_expert_gate:
                s = torch.sigmoid(F.linear(x, w[f"{p}mlp.shared_expert_gate.weight"])) * s
            out = out + s
        return out

    def forward(
        self,
        tokens: list[torch.Tensor],
        caches: list[KVCache],
        experts: ExpertFn,
        routes: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One step over ragged chunks; returns the logits [sum(len), V] (float32). Updates `caches`."""
        cfg, w = self.cfg, self.w
        chunks = [int(t.numel()) for t in tokens]
        ids = torch.cat(tokens).to(self.device)
        r = None if routes is None else torch.cat(routes).to(self.device)
        h = F.embedding(ids, w["model.embed_tokens.weight"])
        with sdpa_no_cudnn():
            for i in range(cfg.num_layers):
                p = layer_prefix(i)
                h = h + self._attention(i, rms_norm(h, w[f"{p}input_layernorm.weight"], cfg.rms_eps), chunks, caches)
                h = h + self._mlp(i, rms_norm(h, w[f"{p}post_attention_layernorm.weight"], cfg.rms_eps), r, experts)
        for c, n in zip(caches, chunks):
            c.length += n
        h = rms_norm(h, w["model.norm.weight"], cfg.rms_eps)
        return F.linear(h, w["lm_head.weight"]).float()


def generate(
    model: MoETransformer,
    prompts: list[torch.Tensor],
    max_new: list[int],
    experts: ExpertFn,
    routes: list[torch.Tensor] | None = None,
    step_hook: Callable[[], None] | None = None,
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy generation of a batch of ragged prompts; returns (new tokens per sequence, prompt logits per sequence).

    `routes[i]` [len(prompt) + max_new - 1, L, k] forces the experts of every token of sequence i."""
    caches = [KVCache(model.cfg.num_layers) for _ in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    prompt_logits: list[torch.Tensor] = []
    live = list(range(len(prompts)))
    step_tokens = list(prompts)
    first = True
    while live:
        rts = (
            None
            if routes is None
            else [routes[i][caches[i].length : caches[i].length + len(step_tokens[j])] for j, i in enumerate(live)]
        )
        logits = model.forward(step_tokens, [caches[i] for i in live], experts, rts)
        if step_hook is not None:
            step_hook()
        ends = torch.tensor([len(t) for t in step_tokens]).cumsum(0) - 1
        nxt = logits[ends].argmax(-1).tolist()
        if first:
            start = 0
            for t in step_tokens:
                prompt_logits.append(logits[start : start + len(t)])
                start += len(t)
            first = False
        keep, toks = [], []
        for j, i in enumerate(live):
            out[i].append(int(nxt[j]))
            if len(out[i]) < max_new[i]:
                keep.append(i)
                toks.append(torch.tensor([nxt[j]]))
        live, step_tokens = keep, toks
    return out, prompt_logits


class DenseExperts:
    """All routed experts in one process at 16-bit (the single-process reference)."""

    def __init__(self, cfg: MoEConfig, source: WeightSource, device="cpu", dtype=torch.float32):
        self.cfg = cfg
        self.w = [
            [tuple(t.to(device, dtype) for t in source.expert(l, e)) for e in range(cfg.num_experts)]
            for l in range(cfg.num_moe_layers)
        ]

    def __call__(self, layer: int, x: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in idx.unique().tolist():
            tok, slot = (idx == e).nonzero(as_tuple=True)
            out.index_add_(0, tok, swiglu(x[tok], *self.w[layer][e]) * wts[tok, slot, None])
        return out


def reference_model(
    cfg: MoEConfig, seed: int = 0, checkpoint=None, device="cpu", dtype=torch.float32
) -> tuple[MoETransformer, DenseExperts]:
    src = WeightSource(cfg, seed, checkpoint)
    return MoETransformer(cfg, src.non_expert(), device, dtype), DenseExperts(cfg, src, device, dtype)


def with_arch(cfg: MoEConfig, **changes) -> MoEConfig:
    return replace(cfg, **changes)
