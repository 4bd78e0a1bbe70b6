"""The surrogate's per-state cache never serves stale inputs: states are keyed on their `version` (touch())."""

from __future__ import annotations

import numpy as np

from coel_env import DeploymentPlan, SurrogateBackend, make_scenario
from coel_env.env import CoELEnv
from coel_env.world.state import StateBatch


def _same(a, b) -> bool:
    da, db = a.to_dict(), b.to_dict()
    return all(np.array_equal(np.asarray(da[k]), np.asarray(db[k])) for k in da)


def test_touch_and_copy_change_the_version(tiny_state):
    v = tiny_state.version
    assert tiny_state.touch().version > v
    assert tiny_state.copy().version not in (v, tiny_state.version)


def test_in_place_popularity_edit_with_touch_is_seen(testbed, testbed_state):
    c = testbed.cluster
    plan = DeploymentPlan.uniform(c)
    be = SurrogateBackend(c)
    before = be.serve(plan, testbed_state, 60.0)
    ptr = testbed_state.popularity.ctypes.data
    testbed_state.popularity *= 0.5  # same array, same epoch, same id
    testbed_state.touch()
    assert testbed_state.popularity.ctypes.data == ptr
    after = be.serve(plan, testbed_state, 60.0)
    fresh = SurrogateBackend(c).serve(plan, testbed_state, 60.0)
    assert _same(after, fresh) and not _same(after, before)


def test_state_batch_rows_reloaded_in_place_are_seen():
    """A StateBatch row reloaded with another episode's initial state (epoch 0 again, same arrays)."""
    sc = make_scenario("paper-testbed", seed=0)
    c = sc.cluster
    plan = DeploymentPlan.uniform(c)
    be = SurrogateBackend(c)
    sb = StateBatch(sc, 1)
    results = []
    for seed in (1, 2, 1):
        st = sc.initial_state(np.random.default_rng(seed))
        sb.load(0, st)
        sb.refresh_popularity([0])
        got = be.serve_arrays(
            plan.device[None], plan.tier[None], plan.bits[None], plan.prune[None], plan.fuse[None], sb, 60.0
        ).item(0)
        assert _same(got, SurrogateBackend(c).serve(plan, st, 60.0))
        results.append(got)
    assert not _same(results[0], results[1]) and _same(results[0], results[2])


def test_scenario_advance_on_one_state_is_seen(tiny):
    c = tiny.cluster
    plan = DeploymentPlan.uniform(c)
    rng = np.random.default_rng(4)
    state = tiny.initial_state(rng)
    be = SurrogateBackend(c)
    for _ in range(3):
        tiny.advance(state, rng)
        assert _same(be.serve(plan, state, 10.0), SurrogateBackend(c).serve(plan, state, 10.0))


def test_env_episodes_match_a_fresh_env():
    """Reusing one env across episodes (states updated in place) gives what a fresh env gives."""
    env = CoELEnv(scenario="tiny", max_epochs=3, info_action_mask=False)
    env.action_space.seed(0)
    acts = [env.action_space.sample() for _ in range(3)]

    def episode(e, seed):
        e.reset(seed=seed)
        return [e.step(a)[1] for a in acts]  # rewards

    episode(env, 5)
    second = episode(env, 6)
    fresh = episode(CoELEnv(scenario="tiny", max_epochs=3, info_action_mask=False), 6)
    assert second == fresh
