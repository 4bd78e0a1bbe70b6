"""Named observation spaces: `compact` (fixed-size summaries incl. per-server popularity) next to `default`."""

from __future__ import annotations

import numpy as np
import pytest

from agents.envs import make_flat_env, observed_keys
from coel_env.env import CoELEnv
from coel_env.env.observations import OBSERVATION_KEYS, PAIR_KEYS
from coel_env.env.vector import CoELVectorEnv
from coel_env.errors import ConfigError
from tests.conftest import scenario_dict


def compact_size(c) -> int:
    S, L = c.num_servers, c.model.num_moe_layers
    return 9 * S + c.num_links + 2 * c.num_pairs + len(PAIR_KEYS) * S * L + 1


def rollout(env, seed: int, steps: int) -> list[dict]:
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    out = [obs]
    for _ in range(steps):
        obs, *_ = env.step(env.action_space.sample())
        out.append(obs)
    return out


def test_compact_keys_and_size_do_not_grow_with_experts():
    sizes = []
    for experts in (8, 32):
        model = {"name": f"m{experts}", "num_layers": 2, "num_experts": experts, "top_k": 2, "d_model": 64}
        model.update(d_ff_expert=128, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=512)
        env = CoELEnv(scenario=scenario_dict(num_servers=3, model=model), observation_space="compact")
        assert set(env.observation_space.spaces) == set(OBSERVATION_KEYS["compact"])
        obs, _ = env.reset(seed=0)
        assert {k: v.shape for k, v in obs.items()} == {k: s.shape for k, s in env.observation_space.spaces.items()}
        sizes.append(sum(v.size for v in obs.values()))
        assert sizes[-1] == compact_size(env.cluster)
    assert sizes[0] == sizes[1]
    env = CoELEnv(scenario="paper-testbed", observation_space="compact")
    assert sum(s.shape[0] for s in env.observation_space.spaces.values()) == 541  # default: 10,113


@pytest.mark.parametrize("perception", ["hello", "ideal"])
def test_compact_is_in_unit_range_and_deterministic(perception):
    env = CoELEnv(scenario="tiny", observation_space="compact", action_space="threshold", perception=perception)
    a, b = rollout(env, 3, 12), rollout(env, 3, 12)
    for oa, ob in zip(a, b):
        assert env.observation_space.contains(oa)  # float32 boxes in [0, 1]
        for k in oa:
            assert np.isfinite(oa[k]).all() and oa[k].dtype == np.float32
            np.testing.assert_array_equal(oa[k], ob[k])
    c = rollout(env, 4, 12)
    assert any(not np.array_equal(x[k], y[k]) for x, y in zip(a, c) for k in x)  # another seed, other values
    assert any(not np.array_equal(a[0][k], a[-1][k]) for k in a[0])  # it moves within an episode


def test_vector_env_encodes_compact_like_single_envs():
    single = CoELEnv(scenario="tiny", observation_space="compact")
    vec = CoELVectorEnv(num_envs=2, scenario="tiny", observation_space="compact")
    obs, _ = vec.reset(seed=[5, 6])
    for i, seed in enumerate((5, 6)):
        one, _ = single.reset(seed=seed)
        for k in one:
            np.testing.assert_array_equal(obs[k][i], one[k])


def test_compact_follows_per_server_popularity_and_the_plan():
    env = CoELEnv(scenario="tiny", observation_space="compact", perception="ideal")
    env.reset(seed=0)
    core, c = env.unwrapped.core, env.cluster
    L, E = c.model.num_moe_layers, c.model.num_experts
    before = core.observe()
    plan = core.plans
    s, layer = 1, 2
    # server s's popularity at `layer` moves onto one expert held on its own GPU, then onto one held elsewhere
    gpu0 = (plan.tier[0, layer, :, 0] == 0) & (plan.dev[0, layer, :, 0] >= 0)
    srv = c.dev_server[np.maximum(plan.dev[0, layer, :, 0], 0)]
    own = int(np.flatnonzero(gpu0 & (srv == s) & (plan.dev[0, layer, :, 1] < 0))[0])
    other = int(np.flatnonzero(gpu0 & (srv != s) & (plan.dev[0, layer, :, 1] < 0))[0])
    row = s * L + layer
    for expert, local in ((own, 1.0), (other, 0.0)):
        core.states.popularity[0, s, layer] = 1e-6
        core.states.popularity[0, s, layer, expert] = c.model.top_k
        after = core.observe()
        assert after["pop_top"][0, row] > before["pop_top"][0, row]
        assert after["pop_top"][0, row] == pytest.approx(1.0, abs=1e-4)
        assert after["mass_local"][0, row] == pytest.approx(local, abs=1e-4)
        assert after["mass_remote"][0, row] == pytest.approx(1.0 - local, abs=1e-4)
        changed = np.flatnonzero(np.any([after[k][0] != before[k][0] for k in PAIR_KEYS], axis=0))
        assert set(changed) == {row}  # only (server s, layer) moved: the aggregate popularity is perception's
    assert E > 1


def test_compact_encodes_what_perceived_state_reveals():
    """Hello mode: the per-server popularity summarised is the one CoELEnv.perceived_state() (the heuristic's
    input) reveals that epoch."""
    env = CoELEnv(scenario="tiny", observation_space="compact", action_space="threshold")
    obs = rollout(env, 2, 3)[-1]
    pop = env.perceived_state().popularity  # [S, L, E]
    w = pop / pop.sum(-1, keepdims=True)
    top = np.sort(w, -1)[..., -1:].sum(-1)  # tiny: 8 experts, ceil(8 / 8) = 1 on top
    np.testing.assert_allclose(obs["pop_top"], top.ravel(), rtol=1e-5)


def test_obs_exclude_ignores_keys_of_other_spaces_only():
    env = make_flat_env({"scenario": "tiny", "observation_space": "compact"}, "coel", ("plan",))
    assert env.observation_space.shape == (compact_size(env.unwrapped.cluster),)
    space = CoELEnv(scenario="tiny", observation_space="compact").observation_space
    assert set(observed_keys(space, ("plan", "time"))) == set(OBSERVATION_KEYS["compact"]) - {"time"}
    with pytest.raises(ConfigError, match="obs_exclude: unknown key 'plann'"):
        observed_keys(space, ("plann",))


def test_unknown_observation_space_is_one_line():
    with pytest.raises(ConfigError, match="observation_space: unknown name 'tiny'; allowed: default, compact"):
        CoELEnv(scenario="tiny", observation_space="tiny")
