"""Median seconds of one `SurrogateBackend.serve` and one `serve_batch` of 64 plans on paper-testbed (uniform plan,
random pruning), for comparing two checkouts side by side: run it alternately from each tree,

    for i in 1 2 3 4 5; do (cd OLD && PYTHONPATH=OLD python benchmarks/serve_speed_pair.py old); \\
        PYTHONPATH=. python benchmarks/serve_speed_pair.py new; done
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import numpy as np

from coel_env import DeploymentPlan, SurrogateBackend, make_scenario


def median_s(call: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(tag: str) -> None:
    scenario = make_scenario("paper-testbed", seed=0)
    state = scenario.initial_state(np.random.default_rng(0))
    backend = SurrogateBackend(scenario.cluster)
    backend.incremental = False  # the full evaluation, as an env step serves (its state changes every step)
    plan = DeploymentPlan.uniform(scenario.cluster)
    rng = np.random.default_rng(1)
    plans = []
    for _ in range(64):
        p = plan.copy()
        p.prune[:] = rng.uniform(0, 0.5, p.prune.shape)
        plans.append(p)
    backend.serve(plan, state, 60.0)  # compile / warm the caches
    backend.serve_batch(plans, state, 60.0)
    one = median_s(lambda: backend.serve(plan, state, 60.0), 300)
    batch = median_s(lambda: backend.serve_batch(plans, state, 60.0), 40)
    print(f"{tag}: serve {one * 1e6:.0f} us, serve_batch(64) {batch * 1e3:.2f} ms")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "this tree")
