"""CoEL-v0 API: registration, checkers without warnings for every space, config, errors, rendering."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import coel_env  # noqa: F401
from coel_env.env import CoELEnv, make_backend, register_backend
from coel_env.env.config import compose_env_config, make_env_from_config
from coel_env.errors import ConfigError
from coel_env.world.state import ClusterState


def test_make_with_defaults():
    env = gym.make("CoEL-v0", scenario="paper-testbed")
    obs, info = env.reset(seed=0)
    u = env.unwrapped
    assert u.scenario.name == "paper-testbed" and u.backend.name == "surrogate"
    assert isinstance(u.state, ClusterState) and u.plan.problems(u.cluster) == []
    assert obs["plan"].shape == (24 * 60 * 2 * 3,) and obs["popularity"].shape == (24 * 60,)
    assert info["hello_bits"] == 3 * 64 + 8 * (2 * 4 + 3 + 3)  # full Hellos: 3 headers + 14 fields
    obs, r, term, trunc, info = env.step(env.action_space.sample())
    assert np.isfinite(r) and not term and not trunc
    for key in (
        "metrics",
        "migration",
        "repaired",
        "repair_reasons",
        "penalty",
        "hello_bits",
        "dropped_requests",
        "restored_experts",
        "action_mask",
    ):
        assert key in info
    assert info["action_mask"].shape == (int(env.action_space.nvec.sum()),)


@pytest.mark.parametrize("scenario", ["tiny", "paper-testbed"])
@pytest.mark.parametrize("action_space", ["full", "edit", "threshold"])
@pytest.mark.parametrize("perception", ["hello", "ideal"])
def test_checkers_without_warnings(scenario, action_space, perception):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env = CoELEnv(scenario=scenario, action_space=action_space, perception=perception, max_epochs=20)
        gym_check_env(env, skip_render_check=True)
        sb3_check_env(
            CoELEnv(scenario=scenario, action_space=action_space, perception=perception, max_epochs=20), warn=True
        )


@pytest.mark.parametrize("reward", ["latency", "slo", "throughput_per_watt", "composite"])
def test_reward_spaces(reward):
    env = CoELEnv(scenario="tiny", reward_space=reward)
    env.reset(seed=3)
    keep = np.r_[env.action_codec.encode(env.plan)[:-1], 0]
    rewards = [env.step(keep)[1] for _ in range(3)]
    assert all(np.isfinite(rewards))
    if reward == "slo":
        assert all(0.0 <= r <= 1.0 for r in rewards)  # keeping a valid plan: no penalty
    if reward == "throughput_per_watt":
        assert all(r > 0 for r in rewards)


def test_bad_arguments_are_one_line_errors():
    for kw, field in [
        ({"action_space": "nope"}, "action_space"),
        ({"reward_space": "x"}, "reward_space"),
        ({"perception": "x"}, "perception"),
        ({"backend": "x"}, "backend"),
        ({"reward_space": "composite", "reward_weights": {"speed": 1}}, "reward_weights"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"scenario": "nowhere"}, "scenario"),
    ]:
        with pytest.raises(ConfigError) as exc:
            CoELEnv(**{"scenario": "tiny", **kw})
        assert str(exc.value).startswith(field) and "\n" not in str(exc.value)


def test_backend_factory_is_extensible():
    calls = []

    def factory(cluster, **kw):
        calls.append(kw)
        return make_backend("surrogate", cluster)

    register_backend("test-fake", factory)
    env = CoELEnv(scenario="tiny", backend="test-fake", backend_kwargs={"flag": 1})
    assert calls == [{"flag": 1}] and env.backend.name == "surrogate"


class _ProtocolOnly:
    """A Backend that is not a SurrogateBackend: the env must go through the protocol calls only."""

    name = "protocol-only"

    def __init__(self, cluster):
        self.inner = make_backend("surrogate", cluster)

    def reset(self, plan, state):
        self.inner.reset(plan, state)

    def apply(self, plan, state):
        return self.inner.apply(plan, state)

    def serve(self, plan, state, window_s):
        return self.inner.serve(plan, state, window_s)

    def close(self):
        self.inner.close()


def test_protocol_backend_matches_fast_path():
    """The generic Backend path (apply/serve) gives the same rewards as the stacked-array fast path."""
    fast = CoELEnv(scenario="tiny", action_space="edit")
    env = CoELEnv(scenario="tiny", action_space="edit")
    slow = CoELEnv(scenario=fast.scenario, backend=_ProtocolOnly(env.cluster), action_space="edit")
    fast.reset(seed=5)
    slow.reset(seed=5)
    fast.action_space.seed(1)
    for _ in range(8):
        a = fast.action_space.sample()
        _, r1, *_, i1 = fast.step(a)
        _, r2, *_, i2 = slow.step(a)
        assert r1 == pytest.approx(r2, rel=1e-9, abs=1e-12)
        assert i1["migration"]["bytes_total"] == i2["migration"]["bytes_total"]


def test_hydra_config_group():
    cfg = compose_env_config("edit", ["scenario=tiny", "max_epochs=7"])
    env = make_env_from_config(cfg)
    assert env.unwrapped.core.codec.name == "edit" and env.unwrapped.core.reward_space == "composite"
    assert env.unwrapped.core.max_epochs == 7
    env.reset(seed=0)
    assert np.isfinite(env.step(env.action_space.sample())[1])


def test_render_modes():
    env = CoELEnv(scenario="tiny", render_mode="ansi")
    env.reset(seed=0)
    env.step(env.action_space.sample())
    text = env.render()
    assert "s1/gpu0" in text and "epoch 1/" in text
    env.render_mode = "rgb_array"
    img = env.render()
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.std() > 0
