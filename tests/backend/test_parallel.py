"""vLLM's tensor and pipeline parallelism (coel_env/backend/parallel.py): hand-derived formulas and parity with the
expert-placement surrogate where the two must agree."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import scenario_dict

from coel_env import DeploymentPlan, Scenario
from coel_env.backend.parallel import allreduce_s, pipeline_tpot, serve_parallel, stage_layers, stage_weights
from coel_env.backend.surrogate import SurrogateBackend
from coel_env.errors import ConfigError
from coel_env.specs import LengthDist, load_hardware_profile, load_scenario_spec, model_preset

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


def test_pipeline_tpot_by_hand():
    """Two stages of 3 and 5 ms, hops of 1 ms and 0.5 ms: one sequence walks the pipeline (9.5 ms); two or more
    fill it with two micro-batches, each cycle set by the slowest stage (2 * 5 ms = 10 ms)."""
    stage = np.array([[3e-3, 3e-3, 3e-3], [5e-3, 5e-3, 5e-3]])
    hop = np.array([[1e-3, 1e-3, 1e-3], [0.5e-3, 0.5e-3, 0.5e-3]])
    np.testing.assert_allclose(pipeline_tpot(stage, hop, np.array([1.0, 2.0, 4.0])), [9.5e-3, 10e-3, 10e-3])


def test_stage_weights_place_embedding_first_and_head_last():
    m = model_preset("qwen1.5-moe-a2.7b")  # untied embeddings
    eb = float(m.expert_bytes(16))
    parts = [stage_weights(m, lo, hi, lo == 0, hi == 24, eb) for lo, hi in ((0, 8), (8, 16), (16, 24))]
    held = sum(p[0] for p in parts)
    assert held == pytest.approx(m.non_expert_bytes(16) + m.num_moe_layers * m.num_experts * eb)
    embed = 2.0 * m.vocab_size * m.d_model
    assert parts[0][0] - parts[0][1] == pytest.approx(8 * 60 * eb + embed)  # the first stage gathers, never reads it
    assert parts[2][1] - parts[1][1] == pytest.approx(embed + 2 * m.d_model)  # the last reads the head every step
    whole = stage_weights(m, 0, 24, True, True, eb)
    assert whole[1] == pytest.approx(2.0 * m.step_read_params)


def test_three_servers_hold_more_kv_than_two():
    """A third of the weights per GPU leaves far more KV room than a half (the paper's Fig. 6 mechanism)."""
    found = {}
    for name in ("paper-2server-1gpu", "paper-3server-1gpu"):
        sc = _paper(name, clients=64, input_len=2048)
        found[name] = serve_parallel(sc.cluster, sc.initial_state(np.random.default_rng(0))).kv_sequences
    assert found["paper-3server-1gpu"] > 2 * found["paper-2server-1gpu"] > 0


def test_tensor_parallel_waits_for_the_slowest_gpu():
    sc = _paper("paper-1server-2gpu", clients=1)
    state = sc.initial_state(np.random.default_rng(0))
    state.compute_avail[:] = [1.0, 0.5]
    mixed = serve_parallel(sc.cluster, state, clients=1)
    state.compute_avail[:] = [0.5, 0.5]
    both = serve_parallel(sc.cluster, state, clients=1)
    assert mixed.tpot_s == pytest.approx(both.tpot_s)


def test_latent_kv_cache_is_whole_on_every_tensor_parallel_rank():
    """MLA keeps the latent cache whole on each rank: two GPUs give no more KV room per sequence than their memory
    left after half the weights each allows for the whole cache."""
    d = scenario_dict(num_servers=1, gpus=("a100-80gb", "a100-80gb"), model="deepseek-v2-lite", max_replicas=1)
    d["workload"].update(concurrency=8, max_batch=256)
    sc = Scenario(d, seed=0, hardware=CONTINUOUS)
    c, m = sc.cluster, sc.cluster.model
    r = serve_parallel(c, sc.initial_state(np.random.default_rng(0)))
    held = stage_weights(m, 0, m.num_layers, True, True, float(m.expert_bytes(16)))[0]
    per_gpu_tokens = (c.dev_mem[0] * 0.9 - held / 2) / m.kv_bytes_per_token()
    block = c.spec.workload.kv_block_tokens
    held_tokens = np.ceil((c.spec.workload.input_len.mean + c.spec.workload.output_len.mean / 2) / block) * block
    assert r.kv_sequences == np.floor(per_gpu_tokens / held_tokens)


def test_a_dead_stage_stops_the_engine_and_too_many_stages_are_refused():
    sc = _paper("paper-3server-1gpu", clients=8)
    state = sc.initial_state(np.random.default_rng(0))
    state.server_up[1] = False
    r = serve_parallel(sc.cluster, state)
    assert r.tokens_per_s == 0.0 and r.dropped_frac == 1.0 and r.e2e_s == np.inf
    many = Scenario(scenario_dict(num_servers=model_preset("tiny-moe").num_layers + 1, model="tiny-moe"), seed=0)
    with pytest.raises(ConfigError, match="pipeline stages"):
        serve_parallel(many.cluster, many.initial_state(np.random.default_rng(0)))


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
