"""The composite reward's throughput scale under open and closed loops."""

from __future__ import annotations

import pytest
from conftest import scenario_dict

from coel_env import Scenario
from coel_env.env.rewards import demand_tokens_per_s


def test_demand_follows_the_clients_under_a_closed_loop():
    open_loop = Scenario(scenario_dict(arrival_rate=[0.2, 0.3]), seed=0).spec
    wl = open_loop.workload
    assert demand_tokens_per_s(wl, open_loop.arrival_rates, 2, 100.0) == pytest.approx(0.5 * 100.0)
    closed = wl.model_copy(update={"concurrency": 8})
    # 8 clients per server, each asking for a request per SLO: independent of the (ignored) arrival rates
    assert demand_tokens_per_s(closed, [5.0, 5.0], 2, 100.0) == pytest.approx(16 * 100.0 / wl.slo_s)
