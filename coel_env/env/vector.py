"""CoELVectorEnv: a natively batched `gymnasium.vector.VectorEnv` stepping N surrogate envs in one numpy call.

Env i seeded with `seed + i` behaves exactly like `CoELEnv` reset with that seed (same observations, rewards,
infos); autoreset follows gymnasium's default NEXT_STEP mode. Infos are dicts of arrays with `_key` masks, derived from
the core's StepRecord by the same function as CoELEnv's info (record.py).
`step` validates the whole batch [N, *single_action_space.shape] before anything changes (rows of envs about to
autoreset included): a bad row raises a one-line ActionError naming the env index (rules in actions.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from coel_env.backend.registry import make_backend
from coel_env.env.core import CoELCore
from coel_env.env.env import build_scenario
from coel_env.env.record import StepRecord, vector_info
from coel_env.errors import ConfigError


class CoELVectorEnv(VectorEnv):
    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP}  # noqa: RUF012

    def __init__(
        self,
        num_envs: int = 8,
        scenario: Any = "paper-testbed",
        backend: Any = "surrogate",
        scenario_seed: int = 0,
        info_action_mask: bool = False,
        backend_kwargs: dict | None = None,
        **kwargs,
    ):
        if num_envs < 1:
            raise ConfigError(f"num_envs: {num_envs}; allowed: an integer >= 1")
        kwargs.pop("render_mode", None)
        self.scenario = build_scenario(scenario, scenario_seed)
        self.cluster = self.scenario.cluster
        self.backend = make_backend(backend, self.cluster, self.scenario.routing, **(backend_kwargs or {}))
        self.core = CoELCore(self.scenario, self.backend, num_envs, **kwargs)
        self.num_envs = num_envs
        self.single_action_space = self.core.codec.space
        self.single_observation_space = self.core.obs_encoder.space
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.info_action_mask = info_action_mask
        self._autoreset = np.zeros(num_envs, dtype=bool)
        self._has_reset = False

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict | None = None):
        N = self.num_envs
        if seed is None and not self._has_reset:
            seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> 1)
        seeds = (
            [None] * N
            if seed is None
            else (list(seed) if isinstance(seed, (list, tuple)) else [seed + i for i in range(N)])
        )
        bits = np.array([self.core.reset_env(i, s)["hello_bits"] for i, s in enumerate(seeds)])
        self._autoreset[:] = False
        self._has_reset = True
        info = {
            "hello_bits": bits,
            "_hello_bits": np.ones(N, dtype=bool),
            "epoch": np.zeros(N, dtype=np.int64),
            "_epoch": np.ones(N, dtype=bool),
        }
        if self.info_action_mask:
            info["action_mask"] = self.action_masks()
            info["_action_mask"] = np.ones(N, dtype=bool)
        return self.core.observe(), info

    def step(self, actions):
        core, N = self.core, self.num_envs
        resetting = self._autoreset.copy()
        reward, term, trunc, rec = core.step(actions=actions, active=~resetting)  # validated first (ActionError)
        reset_bits = np.zeros(N, dtype=np.int64)
        for i in np.flatnonzero(resetting):
            reset_bits[i] = core.reset_env(i)["hello_bits"]
        reward = np.where(resetting, 0.0, reward)
        term = term & ~resetting
        trunc = trunc & ~resetting
        self._autoreset = term | trunc
        return core.observe(), reward, term, trunc, self._infos(rec, resetting, reset_bits)

    def _infos(self, rec: StepRecord, resetting: np.ndarray, reset_bits: np.ndarray) -> dict:
        """record.vector_info; rows of envs reset this step show their fresh episode's Hello bits, servers, epoch."""
        st = self.core.states
        fresh = {"hello_bits": reset_bits, "servers_up": st.server_up.sum(1), "epoch": st.epoch.copy()}
        infos = vector_info(rec, resetting, fresh)
        if self.info_action_mask:
            infos["action_mask"] = self.action_masks()
            infos["_action_mask"] = np.ones(self.num_envs, dtype=bool)
        return infos

    def action_masks(self) -> np.ndarray | None:
        """[N, sum(nvec)] masks (sb3-contrib convention per env); None for Box action spaces."""
        return self.core.codec.masks(self.core.states.server_up, self.core.plans)

    def close_extras(self, **kwargs):
        self.backend.close()
