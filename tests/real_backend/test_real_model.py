"""The real backend's MoE transformer: seeded weights, checkpoints, KV cache, forced routing."""

from __future__ import annotations

import json

import pytest
import torch

from coel_env import ConfigError
from coel_env.specs import model_preset
from real_backend.model import (
    DenseExperts,
    KVCache,
    MoEConfig,
    MoETransformer,
    WeightSource,
    expert_names,
    generate,
    random_weights,
    reference_model,
    save_checkpoint,
)

CFG = MoEConfig.from_spec(model_preset("tiny-moe"))


def test_config_from_spec_and_hf_roundtrip(tmp_path):
    assert CFG.arch == "qwen2_moe" and CFG.num_experts == 8 and CFG.top_k == 2 and CFG.shared_expert_gate
    (tmp_path / "config.json").write_text(json.dumps(CFG.hf_config_dict()))
    assert MoEConfig.from_hf_config(tmp_path) == CFG
    mix = MoEConfig.from_spec(model_preset("mixtral-8x7b"))
    assert mix.arch == "mixtral" and mix.norm_topk_prob and expert_names(mix, 0, 1)[0].endswith("experts.1.w1.weight")
    with pytest.raises(ConfigError, match="latent attention"):
        MoEConfig.from_spec(model_preset("deepseek-v2-lite"))


def test_seeded_weights_are_per_tensor_deterministic():
    names = list(expert_names(CFG, 1, 3))
    a = random_weights(CFG, 7, names)
    b = random_weights(CFG, 7, [names[2], names[0]])  # another subset and order: same values
    assert torch.equal(a[names[0]], b[names[0]]) and torch.equal(a[names[2]], b[names[2]])
    assert not torch.equal(a[names[0]], random_weights(CFG, 8, names[:1])[names[0]])
    assert a[names[2]].shape == (64, 128) and a[names[0]].dtype == torch.bfloat16


def test_checkpoint_roundtrip(tmp_path):
    save_checkpoint(CFG, 3, tmp_path)
    src, ref = WeightSource(CFG, 0, tmp_path), WeightSource(CFG, 3)
    for x, y in zip(src.expert(2, 5), ref.expert(2, 5)):
        assert torch.equal(x, y)
    assert torch.equal(src.non_expert()["lm_head.weight"], ref.non_expert()["lm_head.weight"])
    with pytest.raises(ConfigError, match=r"no \*\.safetensors"):
        WeightSource(CFG, 0, tmp_path / "nothing")


def test_kv_cache_decode_matches_full_forward():
    model, experts = reference_model(CFG, 0)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, CFG.vocab_size, (12,), generator=g)
    toks, _ = generate(model, [prompt], [6], experts)
    full = torch.cat([prompt, torch.tensor(toks[0][:-1])])
    from real_backend.model import KVCache

    logits = model.forward([full], [KVCache(CFG.num_layers)], experts)
    assert logits[len(prompt) - 1 :].argmax(-1).tolist() == toks[0]


def test_ragged_batch_equals_one_by_one():
    model, experts = reference_model(CFG, 0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, CFG.vocab_size, (n,), generator=g) for n in (5, 9, 3)]
    batch, blog = generate(model, prompts, [4, 2, 5], experts)
    for i, p in enumerate(prompts):
        one, olog = generate(model, [p], [[4, 2, 5][i]], experts)
        assert one[0] == batch[i]
        torch.testing.assert_close(olog[0], blog[i], atol=1e-4, rtol=1e-4)


def test_forced_routes_change_the_output_and_router_routes_topk():
    model, experts = reference_model(CFG, 0)
    x = torch.randn(6, CFG.d_model)
    idx, w = model.route(0, x, None)
    assert idx.shape == (6, 2) and (w > 0).all()
    forced = torch.zeros(6, 2, dtype=torch.long)
    forced[:, 1] = 7
    idx2, _w2 = model.route(0, x, forced)
    assert (idx2 == forced).all()
    p = torch.randint(0, CFG.vocab_size, (10,))
    routes = torch.randint(0, CFG.num_experts, (10, CFG.num_moe_layers, CFG.top_k))
    _, a = generate(model, [p], [1], experts)
    _, b = generate(model, [p], [1], experts, [routes])
    assert not torch.allclose(a[0], b[0])


def test_mixtral_style_model_runs():
    cfg = MoEConfig.from_spec(model_preset("tiny-moe"), arch="mixtral")
    src = WeightSource(cfg, 0)
    model = MoETransformer(cfg, src.non_expert())
    toks, logits = generate(model, [torch.arange(7)], [3], DenseExperts(cfg, src))
    assert len(toks[0]) == 3 and logits[0].shape == (7, cfg.vocab_size) and torch.isfinite(logits[0]).all()


def test_batched_decode_step_equals_one_sequence_at_a_time():
    """A decode step over sequences of different lengths (one masked SDPA over padded caches, GQA included) gives
    the logits and caches of running each sequence alone; the caches grow past their first capacity on the way."""
    cfg = MoEConfig.from_spec(model_preset("tiny-moe").model_copy(update={"num_kv_heads": 2}))
    model, experts = reference_model(cfg, 0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (3, 17, 9)]
    together = [KVCache(cfg.num_layers) for _ in prompts]
    alone = [KVCache(cfg.num_layers) for _ in prompts]
    model.forward(prompts, together, experts)
    for p, c in zip(prompts, alone):
        model.forward([p], [c], experts)
    for _ in range(3):
        nxt = [torch.randint(0, cfg.vocab_size, (1,), generator=g) for _ in prompts]
        batched = model.forward(nxt, together, experts)
        single = torch.cat([model.forward([t], [c], experts) for t, c in zip(nxt, alone)])
        torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    for a, b in zip(together, alone):
        assert a.length == b.length
        for layer in range(cfg.num_layers):
            torch.testing.assert_close(a.kv(layer)[0], b.kv(layer)[0])
