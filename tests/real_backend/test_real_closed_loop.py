"""A closed-loop window on the real backend (CPU/gloo, tiny): each client sends its next request when its last one
completes, so at most `concurrency` requests per server are in the system and none waits for a slot."""

from __future__ import annotations

import numpy as np
import pytest

from coel_env import DeploymentPlan, Scenario
from real_backend import make_real_backend

pytestmark = pytest.mark.slow


def test_closed_loop_chains_each_clients_requests():
    sc = Scenario("tiny", seed=0)
    state = sc.initial_state(np.random.default_rng(0))
    state.arrival_rate = np.array([1.5, 0.0, 0.5])
    state.touch()
    plan = DeploymentPlan.uniform(sc.cluster)
    backend = make_real_backend(sc.cluster, seed=0, timeout_s=60)
    try:
        backend.reset(plan, state)
        backend.concurrency = 2
        m = backend.serve(plan, state, 4.0)
        reqs = backend.last_requests
        timing = backend.last_details["timing"]
    finally:
        backend.close()
    assert [len(r) for r in reqs] == [6, 0, 2]  # round(rate * window) requests per server
    assert m.dropped_frac == 0.0 and len(timing) == 8
    for server in reqs:
        firsts = [q for q in server if q["after"] is None]
        assert len(firsts) == min(2, len(server)) and all(q["arrival"] == 0.0 for q in firsts)
        for q in server:
            arrival, t_first, t_last = timing[q["rid"]]
            assert arrival <= t_first <= t_last
            if q["after"] is not None:  # sent the moment its client's previous request completed
                assert arrival == timing[q["after"]][2]
    # throughput over the span the chains took (not the nominal window)
    makespan = max(t for _, _, t in timing.values())
    n_out = sum(q["max_new"] for r in reqs for q in r)
    assert m.tokens_per_s == pytest.approx(n_out / makespan, rel=1e-9)
