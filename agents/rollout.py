"""Run episodes of CoEL-v0 with any Policy and summarise them (shared by the leaderboard and training)."""

from __future__ import annotations

import time

import gymnasium as gym
import numpy as np

from agents.policy import ActionPolicy, Decision, Policy

EPISODE_METRICS = (
    "return",
    "e2e_p95_s",
    "tokens_per_s",
    "quality_loss",
    "energy_j",
    "migration_bytes",
    "slo_attainment",
    "decide_ms",
    "score_raw",
    "infeasible",
)
_PER_EPOCH = ("e2e_p95_s", "tokens_per_s", "quality_loss", "energy_j", "late_frac")


def run_episode(
    env: gym.Env, policy: Policy, seed: int, max_steps: int | None = None, predictor=None
) -> dict[str, float]:
    """One episode of `policy` in CoEL-v0 from reset(seed).

    Plan policies step with `step_plan` (their own plan, no encoding loss; the first decision always deploys);
    action policies with `step`, unless their `act` returns a Decision (e.g. an agent steering a heuristic).
    With a `predictor` backend (the surrogate, while the env runs the real backend), every served window is also
    predicted for the same plan and state: `pred_<metric>` fields sit next to the measured ones (`pred_score_raw`:
    the official score's utility of the predicted windows).
    `score_raw` is the mean per-epoch utility of the official score (coel_env.benchmark.score; not normalized) and
    `infeasible` the fraction of epochs over its quality budget."""
    from coel_env.benchmark.score import epoch_feasible, epoch_utility

    core = env.unwrapped
    slo_s = float(core.scenario.spec.workload.slo_s)
    obs, _ = env.reset(seed=seed)
    policy.reset(core.cluster, seed=seed, scenario=core.scenario)
    rec: dict[str, list[float]] = {k: [] for k in (*_PER_EPOCH, "decide_ms", "score_raw", "infeasible")}
    if predictor is not None:
        rec.update({f"pred_{k}": [] for k in (*_PER_EPOCH, "score_raw")})
    total, migration, repairs, steps, done = 0.0, 0.0, 0, 0, False
    while not done:
        t0 = time.perf_counter()
        if isinstance(policy, ActionPolicy):
            out = policy.act(obs, env)
        else:
            current = core.plan if steps else None
            out = policy.decide(core.perceived_state(), core.cluster, current)
        rec["decide_ms"].append(1e3 * (time.perf_counter() - t0))
        if isinstance(out, Decision):
            obs, reward, term, trunc, info = core.step_plan(out.plan, update=out.update)
        else:
            obs, reward, term, trunc, info = env.step(out)
        total += float(reward)
        steps += 1
        for k in _PER_EPOCH:
            rec[k].append(float(info["metrics"][k]))
        rec["score_raw"].append(float(epoch_utility(info["metrics"], slo_s)))
        rec["infeasible"].append(float(not epoch_feasible(info["metrics"])))
        if predictor is not None:
            pred = predictor.serve(core.plan, core.state, float(core.scenario.spec.dynamics.epoch_s))
            for k in _PER_EPOCH:
                rec[f"pred_{k}"].append(float(getattr(pred, k)))
            fields = {k: getattr(pred, k) for k in ("late_frac", "dropped_frac", "e2e_p95_s", "quality_loss")}
            rec["pred_score_raw"].append(float(epoch_utility(fields, slo_s)))
        migration += float(info["migration"]["bytes_total"])
        repairs += int(info.get("repaired", False))
        done = term or trunc or (max_steps is not None and steps >= max_steps)
    out_row = {k: float(np.mean(v)) for k, v in rec.items()}
    out_row.update(
        {
            "return": total,
            "migration_bytes": migration,
            "slo_attainment": 1.0 - out_row.pop("late_frac"),
            "repairs": repairs,
            "epochs": steps,
        }
    )
    if predictor is not None:
        out_row["pred_slo_attainment"] = 1.0 - out_row.pop("pred_late_frac")
    return out_row


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and 95% confidence half-width (Student t) of finite values."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return float("nan"), float("nan")
    if len(v) < 2:
        return float(v.mean()), 0.0
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def summarize(episodes: list[dict]) -> dict:
    """Mean and `<key>_ci95` of every EPISODE_METRICS field over episodes."""
    out: dict[str, float] = {"episodes": len(episodes)}
    for key in EPISODE_METRICS:
        out[key], out[f"{key}_ci95"] = mean_ci([e[key] for e in episodes])
    return out
