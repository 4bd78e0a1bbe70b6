"""Seeding and vector envs: identical trajectories across single envs, gymnasium/SB3 wrappers and CoELVectorEnv."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import SyncVectorEnv
from stable_baselines3.common.vec_env import DummyVecEnv

import coel_env  # noqa: F401
from coel_env.env import CoELEnv
from coel_env.env.vector import CoELVectorEnv


def rollout(env, seed, actions):
    obs, _ = env.reset(seed=seed)
    out = [obs]
    for a in actions:
        obs, r, term, trunc, info = env.step(a)
        out.append((obs, r, term, trunc, {k: v for k, v in info.items() if k != "action_mask"}))
    return out


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


@pytest.mark.parametrize("action_space", ["full", "edit", "threshold"])
def test_same_seed_same_trajectory(action_space):
    env = CoELEnv(scenario="tiny", action_space=action_space)
    env.action_space.seed(0)
    actions = [env.action_space.sample() for _ in range(6)]
    a = rollout(env, 7, actions)
    b = rollout(CoELEnv(scenario="tiny", action_space=action_space), 7, actions)
    assert same(a, b)
    c = rollout(env, 8, actions)
    assert not same(a, c)


@pytest.mark.parametrize("action_space", ["full", "edit"])
def test_native_vector_env_matches_single_envs(action_space):
    N, seed = 3, 11
    venv = CoELVectorEnv(N, scenario="tiny", action_space=action_space, max_epochs=4, info_action_mask=True)
    sync = SyncVectorEnv([lambda: CoELEnv(scenario="tiny", action_space=action_space, max_epochs=4) for _ in range(N)])
    vo, _ = venv.reset(seed=seed)
    so, _ = sync.reset(seed=seed)
    assert same(vo, so)
    venv.action_space.seed(3)
    for _ in range(10):  # crosses two autoresets (NEXT_STEP mode)
        acts = venv.action_space.sample()
        vo, vr, vt, vtr, vi = venv.step(acts)
        so, sr, st, strn, si = sync.step(acts)
        assert same(vo, so) and np.array_equal(vr, sr) and np.array_equal(vt, st) and np.array_equal(vtr, strn)
        for key in ("metrics", "migration"):
            if key not in si:  # every env was resetting
                assert not vi["_" + key].any()
                continue
            for k in si[key]:
                if not k.startswith("_"):
                    assert np.array_equal(vi[key][k][si["_" + key]], si[key][k][si["_" + key]]), (key, k)
        for key in ("hello_bits", "penalty", "restored_experts", "repaired", "action_mask"):
            if key not in si:
                continue
            m = si["_" + key]
            assert np.array_equal(vi[key][m], si[key][m]), key
        assert venv.action_masks().shape == (N, int(venv.single_action_space.nvec.sum()))


def test_sb3_dummy_vec_env_and_gym_async():
    venv = DummyVecEnv([lambda: CoELEnv(scenario="tiny", max_epochs=3) for _ in range(2)])
    venv.seed(0)
    obs = venv.reset()
    assert obs["plan"].shape == (2, 4 * 8 * 2 * 3)
    for _ in range(4):
        obs, r, done, _infos = venv.step(np.stack([venv.action_space.sample() for _ in range(2)]))
    assert np.isfinite(r).all() and done.all() is not None
    env = gym.make_vec("CoEL-v0", num_envs=2, vectorization_mode="sync", scenario="tiny")
    obs, _ = env.reset(seed=0)
    obs, r, *_ = env.step(env.action_space.sample())
    assert np.isfinite(r).all()
