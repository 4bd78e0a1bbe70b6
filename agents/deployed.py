"""An exported deployment policy (ONNX + JSON) as a Policy that runs inside CoEL-v0 — no SB3."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gymnasium import spaces

from agents.deployment_policy import DeploymentPolicy
from agents.policy import ActionPolicy, Decision
from coel_env.errors import ConfigError


class DeployedAgent(ActionPolicy):
    """Flattens the env's Dict observation, runs the ONNX actor and returns an action (masks applied) — or, for
    agents trained on the knobs space, the base heuristic's Decision under the predicted knobs."""

    def __init__(self, directory: str | Path):
        self.deployment = DeploymentPolicy(directory)
        d = Path(directory).resolve()
        label = d.parent.name if d.name == "policy" else d.name  # a run's policy/ is named after its run
        super().__init__(self.deployment.act, name=f"agent:{label}")
        self._space: spaces.Dict | None = None
        base = self.deployment.env_spec.get("knobs")
        self.knobbed = None
        if base:
            from agents.knobs import KnobbedPolicy

            self.knobbed = KnobbedPolicy(base)

    @property
    def env_kwargs(self) -> dict:
        """The CoEL-v0 keyword arguments the policy was trained with."""
        return dict(self.deployment.env_spec.get("kwargs", {}))

    def reset(self, cluster, seed=None, scenario=None) -> None:
        super().reset(cluster, seed, scenario)
        self._space = None
        if self.knobbed is not None:
            self.knobbed.reset(cluster, seed=seed, scenario=scenario)

    def act(self, obs: Any, env: Any) -> Any:
        core = env.unwrapped
        if isinstance(obs, dict):
            if self._space is None:
                keys = self.deployment.env_spec.get("obs_keys") or list(core.observation_space.spaces)
                self._space = spaces.Dict({k: core.observation_space[k] for k in keys})
            flat = spaces.flatten(self._space, {k: obs[k] for k in self._space.spaces})
        else:
            flat = np.asarray(obs)
        if flat.size != self.deployment.obs_dim:
            trained = self.deployment.env_spec.get("kwargs", {}).get("scenario")
            trained = trained.get("name") if isinstance(trained, dict) else trained
            raise ConfigError(
                f"policy {self.name}: trained on scenario '{trained}' (observation size "
                f"{self.deployment.obs_dim}); scenario '{core.scenario.name}' gives {flat.size}"
            )
        if self.knobbed is not None:
            return self.knobbed.decide_with(self.deployment.act(flat), core.perceived_state(), core.cluster, core.plan)
        mask = core.action_masks() if self.deployment.action_type == "MultiDiscrete" else None
        return self.deployment.act(flat, mask)


__all__ = ["Decision", "DeployedAgent"]
