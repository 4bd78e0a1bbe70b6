"""vLLM's tensor and pipeline parallelism (coel_env/backend/parallel.py): hand-derived formulas and parity with the
expert-placement surrogate where the two must agree."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import scenario_dict

from coel_env import DeploymentPlan, Scenario
from coel_env.backend.parallel import allreduce_s, serve_parallel, stage_layers
from coel_env.backend.surrogate import SurrogateBackend
from coel_env.specs import LengthDist, load_hardware_profile, load_scenario_spec

CONTINUOUS = load_hardware_profile("continuous")


def test_stage_layers_split_evenly_remainder_first():
    np.testing.assert_array_equal(stage_layers(24, 2), [12, 12])
    np.testing.assert_array_equal(stage_layers(27, 4), [7, 7, 7, 6])
    assert stage_layers(24, 1).tolist() == [24]


def test_allreduce_cost_by_hand():
    # 2 GPUs: ring volume 2 (G-1)/G * tokens * d * bytes = tokens * d * bytes, twice per layer
    got = allreduce_s(np.array([1.0, 8.0]), d_model=2048, act_bytes=2, gpus=2, pcie_bw=1e10, latency=2e-5, layers=24)
    want = 2 * 24 * (np.array([1.0, 8.0]) * 2048 * 2 / 1e10 + 2e-5)
    np.testing.assert_allclose(got, want)
    assert allreduce_s(np.array([4.0]), 2048, 2, 1, 1e10, 2e-5, 24).tolist() == [0.0]


@pytest.mark.parametrize("clients", [1, 8, 64])
def test_one_gpu_engine_equals_expert_placement(clients):
    """One server, one GPU, every expert on it at 16 bits: no parallelism to speak of, so the tp x pp engine and the
    expert-placement surrogate must give the same steady state (they share the formulas; grids differ slightly)."""
    d = scenario_dict(num_servers=1, model="olmoe-1b-7b", max_replicas=1)
    d["workload"].update(concurrency=clients, max_batch=64)
    sc = Scenario(d, seed=0, hardware=CONTINUOUS)
    state = sc.initial_state(np.random.default_rng(0))
    plan = DeploymentPlan.uniform(sc.cluster)
    assert np.all(plan.bits[plan.device >= 0] == 16) and np.all(plan.tier == 0)
    ep = SurrogateBackend(sc.cluster).serve(plan, state, 60.0)
    vl = serve_parallel(sc.cluster, state)
    assert vl.stages == (16,)
    assert vl.ttft_s == pytest.approx(ep.ttft_mean_s, rel=1e-6)
    assert vl.tpot_s == pytest.approx(ep.tpot_mean_s, rel=0.015)
    assert vl.tokens_per_s == pytest.approx(ep.tokens_per_s, rel=0.015)


def _paper(name: str, clients: int, input_len: int = 128, output_len: int = 128) -> Scenario:
    spec = load_scenario_spec(name)
    wl = spec.workload.model_validate(
        {
            **spec.workload.model_dump(),
            "input_len": LengthDist(dist="fixed", mean=input_len),
            "output_len": LengthDist(dist="fixed", mean=output_len),
            "concurrency": clients,
            "max_batch": 256,
        }
    )
    return Scenario(spec.model_copy(update={"workload": wl}), seed=0, hardware=CONTINUOUS)


def test_pipeline_kv_room_by_hand():
    """Each stage holds its layers' weights (16-bit) and their share of every sequence's KV: sequences =
    floor(min over stages of (mem * utilization - weights) / (KV per token * layers share) / held tokens)."""
    found = {}
    for name, stages in (("paper-2server-1gpu", 2), ("paper-3server-1gpu", 3)):
        sc = _paper(name, clients=64, input_len=2048)
        c, m = sc.cluster, sc.cluster.model
        r = serve_parallel(c, sc.initial_state(np.random.default_rng(0)))
        layers = stage_layers(m.num_layers, stages)
        held = np.ceil((2048 + 128 / 2) / c.spec.workload.kv_block_tokens) * c.spec.workload.kv_block_tokens
        tokens = min(
            (24e9 * 0.9 - (n / 24) * m.non_expert_bytes(16) - n * 60 * m.expert_bytes(16))
            / (m.kv_bytes_per_token() * n / 24)
            for n in layers
        )
        assert c.dev_mem[0] == 24e9  # GB as the vendor counts
        assert r.kv_sequences == np.floor(tokens / held)
        found[stages] = r.kv_sequences
    assert found[3] > 2 * found[2]  # a third of the weights each: far more KV room


def test_slower_link_only_slows_the_pipeline():
    """The pipeline's hops cross the LAN; tensor parallel inside a server never does."""
    for name, crosses in (("paper-2server-1gpu", True), ("paper-1server-2gpu", False)):
        sc = _paper(name, clients=1)
        state = sc.initial_state(np.random.default_rng(0))
        fast = serve_parallel(sc.cluster, state, clients=1)
        state.link_factor[:] = 0.1
        slow = serve_parallel(sc.cluster, state, clients=1)
        if crosses:
            assert slow.tpot_s > fast.tpot_s and slow.ttft_s > fast.ttft_s
        else:
            assert slow.tpot_s == fast.tpot_s and slow.ttft_s == fast.ttft_s
