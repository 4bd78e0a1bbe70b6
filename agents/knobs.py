"""Learn to steer a heuristic: the agent sets a plan-producing baseline's knobs every decision epoch.

`KnobsWrapper` turns CoEL-v0 into an env whose action is a Box in [-1, 1] of the base policy's knobs (mapped onto
their ranges) plus an update gate; the base policy turns perceived state + knobs into a DeploymentPlan, stepped with
`step_plan`. A plain end-to-end action space (`full`, `edit`, `threshold`) needs no wrapper; this one gives the agent
the baseline's locality-aware decoding and leaves it the adaptive part (how local, how compressed, when to update).
Actions are validated like the env's Box spaces (coel_env/env/actions.py): wrong shape/dtype or NaN/inf is a one-line
ActionError (`action (knobs): ...`, nothing applied); finite values outside [-1, 1] are clipped and the step counts
as repaired (`"action_clipped"` in `info["repair_reasons"]`, the repair penalty).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from agents.baselines import make_policy
from agents.policy import Decision, Policy, needs_repair
from coel_env.env.actions import ActionCheck
from coel_env.errors import ConfigError

# knob -> (low, high) of the base policy's constructor argument; each range is centred on the base policy's
# default, so a zero action reproduces the baseline and learning starts from it (residual control).
KNOB_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "coel": {
        "locality": (0.0, 2.0),
        "balance": (0.0, 2.0),
        "prune_ratio": (0.0, 0.5),
        "drift_threshold": (0.0, 0.1),
        "fill": (0.95, 0.99),
        "compress_below_gbps": (0.0, 2.0),
    },
    "greedy_popularity": {"fill": (0.95, 0.99)},
}
KEEP_BELOW = -0.5  # gate: an action's last entry below this keeps a still-valid deployment


def knob_values(base: str, action: np.ndarray) -> dict[str, float]:
    """Map an action in [-1, 1]^K onto the knobs' ranges (in KNOB_RANGES order)."""
    ranges = KNOB_RANGES[base]
    x = (np.clip(np.nan_to_num(np.asarray(action, dtype=np.float64)), -1.0, 1.0) + 1.0) / 2.0
    return {k: lo + float(x[i]) * (hi - lo) for i, (k, (lo, hi)) in enumerate(ranges.items())}


class KnobbedPolicy(Policy):
    """A base policy whose knobs come from an action each epoch (also used by exported policies)."""

    def __init__(self, base: str, seed: int | None = None):
        if base not in KNOB_RANGES:
            raise ConfigError(f"knobs.base: '{base}' has no knobs; allowed: {', '.join(KNOB_RANGES)}")
        super().__init__(seed)
        self.base_name = base
        self.base = make_policy(base, seed=seed)
        self.name = f"knobs:{base}"

    @property
    def num_knobs(self) -> int:
        return len(KNOB_RANGES[self.base_name])

    def reset(self, cluster, seed=None, scenario=None) -> None:
        super().reset(cluster, seed, scenario)
        self.base.reset(cluster, seed=seed, scenario=scenario)

    def plan(self, view, cluster):
        return self.base.plan(view, cluster)

    def decide_with(self, action: np.ndarray, view, cluster, current) -> Decision:
        """Set the knobs from `action`; its last entry gates updates (< KEEP_BELOW keeps a still-valid deployment,
        otherwise the base policy's own update rule decides)."""
        for k, v in knob_values(self.base_name, action[: self.num_knobs]).items():
            setattr(self.base, k, v)
        self.epoch += 1
        self.base.epoch += 1
        update = self.base.should_update(view, cluster, current)  # the base's own rule (e.g. drift threshold)
        if current is not None and float(action[-1]) < KEEP_BELOW and not needs_repair(current, view, cluster):
            update = False
        return Decision(self.base.plan(view, cluster), True) if update else Decision(current, False)


class KnobsWrapper(gym.Wrapper):
    """CoEL-v0 with the knobs action space (observations unchanged)."""

    def __init__(self, env: gym.Env, base: str = "coel"):
        super().__init__(env)
        self.knobbed = KnobbedPolicy(base)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(self.knobbed.num_knobs + 1,), dtype=np.float32)
        self._check = ActionCheck("knobs", self.action_space)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        obs, info = self.env.reset(seed=seed, options=options)
        core = self.env.unwrapped
        self.knobbed.reset(core.cluster, seed=seed, scenario=core.scenario)
        return obs, info

    def step(self, action):
        a, clipped = self._check(action)  # before the base policy sees (and stores) any knob
        core = self.env.unwrapped
        decision = self.knobbed.decide_with(a[0], core.perceived_state(), core.cluster, core.plan)
        return core.step_plan(decision.plan, update=decision.update, action_clipped=bool(clipped[0]))
