"""Serve time of a plan after a small edit against the same state: incremental (incremental.py) vs full evaluation.

Usage: .venv/bin/python -m benchmarks.bench_incremental [--edits 300] [--scenarios paper-testbed metro-8 ...]
Per scenario one state and one plan (DeploymentPlan.uniform, then random edits of 1-3 cells as an `edit` action
makes: place / drop a replica, re-tier, re-bit); after each edit the plan is served by an incremental backend and by
a full one (SurrogateBackend.incremental = False), alternating; medians. Writes benchmarks/results/incremental.json
and incremental.md. Both backends give the same Metrics bit for bit (tests/backend/test_incremental.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

from coel_env import DeploymentPlan, SurrogateBackend, make_scenario
from coel_env.atomic import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def edit(rng: np.random.Generator, plan: DeploymentPlan, num_devices: int) -> None:
    """1-3 random cell edits in place (the size of an `edit` action)."""
    L, E, R = plan.device.shape
    for _ in range(int(rng.integers(1, 4))):
        l, e, r = rng.integers(L), rng.integers(E), rng.integers(R)
        if r > 0 and rng.random() < 0.3:
            plan.device[l, e, r] = -1
        else:
            plan.device[l, e, r] = rng.integers(num_devices)
            plan.tier[l, e, r] = rng.choice([0, 0, 1, 2])
            plan.bits[l, e, r] = rng.choice([16, 8, 4])


def measure(scenario: str, edits: int) -> dict:
    """Median serve seconds after an edit, incremental and full, on one scenario."""
    sc = make_scenario(scenario, seed=0)
    c = sc.cluster
    state = sc.initial_state(np.random.default_rng(0))
    plan = DeploymentPlan.uniform(c)
    inc, full = SurrogateBackend(c), SurrogateBackend(c)
    full.incremental = False
    rng = np.random.default_rng(1)
    times = {"incremental": [], "full": []}
    for i in range(edits + 3):
        edit(rng, plan, c.num_devices)
        for name, be in (("incremental", inc), ("full", full)):
            t0 = time.perf_counter()
            be.serve(plan, state, 60.0)
            if i >= 3:  # compile and the first (recording) serve
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "scenario": scenario,
        "edits": edits,
        "incremental_s": med["incremental"],
        "full_s": med["full"],
        "speedup": med["full"] / med["incremental"],
        "plans_with_choice_at_end": bool((plan.device[..., 1:] >= 0).any()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--edits", type=int, default=300)
    ap.add_argument("--scenarios", nargs="+", default=["paper-testbed", "metro-8", "deepseek-scale"])
    args = ap.parse_args()
    rows = []
    for s in args.scenarios:
        n = args.edits if s != "deepseek-scale" else max(args.edits // 10, 5)
        rows.append(measure(s, n))
        r = rows[-1]
        print(f"{s:<16} incremental {r['incremental_s'] * 1e3:8.3f} ms  full {r['full_s'] * 1e3:8.3f} ms", flush=True)
    meta = {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "incremental.json", {"meta": meta, "rows": rows})
    lines = [
        "# Serve after an edit, same state: incremental vs full evaluation (medians)",
        "",
        f"{meta['time']}, {meta['cpus']} CPUs, 1-min load average {meta['load_avg_1m']:.2f}. Command: "
        f"`python -m benchmarks.bench_incremental --edits {args.edits}`",
        "",
        "| scenario | edits | incremental ms | full ms | speedup |",
        "|---|---|---|---|---|",
        *(
            f"| {r['scenario']} | {r['edits']} | {r['incremental_s'] * 1e3:.3f} | {r['full_s'] * 1e3:.3f} | "
            f"{r['speedup']:.2f}x |"
            for r in rows
        ),
        "",
        "Bit-identical Metrics (tests/backend/test_incremental.py). The env's own steps advance the state every "
        "epoch, so they take the full path (see speed_profile.md).",
    ]
    atomic_write_text(RESULTS / "incremental.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
