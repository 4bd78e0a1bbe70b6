"""Property fuzzing: random scenarios, spaces and actions never produce NaN/inf, out-of-space observations or an
incomplete plan."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coel_env.env import CoELEnv
from coel_env.specs import load_scenario_spec

_ENVS: dict = {}


def get_env(scenario: str, action_space: str, perception: str) -> CoELEnv:
    key = (scenario, action_space, perception)
    if key not in _ENVS:
        data = load_scenario_spec(scenario).model_dump()
        data["dynamics"].update(failure_rate=0.2, recovery_rate=0.3, link_change_rate=0.2)
        _ENVS[key] = CoELEnv(scenario=data, action_space=action_space, perception=perception, max_epochs=50)
    return _ENVS[key]


def finite(x) -> bool:
    if isinstance(x, dict):
        return all(finite(v) for v in x.values())
    if isinstance(x, (float, int, np.ndarray)) and not isinstance(x, bool):
        return bool(np.isfinite(x).all())
    return True


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scenario=st.sampled_from(["tiny", "paper-testbed", "moe2-heterogeneous"]),
    action_space=st.sampled_from(["full", "edit", "threshold"]),
    perception=st.sampled_from(["hello", "ideal"]),
    seed=st.integers(0, 2**31),
    steps=st.integers(1, 4),
)
def test_random_actions_keep_everything_valid(scenario, action_space, perception, seed, steps):
    env = get_env(scenario, action_space, perception)
    obs, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    for _ in range(steps):
        obs, r, term, trunc, info = env.step(env.action_space.sample())
        assert np.isfinite(r) and finite(info["metrics"]) and finite(info["migration"])
        assert env.observation_space.contains(obs)
        plan = env.plan
        assert plan.problems(env.cluster, env.state.memory_avail) == []
        live = env.state.server_up[env.cluster.dev_server[np.maximum(plan.device, 0)]] & (plan.device >= 0)
        assert live.any(-1).all()  # every expert has a replica on a live server
        if term or trunc:
            break
