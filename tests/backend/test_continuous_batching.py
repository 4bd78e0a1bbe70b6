"""Continuous batching (hardware `serving: continuous`): each formula against a hand derivation, then the model's
behaviour (KV-limited batch, the memory trade-off of replicas, saturation with explicit admission drops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from coel_env import ConfigError, DeploymentPlan, SurrogateBackend, make_scenario
from coel_env.backend.physics import (
    erlang_c_wait,
    held_kv_tokens,
    interp_log2,
    kv_sequences,
    prefill_in_steps,
)
from coel_env.specs.hardware import load_hardware_profile
from coel_env.specs.scenario import SCENARIO_DIR


def test_held_kv_tokens_rounds_prompt_plus_half_the_output_to_blocks():
    assert held_kv_tokens(128.0, 128.0, 16.0) == 192.0  # 128 + 64, already whole blocks
    assert held_kv_tokens(100.0, 10.0, 16.0) == 112.0  # 105 -> 7 blocks of 16


def test_kv_sequences_is_kv_bytes_over_bytes_per_sequence_capped():
    assert kv_sequences(10 * 1000 * 192.0, 1000.0, 192.0, 256.0) == 10.0
    assert kv_sequences(10.9 * 1000 * 192.0, 1000.0, 192.0, 256.0) == 10.0  # whole sequences only
    assert kv_sequences(1e12, 1000.0, 192.0, 256.0) == 256.0  # max_num_seqs binds
    assert kv_sequences(-5.0, 1000.0, 192.0, 256.0) == 0.0  # no room: serves nothing


@pytest.mark.parametrize("a", [0.1, 0.5, 0.9])
def test_erlang_c_with_one_slot_is_the_mm1_wait(a):
    service = 2.0
    assert erlang_c_wait(1.0, a, service) == pytest.approx(a * service / (1 - a))


def test_erlang_c_two_slots_matches_the_closed_form():
    # M/M/2: P(wait) = a^2 / (2 + a) / (1 + a + a^2 / (2 + a)) ... written as 2 rho^2 / (1 + rho), rho = a / 2
    a, service = 1.2, 1.0
    rho = a / 2
    p_wait = 2 * rho**2 / (1 + rho)
    assert erlang_c_wait(2.0, a, service) == pytest.approx(p_wait * service / (2 - a))
    assert math.isinf(erlang_c_wait(2.0, 2.0, service)) and erlang_c_wait(4.0, 0.0, service) == 0.0


def test_interp_log2_is_linear_in_log_batch_and_clamped():
    grid = np.array([1.0, 2.0, 4.0, 8.0])
    values = np.array([10.0, 20.0, 40.0, 80.0])
    assert interp_log2(grid, values, 1.0) == 10.0 and interp_log2(grid, values, 0.5) == 10.0
    assert interp_log2(grid, values, 2.0**1.5) == pytest.approx(30.0)  # halfway between 2 and 4 in log2
    assert interp_log2(grid, values, 100.0) == 80.0


def test_chunked_prefill_rides_in_steps_beside_the_decodes():
    # 1000 prompt tokens, budget 512 tokens per step with 12 decodes: ceil(1000 / 500) = 2 steps of 10 ms
    assert prefill_in_steps(0.1, 0.01, 1000.0, 512.0, 12.0, True) == pytest.approx(0.1 + 2 * 0.01)
    assert prefill_in_steps(0.1, 0.01, 1000.0, 512.0, 12.0, False) == pytest.approx(0.1 + 0.005)


def _scenario(hardware: str, rate: float, max_batch: int = 256, name: str = "paper-1server-2gpu", profile=None, **wl):
    d = yaml.safe_load((SCENARIO_DIR / f"{name}.yaml").read_text())
    d["name"], d["hardware"] = f"{name}-{hardware}", hardware
    d["workload"].update(arrival_rate=rate, max_batch=max_batch, slo_s=600, **wl)
    sc = make_scenario(d, hardware=profile)
    return sc, sc.initial_state(np.random.default_rng(0))


def _serve(hardware: str, rate: float, plan=None, **kw):
    sc, st = _scenario(hardware, rate, **kw)
    plan = DeploymentPlan.uniform(sc.cluster) if plan is None else plan(sc.cluster)
    return SurrogateBackend(sc.cluster).serve(plan, st, 60.0)


def test_light_load_decodes_like_batch_one():
    light = _serve("continuous", 1e-4)
    assert light.dropped_frac == 0.0
    single = _serve("continuous", 1e-4, max_batch=1)
    assert light.tpot_mean_s == pytest.approx(single.tpot_mean_s, rel=1e-3)


def test_saturation_plateaus_in_throughput_and_drops_explicitly():
    tok = [_serve("continuous", r).tokens_per_s for r in (1.0, 100.0, 1000.0)]
    high, higher = _serve("continuous", 100.0), _serve("continuous", 1000.0)
    assert tok[1] == pytest.approx(tok[2], rel=1e-6)  # saturated: the served rate is the capacity
    assert tok[1] > tok[0]
    assert 0 < high.dropped_frac < higher.dropped_frac < 1
    assert high.ttft_mean_s >= 600.0  # admitted requests wait max_queue_wait_s (the SLO by default)
    # a batch of many sequences decodes far faster per sequence than one at a time
    one_at_a_time = _serve("continuous", 100.0, max_batch=1)
    assert high.tokens_per_s > 5 * one_at_a_time.tokens_per_s


def test_queue_wait_limit_is_the_admission_rule():
    short = _serve("continuous", 100.0, max_queue_wait_s=5.0)
    assert 5.0 <= short.ttft_mean_s < 600.0


def test_more_gpu_experts_leave_less_kv_and_a_smaller_saturated_throughput():
    """The memory trade-off: at 8 bits every expert fits on the GPUs; at 4 bits the same experts take half the
    bytes, leaving more KV cache, so a saturated server runs more sequences at once."""

    def at_bits(b):
        def plan(c):
            p = DeploymentPlan.uniform(c)
            p.bits[p.device >= 0] = b
            p.tier[p.device >= 0] = 0
            return p

        return plan

    eight, four = _serve("continuous", 1000.0, plan=at_bits(8)), _serve("continuous", 1000.0, plan=at_bits(4))
    assert four.gpu_mem_bytes.sum() < eight.gpu_mem_bytes.sum()
    assert four.tokens_per_s > 1.2 * eight.tokens_per_s


@pytest.mark.parametrize("clients", [4, 2000])
def test_closed_loop_obeys_littles_law(clients):
    """A closed loop of C requests per server: completions/s x time in the system (wait + service) = C, with or
    without clients waiting for a slot (2000 > the KV-limited slots)."""
    sc, st = _scenario("continuous", 1.0, concurrency=clients)
    m = SurrogateBackend(sc.cluster).serve(DeploymentPlan.uniform(sc.cluster), st, 60.0)
    out_len = sc.spec.workload.output_len.mean
    completions = m.tokens_per_s / out_len
    assert completions * m.e2e_mean_s == pytest.approx(clients * sc.cluster.num_servers, rel=1e-6)
    assert m.dropped_frac == 0.0
    if clients == 2000:
        assert m.ttft_mean_s > 10 * m.tpot_mean_s  # clients beyond the slots wait their turn


def test_closed_loop_through_an_overloaded_link_slows_down_instead_of_dropping():
    """256 clients per server of an expert-parallel plan over 1 GbE (paper-2server-1gpu): the link binds. The
    clients slow down: nothing is dropped, Little's law still holds, and the link carries at most its capacity."""
    sc, st = _scenario("continuous", 1.0, name="paper-2server-1gpu", concurrency=256)
    c = sc.cluster
    m = SurrogateBackend(c).serve(DeploymentPlan.uniform(c), st, 60.0)
    completions = m.tokens_per_s / sc.spec.workload.output_len.mean
    assert m.dropped_frac == 0.0
    assert completions * m.e2e_mean_s == pytest.approx(256 * c.num_servers, rel=1e-6)
    capacity = 2.0 * c.link_bw * c.hw.link_efficiency * 60.0  # both directions over the window
    assert np.all(m.link_bytes <= capacity * (1 + 1e-9)) and m.link_bytes.max() > 0.9 * capacity.max()


def test_closed_loop_needs_continuous_serving():
    with pytest.raises(ConfigError, match=r"workload\.concurrency: a closed-loop workload needs a hardware profile"):
        _scenario("default", 1.0, concurrency=8)


def test_a_kv_reserve_too_small_for_one_sequence_is_one_line():
    with pytest.raises(ConfigError, match=r"hardware: kv_reserve_frac: 1e-05 leaves server 'server1' .* allowed: >="):
        d = yaml.safe_load((SCENARIO_DIR / "paper-1server-2gpu.yaml").read_text())
        d["name"], d["hardware"] = "tiny-reserve", "continuous"
        profile = make_scenario(d).cluster.hw.model_copy(update={"kv_reserve_frac": 1e-5})
        make_scenario(d, hardware=profile)


@pytest.mark.parametrize("name", ["paper-1server-2gpu", "paper-2server-1gpu", "paper-testbed"])
def test_batch_grid_at_one_agrees_with_the_routing_pass(name):
    """At batch 1 and a vanishing load the continuous model's decode step (`decode_grid` at B = 1, interpolated) is
    the routing pass's own decode step: the independent model's TPOT (same profile otherwise), which the same
    formulas give at B = 1."""

    def tpot(serving):
        profile = load_hardware_profile("continuous").model_copy(update={"serving": serving})
        sc, st = _scenario("continuous", 1e-6, max_batch=1, name=name, profile=profile)
        return SurrogateBackend(sc.cluster).serve(DeploymentPlan.uniform(sc.cluster), st, 60.0).tpot_mean_s

    assert tpot("continuous") == pytest.approx(tpot("independent"), rel=1e-4)


def test_closed_loop_clients_of_a_failed_server_are_dropped():
    """A server that cannot serve drops its clients' requests (they count as offered), not the score's denominator."""
    sc, st = _scenario("continuous", 1.0, name="tiny", concurrency=4)
    st.server_up[:] = False
    st.touch()
    m = SurrogateBackend(sc.cluster).serve(DeploymentPlan.uniform(sc.cluster), st, 60.0)
    assert m.requests > 0 and m.tokens_per_s == 0.0
    assert m.dropped_frac == pytest.approx(1.0) and m.late_frac == pytest.approx(1.0)


def test_device_utilization_grows_with_the_served_load():
    utils = [_serve("continuous", r).device_util.max() for r in (1.0, 3.0, 10.0)]
    assert utils[0] < utils[1] < utils[2] <= 1.0


def test_token_budget_below_the_batch_is_one_line():
    with pytest.raises(ConfigError, match=r"workload\.max_num_batched_tokens \(64\) must be >= workload\.max_batch"):
        _scenario("continuous", 1.0, max_batch=256, max_num_batched_tokens=64)
