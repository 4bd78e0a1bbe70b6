"""The flat CoEL-v0 an agent trains on and an exported policy runs in (gymnasium only: no SB3, no torch)."""

from __future__ import annotations

import gymnasium as gym
from gymnasium import spaces
from gymnasium.wrappers import FilterObservation, FlattenObservation

from coel_env.errors import ConfigError


def observed_keys(space: spaces.Dict, exclude: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The observation entries an agent sees (all but `exclude`), in the Dict space's order. A key of another
    observation space (coel_env.env.observations.OBSERVATION_KEYS, e.g. `plan`, which `compact` lacks) is ignored;
    any other unknown key is refused."""
    from coel_env.env.observations import OBSERVATION_KEYS

    known = {k for keys in OBSERVATION_KEYS.values() for k in keys}
    unknown = set(exclude) - set(space.spaces) - known
    if unknown:
        raise ConfigError(f"obs_exclude: unknown key '{sorted(unknown)[0]}'; allowed: {', '.join(space.spaces)}")
    return [k for k in space.spaces if k not in exclude]


def make_flat_env(
    env_kwargs: dict, knobs: str | dict | None = None, obs_exclude: list[str] | tuple[str, ...] = ()
) -> gym.Env:
    """CoEL-v0 (optionally with the `knobs` action space over a base policy: a name or a tuned base with its centre,
    agents.knobs.knob_spec; and without the observation entries in `obs_exclude`) with its Dict observation
    flattened into one Box (what SB3 MLP policies and exports take)."""
    import coel_env  # noqa: F401  (registers CoEL-v0)

    env = gym.make("CoEL-v0", **env_kwargs)
    if knobs:
        from agents.knobs import KnobsWrapper

        env = KnobsWrapper(env, base=knobs)
    keys = observed_keys(env.observation_space, obs_exclude)
    if len(keys) < len(env.observation_space.spaces):
        env = FilterObservation(env, keys)
    return FlattenObservation(env)


def make_env_from_spec(env_spec: dict) -> gym.Env:
    """The flat env an exported policy was trained on (its `env` entry in policy.json / env_spec.json)."""
    space = gym.make("CoEL-v0", **env_spec["kwargs"]).observation_space
    keys = env_spec.get("obs_keys") or list(space.spaces)
    return make_flat_env(env_spec["kwargs"], env_spec.get("knobs"), [k for k in space.spaces if k not in keys])


__all__ = ["make_env_from_spec", "make_flat_env", "observed_keys"]
