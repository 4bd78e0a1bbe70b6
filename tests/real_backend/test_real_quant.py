"""Per-expert int8 / int4 quantization: packing, stated error bounds, model-level quality."""

from __future__ import annotations

import pytest
import torch

from coel_env import ConfigError
from coel_env.specs import model_preset
from real_backend.model import MoEConfig, WeightSource, generate, reference_model
from real_backend.quant import pack_int4, qlinear, quality, quantize, requantize, unpack_int4
from real_backend.tiers import expert_forward


def test_int4_pack_roundtrip_two_per_byte():
    q = torch.randint(-8, 8, (6, 10), dtype=torch.int8)
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (6, 5)
    assert torch.equal(unpack_int4(p, 10), q)


@pytest.mark.parametrize("bits,levels,rel_bound", [(8, 127, 0.015), (4, 7, 0.15)])
def test_error_within_stated_bounds(bits, levels, rel_bound):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g) / 22
    q = quantize(w, bits)
    err = (q.dequantize() - w).abs()
    if bits == 8:
        step = q.scale.float()[:, None]
        assert q.data.dtype == torch.int8 and q.nbytes == 256 * 512 + 2 * 256
    else:
        step = q.scale.float().repeat_interleave(q.group, 1)
        assert q.group == 128 and q.nbytes == 256 * 256 + 2 * 256 * 4
    assert (err <= step / 2 * 1.01 + 1e-6).all()  # round-to-nearest: half a step (fp16 scale rounding)
    groups = w.abs().view(256, -1, q.group).amax(-1) if bits == 4 else w.abs().amax(1, keepdim=True)
    assert torch.allclose(q.scale.float().view_as(groups) * levels, groups, rtol=2e-3)  # scale = max|w| / levels
    x = torch.randn(16, 512, generator=g)
    y, yq = x @ w.T, qlinear(x, q)
    assert ((y - yq).norm() / y.norm()).item() < rel_bound


def test_requantize_only_lowers_precision():
    w = torch.randn(32, 64)
    q8 = quantize(w, 8)
    assert requantize(q8, 4).bits == 4 and requantize(q8, 8) is q8
    with pytest.raises(ConfigError, match="cannot raise"):
        requantize(q8, 16)
    with pytest.raises(ConfigError, match="allowed: 16, 8, 4"):
        quantize(w, 3)


def test_model_quality_vs_16bit():
    cfg = MoEConfig.from_spec(model_preset("tiny-moe"))
    model, dense = reference_model(cfg, 0)
    src = WeightSource(cfg, 0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (48,), generator=g) for _ in range(4)]
    _, ref = generate(model, prompts, [1] * 4, dense)
    out = {}
    for bits in (16, 8, 4):
        q = [
            [tuple(quantize(t, bits) for t in src.expert(l, e)) for e in range(cfg.num_experts)]
            for l in range(cfg.num_moe_layers)
        ]

        def experts(l, x, idx, w, q=q):
            y = torch.zeros_like(x)
            for e in idx.unique().tolist():
                tok, slot = (idx == e).nonzero(as_tuple=True)
                y.index_add_(0, tok, expert_forward(x[tok], q[l][e]) * w[tok, slot, None])
            return y

        _, got = generate(model, prompts, [1] * 4, experts)
        out[bits] = quality(torch.cat(got), torch.cat(ref))
    assert out[16][0] < 1e-6 and out[16][1] == 1.0
    assert out[8][0] < 1e-3 and out[8][1] >= 0.95
    assert out[4][0] < 0.05 and out[4][1] >= 0.7
    assert out[4][0] > out[8][0]
