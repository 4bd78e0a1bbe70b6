"""CoEL-v0: the Gymnasium environment (a thin single-env face over the batched CoELCore)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from coel_env.backend.contract import Backend
from coel_env.backend.registry import make_backend
from coel_env.env.core import CoELCore
from coel_env.errors import ConfigError, PlanError
from coel_env.plan.batch import PlanBatch
from coel_env.plan.deployment import DeploymentPlan
from coel_env.specs import ScenarioSpec
from coel_env.world.state import ClusterState, Scenario


def build_scenario(scenario: str | Path | dict | ScenarioSpec | Scenario, scenario_seed: int = 0) -> Scenario:
    if isinstance(scenario, Scenario):
        return scenario
    return Scenario(scenario, seed=scenario_seed)


class CoELEnv(gym.Env):
    """Deploy a MoE LLM's experts over an edge cluster, one decision epoch per step.

    Keyword arguments: `scenario` (registry name, YAML path, dict or Scenario), `backend` ("surrogate", a
    registered name, or a Backend), `action_space` ("full", "edit", "threshold"), `observation_space`
    ("default", "compact": coel_env/env/observations.py), `perception` ("hello" or "ideal"), `reward_space`
    ("latency", "slo", "throughput_per_watt", "composite" with `reward_weights`), `max_epochs`, `scenario_seed`
    (the routing model; dynamics are seeded by `reset(seed=...)`), `num_edits`, penalties, `hello` (perception
    settings), `initial_plan`, `render_mode` ("ansi", "rgb_array"), `info_action_mask`.
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}  # noqa: RUF012

    def __init__(
        self,
        scenario: Any = "paper-testbed",
        backend: str | Backend = "surrogate",
        action_space: str = "full",
        observation_space: str = "default",
        reward_space: str = "latency",
        max_epochs: int = 200,
        perception: str = "hello",
        scenario_seed: int = 0,
        render_mode: str | None = None,
        info_action_mask: bool = True,
        backend_kwargs: dict | None = None,
        **kwargs,
    ):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ConfigError(f"render_mode: unknown '{render_mode}'; allowed: ansi, rgb_array")
        self.scenario = build_scenario(scenario, scenario_seed)
        self.cluster = self.scenario.cluster
        self.backend = make_backend(backend, self.cluster, self.scenario.routing, **(backend_kwargs or {}))
        self.core = CoELCore(
            self.scenario,
            self.backend,
            1,
            action_space=action_space,
            observation_space=observation_space,
            reward_space=reward_space,
            perception=perception,
            max_epochs=max_epochs,
            **kwargs,
        )
        self.action_codec = self.core.codec
        self.action_space = self.core.codec.space
        self.observation_space = self.core.obs_encoder.space
        self.render_mode = render_mode
        self.info_action_mask = info_action_mask
        self._has_reset = False

    # ---- Gymnasium API ------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is None and not self._has_reset:
            seed = int(self.np_random.integers(2**63))
        info = self.core.reset_env(0, seed)
        self._has_reset = True
        return self._obs(), self._with_mask(info)

    def step(self, action):
        """One decision epoch. The action is validated first (ActionError, nothing applied; rules in
        coel_env/env/actions.py)."""
        r, term, trunc, _ = self.core.step(actions=action, single=True)
        return self._obs(), float(r[0]), bool(term[0]), bool(trunc[0]), self._with_mask(self.core.env_info(0))

    def step_plan(self, plan: DeploymentPlan, update: bool = True, *, action_clipped: bool = False):
        """Step with a DeploymentPlan instead of an action (repaired and validated like any action; PlanError if
        its arrays are not shaped for this cluster). `action_clipped` marks a plan made from a wrapper's clipped
        action (e.g. agents/knobs.py): the step counts as repaired with reason `action_clipped`."""
        if not isinstance(plan, DeploymentPlan):
            raise PlanError(f"plan: a DeploymentPlan is required, {type(plan).__name__} given")
        try:
            pb = PlanBatch.from_plans([plan])
        except (TypeError, ValueError, AttributeError):
            raise PlanError("plan: its arrays are not numeric arrays") from None
        r, term, trunc, _ = self.core.step(
            proposed=pb, update=np.array([bool(update)]), clipped=np.array([bool(action_clipped)])
        )
        return self._obs(), float(r[0]), bool(term[0]), bool(trunc[0]), self._with_mask(self.core.env_info(0))

    def action_masks(self) -> np.ndarray | None:
        """Flat bool mask over the MultiDiscrete choices (sb3-contrib MaskablePPO); None for Box spaces."""
        codec = self.core.codec
        up = self.core.states.server_up
        if hasattr(codec, "mask_for"):
            return codec.mask_for(up[0])
        m = codec.masks(up, self.core.plans)
        return None if m is None else m[0]

    def render(self):
        from coel_env.env.render import render_ansi, render_rgb

        if self.render_mode == "ansi":
            return render_ansi(self)
        if self.render_mode == "rgb_array":
            return render_rgb(self)
        return None

    def close(self):
        self.backend.close()

    # ---- views --------------------------------------------------------------------------------------
    @property
    def state(self) -> ClusterState:
        """Ground truth (a live view; copy it before keeping it)."""
        return self.core.states.views[0]

    @property
    def plan(self) -> DeploymentPlan:
        """The deployed plan (a copy)."""
        return self.core.plans.plan(0)

    def perceived_state(self) -> ClusterState:
        """A ClusterState holding only what perception reveals: Hello values (quantized, stale), measured
        request rates, per-server popularity from routing logs; domain mixtures are unknown (uniform)."""
        core, perc = self.core, self.core.perception
        st = self.state.copy()
        st.compute_avail = perc.compute_avail[0].copy()
        st.memory_avail = perc.memory_avail[0].copy()
        st.link_factor = perc.link_factor[0].copy()
        st.arrival_rate = perc.arrival_rate[0].copy()
        st.popularity = perc.perceived_server_popularity(core.states, 0)
        M = st.domain_mix.shape[-1]
        st.domain_mix = np.full_like(st.domain_mix, 1.0 / M)
        st.domain_target = st.domain_mix.copy()
        return st

    # ---- helpers ------------------------------------------------------------------------------------
    def _obs(self) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.core.observe().items()}

    def _with_mask(self, info: dict) -> dict:
        if self.info_action_mask:
            m = self.action_masks()
            if m is not None:
                info["action_mask"] = m.copy()
        return info
