"""Policies evaluated on the real backend are compared on the same traffic: the env hands its scenario's routing
model to the backend (the routes follow the popularity its states and the surrogate see), and every reset restarts
the window sequence (the k-th window of an episode draws the same requests whatever ran before)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import coel_env  # noqa: F401  (registers CoEL-v0)
from coel_env import DeploymentPlan, Scenario
from real_backend import make_real_backend


def test_the_env_gives_the_real_backend_its_scenarios_routing_model():
    env = gym.make("CoEL-v0", scenario="tiny", backend="real", scenario_seed=7)
    core = env.unwrapped
    assert core.backend.routing is core.scenario.routing  # not a model of the backend's own seed (0)
    env.close()


def _requests(backend, plan, state) -> list:
    reqs, _, _ = backend.workload(plan, state, 4.0)
    return [(q["rid"], q["arrival"], q["max_new"], q["prompt"].tolist()) for r in reqs for q in r]


@pytest.mark.slow
def test_each_reset_restarts_the_window_sequence():
    sc = Scenario("tiny", seed=0)
    state = sc.initial_state(np.random.default_rng(0))
    plan = DeploymentPlan.uniform(sc.cluster)
    backend = make_real_backend(sc.cluster, seed=0, timeout_s=30, max_requests_per_server=2)
    try:
        backend.reset(plan, state)
        first, second = _requests(backend, plan, state), _requests(backend, plan, state)
        backend.reset(plan, state)  # the next episode
        assert _requests(backend, plan, state) == first and first != second and first
    finally:
        backend.close()
