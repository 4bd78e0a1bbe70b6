"""Fitting the surrogate's constants from sweep measurements (least squares; pure numpy/scipy, unit-tested)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.optimize import least_squares
from scipy.stats import kendalltau, spearmanr


def fit_alpha_beta(nbytes: np.ndarray, seconds: np.ndarray) -> tuple[float, float]:
    """(α seconds, β bytes/s) of t = α + bytes/β by ordinary least squares."""
    A = np.stack([np.ones_like(nbytes, dtype=np.float64), np.asarray(nbytes, dtype=np.float64)], 1)
    (alpha, inv_beta), *_ = np.linalg.lstsq(A, np.asarray(seconds, dtype=np.float64), rcond=None)
    return float(max(alpha, 0.0)), float(1.0 / max(inv_beta, 1e-30))


def roofline(
    params: np.ndarray, nbytes: np.ndarray, flops: np.ndarray, slow: np.ndarray, overlap: bool = False
) -> np.ndarray:
    """params = (c0, log BW, log F). Serial overhead (CPU, Python): t = c0 + max(bytes * slow / BW, flops / F);
    overlapped launch overhead (GPU, asynchronous kernels): t = max(c0, bytes * slow / BW, flops / F)."""
    c0, lbw, lf = params
    work = np.maximum(nbytes * slow / np.exp(lbw), flops / np.exp(lf))
    return np.maximum(c0, work) if overlap else c0 + work


def fit_roofline(
    nbytes: np.ndarray, flops: np.ndarray, bits: np.ndarray, seconds: np.ndarray, overlap: bool = False
) -> dict[str, float | dict[int, float]]:
    """Fit overhead c0, bandwidth BW, FLOP/s F and a per-bit-width slowdown of the read term (16 = 1) to an expert
    matmul sweep; log residuals, so small and large points weigh alike. Starts from robust estimates (fastest
    point for c0, best achieved bytes/s and FLOP/s at 16 bits, median time ratios for the slowdowns)."""
    nbytes, flops, seconds = (np.asarray(a, dtype=np.float64) for a in (nbytes, flops, seconds))
    bits = np.asarray(bits, dtype=np.int64)
    low = sorted(b for b in set(bits.tolist()) if b != 16)
    hi = bits == 16 if (bits == 16).any() else np.ones_like(bits, dtype=bool)
    c0 = float(seconds.min())
    bw0 = float(np.max(nbytes[hi] / seconds[hi]))
    f0 = float(np.max(flops[hi] / seconds[hi]))
    s0 = []
    for b in low:
        m = bits == b
        s0.append(float(np.log(max(np.median(seconds[m] * bw0 / nbytes[m]), 1e-3))))

    def model(x):
        slow = np.ones_like(seconds)
        for j, b in enumerate(low):
            slow[bits == b] = np.exp(x[3 + j])
        return roofline(x[:3], nbytes, flops, slow, overlap)

    x0 = np.array([c0 * (0.9 if overlap else 0.5), np.log(bw0), np.log(f0), *s0])
    lo = [0.0, x0[1] - 3, x0[2] - 3, *([-5.0] * len(low))]
    up = [max(seconds.max(), 1e-9), x0[1] + 3, x0[2] + 3, *([8.0] * len(low))]
    res = least_squares(lambda x: np.log(np.maximum(model(x), 1e-15) / seconds), np.clip(x0, lo, up), bounds=(lo, up))
    x = res.x
    return {
        "overhead_s": float(x[0]),
        "bandwidth_Bps": float(np.exp(x[1])),
        "flops": float(np.exp(x[2])),
        "slowdown": {16: 1.0, **{b: float(np.exp(x[3 + j])) for j, b in enumerate(low)}},
        "overlap": overlap,
        "rms_log_residual": float(np.sqrt(np.mean(res.fun**2))),
    }


def fit_prune_loss(ratio: np.ndarray, loss: np.ndarray, knee: float) -> tuple[float, float]:
    """(linear, quadratic) of loss = linear * r + quadratic * max(r - knee, 0)^2, non-negative least squares."""
    from scipy.optimize import nnls

    r = np.asarray(ratio, dtype=np.float64)
    A = np.stack([r, np.maximum(r - knee, 0.0) ** 2], 1)
    x, _ = nnls(A, np.asarray(loss, dtype=np.float64))
    return float(x[0]), float(x[1])


def fit_black_box(
    predict: Callable[[np.ndarray], np.ndarray],
    measured: np.ndarray,
    x0: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
) -> tuple[np.ndarray, float]:
    """Fit parameters of `predict(x) -> predictions` (same shape as `measured`) on log-ratios; returns (x, cost)."""
    measured = np.asarray(measured, dtype=np.float64)
    ok = measured > 0

    def resid(x):
        p = np.maximum(predict(x), 1e-12)
        return np.log(p[ok] / measured[ok])

    res = least_squares(resid, x0, bounds=(lower, upper), x_scale="jac")
    return res.x, float(res.cost)


def rank_corr(pred: np.ndarray, meas: np.ndarray) -> tuple[float, float]:
    """(Spearman ρ, Kendall τ) of prediction vs measurement; NaN for fewer than 3 points or a constant side."""
    pred, meas = np.asarray(pred, dtype=np.float64), np.asarray(meas, dtype=np.float64)
    if len(meas) < 3 or np.ptp(meas) == 0 or np.ptp(pred) == 0:
        return float("nan"), float("nan")
    return float(spearmanr(pred, meas).statistic), float(kendalltau(pred, meas).statistic)


def error_stats(pred: np.ndarray, meas: np.ndarray) -> dict[str, float]:
    """MAPE (%), median / p95 / max |relative error| (%), Spearman and Kendall rank correlations and the count of
    prediction vs measurement (pairs with a finite prediction and a non-zero measurement)."""
    pred, meas = np.asarray(pred, dtype=np.float64), np.asarray(meas, dtype=np.float64)
    ok = np.isfinite(pred) & np.isfinite(meas) & (np.abs(meas) > 0)
    if not ok.any():
        keys = ("mape_pct", "p50_err_pct", "p95_err_pct", "max_err_pct", "spearman", "kendall")
        return {"n": 0, **dict.fromkeys(keys, float("nan"))}
    rel = 100 * np.abs(pred[ok] - meas[ok]) / np.abs(meas[ok])
    rho, tau = rank_corr(pred[ok], meas[ok])
    return {
        "n": int(ok.sum()),
        "mape_pct": float(rel.mean()),
        "p50_err_pct": float(np.percentile(rel, 50)),
        "p95_err_pct": float(np.percentile(rel, 95)),
        "max_err_pct": float(rel.max()),
        "spearman": rho,
        "kendall": tau,
    }
