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
    agents trained on the knobs space, the base heuristic's Decision under the predicted knobs (around the centre
    saved with the policy, e.g. tuned CoEL's knobs: nothing is re-tuned)."""

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

    def _observed(self, core) -> spaces.Dict:
        """The part of the env's observation space the policy reads (its training run's obs_keys)."""
        keys = self.deployment.env_spec.get("obs_keys") or list(core.observation_space.spaces)
        missing = [k for k in keys if k not in core.observation_space.spaces]
        if missing:
            raise ConfigError(f"policy {self.name}: {self._lacks(missing[0])}")
        return spaces.Dict({k: core.observation_space[k] for k in keys})

    def _lacks(self, key: str) -> str:
        return f"{self._trained_on()}; the env's observation lacks '{key}'"

    def _trained_on(self) -> str:
        trained = self.deployment.env_spec.get("kwargs", {}).get("scenario")
        trained = trained.get("name") if isinstance(trained, dict) else trained
        return f"trained on scenario '{trained}' (observation size {self.deployment.obs_dim})"

    def incompatibility(self, env: Any) -> str | None:
        """Why this policy cannot act in `env` (a CoEL-v0 env or a wrapper of one) — its observation size, or for an
        end-to-end action its action space, differs from the one it was trained on — or None when it fits. Checked
        on the spaces, before any episode runs (experiments.evaluate skips such a (policy, scenario))."""
        core = env.unwrapped
        keys = self.deployment.env_spec.get("obs_keys") or list(core.observation_space.spaces)
        missing = [k for k in keys if k not in core.observation_space.spaces]
        if missing:
            return self._lacks(missing[0])
        space = self._observed(core)
        size = spaces.flatdim(space)
        if size != self.deployment.obs_dim:
            return f"{self._trained_on()}; scenario '{core.scenario.name}' gives {size}"
        if self.knobbed is not None:  # the knobs do not depend on the scenario
            return None
        act, d = core.action_space, self.deployment
        if d.action_type == "MultiDiscrete":
            fits = isinstance(act, spaces.MultiDiscrete) and np.array_equal(np.ravel(act.nvec), d.nvec)
        elif d.action_type == "Discrete":
            fits = isinstance(act, spaces.Discrete) and int(act.n) == d.act_dim
        else:
            fits = isinstance(act, spaces.Box) and int(np.prod(act.shape)) == d.act_dim
        if not fits:
            trained = d.nvec.shape if d.action_type == "MultiDiscrete" else (d.act_dim,)
            return (
                f"{self._trained_on()} with a {d.action_type} action of shape {trained}; scenario "
                f"'{core.scenario.name}' has a {type(act).__name__} action of shape {act.shape}"
                + (" (other choices per entry)" if act.shape == trained else "")
            )
        return None

    def act(self, obs: Any, env: Any) -> Any:
        core = env.unwrapped
        if isinstance(obs, dict):
            if self._space is None:
                self._space = self._observed(core)
            flat = spaces.flatten(self._space, {k: obs[k] for k in self._space.spaces})
        else:
            flat = np.asarray(obs)
        if flat.size != self.deployment.obs_dim:
            raise ConfigError(
                f"policy {self.name}: {self._trained_on()}; scenario '{core.scenario.name}' gives {flat.size}"
            )
        if self.knobbed is not None:
            return self.knobbed.decide_with(self.deployment.act(flat), core.perceived_state(), core.cluster, core.plan)
        mask = core.action_masks() if self.deployment.action_type == "MultiDiscrete" else None
        return self.deployment.act(flat, mask)


__all__ = ["Decision", "DeployedAgent"]
