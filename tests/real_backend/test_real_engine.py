"""FastMoE (static KV cache, grouped expert matmuls, CUDA graphs) equals the reference MoETransformer."""

from __future__ import annotations

import pytest
import torch

from coel_env.specs import model_preset
from real_backend.engine import EXPERT_MODES, FastMoE
from real_backend.model import MoEConfig, WeightSource, generate, reference_model

CFG = MoEConfig.from_spec(model_preset("tiny-moe"))


@pytest.mark.parametrize("mode", EXPERT_MODES)
def test_fast_engine_matches_reference(mode):
    model, experts = reference_model(CFG, 0)
    fast = FastMoE(
        CFG, WeightSource(CFG, 0), device="cpu", dtype=torch.float32, max_batch=2, max_len=32, expert_mode=mode
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CFG.vocab_size, (2, 10), generator=g)
    got = fast.generate(ids, 6)
    ref, _ = generate(model, list(ids), [6, 6], experts)
    assert got.tolist() == ref


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_matches_eager():
    fast = FastMoE(CFG, WeightSource(CFG, 0), device="cuda", max_batch=2, max_len=32)
    ids = torch.randint(0, CFG.vocab_size, (2, 10), device="cuda")
    eager = fast.generate(ids, 6)
    fast.capture(2)
    assert torch.equal(fast.generate(ids, 6), eager)
