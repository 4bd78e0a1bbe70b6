"""The migration-disruption model: how moving experts degrades the window in which they move.

Backends measure (real) or predict (surrogate) a window served by the NEW plan as if it had been in place all along;
the env then applies this model knowingly, keeping both values (StepRecord.measured and StepRecord.served).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MigrationDisruption:
    """Requests arriving while experts move wait for them. With t the step's migration time [N] (plan change plus
    fault restoration), W the window and SLO the workload's latency objective:

        f = min(t / W, 1)          fraction of the window's requests that arrive during the move
        w = min(t, W) / 2          their mean extra wait
        e2e_mean_s  += f * w       ttft_mean_s += f * w
        e2e_p95_s   += w * [f > 0.05]   ttft_p95_s += w * [f > 0.05]   (enough requests wait to reach the p95)
        tokens_per_s *= 1 - slowdown * f
        late_frac   += (1 - late_frac) * f * min(w / SLO, 1)

    Every other field is left as measured; envs with t = 0 keep their values exactly."""

    window_s: float
    slo_s: float
    slowdown: float = 0.5  # throughput lost over a window spent entirely migrating

    def __call__(self, measured: dict[str, np.ndarray], migration_s: np.ndarray) -> dict[str, np.ndarray]:
        """The served metrics: a new dict (`measured` and its arrays untouched), or `measured` itself when no env
        migrated."""
        if not np.count_nonzero(migration_s > 0):
            return measured
        t, W = migration_s, self.window_s
        frac = np.minimum(t / W, 1.0)
        wait = np.minimum(t, W) / 2.0
        tail = np.where(frac > 0.05, wait, 0.0)
        m = measured
        out = dict(m)
        out["e2e_mean_s"] = m["e2e_mean_s"] + frac * wait
        out["ttft_mean_s"] = m["ttft_mean_s"] + frac * wait
        out["e2e_p95_s"] = m["e2e_p95_s"] + tail
        out["ttft_p95_s"] = m["ttft_p95_s"] + tail
        out["tokens_per_s"] = m["tokens_per_s"] * (1.0 - self.slowdown * frac)
        out["late_frac"] = m["late_frac"] + (1 - m["late_frac"]) * frac * np.minimum(wait / self.slo_s, 1.0)
        return out
