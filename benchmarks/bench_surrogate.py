"""SurrogateBackend.serve throughput: single evaluations, the batched entry point (64 plans), deepseek-scale.

    python -m benchmarks.bench_surrogate [--baseline DIR]   (DIR: python -m benchmarks.baseline HEAD DIR)
Targets (issue 2): paper-testbed >= 10k evaluations/s single, >= 100k plan-evaluations/s batched (64 at a time),
deepseek-scale >= 1k/s.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

import coel_env
from benchmarks.common import median_rate, write_results
from coel_env import DeploymentPlan, make_scenario


def shuffled_plans(cluster, n: int, seed: int) -> list[DeploymentPlan]:
    """Distinct valid plans: the uniform plan with its expert-to-device assignment permuted."""
    rng = np.random.default_rng(seed)
    base = DeploymentPlan.uniform(cluster)
    plans = []
    for _ in range(n):
        p = base.copy()
        L, E, _ = p.device.shape
        perm = rng.permutation(L * E)
        for arr in (p.device, p.tier, p.bits):
            arr[:, :, 0] = arr[:, :, 0].reshape(-1)[perm].reshape(L, E)
        plans.append(p.validate(cluster))
    return plans


def bench(name: str, batch: int = 64, repeats: int = 7, pkgs: dict | None = None) -> dict:
    """Single and batched evaluation rates; with several packages (a baseline), rounds alternate between them."""
    pkgs = pkgs or {"new": coel_env}
    sc = make_scenario(name, seed=0)
    state = sc.initial_state(np.random.default_rng(0))
    plans = shuffled_plans(sc.cluster, batch, seed=1)
    out = {"scenario": name, "batch": batch}
    for label, pkg in pkgs.items():
        if label != "new":  # the baseline builds its own scenario, state and plans from identical seeds
            bsc = pkg.make_scenario(name, seed=0)
            bstate = bsc.initial_state(np.random.default_rng(0))
            bplans = [
                pkg.DeploymentPlan(p.device.copy(), p.tier.copy(), p.bits.copy(), p.prune.copy(), p.fuse.copy())
                for p in plans
            ]
            pkgs[label] = (pkg.SurrogateBackend(bsc.cluster), bstate, bplans)
        else:
            pkgs[label] = (pkg.SurrogateBackend(sc.cluster), state, plans)
    for mode, per in (("single", 1), ("batched", batch)):
        fns = {}
        for label, (be, st, pl) in pkgs.items():
            it = iter(range(10**9))
            fns[label] = (
                (lambda be=be, st=st, pl=pl, it=it: be.serve(pl[next(it) % batch], st, 60.0))
                if per == 1
                else (lambda be=be, st=st, pl=pl: be.serve_batch(pl, st, 60.0))
            )
        rates = {k: [] for k in fns}
        for _ in range(repeats):
            for label, fn in fns.items():
                rates[label].append(median_rate(fn, per, 1)["median_per_s"])
        out[mode] = {"median_per_s": statistics.median(rates["new"]), "trials": rates["new"]}
        if "baseline" in rates:
            out[mode + "_baseline"] = {
                "median_per_s": statistics.median(rates["baseline"]),
                "trials": rates["baseline"],
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default=None, help="exported baseline dir (python -m benchmarks.baseline)")
    args = ap.parse_args()
    base = None
    if args.baseline:
        from benchmarks.baseline import load

        base = load(args.baseline)
    rows, results = [], []
    for name, target_single, target_batch in (
        ("paper-testbed", 10_000, 100_000),
        ("metro-8", None, None),
        ("deepseek-scale", 1_000, None),
    ):
        pkgs = {"new": coel_env} | ({"baseline": base} if base else {})
        r = bench(name, repeats=5 if name == "deepseek-scale" else 7, pkgs=pkgs)
        results.append(r)

        def cell(mode, r=r):
            v = r[mode]["median_per_s"]
            b = r.get(mode + "_baseline")
            return f"{v:.0f}" + (f" (baseline {b['median_per_s']:.0f}, {v / b['median_per_s']:.2f}x)" if b else "")

        rows.append((name, cell("single"), target_single or "-", cell("batched"), target_batch or "-"))
        print(rows[-1], flush=True)
    path = write_results(
        "surrogate",
        {"results": results, "baseline": args.baseline},
        rows,
        ("scenario", "single evals/s (median)", "target", "batched plan-evals/s (64)", "target"),
        "python -m benchmarks.bench_surrogate" + (f" --baseline {args.baseline}" if base else ""),
    )
    print(f"written {path}")


if __name__ == "__main__":
    main()
