"""rliable-style statistics (Agarwal et al. 2021, "Deep RL at the Edge of the Statistical Precipice") with numpy and
scipy only: the `rliable` package pulls pandas, statsmodels, arch and seaborn, so its three estimators are
re-implemented here.

Scores are arrays [runs, tasks] (runs = test instances, tasks = scenarios; a 1-D array is one task).

- `iqm`: interquartile mean (the mean of the middle 50% of all scores, `scipy.stats.trim_mean(·, 0.25)`).
- `stratified_bootstrap_ci`: percentile bootstrap resampling runs *within each task* (rliable's stratified
  bootstrap); a percentile interval never leaves the range of the data, so bounded metrics keep their bounds.
- `probability_of_improvement`: P(X > Y), the Mann-Whitney U statistic / (n m) per task (ties count 1/2), averaged
  over tasks, with its stratified bootstrap interval.
- `paired_difference`: the mean of per-instance differences X_i - Y_i (same instances: same routing model, same
  state trajectory), a Student-t 95% interval and the paired t-test p-value; `tied` when the interval holds 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats

REPS = 2000  # bootstrap resamples


def _2d(x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    return a[:, None] if a.ndim == 1 else a


def iqm(scores) -> float:
    """Interquartile mean of all finite scores."""
    a = _2d(scores).ravel()
    a = a[np.isfinite(a)]
    return float(stats.trim_mean(a, 0.25)) if a.size else float("nan")


def mean(scores) -> float:
    a = _2d(scores).ravel()
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def _resample(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One stratified bootstrap sample: runs redrawn with replacement inside each task (column)."""
    n, t = a.shape
    idx = rng.integers(0, n, size=(n, t))
    return np.take_along_axis(a, idx, axis=0)


def stratified_bootstrap_ci(
    scores, statistic: Callable[[np.ndarray], float] = iqm, reps: int = REPS, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """(point estimate, lower, upper) of `statistic` with a (1 - alpha) percentile stratified bootstrap interval."""
    a = _2d(scores)
    point = statistic(a)
    if a.shape[0] < 2 or not np.isfinite(point):
        return point, point, point
    rng = np.random.default_rng(seed)
    if statistic in (mean, iqm) and np.isfinite(a).all():  # vectorized: every resample at once
        n, t = a.shape
        idx = rng.integers(0, n, size=(reps, n, t))
        samples = a[idx, np.arange(t)[None, None, :]].reshape(reps, n * t)
        boot = samples.mean(1) if statistic is mean else stats.trim_mean(samples, 0.25, axis=1)
    else:
        boot = np.array([statistic(_resample(a, rng)) for _ in range(reps)])
    lo, hi = np.nanpercentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return point, float(lo), float(hi)


def _poi(x: np.ndarray, y: np.ndarray) -> float:
    vals = []
    for t in range(x.shape[1]):
        a, b = x[:, t][:, None], y[:, t][None, :]
        vals.append(float(((a > b) + 0.5 * (a == b)).mean()))
    return float(np.mean(vals))


def probability_of_improvement(
    x, y, reps: int = REPS, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """P(X > Y) averaged over tasks, with a stratified bootstrap interval (x and y resampled independently)."""
    a, b = _2d(x), _2d(y)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"probability_of_improvement: {a.shape[1]} vs {b.shape[1]} tasks")
    point = _poi(a, b)
    if min(a.shape[0], b.shape[0]) < 2:
        return point, point, point
    rng = np.random.default_rng(seed)
    n, m, t = a.shape[0], b.shape[0], a.shape[1]
    cols = np.arange(t)[None, None, :]
    xa = a[rng.integers(0, n, size=(reps, n, t)), cols]  # [reps, n, t]
    yb = b[rng.integers(0, m, size=(reps, m, t)), cols]
    gt = (xa[:, :, None, :] > yb[:, None, :, :]) + 0.5 * (xa[:, :, None, :] == yb[:, None, :, :])
    boot = gt.mean((1, 2)).mean(-1)
    lo, hi = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return point, float(lo), float(hi)


@dataclass(frozen=True)
class Paired:
    mean: float
    lo: float
    hi: float
    p_value: float
    n: int

    @property
    def tied(self) -> bool:
        """The 95% interval holds 0 (or there are too few pairs to tell)."""
        return not (self.lo > 0 or self.hi < 0)

    @property
    def verdict(self) -> str:
        return "tie" if self.tied else ("better" if self.mean > 0 else "worse")


def paired_difference(x, y, alpha: float = 0.05) -> Paired:
    """Mean of x_i - y_i over paired instances (all tasks pooled), Student-t interval and paired t-test p-value."""
    d = (_2d(x) - _2d(y)).ravel()
    d = d[np.isfinite(d)]
    n = len(d)
    if n == 0:
        return Paired(float("nan"), float("nan"), float("nan"), float("nan"), 0)
    m = float(d.mean())
    if n < 2:
        return Paired(m, -np.inf, np.inf, 1.0, n)
    se = float(d.std(ddof=1) / np.sqrt(n))
    if se == 0:
        return Paired(m, m, m, 0.0 if m else 1.0, n)
    h = float(stats.t.ppf(1 - alpha / 2, n - 1) * se)
    p = float(2 * stats.t.sf(abs(m) / se, n - 1))
    return Paired(m, m - h, m + h, p, n)
