"""Cluster state dynamics: seeded determinism, failures never take every server down, drift toward targets."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coel_env import make_scenario
from coel_env.world.state import STATE_FIELDS

HYP = settings(
    max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
ARRAYS = STATE_FIELDS


def _run(sc, seed: int, epochs: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    state = sc.initial_state(rng)
    out = []
    for _ in range(epochs):
        sc.advance(state, rng)
        out.append({k: getattr(state, k).copy() for k in ARRAYS} | {"epoch": state.epoch})
    return out


@pytest.mark.parametrize("name", ["tiny", "metro-8"])
def test_same_seed_same_trajectory(name):
    a, b = make_scenario(name, seed=3), make_scenario(name, seed=3)
    ta, tb = _run(a, 11, 20), _run(b, 11, 20)
    for x, y in zip(ta, tb):
        assert x["epoch"] == y["epoch"]
        for k in ARRAYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    tc = _run(a, 12, 20)
    assert any(not np.array_equal(x["arrival_rate"], y["arrival_rate"]) for x, y in zip(ta, tc))


def test_scenario_seed_changes_routing_not_the_cluster():
    a, b = make_scenario("tiny", seed=0), make_scenario("tiny", seed=1)
    assert not np.array_equal(a.routing.domain_popularity, b.routing.domain_popularity)
    np.testing.assert_array_equal(a.cluster.dev_mem, b.cluster.dev_mem)


def test_initial_state_by_hand(testbed):
    state = testbed.initial_state(np.random.default_rng(0))
    c = testbed.cluster
    assert state.epoch == 0
    assert state.server_up.all() and state.server_up.dtype == bool
    np.testing.assert_array_equal(state.compute_avail, np.ones(c.num_devices))
    np.testing.assert_array_equal(state.link_factor, np.ones(c.num_links))
    np.testing.assert_array_equal(state.arrival_rate, [0.3, 0.2, 0.2])
    np.testing.assert_allclose(state.domain_mix.sum(-1), 1.0)
    np.testing.assert_array_equal(state.domain_mix, state.domain_target)
    np.testing.assert_allclose(state.popularity, testbed.routing.popularity(state.domain_mix))
    np.testing.assert_array_equal(state.device_up, [True] * 4)


def test_copy_is_independent(tiny_state):
    other = tiny_state.copy()
    other.server_up[0] = False
    other.popularity[0, 0, 0] = 9.0
    other.epoch = 5
    assert tiny_state.server_up[0] and tiny_state.popularity[0, 0, 0] != 9.0 and tiny_state.epoch == 0


@HYP
@given(seed=st.integers(0, 10_000), recovery=st.floats(0.0, 1.0))
def test_failures_never_take_every_server_down(make_spec, seed, recovery):
    spec = make_spec(num_servers=3, dynamics=dict(failure_rate=1.0, recovery_rate=recovery))
    sc = make_scenario(spec, seed=0)
    rng = np.random.default_rng(seed)
    state = sc.initial_state(rng)
    for _ in range(15):
        sc.advance(state, rng)
        assert state.server_up.any()
        # a failed server's GPUs are down with it
        np.testing.assert_array_equal(state.device_up, state.server_up[sc.cluster.dev_server])


def test_failures_and_recoveries_happen_at_their_rates(make_spec):
    spec = make_spec(num_servers=4, dynamics=dict(failure_rate=0.1, recovery_rate=0.5))
    sc = make_scenario(spec, seed=0)
    rng = np.random.default_rng(0)
    state = sc.initial_state(rng)
    up = []
    for _ in range(2000):
        sc.advance(state, rng)
        up.append(state.server_up.copy())
    frac_up = np.mean(up)
    # two-state Markov chain: stationary up-fraction = recovery / (failure + recovery) = 0.5 / 0.6
    assert frac_up == pytest.approx(0.5 / 0.6, abs=0.03)


def test_no_failures_without_a_failure_rate(tiny):
    spec = tiny.spec.model_copy(update={"dynamics": tiny.spec.dynamics.model_copy(update={"failure_rate": 0.0})})
    sc = make_scenario(spec, seed=0)
    rng = np.random.default_rng(0)
    state = sc.initial_state(rng)
    for _ in range(50):
        sc.advance(state, rng)
        assert state.server_up.all()


def test_drift_moves_mixtures_toward_targets(make_spec):
    spec = make_spec(
        num_servers=3,
        routing=dict(num_domains=4),
        dynamics=dict(drift_rate=0.1, domain_switch_rate=0.0, resource_noise=0.0),
    )
    sc = make_scenario(spec, seed=0)
    rng = np.random.default_rng(0)
    state = sc.initial_state(rng)
    target = np.random.default_rng(9).dirichlet(np.ones(4), size=3)
    state.domain_target[:] = target
    gap0 = np.abs(state.domain_mix - target).sum(-1)
    for t in range(1, 31):
        sc.advance(state, rng)
        # a fixed fraction of the gap closes every epoch: |mix - target| = 0.9^t |mix0 - target|
        np.testing.assert_allclose(np.abs(state.domain_mix - target).sum(-1), gap0 * 0.9**t, rtol=1e-9)
        np.testing.assert_allclose(state.domain_mix.sum(-1), 1.0)
        np.testing.assert_allclose(state.popularity, sc.routing.popularity(state.domain_mix))


def test_domain_switches_pick_new_targets(make_spec):
    spec = make_spec(num_servers=3, dynamics=dict(drift_rate=0.05, domain_switch_rate=1.0))
    sc = make_scenario(spec, seed=0)
    rng = np.random.default_rng(0)
    state = sc.initial_state(rng)
    before = state.domain_target.copy()
    sc.advance(state, rng)
    assert not np.allclose(state.domain_target, before)
    np.testing.assert_allclose(state.domain_target.sum(-1), 1.0)


def test_resource_noise_and_links_stay_in_range(make_spec):
    spec = make_spec(
        num_servers=3,
        dynamics=dict(resource_noise=0.5, link_change_rate=0.5, link_change_range=[0.3, 0.8], arrival_burstiness=0.5),
    )
    sc = make_scenario(spec, seed=0)
    rng = np.random.default_rng(0)
    state = sc.initial_state(rng)
    changed = False
    for _ in range(100):
        sc.advance(state, rng)
        assert ((state.compute_avail >= 0.2) & (state.compute_avail <= 1.0)).all()
        assert ((state.memory_avail >= 0.5) & (state.memory_avail <= 1.0)).all()
        assert ((state.link_factor >= 0.3) & (state.link_factor <= 1.0)).all()
        assert (state.arrival_rate > 0).all()
        changed |= bool((state.link_factor < 1.0).any())
    assert changed


def test_no_noise_means_a_static_cluster(make_spec):
    spec = make_spec(
        num_servers=2, dynamics=dict(resource_noise=0.0, arrival_burstiness=0.0, drift_rate=0.0, domain_switch_rate=0.0)
    )
    sc = make_scenario(spec, seed=0)
    rng = np.random.default_rng(0)
    state = sc.initial_state(rng)
    first = state.copy()
    for _ in range(5):
        sc.advance(state, rng)
    for k in ARRAYS:
        np.testing.assert_array_equal(getattr(state, k), getattr(first, k), err_msg=k)
    assert state.epoch == 5
