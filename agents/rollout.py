"""Run episodes of CoEL-v0 with any acting function and summarise them (shared by training and evaluation)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

from agents.policy import ActionPolicy, Policy

EPISODE_FIELDS = ("return", "e2e_p95_s", "tokens_per_s", "quality_loss", "energy_j", "migration_bytes",
                  "slo_attainment", "dropped_frac", "epochs")

ActFn = Callable[[Any, gym.Env], Any]


def run_episode(env: gym.Env, actor: Policy | ActFn, seed: int, max_steps: int | None = None) -> dict:
    """One episode from reset(seed). `actor` is a plan-producing Policy (stepped with `step_plan`, whatever the
    env's action space) or a function `act(obs, env) -> action`. Returns EPISODE_FIELDS."""
    obs, info = env.reset(seed=seed)
    core = env.unwrapped
    planner = isinstance(actor, Policy) and not isinstance(actor, ActionPolicy)
    if planner:
        actor.reset(core.cluster, seed=seed, scenario=core.scenario)
    total, steps = 0.0, 0
    acc = {k: [] for k in ("e2e_p95_s", "tokens_per_s", "quality_loss", "energy_j", "late_frac", "dropped_frac")}
    migration = 0.0
    done = False
    while not done:
        if planner:
            decision = actor.decide(core.perceived_state(), core.cluster, core.plan)
            obs, reward, terminated, truncated, info = core.step_plan(decision.plan, update=decision.update)
        else:
            obs, reward, terminated, truncated, info = env.step(actor(obs, env))
        total += float(reward)
        steps += 1
        metrics = info.get("metrics", {})
        for k in acc:
            if k in metrics:
                acc[k].append(float(metrics[k]))
        migration += float(info.get("migration", {}).get("bytes_total", 0.0))
        done = terminated or truncated or (max_steps is not None and steps >= max_steps)

    def mean(key: str) -> float:
        return float(np.mean(acc[key])) if acc[key] else float("nan")

    return {"return": total, "e2e_p95_s": mean("e2e_p95_s"), "tokens_per_s": mean("tokens_per_s"),
            "quality_loss": mean("quality_loss"), "energy_j": mean("energy_j"), "migration_bytes": migration,
            "slo_attainment": 1.0 - mean("late_frac"), "dropped_frac": mean("dropped_frac"), "epochs": steps}


def summarize(episodes: list[dict]) -> dict:
    """Mean and 95% confidence half-width (Student t) of each field over episodes."""
    from scipy import stats

    out = {"episodes": len(episodes)}
    for key in EPISODE_FIELDS:
        vals = np.array([e[key] for e in episodes], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        out[key] = float(vals.mean()) if len(vals) else float("nan")
        if len(vals) > 1:
            out[f"{key}_ci95"] = float(stats.t.ppf(0.975, len(vals) - 1) * vals.std(ddof=1) / np.sqrt(len(vals)))
        else:
            out[f"{key}_ci95"] = 0.0
    return out
