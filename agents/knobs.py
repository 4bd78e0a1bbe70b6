"""Learn to steer a heuristic: the agent sets a plan-producing baseline's knobs every decision epoch.

`KnobsWrapper` turns CoEL-v0 into an env whose action is a Box in [-1, 1] of the base policy's knobs (mapped onto
their ranges) plus an update gate; the base policy turns perceived state + knobs into a DeploymentPlan, stepped with
`step_plan`. A plain end-to-end action space (`full`, `edit`, `threshold`) needs no wrapper; this one gives the agent
the baseline's locality-aware decoding and leaves it the adaptive part (how local, how compressed, when to update).

Residual control: each knob moves within its centre +- a half-width (`HALF_WIDTHS`), clipped to the tuning search
space (agents.baselines.tuning.SPACES); 0 maps to the centre, -1 / +1 to the range's ends, so a zero action is the
centre policy exactly. The centre of `coel` is CoEL's defaults; of `coel_tuned` it is CoEL's knobs tuned on the
training scenario's *train* instances (`resolve_knobs`: agents.baselines.tuning.tune with the leaderboard's budget,
conf/tuning), which the leaderboard's `coel_tuned` also gets — knobs not steered (`ema`, `fuse`) stay at their
tuned values. The centre travels with the policy as plain JSON (env_spec.json / policy.json `env.knobs`:
`{"base": "coel_tuned", "centre": {...}, "tuning": {...}}`), checked against the search space when read back.
Actions are validated like the env's Box spaces (coel_env/env/actions.py): wrong shape/dtype or NaN/inf is a one-line
ActionError (`action (knobs): ...`, nothing applied); finite values outside [-1, 1] are clipped and the step counts
as repaired (`"action_clipped"` in `info["repair_reasons"]`, the repair penalty).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from agents.baselines import make_policy
from agents.baselines.tuning import TUNED, check_params, defaults, tune
from agents.baselines.tuning import bounds as tuning_bounds
from agents.policy import Decision, Policy, needs_repair
from coel_env.env.actions import ActionCheck
from coel_env.errors import ConfigError

# base policy -> knob -> half-width of the knob's range around its centre (the policy's defaults for `coel`, the tuned
# knobs for `coel_tuned`); ranges are clipped to the tuning search space (agents.baselines.tuning.SPACES), so a zero
# action reproduces the centre policy exactly and learning starts from it (residual control).
HALF_WIDTHS: dict[str, dict[str, float]] = {
    "coel": {
        "locality": 1.0,
        "balance": 1.0,
        "prune_ratio": 0.25,
        "drift_threshold": 0.05,
        "fill": 0.02,
        "compress_below_gbps": 1.0,
    },
    "greedy_popularity": {"fill": 0.02},
}
TUNED_BASES: dict[str, str] = {name: base for name, base in TUNED.items() if base in HALF_WIDTHS}  # coel_tuned
KNOB_BASES: tuple[str, ...] = (*HALF_WIDTHS, *TUNED_BASES)
KEEP_BELOW = -0.5  # gate: an action's last entry below this keeps a still-valid deployment

Knobs = str | Mapping[str, Any]  # a KNOB_BASES name, or {"base": "coel_tuned", "centre": {tuned knobs}, ...}


@dataclass(frozen=True)
class KnobSpec:
    """What a knobs agent steers: `name` (a KNOB_BASES entry) builds `policy` with `centre` (its constructor
    arguments at a zero action); each knob of `ranges` moves within (low, high) around its centre."""

    name: str
    policy: str
    centre: dict[str, Any]
    ranges: dict[str, tuple[float, float]]

    @property
    def num_knobs(self) -> int:
        return len(self.ranges)


def check_knobs_name(name: Any, what: str = "knobs") -> str:
    """`name` if it is a knobs base (KNOB_BASES); otherwise one ConfigError line naming the allowed ones."""
    if not isinstance(name, str) or name not in KNOB_BASES:
        raise ConfigError(f"{what}: {name!r} has no knobs; allowed: {', '.join(KNOB_BASES)}")
    return name


def knob_range(policy: str, knob: str, centre: float) -> tuple[float, float]:
    """`centre` +- the knob's half-width, clipped to the tuning search space's bounds (when it has them)."""
    half = HALF_WIDTHS[policy][knob]
    lo, hi = tuning_bounds(policy, knob) or (-np.inf, np.inf)
    return max(lo, centre - half), min(hi, centre + half)


def knob_spec(knobs: Knobs | KnobSpec) -> KnobSpec:
    """The KnobSpec of a knobs value (train.yaml `knobs`, env_spec.json's `knobs`): a base policy name (centre: its
    defaults) or a tuned base with its tuned centre, {"base": "coel_tuned", "centre": {...}} (checked against the
    tuning search space: read from a policy's JSON, never trusted)."""
    if isinstance(knobs, KnobSpec):
        return knobs
    mapping = isinstance(knobs, Mapping)
    name = check_knobs_name(knobs.get("base") if mapping else knobs, "knobs.base" if mapping else "knobs")
    policy = TUNED_BASES.get(name, name)
    if name in TUNED_BASES:
        if not mapping or "centre" not in knobs:
            raise ConfigError(
                f"knobs: '{name}' needs its tuned centre ({{base: {name}, centre: {{...}}}}; experiments.train "
                "tunes it on train instances)"
            )
        centre = check_params(
            policy, dict(knobs["centre"]) if isinstance(knobs["centre"], Mapping) else None, "knobs.centre"
        )
    else:
        centre = defaults(policy, HALF_WIDTHS[policy])
    ranges = {k: knob_range(policy, k, float(centre[k])) for k in HALF_WIDTHS[policy]}
    return KnobSpec(name, policy, centre, ranges)


def knob_values(spec: KnobSpec, action: np.ndarray) -> dict[str, float]:
    """Map an action in [-1, 1]^K onto the knobs' ranges (in `spec.ranges` order), piecewise linearly: 0 -> the
    centre, -1 -> low, +1 -> high (a range clipped on one side stays exact at 0)."""
    x = np.clip(np.nan_to_num(np.asarray(action, dtype=np.float64)), -1.0, 1.0)
    out = {}
    for i, (k, (lo, hi)) in enumerate(spec.ranges.items()):
        c, a = float(spec.centre[k]), float(x[i])
        out[k] = (1.0 - abs(a)) * c + abs(a) * (hi if a >= 0 else lo)  # exact at 0 and at +-1
    return out


class KnobbedPolicy(Policy):
    """A base policy whose knobs come from an action each epoch (also used by exported policies)."""

    def __init__(self, base: Knobs | KnobSpec, seed: int | None = None):
        super().__init__(seed)
        self.spec = knob_spec(base)
        self.base = make_policy(self.spec.policy, seed=seed, **self.spec.centre)
        self.name = f"knobs:{self.spec.name}"

    @property
    def num_knobs(self) -> int:
        return self.spec.num_knobs

    def reset(self, cluster, seed=None, scenario=None) -> None:
        super().reset(cluster, seed, scenario)
        self.base.reset(cluster, seed=seed, scenario=scenario)

    def plan(self, view, cluster):
        return self.base.plan(view, cluster)

    def decide_with(self, action: np.ndarray, view, cluster, current) -> Decision:
        """Set the knobs from `action`; its last entry gates updates (< KEEP_BELOW keeps a still-valid deployment,
        otherwise the base policy's own update rule decides)."""
        for k, v in knob_values(self.spec, action[: self.num_knobs]).items():
            setattr(self.base, k, v)
        self.epoch += 1
        self.base.epoch += 1
        update = self.base.should_update(view, cluster, current)  # the base's own rule (e.g. drift threshold)
        if current is not None and float(action[-1]) < KEEP_BELOW and not needs_repair(current, view, cluster):
            update = False
        return Decision(self.base.plan(view, cluster), True) if update else Decision(current, False)


class KnobsWrapper(gym.Wrapper):
    """CoEL-v0 with the knobs action space (observations unchanged)."""

    def __init__(self, env: gym.Env, base: Knobs | KnobSpec = "coel"):
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


def scenario_key(scenario: Any) -> str:
    """The key of a scenario in a tuned.json (experiments.evaluate's): its name."""
    return str(scenario.get("name", "custom")) if isinstance(scenario, Mapping) else str(scenario)


def resolve_knobs(
    knobs: str | None, env_kwargs: dict, tuning: Mapping[str, int], tuned: dict | None = None
) -> tuple[Knobs | None, dict]:
    """The knobs value the training envs get, and the tuned table {scenario: {base: tune() result}} to save.

    A tuned base (`coel_tuned`) gets its centre from agents.baselines.tuning.tune on the *train* instances of
    the training scenario with the leaderboard's budget (`tuning`: trials, instances, epochs, seed) and env
    (surrogate, the training perception; as experiments.evaluate tunes `coel_tuned`), or from `tuned` (a tuned.json
    of experiments.evaluate or of an earlier training run) when it holds that scenario's result."""
    table = {k: dict(v) for k, v in (tuned or {}).items()}
    if knobs is None or check_knobs_name(knobs) not in TUNED_BASES:
        return knobs, table
    policy, key = TUNED_BASES[knobs], scenario_key(env_kwargs["scenario"])
    result = table.get(key, {}).get(policy)
    if result is None:
        perception = {k: v for k, v in env_kwargs.items() if k == "perception"}
        names = {"trials": "trials", "instances": "num_instances", "epochs": "epochs", "seed": "seed"}
        budget = {names[k]: int(v) for k, v in tuning.items() if k in names}  # tune()'s defaults for the rest
        result = tune(env_kwargs["scenario"], policy, env_kwargs=perception, **budget)
        table.setdefault(key, {})[policy] = result
    if not isinstance(result, dict):
        raise ConfigError(f"tuned: the entry {key}.{policy} must be a tune() result (a JSON object with 'params')")
    provenance = {k: result.get(k) for k in ("value", "default_value", "trials", "instances", "epochs")}
    value = {"base": knobs, "centre": result.get("params"), "tuning": {"scenario": key, **provenance}}
    knob_spec(value)  # a cached centre outside the search space: one line now, not in every env
    return value, table
