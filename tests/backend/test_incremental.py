"""Incremental serving (incremental.py) gives exactly the full evaluation's Metrics, bit for bit, on random edit
sequences against one state: single plans and batches, shared and per-plan states, every serving and routing
model it covers, and compression changes (which change every layer)."""

from __future__ import annotations

import numpy as np
import pytest

from coel_env import DeploymentPlan, SurrogateBackend, make_scenario
from coel_env.plan.batch import PlanBatch
from coel_env.specs import HardwareProfile

PROFILES = {
    "default": HardwareProfile(),  # independent serving, load-aware routing (primary-replica check)
    "shared_host": HardwareProfile(host_cores=2, emulated_latency=True),  # (lockstep batches continuously: full)
    "local_first": HardwareProfile(routing="local_first"),
    "grouped_no_cpu": HardwareProfile(grouped_expert_bits=[16, 8], cpu_compute=False),
}


def _edit(rng: np.random.Generator, dev, tier, bits, prune, num_devices: int) -> None:
    """A few random cell edits of one plan's arrays in place (place / drop a replica, re-tier, re-bit), now and
    then a compression change."""
    L, E, R = dev.shape
    for _ in range(int(rng.integers(1, 4))):
        l, e, r = rng.integers(L), rng.integers(E), rng.integers(R)
        if r > 0 and rng.random() < 0.3:
            dev[l, e, r] = -1
        else:
            dev[l, e, r] = rng.integers(num_devices)
            tier[l, e, r] = rng.choice([0, 0, 1, 2])
            bits[l, e, r] = rng.choice([16, 8, 4])
    if prune.size and rng.random() < 0.1:
        prune[rng.integers(prune.size)] = rng.choice([0.0, 0.2, 0.4])


def _assert_identical(got, want, where: str) -> None:
    for key, value in want.fields.items():
        assert np.array_equal(got.fields[key], value, equal_nan=True), f"{where}: {key}"


def _backends(cluster) -> tuple[SurrogateBackend, SurrogateBackend]:
    inc, full = SurrogateBackend(cluster), SurrogateBackend(cluster)
    full.incremental = False
    return inc, full


@pytest.mark.parametrize("profile", list(PROFILES))
@pytest.mark.parametrize("scenario", ["paper-testbed", "metro-8"])
def test_incremental_equals_full_on_random_edit_sequences(scenario, profile):
    sc = make_scenario(scenario, seed=0, hardware=PROFILES[profile])
    c = sc.cluster
    state = sc.initial_state(np.random.default_rng(0))
    plan = DeploymentPlan.uniform(c)
    inc, full = _backends(c)
    rng = np.random.default_rng(1)
    for i in range(40):
        _edit(rng, plan.device, plan.tier, plan.bits, plan.prune, c.num_devices)
        _assert_identical(inc.serve_batch([plan], state, 60.0), full.serve_batch([plan], state, 60.0), f"step {i}")
    assert inc._inc.main is not None and inc._inc.main.terms.any()  # the incremental path served


@pytest.mark.parametrize("per_plan_states", [False, True])
def test_incremental_batches_equal_full(per_plan_states):
    """A batch of 4 plans edited independently, against one shared state or a state per plan (a list)."""
    sc = make_scenario("paper-testbed", seed=0)
    c = sc.cluster
    state = sc.initial_state(np.random.default_rng(0))
    states = [sc.advance(state.copy(), np.random.default_rng(k)) for k in range(4)] if per_plan_states else state
    plans = PlanBatch.tile(DeploymentPlan.uniform(c), 4)
    inc, full = _backends(c)
    rng = np.random.default_rng(2)
    for i in range(25):
        for n in range(4):
            _edit(rng, plans.dev[n], plans.tier[n], plans.bits[n], plans.prune[n], c.num_devices)
        _assert_identical(inc.serve_batch(plans, states, 60.0), full.serve_batch(plans, states, 60.0), f"step {i}")


def test_new_states_and_continuous_batching_serve_fully():
    """A serve against other states than the previous one's, and continuous batching, take the full path: the
    cache holds nothing stale."""
    sc = make_scenario("paper-testbed", seed=0)
    c = sc.cluster
    state = sc.initial_state(np.random.default_rng(0))
    plan = DeploymentPlan.uniform(c)
    inc, full = _backends(c)
    rng = np.random.default_rng(3)
    for i in range(10):
        _edit(rng, plan.device, plan.tier, plan.bits, plan.prune, c.num_devices)
        if i % 3 == 0:
            sc.advance(state, rng)
        _assert_identical(inc.serve_batch([plan], state, 60.0), full.serve_batch([plan], state, 60.0), f"step {i}")
    cont = SurrogateBackend(make_scenario("paper-testbed", seed=0, hardware="continuous").cluster)
    assert not cont._incremental_ok(plan.device[None])
