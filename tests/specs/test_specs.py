"""Model presets against public parameter counts, expert sizes, Hugging Face config.json loading, devices,
hardware profiles."""

from __future__ import annotations

import json

import pytest

from coel_env import ConfigError
from coel_env.specs import (
    BIT_WIDTHS,
    MODEL_PRESETS,
    HardwareProfile,
    device_preset,
    load_hardware_profile,
    model_from_hf_config,
    model_preset,
)
from coel_env.specs.model import resolve_model

B = 1e9

# (preset, public total params, public active params or None, relative tolerance)
PUBLIC_COUNTS = [
    ("qwen1.5-moe-a2.7b", 14.3 * B, 2.7 * B, 0.01),  # Qwen blog / model card
    ("mixtral-8x7b", 46.7 * B, 12.9 * B, 0.01),  # Mixtral paper: 46.7B total, 12.9B active
    ("olmoe-1b-7b", 6.9 * B, 1.3 * B, 0.02),  # OLMoE paper: 6.9B total, 1.3B active
    ("deepseek-v2-lite", 15.7 * B, None, 0.01),  # DeepSeek-V2 paper: 15.7B total
    ("qwen3-30b-a3b", 30.5 * B, 3.3 * B, 0.02),  # Qwen3 model card: 30.5B total, 3.3B active
    ("deepseek-v3", 671 * B, 37 * B, 0.02),  # DeepSeek-V3 report: 671B total (no MTP), 37B active
]


@pytest.mark.parametrize(("name", "total", "active", "tol"), PUBLIC_COUNTS)
def test_preset_parameter_counts_match_public_numbers(name, total, active, tol):
    m = model_preset(name)
    assert m.total_params == pytest.approx(total, rel=tol)
    if active is not None:
        assert m.active_params == pytest.approx(active, rel=tol)
    assert m.active_params < m.total_params


def test_deepseek_v2_lite_active_params_plausible():
    # The paper's 2.4B active excludes (part of) the 0.42B of embeddings; accept either convention.
    m = model_preset("deepseek-v2-lite")
    assert 2.2 * B <= m.active_params <= 2.8 * B
    assert m.num_moe_layers == 26 and m.first_k_dense == 1


def test_qwen_expert_sizes_by_hand():
    m = model_preset("qwen1.5-moe-a2.7b")
    assert m.expert_params == 3 * 2048 * 1408 == 8_650_752
    assert m.expert_bytes(16) == 17_301_504  # 17.3 MB
    # 8-bit: payload plus one fp16 scale per output channel of the three projections
    assert m.expert_bytes(8) == 8_650_752 + 2 * (2 * 1408 + 2048)
    # 4-bit group-128: one fp16 scale per 128 weights = +1/32 = +3.1%
    assert m.expert_bytes(4) == 4_325_376 + 2 * (8_650_752 // 128)
    assert m.expert_bytes(4) / (m.expert_params / 2) == pytest.approx(1.03, abs=0.005)
    assert m.routed_expert_params * 2 == pytest.approx(24.9e9, rel=0.005)  # all routed experts at 16 bits
    assert m.non_expert_bytes(16) == pytest.approx(3.7e9, rel=0.02)
    assert m.hidden_bytes == 4096
    # does not fit one 24 GB GPU at 16 bits
    assert m.total_params * 2 > 24e9


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_fewer_bits_never_more_bytes(name):
    m = model_preset(name)
    sizes = [m.expert_bytes(b) for b in sorted(BIT_WIDTHS, reverse=True)]
    assert sizes == sorted(sizes, reverse=True)
    assert len(set(sizes)) == len(sizes)
    assert m.expert_bytes(16) == 2 * m.expert_params


def test_expert_bytes_rejects_unsupported_bits():
    with pytest.raises(ConfigError, match=r"bits: 3 is not supported; allowed: 16, 8, 4") as exc:
        model_preset("tiny-moe").expert_bytes(3)
    assert "\n" not in str(exc.value)


def test_known_expert_sizes_of_other_presets():
    assert model_preset("mixtral-8x7b").expert_bytes(16) == 2 * 3 * 4096 * 14336  # 352 MB
    assert model_preset("deepseek-v3").expert_params == 3 * 7168 * 2048
    ds = model_preset("deepseek-v3")
    assert ds.num_moe_layers * ds.num_experts == 58 * 256
    assert model_preset("qwen3-30b-a3b").kv_bytes_per_token() == 2 * 48 * 4 * 128 * 2


# ---- Hugging Face config.json ----------------------------------------------------------------------------
# Values as in the checkpoints' config.json files (trimmed to the fields that matter).
HF_CONFIGS = {
    "qwen1.5-moe-a2.7b": {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
        "decoder_sparse_step": 1,
        "torch_dtype": "bfloat16",
    },
    "mixtral-8x7b": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "deepseek-v2-lite": {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "kv_lora_rank": 512,
        "q_lora_rank": None,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "vocab_size": 102400,
        "tie_word_embeddings": False,
    },
    "deepseek-v3": {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "first_k_dense_replace": 3,
        "n_group": 8,
        "topk_group": 4,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "vocab_size": 129280,
        "tie_word_embeddings": False,
    },
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
    },
    "olmoe-1b-7b": {
        "architectures": ["OlmoeForCausalLM"],
        "model_type": "olmoe",
        "hidden_size": 2048,
        "intermediate_size": 1024,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": 50304,
        "tie_word_embeddings": False,
    },
}


@pytest.mark.parametrize("preset", sorted(HF_CONFIGS))
def test_hf_config_matches_preset(tmp_path, preset):
    ckpt = tmp_path / preset
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(HF_CONFIGS[preset]))
    loaded = model_from_hf_config(ckpt, name=preset)  # a checkpoint directory
    want = model_preset(preset)
    assert loaded.model_dump() == want.model_dump()
    assert loaded.total_params == want.total_params
    # the file itself, and through the scenario's model resolver (a path)
    assert model_from_hf_config(ckpt / "config.json", name=preset) == loaded
    assert resolve_model(str(ckpt)).total_params == want.total_params


def test_hf_config_reads_real_values_not_library_defaults(tmp_path):
    # Mixtral's expert width is `intermediate_size`; Qwen2-MoE's is `moe_intermediate_size` (not the dense 5632)
    for preset, d_ff in (("mixtral-8x7b", 14336), ("qwen1.5-moe-a2.7b", 1408), ("qwen3-30b-a3b", 768)):
        p = tmp_path / f"{preset}.json"
        p.write_text(json.dumps(HF_CONFIGS[preset]))
        m = model_from_hf_config(p)
        assert m.d_ff_expert == d_ff
    assert m.head_dim == 128  # explicit head_dim, not hidden_size / heads = 64


def _one_line_config_error(fn, *args, match: str) -> str:
    with pytest.raises(ConfigError, match=match) as exc:
        fn(*args)
    msg = str(exc.value)
    assert "\n" not in msg and msg.strip()
    assert exc.value.__cause__ is None
    return msg


def test_hf_config_errors_are_one_line(tmp_path):
    dense = tmp_path / "llama.json"
    dense.write_text(json.dumps({"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32}))
    _one_line_config_error(model_from_hf_config, dense, match="not a MoE model")
    bad = tmp_path / "bad.json"
    bad.write_text("{'model_type': 'mixtral',")
    _one_line_config_error(model_from_hf_config, bad, match="not valid JSON")
    _one_line_config_error(model_from_hf_config, tmp_path / "missing", match="no config.json")
    incomplete = tmp_path / "incomplete.json"
    cfg = dict(HF_CONFIGS["mixtral-8x7b"])
    del cfg["hidden_size"]
    incomplete.write_text(json.dumps(cfg))
    msg = _one_line_config_error(model_from_hf_config, incomplete, match="d_model")
    assert "integer" in msg


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (dict(top_k=9), r"top_k \(9\) must be <= num_experts \(8\)"),
        (dict(first_k_dense=4), r"first_k_dense \(4\) must be < num_layers \(4\)"),
        (dict(num_experts=0), r"num_experts: .*greater than 0"),
        (dict(colour="red"), r"colour: unknown field"),
    ],
)
def test_bad_model_dict_is_one_line(fields, match):
    _one_line_config_error(resolve_model, {"preset": "tiny-moe", **fields}, match=match)


def test_unknown_presets_list_allowed_names():
    msg = _one_line_config_error(model_preset, "gpt-5-moe", match="unknown preset 'gpt-5-moe'; allowed:")
    assert "qwen1.5-moe-a2.7b" in msg and "mixtral-8x7b" in msg
    msg = _one_line_config_error(device_preset, "rtx9090", match="unknown preset 'rtx9090'; allowed:")
    assert "rtx4090d" in msg and "jetson-agx-orin" in msg


def test_device_presets_vendor_numbers():
    d = device_preset("RTX4090D")  # case-insensitive
    assert (d.memory_gb, d.mem_bw_gbs, d.peak_tflops, d.power_max_w) == (24, 1008, 147, 425)
    assert device_preset("h200").memory_gb == 141 and device_preset("h200").mem_bw_gbs == 4800
    orin = device_preset("jetson-agx-orin")
    assert orin.memory_gb == 64 and orin.mem_bw_gbs == pytest.approx(204.8) and orin.power_max_w == 60
    # batch-1 decode of Qwen1.5-MoE on a 4090D is memory-bound: 5.4 GB of active weights ~ 5.3 ms/token
    m = model_preset("qwen1.5-moe-a2.7b")
    assert m.active_params * 2 / (d.mem_bw_gbs * 1e9) == pytest.approx(5.3e-3, rel=0.03)


def test_hardware_profile_default_file_equals_code_defaults():
    prof = load_hardware_profile("default")
    assert prof == HardwareProfile()
    assert load_hardware_profile(None) == prof
    assert load_hardware_profile({"link_efficiency": 0.5}).link_efficiency == 0.5


def test_hardware_profile_errors_are_one_line(tmp_path):
    msg = _one_line_config_error(load_hardware_profile, "nope", match="hardware: unknown profile 'nope'; allowed:")
    assert "default" in msg
    _one_line_config_error(load_hardware_profile, {"link_efficiency": 1.5}, match=r"link_efficiency: .*less than")
    bad = tmp_path / "broken.yaml"
    bad.write_text("link_efficiency: [0.5\n")
    _one_line_config_error(load_hardware_profile, bad, match="not valid YAML")
    typo = tmp_path / "typo.yaml"
    typo.write_text("link_eficiency: 0.5\n")
    _one_line_config_error(load_hardware_profile, typo, match="link_eficiency: unknown field")


def test_mla_models_cache_the_compressed_latent():
    """DeepSeek's multi-head latent attention caches kv_lora_rank + qk_rope_head_dim = 576 values per token and
    layer (bf16): 27 * 576 * 2 bytes for DeepSeek-V2-Lite, against 2 * 16 heads * 192 * 2 per layer uncompressed."""
    lite = model_preset("deepseek-v2-lite")
    assert lite.kv_bytes_per_token() == 27 * 576 * 2
    assert lite.model_copy(update={"kv_cache_dim": None}).kv_bytes_per_token() == 2 * 27 * 16 * 192 * 2
