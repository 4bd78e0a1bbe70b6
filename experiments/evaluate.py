"""Leaderboard (Hydra app): policies x scenarios x held-out test instances on one backend, ranked on the official
score.

    python -m experiments.evaluate scenarios=[paper-testbed,metro-8,moe2-heterogeneous] seeds=10
    python -m experiments.evaluate policies=[static_linear,eplb,coel] max_epochs=10 logger=disabled
    python -m experiments.evaluate scenarios=[paper-testbed] backend.hardware=h100   # another hardware profile

Instances: `seeds` instances of split `split` (default `test`, coel_env.benchmark.instances): each has its own
routing model (the env's scenario_seed) and reset seed (dynamics, workload, faults); training and knob tuning never
see them. Every episode starts from reset(seed); plan-based policies step with `step_plan` (their own plan; the
first decision always deploys), action policies with `step`.

Baselines: `coel_tuned` / `eplb_tuned` are CoEL / EPLB with knobs tuned on *train* instances (optuna,
agents.baselines.tuning; budget `tuning.*`, or `tuned=<tuned.json>` of an earlier run); `never_update` keeps tuned
CoEL's first plan; `clairvoyant` sees the next epoch's true state (a bound, never "the best baseline"). The score's
references (`static_linear` = 0; 1 = the better of `coel_tuned` and `eplb_tuned`) are always evaluated
(`add_references`).

Ranking: the official score (coel_env.benchmark.score, normalized per scenario). Per policy: mean with a percentile
bootstrap 95% interval, IQM with a stratified bootstrap interval, the paired difference to the best baseline (mean,
Student-t 95% interval, p-value), the probability of improvement over it (coel_env.benchmark.stats); rank = 1 +
the number of policies whose paired 95% interval is entirely above this one's (ties share a rank). The training
reward (`return`, the env's reward space) is reported, not ranked. Writes `leaderboard.csv` / `leaderboard.md`,
`episodes.csv` (one row per episode), `tuned.json`, `leaderboard_<metric>.png`; logs the table to W&B (offline
unless WANDB_MODE / logger.mode say otherwise).

On another backend than the surrogate (`backend=real`), the surrogate predicts every window too (`pred_*`
columns), and the leaderboard ranks the policies both ways: measured and predicted for the same windows, with
Kendall τ between the two orders (`pred_rank`, `rank_kendall_tau` columns; a section of leaderboard.md).

An exported policy that does not fit a scenario (trained on another one: its observation or action size differs)
is skipped there with one warning line naming both and why, listed in `skipped.json` and the leaderboard's
"Skipped" section; everything else is evaluated and written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from agents.baselines import BOUNDS, POLICIES, make_policy
from agents.baselines.tuning import TUNED, tune, tuned_policy
from agents.deployed import DeployedAgent
from agents.rollout import run_episode
from coel_env.atomic import atomic_write_json, atomic_write_text
from coel_env.benchmark import stats
from coel_env.benchmark.instances import SPLITS, instances
from coel_env.benchmark.score import (
    ONE_CANDIDATES,
    QUALITY_BUDGET,
    REFERENCE_ZERO,
    SCORE_VERSION,
    normalize,
    reference_gap,
    reference_one,
)
from coel_env.benchmark.stats import paired_difference, probability_of_improvement, stratified_bootstrap_ci
from coel_env.errors import ConfigError
from coel_env.specs import load_scenario_spec, scenario_with_hardware
from experiments.cli_checks import require_int, require_nonnegative, run_in_output_dir
from experiments.results_io import save_png, write_csv

log = logging.getLogger(__name__)

# (key, column title, scale for display)
METRICS: tuple[tuple[str, str, float], ...] = (
    ("score", "score", 1.0),
    ("return", "return (training reward)", 1.0),
    ("e2e_p95_s", "p95 latency (s)", 1.0),
    ("tokens_per_s", "tokens/s", 1.0),
    ("quality_loss", "quality loss (%)", 100.0),
    ("infeasible", "over quality budget (% epochs)", 100.0),
    ("energy_j", "energy (kJ/epoch)", 1e-3),
    ("migration_bytes", "migration (GB)", 1e-9),
    ("migration_s", "migration (s/epoch)", 1.0),  # other backends' runs: also predicted (agents.rollout)
    ("window_e2e_p95_s", "p95 latency of the window alone (s)", 1.0),  # the same, before migration disruption
    ("slo_attainment", "SLO attainment (%)", 100.0),
    ("decide_ms", "decision (ms)", 1.0),
)
TABLE_METRICS = ("e2e_p95_s", "slo_attainment", "quality_loss", "infeasible", "return")
KINDS = ("agent", "bound", "reference", "baseline")


def git_commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).parent,
            ).stdout.strip()
            or "unknown"
        )
    except OSError:
        return "unknown"


def predictor(env: gym.Env, cfg: DictConfig):
    """The surrogate, to predict every window next to the measurement, when evaluating on another backend."""
    if cfg.backend.name == "surrogate" or not cfg.get("predict_with_surrogate", True):
        return None
    from coel_env.backend.surrogate import SurrogateBackend

    return SurrogateBackend(env.unwrapped.cluster)


PARTIAL = "episodes_partial.csv"  # rewritten after each completed instance; removed once episodes.csv is written


def env_kwargs(cfg: DictConfig, scenario: str) -> dict:
    """Keyword arguments of gymnasium.make("CoEL-v0") but the instance's `scenario_seed`; `backend.hardware`
    replaces every scenario's own profile."""
    kw = {k: v for k, v in OmegaConf.to_container(cfg.env, resolve=True).items() if v is not None}
    kw.pop("scenario_seed", None)  # each instance has its own routing seed (coel_env.benchmark.instances)
    backend = OmegaConf.to_container(cfg.backend, resolve=True)
    hardware = backend.pop("hardware", None)
    kw.update(
        scenario=scenario_with_hardware(scenario, hardware), max_epochs=int(cfg.max_epochs), backend=backend.pop("name")
    )
    if backend:
        kw["backend_kwargs"] = backend
    return kw


def policy_list(cfg: DictConfig) -> list[str]:
    """The listed policies, then the score's references if missing (with `add_references`)."""
    names = [str(p) for p in cfg.policies]
    if cfg.get("add_references", True):
        names += [r for r in (REFERENCE_ZERO, *ONE_CANDIDATES) if r not in names]
    return names


def check(cfg: DictConfig) -> None:
    """Refuse bad command-line values in one line, before any episode runs or any file is written."""
    require_int(cfg.seeds, "seeds", 1)
    require_int(cfg.seed_offset, "seed_offset", 0)
    require_int(cfg.max_epochs, "max_epochs", 1)
    if cfg.get("time_budget_s") is not None:
        require_nonnegative(cfg.time_budget_s, "time_budget_s")
    for key in ("policies", "scenarios"):
        value = cfg.get(key)
        if isinstance(value, str) or not hasattr(value, "__len__") or not len(value):
            raise ConfigError(f"{key}: {value!r} must be a non-empty list, e.g. {key}=[a,b]")
    if cfg.split not in SPLITS:
        raise ConfigError(f"split: unknown '{cfg.split}'; allowed: {', '.join(SPLITS)}")
    instances(str(cfg.split), int(cfg.seeds), int(cfg.seed_offset))
    for key in ("trials", "instances", "epochs"):
        require_int(cfg.tuning[key], f"tuning.{key}", 1)
    if cfg.tuned is not None and not Path(str(cfg.tuned)).is_file():
        raise ConfigError(f"tuned: '{cfg.tuned}' is not a file (a tuned.json written by experiments.evaluate)")
    for scenario in cfg.scenarios:
        load_scenario_spec(str(scenario))
    scenario_with_hardware(str(cfg.scenarios[0]), cfg.backend.get("hardware"))
    check_policy_kwargs(cfg)


def check_policy_kwargs(cfg: DictConfig) -> None:
    """Build every listed baseline once with its `policy_kwargs`: an unknown argument or a value out of range fails
    here in one line (`policy oracle: time_limit: ...`), not after the grid's first episodes."""
    raw = cfg.get("policy_kwargs")
    pkw = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else raw
    if pkw is None:
        pkw = {}
    if not isinstance(pkw, dict):
        raise ConfigError(
            f"policy_kwargs: {pkw!r} must be a mapping policy -> arguments, e.g. policy_kwargs.oracle.time_limit=5"
        )
    for name in policy_list(cfg):
        if Path(str(name)).is_dir():  # an exported agent takes no constructor arguments; a broken one fails here
            DeployedAgent(str(name))
            continue
        kw = pkw.get(name) or {}
        if not isinstance(kw, dict):
            raise ConfigError(f"policy_kwargs.{name}: {kw!r} must be a mapping of constructor arguments")
        if "seed" in kw:
            raise ConfigError(
                f"policy_kwargs.{name}.seed: not an argument here; episodes are seeded by seeds and seed_offset"
            )
        if name in TUNED:
            make_policy(TUNED[name], seed=int(cfg.seed_offset), **kw)
        elif name not in SPECIAL:
            make_policy(str(name), seed=int(cfg.seed_offset), **kw)
        elif name not in POLICIES:
            raise ConfigError(f"policy: unknown name '{name}'")


SPECIAL = ("never_update", "clairvoyant")  # built with the tuned knobs


def tuned_knobs(cfg: DictConfig, names: list[str], out: Path) -> dict:
    """{scenario: {base: tune() result}} for the bases the policies need (tuned on train instances, surrogate),
    or read from `tuned`; written to out/tuned.json."""
    need = {TUNED[n] for n in names if n in TUNED}
    if "never_update" in names:
        need.add("coel")
    if "clairvoyant" in names:
        need |= {"coel", "eplb"}
    have: dict = json.loads(Path(str(cfg.tuned)).read_text()) if cfg.tuned else {}
    t = cfg.tuning
    for scenario in cfg.scenarios:
        for base in sorted(need):
            if base in have.get(str(scenario), {}):
                continue
            kw = {k: v for k, v in env_kwargs(cfg, scenario).items() if k in ("perception", "scenario")}
            sc = kw.pop("scenario")
            log.info("tuning %s on %s (train instances, %d trials)", base, scenario, int(t.trials))
            have.setdefault(str(scenario), {})[base] = tune(
                sc, base, int(t.trials), int(t.instances), int(t.epochs), int(t.seed), env_kwargs=kw
            )
    atomic_write_json(out / "tuned.json", have)
    return have


def build_policy(name: str, kw: dict, seed: int, knobs: dict):
    """The policy `name` (a registry name, a tuned one or a special one using the tuned knobs) for one episode."""
    coel = knobs.get("coel", {}).get("params", {})
    if name in TUNED:
        return tuned_policy(TUNED[name], {**knobs[TUNED[name]]["params"], **kw}, seed=seed)
    if name == "never_update":
        return make_policy(name, seed=seed, base="coel", base_kwargs=coel, **kw)
    if name == "clairvoyant":
        eplb = knobs.get("eplb", {}).get("params", {})
        return make_policy(name, seed=seed, coel_kwargs=coel, eplb_kwargs=eplb, **kw)
    return make_policy(name, seed=seed, **kw)


def kind_of(name: str, is_agent: bool) -> str:
    if is_agent:
        return "agent"
    if name in BOUNDS:
        return "bound"
    if name in (REFERENCE_ZERO, *ONE_CANDIDATES):
        return "reference"
    return "baseline"


def evaluate(cfg: DictConfig, out: Path) -> list[dict]:
    """Run the grid; return one summary row per (scenario, policy) and write every artifact into `out`."""
    from tqdm import tqdm

    import coel_env  # noqa: F401  (registers CoEL-v0)

    insts = instances(str(cfg.split), int(cfg.seeds), int(cfg.seed_offset))
    names = policy_list(cfg)
    pkw = OmegaConf.to_container(cfg.policy_kwargs, resolve=True) or {}
    knobs = tuned_knobs(cfg, names, out)
    commit = git_commit()
    rows, episodes = [], []
    skipped: list[dict] = []

    def skip(scenario: str, policy: str, directory: str, reason: str) -> None:
        log.warning("skipping policy %s (%s) on scenario %s: %s", policy, directory, scenario, reason)
        skipped.append({"scenario": str(scenario), "policy": policy, "directory": directory, "reason": reason})

    total = len(cfg.scenarios) * len(names) * len(insts)
    tty = sys.stderr.isatty()  # in a log file a bar is noise: one status line per (scenario, policy) instead
    bar = tqdm(total=total, desc="evaluate", disable=not (cfg.progress_bar and tty))
    started, done = time.time(), [0]

    def status(what: str, wall_s: float) -> None:
        done[0] += 1
        if cfg.progress_bar and not tty:  # in a log file: one line per episode
            elapsed = time.time() - started
            log.info("[evaluate] %d/%d episodes (%s: %.1f s), %.0f s", done[0], total, what, wall_s, elapsed)

    release_backends = cfg.backend.name != "surrogate"  # server processes: closed after each instance
    budget = None if cfg.get("time_budget_s") is None else float(cfg.time_budget_s)
    done_insts: dict[str, int] = {}  # instances completed per scenario (all of them unless time_budget_s stopped)
    for scenario in cfg.scenarios:
        kwargs = env_kwargs(cfg, scenario)
        base_envs = {i.routing_seed: gym.make("CoEL-v0", **kwargs, scenario_seed=i.routing_seed) for i in insts}
        sc_knobs = knobs.get(str(scenario), {})
        sc_rows = []
        setups = []  # per policy that fits: its envs, agent and config; episodes are run instance by instance below
        for name in names:
            kw = dict(pkw.get(name, {}) or {})
            envs, env_kw, agent = base_envs, kwargs, None
            if Path(str(name)).is_dir():  # an exported deployment policy: its own action space, our scenario
                agent = DeployedAgent(name)
                # the leaderboard's env (reward, perception, scenario) with the agent's own action space
                shaping = ("action_space", "num_edits", "observation_space")
                env_kw = {**kwargs, **{k: agent.env_kwargs[k] for k in shaping if k in agent.env_kwargs}}
                envs = {i.routing_seed: gym.make("CoEL-v0", **env_kw, scenario_seed=i.routing_seed) for i in insts}
                directory, name = str(name), agent.name
                reason = agent.incompatibility(next(iter(envs.values())))
                if reason is not None:  # e.g. trained on another scenario: skip this pair, keep everything else
                    skip(scenario, name, directory, reason)
                    for env in envs.values():
                        env.close()
                    bar.update(len(insts))
                    done[0] += len(insts)
                    continue
            if name in TUNED or name in SPECIAL:
                bases = [TUNED[name]] if name in TUNED else (["coel"] if name == "never_update" else ["coel", "eplb"])
                kw_id = {**kw, "tuned": {b: sc_knobs[b].get("params") for b in bases if b in sc_knobs}}
            else:
                kw_id = kw
            config = {
                "policy": name,
                "policy_kwargs": kw_id,
                "scenario": scenario,
                "split": str(cfg.split),
                "instances": [[i.routing_seed, i.seed] for i in insts],
                "env": env_kw,
                "score": SCORE_VERSION,
                "git": commit,
            }
            setups.append({"name": name, "kw": kw, "envs": envs, "agent": agent, "config": config, "eps": []})
        # instance by instance, every policy: a backend with processes (real) is started once per instance's env
        # and released after it, so the GPU holds at most one instance's servers per action space
        completed = 0
        for inst in insts:
            if budget is not None and time.time() - started > budget and completed:
                log.warning(
                    "time_budget_s %.0f s spent: %s stops after %d of %d instances",
                    budget,
                    scenario,
                    completed,
                    len(insts),
                )
                break
            for st in setups:
                name, env = st["name"], st["envs"][inst.routing_seed]
                bar.set_postfix_str(f"{scenario}/{name}/{inst.label}")
                agent = st["agent"]
                policy = agent if agent is not None else build_policy(name, st["kw"], inst.seed, sc_knobs)
                t0 = time.perf_counter()
                ep = run_episode(env, policy, inst.seed, predictor=predictor(env, cfg))
                ep.update(
                    scenario=scenario,
                    policy=name,
                    instance=inst.label,
                    routing_seed=inst.routing_seed,
                    seed=inst.seed,
                    wall_s=time.perf_counter() - t0,
                )
                st["eps"].append(ep)
                bar.update(1)
                status(f"{scenario}/{name}/{inst.label}", ep["wall_s"])
            if release_backends:
                for st in setups:
                    st["envs"][inst.routing_seed].close()
            completed += 1
            # what a run killed later (a hard timeout, a lost machine) keeps: every completed instance's episodes
            write_csv(out / PARTIAL, episodes + [ep for st in setups for ep in st["eps"]])
        done_insts[str(scenario)] = completed
        for st in setups:
            st["config"]["instances"] = st["config"]["instances"][:completed]
            cid = hashlib.sha1(json.dumps(st["config"], sort_keys=True, default=str).encode()).hexdigest()[:8]
            for ep in st["eps"]:
                ep["config_id"] = cid
            if st["envs"] is not base_envs:
                for env in st["envs"].values():
                    env.close()
            sc_rows.append(
                {
                    "scenario": scenario,
                    "policy": st["name"],
                    "kind": kind_of(st["name"], st["agent"] is not None),
                    "episodes": st["eps"],
                    "config_id": cid,
                    "config": json.dumps(st["config"], sort_keys=True, default=str),
                }
            )
        for env in base_envs.values():
            env.close()
        if not sc_rows:  # every policy skipped on this scenario
            continue
        sc_summary = summarize_scenario(sc_rows)
        rows += sc_summary
        for r in sc_rows:
            episodes += r["episodes"]
        for r in sc_summary:
            log.info("%s %s score %.3f [%.3f, %.3f]", scenario, r["policy"], r["score"], r["score_lo"], r["score_hi"])
    bar.close()
    if not rows:
        raise ConfigError(
            "policies: none fits any of the scenarios; skipped: "
            + "; ".join(f"{k['policy']} on {k['scenario']} ({k['reason']})" for k in skipped)
        )
    write_csv(out / "leaderboard.csv", rows)
    write_csv(out / "episodes.csv", episodes)
    (out / PARTIAL).unlink(missing_ok=True)  # the run completed: episodes.csv holds them all
    atomic_write_json(out / "skipped.json", skipped)  # (policy, scenario) pairs that do not fit, and why
    agg = aggregate(rows, episodes) if len(cfg.scenarios) > 1 else []
    if agg:
        write_csv(out / "leaderboard_all.csv", agg)
    reported = insts[: min(done_insts.values())] if done_insts else insts
    atomic_write_text(out / "leaderboard.md", markdown(rows, cfg, agg, reported, skipped, done_insts))
    if cfg.plots:
        plot(rows, out)
    return rows


def summarize_scenario(sc_rows: list[dict]) -> list[dict]:
    """One scenario's leaderboard rows: normalized scores (per episode), statistics, best baseline, paired
    differences, probability of improvement and tie-aware ranks."""
    by = {r["policy"]: r for r in sc_rows}
    raw = {p: np.array([e["score_raw"] for e in r["episodes"]]) for p, r in by.items()}
    means = {p: float(np.mean(v)) for p, v in raw.items()}
    one_name = reference_one(means)
    zero = means.get(REFERENCE_ZERO, float("nan"))
    one = means[one_name] if one_name else float("nan")
    gap = reference_gap(zero, one)
    scores = {p: normalize(v, zero, one) if np.isfinite(gap) else np.full(len(v), np.nan) for p, v in raw.items()}
    for p, r in by.items():
        for e, s in zip(r["episodes"], scores[p]):
            e["score"] = float(s)
    # rank and compare on raw scores (same order as the normalized ones when they exist)
    key = scores if np.isfinite(gap) else raw
    candidates = [p for p, r in by.items() if r["kind"] in ("baseline", "reference")]
    best = max(candidates, key=lambda p: float(np.nanmean(key[p]))) if candidates else None
    ranked = [p for p, r in by.items() if r["kind"] != "bound"]
    out = []
    for p, r in by.items():
        eps = r["episodes"]
        row: dict[str, Any] = {
            "scenario": r["scenario"],
            "policy": p,
            "kind": r["kind"],
            "episodes": len(eps),
            "epochs": int(np.mean([e["epochs"] for e in eps])),
            "repairs": float(np.mean([e["repairs"] for e in eps])),
            "score_version": SCORE_VERSION,
            "ref_zero_raw": zero,
            "ref_one": one_name or "",
            "ref_one_raw": one,
        }
        s = key[p]
        row["score"], row["score_lo"], row["score_hi"] = stratified_bootstrap_ci(s, statistic=stats.mean)
        row["iqm"], row["iqm_lo"], row["iqm_hi"] = stratified_bootstrap_ci(s, statistic=stats.iqm)
        if not np.isfinite(gap):
            row["score"] = row["score_lo"] = row["score_hi"] = float("nan")
            row["iqm"], row["iqm_lo"], row["iqm_hi"] = float("nan"), float("nan"), float("nan")
        row["score_raw"], row["score_raw_lo"], row["score_raw_hi"] = stratified_bootstrap_ci(
            raw[p], statistic=stats.mean
        )
        for k, _, _ in METRICS:
            if k == "score" or k not in eps[0]:
                continue
            row[k], row[f"{k}_lo"], row[f"{k}_hi"] = stratified_bootstrap_ci([e[k] for e in eps], statistic=stats.mean)
        for k in (k for k in eps[0] if k.startswith("pred_")):  # the surrogate's prediction, same windows
            row[k], row[f"{k}_lo"], row[f"{k}_hi"] = stratified_bootstrap_ci([e[k] for e in eps], statistic=stats.mean)
        row["best_baseline"] = best or ""
        if best is not None and p != best:
            d = paired_difference(key[p], key[best])
            row.update(delta=d.mean, delta_lo=d.lo, delta_hi=d.hi, delta_p=d.p_value, verdict=d.verdict)
            row["p_improve"], row["p_improve_lo"], row["p_improve_hi"] = probability_of_improvement(key[p], key[best])
        else:
            row.update(delta=0.0, delta_lo=0.0, delta_hi=0.0, delta_p=1.0, verdict="best baseline" if best else "")
            row["p_improve"], row["p_improve_lo"], row["p_improve_hi"] = 0.5, 0.5, 0.5
        if r["kind"] == "bound":
            row["rank"] = "bound"
        else:
            beaten_by = sum(1 for q in ranked if q != p and paired_difference(key[q], key[p]).lo > 0)
            row["rank"] = str(1 + beaten_by)
        row.update(config_id=r["config_id"], config=r["config"])
        out.append(row)
    add_surrogate_ranking(out)
    return sorted(
        out, key=lambda r: (r["kind"] == "bound", -_nan_low(r["score"] if np.isfinite(gap) else r["score_raw"]))
    )


def add_surrogate_ranking(rows: list[dict]) -> dict | None:
    """Where the surrogate predicted every window (a real-backend run): one scenario's policies (bounds left out)
    ordered by their mean raw score as measured (`real_order`) and as predicted for the same windows
    (`pred_rank`, 1 = best), and Kendall τ between the two orders (`rank_kendall_tau`, its p-value
    `rank_kendall_p`; NaN for fewer than 2 policies). Returns {tau, p, n}, or None without predictions."""
    from scipy.stats import kendalltau, rankdata

    ranked = [r for r in rows if r["kind"] != "bound"]
    if not ranked or "pred_score_raw" not in ranked[0]:
        return None
    real = np.array([r["score_raw"] for r in ranked], dtype=np.float64)
    pred = np.array([r["pred_score_raw"] for r in ranked], dtype=np.float64)
    if len(ranked) > 1 and np.ptp(real) > 0 and np.ptp(pred) > 0:
        res = kendalltau(real, pred)
        tau, p = float(res.statistic), float(res.pvalue)
    else:
        tau, p = float("nan"), float("nan")
    for r, a, b in zip(ranked, rankdata(-real, method="min"), rankdata(-pred, method="min")):
        r.update(real_order=int(a), pred_rank=int(b))
    for r in rows:
        r.setdefault("real_order", "bound")
        r.setdefault("pred_rank", "bound")
        r.update(rank_kendall_tau=tau, rank_kendall_p=p)
    return {"tau": tau, "p": p, "n": len(ranked)}


def _nan_low(x: float) -> float:
    return float(x) if np.isfinite(x) else -np.inf


def aggregate(rows: list[dict], episodes: list[dict]) -> list[dict]:
    """Across scenarios: IQM of normalized scores with stratified bootstrap intervals (strata = scenarios) and
    the probability of improvement over the best baseline (by IQM), for policies evaluated on every scenario."""
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    kinds = {r["policy"]: r["kind"] for r in rows}
    mats = {}
    for p in dict.fromkeys(r["policy"] for r in rows):
        cols = [[e["score"] for e in episodes if e["policy"] == p and e["scenario"] == sc] for sc in scenarios]
        if all(cols) and len({len(c) for c in cols}) == 1:
            mats[p] = np.array(cols, dtype=np.float64).T  # [instances, scenarios]
    if not mats or not all(np.isfinite(m).all() for m in mats.values()):
        return []
    cands = [p for p in mats if kinds[p] in ("baseline", "reference")]
    best = max(cands, key=lambda p: stats.iqm(mats[p])) if cands else None
    out = []
    for p, m in mats.items():
        row = {"policy": p, "kind": kinds[p], "scenarios": len(scenarios), "instances": m.shape[0]}
        row["iqm"], row["iqm_lo"], row["iqm_hi"] = stratified_bootstrap_ci(m)
        row["best_baseline"] = best or ""
        if best is not None and p != best:
            row["p_improve"], row["p_improve_lo"], row["p_improve_hi"] = probability_of_improvement(m, mats[best])
            d = paired_difference(m, mats[best])
            row.update(delta=d.mean, delta_lo=d.lo, delta_hi=d.hi, verdict=d.verdict)
        else:
            row.update(p_improve=0.5, p_improve_lo=0.5, p_improve_hi=0.5, delta=0.0, delta_lo=0.0, delta_hi=0.0)
            row["verdict"] = "best baseline" if best else ""
        out.append(row)
    return sorted(out, key=lambda r: (r["kind"] == "bound", -r["iqm"]))


def _fmt(x: float, lo: float, hi: float, scale: float) -> str:
    """`mean [lo, hi]` with digits to the interval's width."""
    if not np.isfinite(x):
        return "n/a"
    x, lo, hi = x * scale, lo * scale, hi * scale
    width = abs(hi - lo)
    digits = max(0, min(4, 2 - int(np.floor(np.log10(width))))) if width > 0 else 3
    if abs(x) >= 1e6:
        digits = 0
    return f"{x:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _delta(r: dict) -> str:
    if r["verdict"] in ("best baseline", ""):
        return r["verdict"] or "n/a"
    if not np.isfinite(r["delta"]):
        return "n/a"
    return f"{r['delta']:+.3f} [{r['delta_lo']:+.3f}, {r['delta_hi']:+.3f}] {r['verdict']}"


def _kind_label(r: dict) -> str:
    return {"bound": " (bound)", "reference": " (ref)", "agent": " (agent)"}.get(r["kind"], "")


def markdown(
    rows: list[dict],
    cfg: DictConfig,
    agg: list[dict],
    insts: list,
    skipped: list[dict] = (),
    done_insts: dict[str, int] | None = None,
) -> str:
    titles = {k: (t, sc) for k, t, sc in METRICS}
    lines = [
        f"# CoEL-Gym leaderboard ({cfg.backend.name} backend)",
        "",
        f"**Ranked on the official score** (`{SCORE_VERSION}`, coel_env/benchmark/score.py): per epoch SLO "
        f"attainment and p95 latency (dropped requests count as SLO misses with infinite latency), 0 when quality "
        f"loss exceeds {100 * QUALITY_BUDGET:g}%; normalized per scenario, 0 = `{REFERENCE_ZERO}`, "
        f"1 = the best tuned heuristic (`coel_tuned` or `eplb_tuned`, knobs tuned on train instances). "
        f"{len(insts)} **{cfg.split}** instances per scenario ({insts[0].label}..{insts[-1].label}: routing seeds "
        f"{insts[0].routing_seed}..{insts[-1].routing_seed}, reset seeds {insts[0].seed}..{insts[-1].seed}; "
        f"training and tuning never see them), {int(cfg.max_epochs)} decision epochs each, perception "
        f"`{cfg.env.perception}`.",
        "",
        "score: mean [95% percentile bootstrap]; IQM [95% stratified bootstrap]; Δ: paired difference in score to "
        "the best baseline [Student-t 95%] — *tie* when the interval holds 0; P(>best): probability of improvement "
        "over the best baseline [bootstrap 95%]. Rank = 1 + the number of policies whose paired interval is entirely "
        f"above; ties share a rank; bounds are not ranked. `return` is the env's reward space "
        f"(`{cfg.env.reward_space}`) summed over the episode, shown for reference, not ranked.",
        "",
    ]
    if done_insts and any(n < int(cfg.seeds) for n in done_insts.values()):
        counts = ", ".join(f"{k}: {n}" for k, n in done_insts.items())
        lines += [
            f"**Stopped by `time_budget_s` ({float(cfg.time_budget_s):g} s):** of {int(cfg.seeds)} instances asked, "
            f"completed per scenario: {counts}.",
            "",
        ]
    if len(insts) < 10:
        lines += [f"**Warning:** {len(insts)} instances per scenario; the benchmark asks for at least 10.", ""]
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        sub = [r for r in rows if r["scenario"] == scenario]
        best = sub[0]["best_baseline"]
        lines += [
            f"## {scenario}",
            "",
            f"Best baseline: `{best}`. References (raw score): 0 = {REFERENCE_ZERO} {sub[0]['ref_zero_raw']:.4f}, "
            f"1 = {sub[0]['ref_one'] or 'n/a'} {sub[0]['ref_one_raw']:.4f}"
            + ("" if np.isfinite(sub[0]["score"]) else " (too close: scores n/a, ranked on raw scores)")
            + ".",
            "",
            "| rank | policy | score | IQM | Δ vs best baseline | P(>best) | "
            + " | ".join(titles[k][0] for k in TABLE_METRICS)
            + " | config |",
            "|---" * (6 + len(TABLE_METRICS) + 1) + "|",
        ]
        for r in sub:
            cells = [
                str(r["rank"]),
                f"{r['policy']}{_kind_label(r)}",
                _fmt(r["score"], r["score_lo"], r["score_hi"], 1.0),
                _fmt(r["iqm"], r["iqm_lo"], r["iqm_hi"], 1.0),
                _delta(r),
                f"{r['p_improve']:.2f} [{r['p_improve_lo']:.2f}, {r['p_improve_hi']:.2f}]",
                *[_fmt(r[k], r[f"{k}_lo"], r[f"{k}_hi"], titles[k][1]) for k in TABLE_METRICS],
            ]
            lines.append("| " + " | ".join(cells) + f" | `{r['config_id']}` |")
        lines.append("")
    if agg:
        lines += [
            "## All scenarios",
            "",
            "IQM of normalized scores over every (scenario, instance), stratified bootstrap over instances within "
            "scenarios; P(>best) averaged over scenarios (rliable's estimators, coel_env/benchmark/stats.py).",
            "",
            "| policy | IQM | Δ vs best baseline | P(>best) |",
            "|---|---|---|---|",
        ]
        for r in agg:
            lines.append(
                f"| {r['policy']}{_kind_label(r)} | {_fmt(r['iqm'], r['iqm_lo'], r['iqm_hi'], 1.0)} | {_delta(r)} | "
                f"{r['p_improve']:.2f} [{r['p_improve_lo']:.2f}, {r['p_improve_hi']:.2f}] |"
            )
        lines.append("")
    pred = [(k, t, sc) for k, t, sc in METRICS if f"pred_{k}" in rows[0]]
    if pred:
        lines += [
            "## Measured vs the surrogate's prediction (same plans, same windows)",
            "",
            "| scenario | policy | " + " | ".join(f"{t} measured | predicted" for _, t, _ in pred) + " |",
            "|---" * (2 + 2 * len(pred)) + "|",
        ]
        for r in rows:
            cells = [
                f"{_fmt(r[k], r[f'{k}_lo'], r[f'{k}_hi'], sc)} | "
                f"{_fmt(r[f'pred_{k}'], r[f'pred_{k}_lo'], r[f'pred_{k}_hi'], sc)}"
                for k, _, sc in pred
            ]
            lines.append(f"| {r['scenario']} | {r['policy']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ranking_markdown(rows)
    if skipped:
        lines += ["## Skipped", "", "These policies do not fit these scenarios and were not evaluated there:", ""]
        lines += [f"- `{s['policy']}` on `{s['scenario']}`: {s['reason']} (`{s['directory']}`)" for s in skipped]
        lines.append("")
    lines += ["## Configs", "", "Each row's exact config (policy kwargs, env kwargs, instances, git commit):", ""]
    for r in rows:
        lines.append(f"- `{r['config_id']}`: `{r['config']}`")
    return "\n".join(lines) + "\n"


def ranking_markdown(rows: list[dict]) -> list[str]:
    """The policy ranking as measured next to the surrogate's for the same windows, and Kendall τ, per scenario
    (nothing when the surrogate did not predict the windows)."""
    if "pred_rank" not in rows[0]:
        return []
    lines = [
        "## Ranking: measured vs the surrogate's prediction (same plans, same windows)",
        "",
        "Policies ordered by mean raw score (bounds left out), measured and as the surrogate predicts the same "
        "windows; Kendall τ between the two orders (scipy.stats.kendalltau).",
        "",
    ]
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        sub = sorted(
            (r for r in rows if r["scenario"] == scenario and r["kind"] != "bound"), key=lambda r: r["real_order"]
        )
        tau, p = sub[0]["rank_kendall_tau"], sub[0]["rank_kendall_p"]
        verdict = f"τ = {tau:.3f} (p = {p:.3f}, {len(sub)} policies)" if np.isfinite(tau) else "τ n/a (< 2 policies)"
        lines += [
            f"**{scenario}**: Kendall {verdict}",
            "",
            "| measured rank | policy | raw score measured | surrogate rank | raw score predicted |",
            "|---|---|---|---|---|",
        ]
        for r in sub:
            lines.append(
                f"| {r['real_order']} | {r['policy']}{_kind_label(r)} | {r['score_raw']:.4f} | {r['pred_rank']} | "
                f"{r['pred_score_raw']:.4f} |"
            )
        lines.append("")
    return lines


def plot(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    paths = []
    titles = {k: (t, sc) for k, t, sc in METRICS}
    for key in ("score", "return", "e2e_p95_s", "slo_attainment"):
        title, scale = titles[key]
        fig, axes = plt.subplots(1, len(scenarios), figsize=(4.5 * len(scenarios), 3.6), squeeze=False)
        for ax, sc in zip(axes[0], scenarios):
            sel = {r["policy"]: r for r in rows if r["scenario"] == sc}
            names = [p for p in policies if p in sel]
            mid = np.array([sel[p][key] for p in names], dtype=np.float64) * scale
            err = np.array([[sel[p][key] - sel[p][f"{key}_lo"], sel[p][f"{key}_hi"] - sel[p][key]] for p in names])
            colors = [{"bound": "tab:gray", "agent": "tab:orange"}.get(sel[p]["kind"], "tab:blue") for p in names]
            ax.bar(range(len(names)), np.nan_to_num(mid), yerr=np.nan_to_num(err.T * scale), color=colors, capsize=3)
            ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
            ax.set_title(sc, fontsize=10)
            ax.set_ylabel(title)
        fig.tight_layout()
        path = out / f"leaderboard_{key}.png"
        save_png(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def log_wandb(cfg: DictConfig, out: Path, rows: list[dict]) -> None:
    """The leaderboard as a W&B table, its plots, every policy's score in the run summary, and its files as a
    `leaderboard` artifact (job type `evaluate`; offline unless WANDB_MODE / logger.mode say otherwise)."""
    from agents.tracking import finish_wandb, init_wandb, log_artifact, use_artifact

    lg = OmegaConf.to_container(cfg.logger, resolve=True)
    lg["tags"] = [*list(lg.get("tags") or []), "evaluate"]
    run = init_wandb(lg, out, OmegaConf.to_container(cfg, resolve=True), name="evaluate", job_type="evaluate")
    if run is None:
        return
    import wandb

    for name in cfg.policies:  # the exported policies it ranks (lineage, online)
        if Path(str(name)).is_dir():
            use_artifact(run, f"policy-{_policy_run_name(Path(str(name)))}")
    cols = list(rows[0])
    run.log({"leaderboard": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])})
    for png in sorted(out.glob("leaderboard_*.png")):
        run.log({png.stem: wandb.Image(str(png))})
    for r in rows:
        run.summary[f"{r['scenario']}/{r['policy']}/score"] = r["score"]
    files = ["leaderboard.csv", "leaderboard.md", "leaderboard_all.csv", "episodes.csv", "tuned.json", "skipped.json"]
    meta = {"scenarios": [str(x) for x in cfg.scenarios], "split": str(cfg.split), "instances": int(cfg.seeds)}
    log_artifact(run, "leaderboard", "leaderboard", [out / f for f in files], meta)
    finish_wandb(run)


def _policy_run_name(policy_dir: Path) -> str:
    """The W&B run name experiments.train gave the run that exported `policy_dir` (`<algo>-<scenario>-s<seed>`)."""
    try:
        summary = json.loads((policy_dir.parent / "train_summary.json").read_text())
        return f"{summary['algo']}-{summary['scenario']}-s{summary['seed']}"
    except (OSError, ValueError, KeyError):
        return policy_dir.parent.name


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    def work(out: Path) -> list[dict]:
        check(cfg)
        return evaluate(cfg, out)

    rows, out = run_in_output_dir(work)
    log_wandb(cfg, out, rows)
    print((out / "leaderboard.md").read_text())
    print(f"wrote {out / 'leaderboard.csv'}")


if __name__ == "__main__":
    main()
