"""Which expert work a step pays for: pruned rows do not run their experts (`kept_use_probability`), and a layer
computed as one grouped kernel pays no per-expert fixed cost (`grouped_layers`, HardwareProfile.grouped_expert_bits)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from coel_env import DeploymentPlan, SurrogateBackend
from coel_env.backend.physics import Plans, grouped_layers, kept_use_probability, use_probability
from coel_env.specs import HardwareProfile
from coel_env.world.state import Scenario
from experiments.calib.fidelity import scenario_variants


def test_kept_use_probability_is_the_use_probability_of_the_kept_rows():
    p, n = 0.3, 4.0
    u = use_probability(p, n, np.log1p(-p))
    assert kept_use_probability(u, p, n, 1.0) == u
    assert kept_use_probability(u, p, n, 0.5) == pytest.approx(1 - (1 - 0.15) ** 4, rel=1e-12)
    assert kept_use_probability(u, p, n, 0.0) == 0.0
    assert kept_use_probability(p, p, 1.0, 0.25) == pytest.approx(0.075, rel=1e-12)  # one token: p * keep
    assert kept_use_probability(1.0, 1.0, 3.0, 0.5) == pytest.approx(1 - 0.5**3, rel=1e-12)


def _serve(hw: HardwareProfile, plan_fn, rates=(1e-3, 1e-3, 1e-3)):
    sc = Scenario(dict(scenario_variants()["tiny"]), seed=0, hardware=hw)
    state = sc.initial_state(np.random.default_rng(0))
    state.arrival_rate = np.asarray(rates, dtype=np.float64)
    state.touch()
    return SurrogateBackend(sc.cluster).serve(plan_fn(sc.cluster), state, 10.0)


def _uniform(bits: int = 16, prune: float = 0.0):
    def make(cluster):
        plan = DeploymentPlan.uniform(cluster)
        plan.bits[plan.device >= 0] = bits
        plan.prune[:] = prune
        return plan

    return make


def test_pruned_rows_skip_their_experts_so_steps_get_shorter():
    """With a large per-expert cost and no link cost worth counting, a decode step gets strictly shorter as more
    rows are pruned: fewer remote experts run (their reads and fixed costs are paid only for kept rows)."""
    hw = HardwareProfile(expert_overhead_s=1e-3, transfer_latency_s=0.0)
    tpot = [_serve(hw, _uniform(prune=r)).tpot_mean_s for r in (0.0, 0.25, 0.5, 0.75)]
    assert all(a > b for a, b in itertools.pairwise(tpot)), tpot


def test_grouped_layers_are_the_gpus_whose_experts_are_all_grouped_bit_widths_in_memory():
    sc = Scenario(dict(scenario_variants()["tiny"]), seed=0)
    c = sc.cluster
    plan = DeploymentPlan.uniform(c)
    plan.bits[plan.device >= 0] = 16
    plan.tier[:] = 0
    L = plan.device.shape[0]
    one = Plans(plan.device[None], plan.tier[None], plan.bits[None], plan.prune[None], plan.fuse[None], np.zeros(1))
    out = np.zeros((1, c.num_devices, L), dtype=np.bool_)
    only16 = np.isin(np.arange(17), [16])
    grouped_layers(one, only16, out)
    held = np.zeros((c.num_devices, L), dtype=bool)
    for l, e, r in zip(*np.nonzero(plan.device >= 0)):
        held[plan.device[l, e, r], l] = True
    assert (out[0] == held).all() and held.any()
    l, e = np.argwhere(plan.device[..., 0] >= 0)[0]
    d = plan.device[l, e, 0]
    plan.bits[l, e, 0] = 8  # one 8-bit expert on GPU d, layer l: only that (GPU, layer) stops being grouped
    grouped_layers(one, only16, out)
    want = held.copy()
    want[d, l] = False
    assert (out[0] == want).all()
    grouped_layers(one, np.isin(np.arange(17), [16, 8]), out)  # unless 8-bit experts are grouped too
    assert (out[0] == held).all()
    plan.bits[l, e, 0], plan.tier[l, e, 0] = 16, 1  # an expert in CPU memory: not in the GPU's kernel
    grouped_layers(one, only16, out)
    assert (out[0] == want).all()
    grouped_layers(one, np.zeros(17, dtype=bool), out)
    assert not out.any()


def test_grouped_layers_pay_no_per_expert_fixed_cost():
    for oh in (1e-3, 0.0):
        on = _serve(HardwareProfile(grouped_expert_bits=[16], expert_overhead_s=oh), _uniform(16))
        off = _serve(HardwareProfile(grouped_expert_bits=[], expert_overhead_s=oh), _uniform(16))
        if oh:
            assert on.tpot_mean_s < off.tpot_mean_s and on.ttft_mean_s < off.ttft_mean_s
        else:
            assert on.tpot_mean_s == off.tpot_mean_s and on.ttft_mean_s == off.ttft_mean_s
    # 8-bit experts are not grouped under [16]: the setting changes nothing; under [16, 8] it does
    on = _serve(HardwareProfile(grouped_expert_bits=[16], expert_overhead_s=1e-3), _uniform(8))
    off = _serve(HardwareProfile(grouped_expert_bits=[], expert_overhead_s=1e-3), _uniform(8))
    assert on.tpot_mean_s == off.tpot_mean_s and on.ttft_mean_s == off.ttft_mean_s
    both = _serve(HardwareProfile(grouped_expert_bits=[16, 8], expert_overhead_s=1e-3), _uniform(8))
    assert both.tpot_mean_s < off.tpot_mean_s
