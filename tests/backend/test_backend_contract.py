"""The batch-first backend contract: a single-plan backend adapted with N = 1 steps exactly like the native batch."""

from __future__ import annotations

import numpy as np
import pytest

from coel_env import DeploymentPlan, SurrogateBackend
from coel_env.backend.contract import Backend, BatchBackend, SinglePlanBatch, as_batch_backend
from coel_env.backend.metrics import ARRAY_METRICS, SCALAR_METRICS, Metrics
from coel_env.env import CoELEnv
from coel_env.env.core import CoELCore
from coel_env.errors import ConfigError
from coel_env.world.state import make_scenario


class SinglePlanOnly:
    """A backend with only the single-plan protocol (as the real backend), answering with the surrogate."""

    name = "single-plan-surrogate"

    def __init__(self, cluster):
        self.inner = SurrogateBackend(cluster)
        self.calls: list[str] = []

    def reset(self, plan, state):
        self.calls.append("reset")
        self.inner.reset(plan, state)

    def apply(self, plan, state):
        self.calls.append("apply")
        return self.inner.apply(plan, state)

    def serve(self, plan, state, window_s):
        self.calls.append("serve")
        return self.inner.serve(plan, state, window_s)

    def close(self):
        self.calls.append("close")


def _trajectory(backend_for, action_space: str, steps: int = 6) -> tuple[list, list, SinglePlanOnly | None]:
    sc = make_scenario("paper-testbed", seed=0)
    backend = backend_for(sc.cluster)
    env = CoELEnv(scenario=sc, backend=backend, action_space=action_space, max_epochs=50)
    env.action_space.seed(3)
    env.reset(seed=11)
    rewards, metrics = [], []
    for _ in range(steps):
        _, r, _, _, info = env.step(env.action_space.sample())
        rewards.append(r)
        metrics.append((info["metrics"], info["migration"], info["restore_migration"]))
    return rewards, metrics, backend


@pytest.mark.parametrize("action_space", ["full", "edit"])
def test_single_plan_backend_adapted_steps_like_the_native_batch(action_space):
    native_r, native_m, _ = _trajectory(SurrogateBackend, action_space)
    adapted_r, adapted_m, backend = _trajectory(SinglePlanOnly, action_space)
    # equal up to float32: a DeploymentPlan (what a single-plan backend is handed) stores the pruning rates as float32
    np.testing.assert_allclose(adapted_r, native_r, rtol=1e-6)
    for (m_a, mig_a, rmig_a), (m_n, mig_n, rmig_n) in zip(adapted_m, native_m):
        assert mig_a == mig_n and rmig_a == rmig_n  # migration is exact
        assert m_a.keys() == m_n.keys()
        np.testing.assert_allclose([m_a[k] for k in m_a], [m_n[k] for k in m_n], rtol=1e-6)
    # the adapter used the single-plan protocol: reset once, then an apply for every committed change, serve per step
    assert backend.calls[0] == "reset" and backend.calls.count("serve") == 6
    assert backend.calls.count("apply") >= 2 and sum(m[1]["bytes_total"] > 0 for m in adapted_m) >= 2


def test_the_adapter_is_used_only_for_single_plan_backends():
    c = make_scenario("tiny").cluster
    sur = SurrogateBackend(c)
    assert isinstance(sur, Backend) and isinstance(sur, BatchBackend)
    assert as_batch_backend(sur, c.num_links) is sur and sur.max_envs is None
    single = SinglePlanOnly(c)
    assert not isinstance(single, BatchBackend)
    wrapped = as_batch_backend(single, c.num_links)
    assert isinstance(wrapped, SinglePlanBatch) and wrapped.max_envs == 1 and wrapped.name == single.name


def test_num_envs_beyond_a_backends_limit_is_one_line():
    sc = make_scenario("tiny")
    with pytest.raises(ConfigError, match=r"num_envs: 4; the single-plan-surrogate backend serves at most 1"):
        CoELCore(sc, SinglePlanOnly(sc.cluster), num_envs=4)
    with pytest.raises(ConfigError, match="implements neither Backend nor BatchBackend"):
        as_batch_backend(object(), sc.cluster.num_links)


def test_metrics_schema_is_the_dataclass():
    names = [f for f in Metrics.__dataclass_fields__]
    assert list(SCALAR_METRICS) + list(ARRAY_METRICS) == names
    assert ARRAY_METRICS == ("gpu_mem_bytes", "cpu_mem_bytes", "ssd_bytes", "link_bytes", "device_util")
    sc = make_scenario("tiny")
    mb = SurrogateBackend(sc.cluster).serve_batch(
        [DeploymentPlan.uniform(sc.cluster)], sc.initial_state(np.random.default_rng(0)), 60.0
    )
    assert set(mb.fields) == set(names)
