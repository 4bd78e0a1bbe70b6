"""SurrogateBackend.serve throughput: single evaluations, the batched entry point (64 plans), deepseek-scale.

    python -m benchmarks.bench_surrogate
Targets (issue 2): paper-testbed >= 10k evaluations/s single, >= 100k plan-evaluations/s batched (64 at a time),
deepseek-scale >= 1k/s.
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import median_rate, write_results
from coel_env import DeploymentPlan, SurrogateBackend, make_scenario


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


def bench(name: str, batch: int = 64, repeats: int = 7) -> dict:
    sc = make_scenario(name, seed=0)
    state = sc.initial_state(np.random.default_rng(0))
    backend = SurrogateBackend(sc.cluster)
    plans = shuffled_plans(sc.cluster, batch, seed=1)
    it = iter(range(10**9))
    single = median_rate(lambda: backend.serve(plans[next(it) % batch], state, 60.0), 1, repeats)
    batched = median_rate(lambda: backend.serve_batch(plans, state, 60.0), batch, repeats)
    return {"scenario": name, "single": single, "batched": batched, "batch": batch}


def main() -> None:
    rows, results = [], []
    for name, target_single, target_batch in (("paper-testbed", 10_000, 100_000), ("metro-8", None, None),
                                              ("deepseek-scale", 1_000, None)):
        r = bench(name, repeats=5 if name == "deepseek-scale" else 7)
        results.append(r)
        rows.append((name, f"{r['single']['median_per_s']:.0f}", target_single or "-",
                     f"{r['batched']['median_per_s']:.0f}", target_batch or "-"))
        print(rows[-1])
    path = write_results("surrogate", {"results": results}, rows,
                         ("scenario", "single evals/s (median)", "target", "batched plan-evals/s (64)", "target"),
                         "python -m benchmarks.bench_surrogate")
    print(f"written {path}")


if __name__ == "__main__":
    main()
