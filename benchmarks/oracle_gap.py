"""The oracle's gap to the best heuristic on small static instances (results: benchmarks/results/oracle_gap.*).

    .venv/bin/python benchmarks/oracle_gap.py [--time-limit 30] [--search-iters 300]

Objective (lower is better, under the surrogate): mean e2e latency + SLO x dropped fraction + a steep penalty
above the quality budget (0.5%). For each instance: every heuristic's objective, the MILP alone (its own linear
optimum, HiGHS's bound and gap, time) and the oracle (MILP, then annealing polish).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import yaml

from agents.baselines import HEURISTICS, make_policy
from agents.baselines.oracle import optimize, score_plans, solve_milp
from coel_env import SurrogateBackend, make_scenario
from coel_env.atomic import atomic_write_json, atomic_write_text
from coel_env.specs.scenario import SCENARIO_DIR

OUT = Path(__file__).parent / "results"


def reduced(name: str, layers: int) -> dict:
    d = yaml.safe_load((SCENARIO_DIR / f"{name}.yaml").read_text())
    d.update(name=f"{name}-{layers}L", model={"preset": "qwen1.5-moe-a2.7b", "num_layers": layers})
    return d


def instances() -> dict:
    return {
        "tiny": "tiny",
        "paper-2server-1gpu-2L": reduced("paper-2server-1gpu", 2),
        "paper-2server-1gpu-4L": reduced("paper-2server-1gpu", 4),
        "paper-3server-1gpu-2L": reduced("paper-3server-1gpu", 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--time-limit", type=float, default=30.0)
    ap.add_argument("--search-iters", type=int, default=300)
    ap.add_argument("--q-max", type=float, default=0.005)
    args = ap.parse_args()
    results = {}
    for name, spec in instances().items():
        sc = make_scenario(spec, seed=0)
        c = sc.cluster
        state = sc.initial_state(np.random.default_rng(0))
        be = SurrogateBackend(c)
        heur = {}
        for h in HEURISTICS:
            pol = make_policy(h, seed=0)
            pol.reset(c, seed=0, scenario=sc)
            heur[h] = float(score_plans(be, [pol.plan(state, c)], state, args.q_max)[0])
        milp = solve_milp(c, state, args.q_max, args.time_limit, backend=be)
        t0 = time.perf_counter()
        res = optimize(c, state, args.q_max, time_limit=args.time_limit, search_iters=args.search_iters, backend=be)
        best_h = min(heur, key=heur.get)
        results[name] = dict(
            heuristics=heur,
            best_heuristic=best_h,
            best_heuristic_objective=heur[best_h],
            milp_surrogate_objective=milp.objective,
            milp_linear_objective=milp.milp_objective,
            milp_bound=milp.milp_bound,
            milp_gap=milp.milp_gap,
            milp_status=milp.milp_status,
            milp_time_s=milp.solve_time_s,
            milp_binaries=milp.num_binaries,
            oracle_objective=res.objective,
            oracle_method=res.method,
            oracle_time_s=time.perf_counter() - t0,
            oracle_vs_best_heuristic_pct=100 * (res.objective - heur[best_h]) / heur[best_h],
            milp_vs_best_heuristic_pct=100 * (milp.objective - heur[best_h]) / heur[best_h],
        )
        print(name, json.dumps(results[name], default=float)[:300])
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_json(OUT / "oracle_gap.json", results, default=float)
    lines = [
        "# Oracle vs heuristics on small static instances (surrogate)",
        "",
        f"Command: `.venv/bin/python benchmarks/oracle_gap.py --time-limit {args.time_limit:g} "
        f"--search-iters {args.search_iters}`. Objective (s, lower is better): mean e2e latency + SLO x "
        f"dropped fraction + penalty above a {100 * args.q_max:.1f}% quality-loss budget. `MILP gap` is HiGHS's "
        "relative optimality gap of its linear latency model at the time limit; `MILP (surr.)` is that MILP "
        "plan scored by the surrogate; `oracle` = MILP, then batched annealing under the surrogate.",
        "",
        "| instance | binaries | best heuristic | MILP (surr.) | MILP gap | MILP time (s) | oracle | "
        "oracle vs best heuristic | " + " | ".join(HEURISTICS) + " |",
        "|---" * (9 + len(HEURISTICS)) + "|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['milp_binaries']} | {r['best_heuristic']} {r['best_heuristic_objective']:.4f} | "
            f"{r['milp_surrogate_objective']:.4f} | {r['milp_gap']:.3f} | {r['milp_time_s']:.1f} | "
            f"{r['oracle_objective']:.4f} ({r['oracle_method']}) | {r['oracle_vs_best_heuristic_pct']:+.1f}% | "
            + " | ".join(f"{r['heuristics'][h]:.4f}" for h in HEURISTICS)
            + " |"
        )
    atomic_write_text(OUT / "oracle_gap.md", "\n".join(lines) + "\n")
    print((OUT / "oracle_gap.md").read_text())


if __name__ == "__main__":
    main()
