"""Which expert work a step pays for: pruned rows do not run their experts (`kept_use_probability`), and a layer
computed as one grouped GEMM pays no per-expert fixed cost (`grouped_layers`, HardwareProfile.grouped_experts)."""

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


def test_grouped_layers_follow_the_real_backends_rule():
    sc = Scenario(dict(scenario_variants()["tiny"]), seed=0)
    c = sc.cluster
    plan = DeploymentPlan.uniform(c)
    plan.bits[plan.device >= 0] = 16
    L = plan.device.shape[0]
    one = Plans(plan.device[None], plan.tier[None], plan.bits[None], plan.prune[None], plan.fuse[None], np.zeros(1))
    out = np.zeros((1, c.num_servers, L), dtype=np.bool_)
    grouped_layers(one, c.dev_server, True, out)
    held = np.zeros((c.num_servers, L), dtype=bool)
    for l, e, r in zip(*np.nonzero(plan.device >= 0)):
        held[c.dev_server[plan.device[l, e, r]], l] = True
    assert (out[0] == held).all() and held.any()
    # one 8-bit expert on server s, layer l: only that (server, layer) stops being grouped
    l, e = np.argwhere(plan.device[..., 0] >= 0)[0]
    s = c.dev_server[plan.device[l, e, 0]]
    plan.bits[l, e, 0] = 8
    grouped_layers(one, c.dev_server, True, out)
    want = held.copy()
    want[s, l] = False
    assert (out[0] == want).all()
    grouped_layers(one, c.dev_server, False, out)
    assert not out.any()


def test_grouped_layers_pay_no_per_expert_fixed_cost():
    for oh in (1e-3, 0.0):
        on = _serve(HardwareProfile(grouped_experts=True, expert_overhead_s=oh), _uniform(16))
        off = _serve(HardwareProfile(grouped_experts=False, expert_overhead_s=oh), _uniform(16))
        if oh:
            assert on.tpot_mean_s < off.tpot_mean_s and on.ttft_mean_s < off.ttft_mean_s
        else:
            assert on.tpot_mean_s == off.tpot_mean_s and on.ttft_mean_s == off.ttft_mean_s
    # 8-bit experts are never grouped: the flag changes nothing
    on = _serve(HardwareProfile(grouped_experts=True, expert_overhead_s=1e-3), _uniform(8))
    off = _serve(HardwareProfile(grouped_experts=False, expert_overhead_s=1e-3), _uniform(8))
    assert on.tpot_mean_s == off.tpot_mean_s and on.ttft_mean_s == off.ttft_mean_s
