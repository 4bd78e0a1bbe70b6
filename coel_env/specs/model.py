"""MoE model specifications: presets with real checkpoint values and Hugging Face `config.json` loading."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from coel_env.errors import ConfigError, format_pydantic_error, read_json_object
from coel_env.specs.bounds import (
    MAX_ATTN_PARAMS,
    MAX_D_FF,
    MAX_D_MODEL,
    MAX_EXPERTS,
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_LAYERS,
    MAX_ROUTING_ENTRIES,
    MAX_VOCAB,
    Int,
    at_most,
    brief,
)

BIT_WIDTHS: tuple[int, ...] = (16, 8, 4)
BITS_INDEX = np.zeros(max(BIT_WIDTHS) + 1, dtype=np.int64)  # bit-width -> its position in BIT_WIDTHS
BITS_INDEX[list(BIT_WIDTHS)] = range(len(BIT_WIDTHS))
INT4_GROUP_SIZE = 128


class ModelSpec(BaseModel):
    """Dimensions of a Mixture-of-Experts transformer (values as in the checkpoint's config.json)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str
    num_layers: Annotated[Int, at_most(MAX_LAYERS)] = Field(
        gt=0, description="all transformer layers, dense ones included"
    )
    first_k_dense: Int = Field(0, ge=0, description="leading layers with a dense MLP instead of experts")
    num_experts: Annotated[Int, at_most(MAX_EXPERTS)] = Field(gt=0, description="routed experts per MoE layer")
    top_k: Int = Field(gt=0)
    d_model: Annotated[Int, at_most(MAX_D_MODEL)] = Field(gt=0)
    d_ff_expert: Annotated[Int, at_most(MAX_D_FF)] = Field(gt=0)
    d_ff_shared: Annotated[Int, at_most(MAX_D_FF)] = Field(
        0, ge=0, description="total width of the shared expert(s); 0 = none"
    )
    shared_expert_gate: bool = False
    d_ff_dense: Annotated[Int, at_most(MAX_D_FF)] = Field(0, ge=0)
    num_heads: Annotated[Int, at_most(MAX_HEADS)] = Field(gt=0)
    num_kv_heads: Annotated[Int, at_most(MAX_HEADS)] = Field(gt=0)
    head_dim: Annotated[Int, at_most(MAX_HEAD_DIM)] = Field(gt=0)
    vocab_size: Annotated[Int, at_most(MAX_VOCAB)] = Field(gt=0)
    tie_word_embeddings: bool = False
    attn_bias: bool = False
    attn_params_per_layer: Annotated[Int | None, at_most(MAX_ATTN_PARAMS)] = Field(
        None, gt=0, description="override for non-standard attention (MLA)"
    )
    num_expert_groups: Int = Field(1, ge=1, description="DeepSeek node-limited routing groups (EPLB)")
    kv_cache_dim: Annotated[Int | None, at_most(MAX_ATTN_PARAMS)] = Field(
        None,
        gt=0,
        description="KV-cache elements per token and layer when the engine caches a compressed latent (MLA: "
        "kv_lora_rank + qk_rope_head_dim, 576 for DeepSeek-V2/V3, as vLLM >= 0.7 and SGLang do); None: K and V "
        "of every KV head",
    )

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.first_k_dense >= self.num_layers:
            raise ValueError(f"first_k_dense ({self.first_k_dense}) must be < num_layers ({self.num_layers})")
        if self.num_experts % self.num_expert_groups:
            raise ValueError("num_expert_groups must divide num_experts")
        affinity = self.num_moe_layers * self.num_experts**2
        if affinity > MAX_ROUTING_ENTRIES:
            raise ValueError(
                f"MoE layers ({self.num_moe_layers}) x num_experts^2 ({self.num_experts}^2) = {affinity} "
                f"routing entries must be <= {MAX_ROUTING_ENTRIES}"
            )
        return self

    # ---- sizes -------------------------------------------------------------------------------------
    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert (gate, up and down projections)."""
        return 3 * self.d_model * self.d_ff_expert

    def expert_bytes(self, bits: int) -> int:
        """Bytes of one routed expert at `bits`, quantization scales included (fp16 scales)."""
        if bits not in BIT_WIDTHS:
            raise ConfigError(f"bits: {bits} is not supported; allowed: {', '.join(map(str, BIT_WIDTHS))}")
        payload = self.expert_params * bits // 8
        if bits == 16:
            return payload
        if bits == 8:  # one scale per output channel of each projection
            return payload + 2 * (2 * self.d_ff_expert + self.d_model)
        return payload + 2 * (self.expert_params // INT4_GROUP_SIZE)  # group-wise int4

    @property
    def attention_params(self) -> int:
        if self.attn_params_per_layer is not None:
            return self.attn_params_per_layer
        q = self.d_model * self.num_heads * self.head_dim
        kv = 2 * self.d_model * self.num_kv_heads * self.head_dim
        o = self.num_heads * self.head_dim * self.d_model
        bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.attn_bias else 0
        return q + kv + o + bias

    def layer_params(self, layer: int) -> int:
        """Non-expert parameters of decoder layer `layer`: attention and its two norms, plus the router and shared
        expert (MoE layers) or the dense MLP (the first `first_k_dense` layers)."""
        own = self.attention_params + 2 * self.d_model
        if layer < self.first_k_dense:
            return own + 3 * self.d_model * self.d_ff_dense
        moe = self.num_experts * self.d_model + 3 * self.d_model * self.d_ff_shared
        return own + moe + (self.d_model if self.shared_expert_gate else 0)

    @property
    def embedding_params(self) -> int:
        """One embedding table (the input embedding; the LM head is another unless tied)."""
        return self.vocab_size * self.d_model

    @property
    def non_expert_params(self) -> int:
        """Everything but the routed experts: embeddings, attention, norms, routers, shared and dense MLPs."""
        embed = self.embedding_params * (1 if self.tie_word_embeddings else 2)
        return embed + self.d_model + sum(self.layer_params(i) for i in range(self.num_layers))

    @property
    def routed_expert_params(self) -> int:
        return self.num_moe_layers * self.num_experts * self.expert_params

    @property
    def total_params(self) -> int:
        return self.non_expert_params + self.routed_expert_params

    @property
    def active_params(self) -> int:
        return self.non_expert_params + self.num_moe_layers * self.top_k * self.expert_params

    def non_expert_bytes(self, bits: int = 16) -> int:
        return self.non_expert_params * bits // 8

    @property
    def step_read_params(self) -> int:
        """Non-expert weights a forward step reads and multiplies: all but an untied input-embedding table, which
        is a gather of the step's rows (the LM head is read once per step; tied embeddings are that head)."""
        return self.non_expert_params - (0 if self.tie_word_embeddings else self.vocab_size * self.d_model)

    @property
    def hidden_bytes(self) -> int:
        """Bytes of one bf16 hidden state (what a token sends to a remote expert)."""
        return 2 * self.d_model

    def kv_bytes_per_token(self) -> int:
        """bf16 KV-cache bytes one token holds over all layers: layers * kv_cache_dim * 2 with a latent cache (MLA),
        else layers * 2 (K and V) * KV heads * head_dim * 2."""
        if self.kv_cache_dim is not None:
            return self.num_layers * self.kv_cache_dim * 2
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2


# Values read from the checkpoints' config.json files (not library defaults).
MODEL_PRESETS: dict[str, dict] = {
    "qwen1.5-moe-a2.7b": dict(
        num_layers=24,
        num_experts=60,
        top_k=4,
        d_model=2048,
        d_ff_expert=1408,
        d_ff_shared=5632,
        shared_expert_gate=True,
        num_heads=16,
        num_kv_heads=16,
        head_dim=128,
        vocab_size=151936,
        attn_bias=True,
    ),
    "mixtral-8x7b": dict(
        num_layers=32,
        num_experts=8,
        top_k=2,
        d_model=4096,
        d_ff_expert=14336,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        vocab_size=32000,
    ),
    "olmoe-1b-7b": dict(
        num_layers=16,
        num_experts=64,
        top_k=8,
        d_model=2048,
        d_ff_expert=1024,
        num_heads=16,
        num_kv_heads=16,
        head_dim=128,
        vocab_size=50304,
    ),
    "deepseek-v2-lite": dict(
        num_layers=27,
        first_k_dense=1,
        num_experts=64,
        top_k=6,
        d_model=2048,
        d_ff_expert=1408,
        d_ff_shared=2 * 1408,
        d_ff_dense=10944,
        num_heads=16,
        num_kv_heads=16,
        head_dim=192,
        vocab_size=102400,
        attn_params_per_layer=2048 * 16 * 192 + 2048 * 576 + 512 * 16 * 256 + 16 * 128 * 2048,
        kv_cache_dim=512 + 64,
    ),
    "qwen3-30b-a3b": dict(
        num_layers=48,
        num_experts=128,
        top_k=8,
        d_model=2048,
        d_ff_expert=768,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        vocab_size=151936,
    ),
    "deepseek-v3": dict(
        num_layers=61,
        first_k_dense=3,
        num_experts=256,
        top_k=8,
        d_model=7168,
        d_ff_expert=2048,
        d_ff_shared=2048,
        d_ff_dense=18432,
        num_heads=128,
        num_kv_heads=128,
        head_dim=192,
        vocab_size=129280,
        num_expert_groups=8,
        attn_params_per_layer=7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168,
        kv_cache_dim=512 + 64,
    ),
    # Small enough for tests and for a CPU real backend.
    "tiny-moe": dict(
        num_layers=4,
        num_experts=8,
        top_k=2,
        d_model=64,
        d_ff_expert=128,
        d_ff_shared=128,
        shared_expert_gate=True,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        vocab_size=512,
    ),
}


def model_preset(name: str) -> ModelSpec:
    """The preset called `name` (see MODEL_PRESETS)."""
    key = name.lower()
    if key not in MODEL_PRESETS:
        raise ConfigError(f"model: unknown preset '{name}'; allowed: {', '.join(MODEL_PRESETS)}")
    return ModelSpec(name=key, **MODEL_PRESETS[key])


def _first(cfg: dict, *keys: str, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def model_from_hf_config(path: str | Path, name: str | None = None) -> ModelSpec:
    """Read a Hugging Face `config.json` (a file, or a checkpoint directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(f"model: no config.json at '{path}'")
    cfg = read_json_object(p, "model")
    n_experts = _first(cfg, "num_experts", "num_local_experts", "n_routed_experts")
    if n_experts is None:
        raise ConfigError(f"model: {p} has no num_experts/num_local_experts/n_routed_experts: not a MoE model")
    d_model = cfg.get("hidden_size")
    heads = cfg.get("num_attention_heads")
    mtype = cfg.get("model_type", "")
    d_ff_expert = _first(cfg, "moe_intermediate_size") if mtype != "mixtral" else None
    d_ff_expert = d_ff_expert or cfg.get("intermediate_size")
    fields = dict(
        name=name or cfg.get("_name_or_path") or p.parent.name or mtype,
        num_layers=cfg.get("num_hidden_layers"),
        first_k_dense=cfg.get("first_k_dense_replace", 0) or 0,
        num_experts=n_experts,
        top_k=_first(cfg, "num_experts_per_tok", "moe_top_k"),
        d_model=d_model,
        d_ff_expert=d_ff_expert,
        num_heads=heads,
        num_kv_heads=_first(cfg, "num_key_value_heads", default=heads),
        head_dim=_first(cfg, "head_dim", default=(d_model // heads) if d_model and heads else None),
        vocab_size=cfg.get("vocab_size"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        num_expert_groups=cfg.get("n_group") or 1,
        attn_bias=mtype in ("qwen2_moe",),
    )
    if cfg.get("shared_expert_intermediate_size"):
        fields.update(d_ff_shared=cfg["shared_expert_intermediate_size"], shared_expert_gate=True)
    elif cfg.get("n_shared_experts"):
        fields["d_ff_shared"] = cfg["n_shared_experts"] * d_ff_expert
    if fields["first_k_dense"]:
        fields["d_ff_dense"] = cfg.get("intermediate_size", 0)
    if cfg.get("kv_lora_rank"):  # multi-head latent attention (DeepSeek)
        nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
        qdim = heads * (nope + rope)
        q = d_model * qdim if not cfg.get("q_lora_rank") else (d_model * cfg["q_lora_rank"] + cfg["q_lora_rank"] * qdim)
        kv_rank = cfg["kv_lora_rank"]
        attn = q + d_model * (kv_rank + rope) + kv_rank * heads * (nope + v) + heads * v * d_model
        fields.update(attn_params_per_layer=attn, head_dim=nope + rope, kv_cache_dim=kv_rank + rope)
    try:
        return ModelSpec(**fields)
    except ValidationError as exc:
        raise ConfigError(format_pydantic_error(f"model config {p}", exc, ModelSpec)) from None


def resolve_model(value: str | dict | ModelSpec) -> ModelSpec:
    """A model given as a preset name, a path to a config.json/checkpoint dir, a dict of fields or a spec."""
    if isinstance(value, ModelSpec):
        return value
    if isinstance(value, dict):
        value = dict(value)
        if "preset" in value:
            base = MODEL_PRESETS.get(str(value.pop("preset")).lower())
            if base is None:
                raise ConfigError(f"model.preset: unknown preset; allowed: {', '.join(MODEL_PRESETS)}")
            value = {**base, **value}
        value.setdefault("name", "custom")
        try:
            return ModelSpec(**value)
        except ValidationError as exc:
            raise ConfigError(format_pydantic_error("model", exc, ModelSpec)) from None
    if not isinstance(value, (str, Path)) or not str(value):
        raise ConfigError(
            f"model: {brief(value)} given; must be a preset name ({', '.join(MODEL_PRESETS)}), a path "
            "to a Hugging Face config.json (or its checkpoint directory) or a mapping of fields"
        )
    if str(value).lower() in MODEL_PRESETS:
        return model_preset(str(value))
    if _exists(value):
        return model_from_hf_config(value)
    raise ConfigError(f"model: unknown preset '{value}'; allowed: {', '.join(MODEL_PRESETS)} or a config.json path")


def _exists(path) -> bool:
    try:
        return Path(path).exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False
