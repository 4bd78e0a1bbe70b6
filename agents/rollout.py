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
_WINDOW = ("window_e2e_p95_s", "migration_s")  # with a predictor: the window alone, and the step's migration time
_DISRUPTED = ("e2e_mean_s", "ttft_mean_s", "e2e_p95_s", "ttft_p95_s", "tokens_per_s", "late_frac")


def run_episode(
    env: gym.Env, policy: Policy, seed: int, max_steps: int | None = None, predictor=None
) -> dict[str, float]:
    """One episode of `policy` in CoEL-v0 from reset(seed).

    Plan policies step with `step_plan` (their own plan, no encoding loss; the first decision always deploys);
    action policies with `step`, unless their `act` returns a Decision (e.g. an agent steering a heuristic).
    With a `predictor` backend (the surrogate, while the env runs the real backend), every step is also predicted
    for the same plans and state (`predicted_step`: its migration time through the env's disruption model, and
    the window): `pred_<metric>` fields sit next to the measured ones (`pred_score_raw`: the official score's
    utility of the predicted steps), plus the window alone (`window_e2e_p95_s`) and the migration time
    (`migration_s`), measured and predicted.
    `score_raw` is the mean per-epoch utility of the official score (coel_env.benchmark.score; not normalized) and
    `infeasible` the fraction of epochs over its quality budget."""
    from coel_env.benchmark.score import epoch_feasible, epoch_utility

    core = env.unwrapped
    slo_s = float(core.scenario.spec.workload.slo_s)
    obs, _ = env.reset(seed=seed)
    policy.reset(core.cluster, seed=seed, scenario=core.scenario)
    rec: dict[str, list[float]] = {k: [] for k in (*_PER_EPOCH, "decide_ms", "score_raw", "infeasible")}
    if predictor is not None:
        rec.update({f"{p}{k}": [] for p in ("", "pred_") for k in _WINDOW})
        rec.update({f"pred_{k}": [] for k in (*_PER_EPOCH, "score_raw")})
    total, migration, repairs, steps, done = 0.0, 0.0, 0, 0, False
    while not done:
        before = (core.plan.copy(), core.state.copy()) if predictor is not None else None
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
            pred = predicted_step(predictor, core, *before)
            for k in _PER_EPOCH:
                rec[f"pred_{k}"].append(float(pred[k]))
            rec["pred_score_raw"].append(float(epoch_utility(pred, slo_s)))
            window = core.core.last_record.measured
            rec["window_e2e_p95_s"].append(float(window["e2e_p95_s"][0]))
            rec["migration_s"].append(float(info["migration_time_s"]))
            rec["pred_window_e2e_p95_s"].append(float(pred["window_e2e_p95_s"]))
            rec["pred_migration_s"].append(float(pred["migration_s"]))
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


def predicted_step(predictor, core, plan_before, state_before) -> dict[str, float]:
    """The surrogate's account of the step the env (on another backend) just took, for the same plans: its own
    migration time for the same plan change (`plan_before` -> the env's plan now; a fault restoration in that step
    is folded in), through the env's migration disruption model, on top of its prediction of the same window.
    So measured and predicted metrics hold the same terms (`window_e2e_p95_s`: the window alone, both ways)."""
    predictor.reset(plan_before, state_before)
    migration_s = float(predictor.apply(core.plan, state_before).time_s)
    window = predictor.serve(core.plan, core.state, float(core.scenario.spec.dynamics.epoch_s))
    fields = {k: np.array([float(getattr(window, k))]) for k in _DISRUPTED}
    served = core.core.disruption(fields, np.array([migration_s]))
    out = {k: float(getattr(window, k)) for k in (*_PER_EPOCH, "dropped_frac")}
    out.update({k: float(v[0]) for k, v in served.items()})
    out.update(window_e2e_p95_s=float(window.e2e_p95_s), migration_s=migration_s)
    return out


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
