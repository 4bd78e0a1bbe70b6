"""GPU-only checks of the real backend (skipped cleanly without CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_triton_int4_kernel_matches_dequantize():
    pytest.importorskip("triton")
    from real_backend.quant import quantize, triton_int4_matmul

    w = quantize(torch.randn(1408, 2048, device="cuda") / 45, 4)
    for m in (1, 7, 64):
        x = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ w.dequantize(torch.float32).T
        torch.testing.assert_close(triton_int4_matmul(x, w).float(), ref, atol=0.05, rtol=0.02)


def test_real_backend_on_gpu_serves_with_reference_quality():
    from coel_env import DeploymentPlan, Scenario
    from real_backend import RealBackend

    sc = Scenario("tiny", seed=0)
    state = sc.initial_state(np.random.default_rng(0))
    plan = DeploymentPlan.uniform(sc.cluster)
    with RealBackend(sc.cluster, device="cuda", max_requests_per_server=2, timeout_s=60) as backend:
        backend.reset(plan, state)
        m = backend.serve(plan, state, 4.0)
        assert m.dropped_frac == 0.0 and m.tokens_per_s > 0
        assert backend.last_details["top1_agreement"] > 0.9  # bf16 on the GPU vs the fp32 CPU reference
        assert max(backend.last_details["peak_gpu_bytes"]) > 0


def test_requantize_on_the_gpu_equals_the_cpu_bit_for_bit():
    from real_backend.quant import quantize, requantize

    w16 = quantize(torch.randn(1408, 2048) / 45, 16)
    for bits in (8, 4):
        cpu, gpu = requantize(w16, bits), requantize(w16.to("cuda"), bits)
        assert torch.equal(gpu.data.cpu(), cpu.data) and torch.equal(gpu.scale.cpu(), cpu.scale)


def test_migration_on_gpu_serves_what_a_fresh_install_serves():
    """Peer copies, tier moves and requantizations done on the GPU (server.apply) leave each server holding what a
    reset to the same plan installs: the same tokens."""
    from coel_env import DeploymentPlan, Scenario
    from real_backend import RealBackend

    sc = Scenario("tiny", seed=0)
    state = sc.initial_state(np.random.default_rng(0))
    plan = DeploymentPlan.uniform(sc.cluster)
    moved = plan.copy()
    moved.device[0, :4, 0] = 1  # peer copies
    moved.tier[1, :, 0] = 1  # to CPU memory
    moved.tier[2, :, 0] = 2  # to SSD files
    moved.bits[3, :, 0] = 8  # requantized where they are
    with RealBackend(sc.cluster, device="cuda", max_requests_per_server=2, timeout_s=60) as backend:
        backend.reset(plan, state)
        rep = backend.apply(moved, state)
        assert rep.bytes_peer > 0 and rep.bytes_local > 0
        migrated = backend.serve(moved, state, 4.0)
        tokens = backend.last_details["tokens"]
        backend.reset(moved, state)
        fresh = backend.serve(moved, state, 4.0)
        assert backend.last_details["tokens"] == tokens and migrated.tokens_per_s > 0 and fresh.tokens_per_s > 0
