"""Knob tuning of the heuristics on train instances (optuna TPE), so that the leaderboard's bar is a tuned heuristic.

`tune(scenario, base, ...)` searches the base policy's constructor knobs (`SPACES`) to maximise the official raw
score (coel_env.benchmark.score: mean per-epoch utility, 0 over the quality budget) averaged over `instances` train
instances of `epochs` decision epochs each. The base's defaults are the first trial, so the tuned knobs are never
worse than the defaults on the train instances. Budgets are small by default (CI has 2 cores): a config value
(`tuning.trials`, `tuning.instances`, `tuning.epochs`: conf/tuning/default.yaml, shared by experiments.evaluate and
experiments.train). Test instances are never used.

`tuned_policy(base, params, seed)` builds the tuned policy, named `<base>_tuned`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from coel_env.benchmark.instances import instances
from coel_env.errors import ConfigError

log = logging.getLogger(__name__)

# knob -> (kind, low, high[, log]) of the base policy's constructor argument
SPACES: dict[str, dict[str, tuple]] = {
    "coel": {
        "drift_threshold": ("float", 0.005, 0.5, True),
        "ema": ("float", 0.1, 1.0),
        "locality": ("float", 0.0, 4.0),
        "balance": ("float", 0.0, 4.0),
        "compress_below_gbps": ("float", 0.0, 10.0),
        "prune_ratio": ("float", 0.0, 0.9),
        "fuse": ("bool",),
        "fill": ("float", 0.5, 1.0),
    },
    "eplb": {"period": ("int", 1, 30), "redundancy": ("float", 0.0, 2.0)},
}
TUNED = {f"{b}_tuned": b for b in SPACES}  # leaderboard name -> base policy


def defaults(base: str, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """The base policy's default values (its constructor's) of `keys` (its tuned knobs by default: the first
    trial)."""
    import inspect

    from agents.baselines import POLICIES

    sig = inspect.signature(POLICIES[base].__init__)
    return {k: sig.parameters[k].default for k in (SPACES[base] if keys is None else keys)}


def bounds(base: str, knob: str) -> tuple[float, float] | None:
    """The search space's (low, high) of a numeric knob; None for a bool knob or one not tuned."""
    spec = SPACES.get(base, {}).get(knob)
    return None if spec is None or spec[0] == "bool" else (float(spec[1]), float(spec[2]))


def check_params(base: str, params: Any, what: str = "params") -> dict[str, Any]:
    """`params` if it holds a value inside the search space for every knob of `base` (tuned knobs read back from
    JSON); otherwise one ConfigError line naming `what`."""
    if not isinstance(params, dict) or set(params) != set(SPACES[base]):
        raise ConfigError(f"{what}: must map exactly the knobs {', '.join(SPACES[base])} of '{base}' to values")
    for k, spec in SPACES[base].items():
        v = params[k]
        if spec[0] == "bool":
            ok = isinstance(v, bool)
        else:
            numeric = isinstance(v, int) if spec[0] == "int" else isinstance(v, (int, float))
            ok = numeric and not isinstance(v, bool) and spec[1] <= v <= spec[2]
        if not ok:
            want = (
                "true or false"
                if spec[0] == "bool"
                else f"a{'n int' if spec[0] == 'int' else ' number'} in [{spec[1]}, {spec[2]}]"
            )
            raise ConfigError(f"{what}.{k}: {v!r} must be {want}")
    return dict(params)


def _suggest(trial, base: str) -> dict[str, Any]:
    out = {}
    for k, spec in SPACES[base].items():
        if spec[0] == "bool":
            out[k] = trial.suggest_categorical(k, [True, False])
        elif spec[0] == "int":
            out[k] = trial.suggest_int(k, spec[1], spec[2])
        else:
            out[k] = trial.suggest_float(k, spec[1], spec[2], log=len(spec) > 3 and spec[3])
    return out


def tuned_policy(base: str, params: dict, seed: int | None = None):
    from agents.baselines import make_policy

    p = make_policy(base, seed=seed, **params)
    p.name = f"{base}_tuned"
    return p


def tune(
    scenario: Any,
    base: str,
    trials: int = 12,
    num_instances: int = 3,
    epochs: int = 10,
    seed: int = 0,
    env_kwargs: dict | None = None,
) -> dict:
    """Tune `base`'s knobs on train instances; returns {params, value, default_value, trials, instances, ...}."""
    import gymnasium as gym
    import optuna

    import coel_env  # noqa: F401
    from agents.baselines import make_policy
    from agents.rollout import run_episode

    if base not in SPACES:
        raise ConfigError(f"tuning: no knobs to tune for '{base}'; allowed: {', '.join(SPACES)}")
    if trials < 1 or num_instances < 1 or epochs < 1:
        raise ConfigError("tuning: trials, instances and epochs must be >= 1")
    insts = instances("train", num_instances)
    kw = {k: v for k, v in (env_kwargs or {}).items() if k not in ("scenario_seed", "max_epochs")}
    envs = {
        i.routing_seed: gym.make("CoEL-v0", scenario=scenario, scenario_seed=i.routing_seed, max_epochs=epochs, **kw)
        for i in insts
    }
    t0 = time.perf_counter()

    def value(params: dict) -> float:
        scores = []
        for inst in insts:
            policy = make_policy(base, seed=inst.seed, **params)
            scores.append(run_episode(envs[inst.routing_seed], policy, inst.seed)["score_raw"])
        return float(np.mean(scores))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    start = defaults(base)
    study.enqueue_trial(start)
    study.optimize(lambda t: value(_suggest(t, base)), n_trials=trials)
    for env in envs.values():
        env.close()
    best = dict(study.best_params)
    default_value = float(study.trials[0].value)
    log.info("tuned %s: %.4f (defaults %.4f) in %d trials", base, study.best_value, default_value, trials)
    return {
        "base": base,
        "params": best,
        "value": float(study.best_value),
        "default_value": default_value,
        "trials": trials,
        "instances": [i.label for i in insts],
        "epochs": epochs,
        "seconds": time.perf_counter() - t0,
    }
