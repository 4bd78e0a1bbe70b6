"""The fidelity report of held-out rows (measured + predicted): summary numbers, headline keys, Markdown, plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from coel_env.atomic import atomic_path
from experiments.calib import fidelity as fid
from experiments.calib import fit
from experiments.calib.micro import _arr

BREAKDOWN = (*fid.LATENCY, *fid.LATENCY_P95, "tokens_per_s")  # per scenario / per workload
TIERS = ("gpu", "cpu", "ssd")


def load_of(row: dict) -> str:
    """The row's workload name (rows of runs before named workloads: the scenario's own)."""
    return row.get("load", "scenario")


def metric_stats(rows: list[dict], keys: tuple[str, ...]) -> dict:
    """error_stats of predicted vs measured for each of `keys`."""
    return {k: fit.error_stats(_arr([r["pred"] for r in rows], k), _arr([r["real"] for r in rows], k)) for k in keys}


def grouped(rows: list[dict], key) -> dict:
    """metric_stats(BREAKDOWN) of the rows sharing each value of `key(row)`."""
    groups = sorted({key(r) for r in rows})
    return {g: metric_stats([r for r in rows if key(r) == g], BREAKDOWN) for g in groups}


def headline(summary: dict) -> dict:
    """The latency headline: MAPE (%), Spearman and Kendall averaged over mean TTFT, TPOT and e2e latency (NaN
    for a statistic the summary lacks)."""
    out = {}
    for s in ("mape_pct", "spearman", "kendall"):
        v = np.array([summary[k].get(s, np.nan) for k in fid.LATENCY], dtype=np.float64)
        out[f"latency_{s}"] = float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else float("nan")
    return out


def summarize(rows: list[dict]) -> dict:
    """Fidelity numbers of held-out rows: per metric MAPE / p50 / p95 / max error and Spearman / Kendall, bytes per
    link, memory per tier, quality, per scenario and per workload, and the noise floor of repeated windows."""
    out = metric_stats(rows, fid.SCALARS)
    q_p, q_r = _arr([r["pred"] for r in rows], "quality_loss"), _arr([r["real"] for r in rows], "quality_loss")
    out["quality_loss"]["mae"] = float(np.mean(np.abs(q_p - q_r)))
    lb_p = np.concatenate([r["pred_link_bytes"] for r in rows])
    lb_r = np.concatenate([r["real_link_bytes"] for r in rows])
    lb_c = np.concatenate([r["count_link_bytes"] for r in rows])
    out["link_bytes"] = fit.error_stats(lb_p, lb_r)
    out["link_bytes_wire_format_exact"] = bool(np.array_equal(lb_c, lb_r))
    out["link_bytes_wire_format_max_abs_err"] = float(np.abs(lb_c - lb_r).max()) if len(lb_r) else 0.0
    for i, t in enumerate(TIERS):
        out[f"memory_{t}"] = fit.error_stats([r["pred_mem"][i] for r in rows], [r["real_mem"][i] for r in rows])
        out[f"memory_{t}"]["exact"] = bool(all(r["pred_mem"][i] == r["real_mem"][i] for r in rows))
    out["by_scenario"] = grouped(rows, lambda r: r["scenario"])
    out["by_workload"] = grouped(rows, load_of)
    for ld, st in out["by_workload"].items():  # how full the batches ran (the busiest server's mean batch)
        st["mean_batch"] = float(np.mean([max(r.get("mean_batch") or [0.0]) for r in rows if load_of(r) == ld]))
    rep = [r for r in rows if "real_repeat" in r]
    if rep:  # the same requests served twice: the real measurement's own spread (a floor for any model's error)
        again, first = [r["real_repeat"] for r in rep], [r["real"] for r in rep]
        keys = [k for k in (*fid.LATENCY, *fid.LATENCY_P95) if all(k in r for r in first)]
        out["noise_floor"] = {k: fit.error_stats(_arr(again, k), _arr(first, k)) for k in keys}
    out["windows"] = len(rows)
    out["plans"] = len({(r["scenario"], r["plan"]) for r in rows})
    out["scenarios"] = sorted({r["scenario"] for r in rows})
    out["workloads"] = sorted({load_of(r) for r in rows})
    return out


def json_text(head: dict, rows: list[dict]) -> str:
    """`head` as indented JSON plus a "rows" list of one compact object a line (a GPU run's rows hold the full
    model's plan arrays and popularity: this keeps the file a few MB and its diffs readable)."""
    text = json.dumps(head, indent=1, default=float)
    body = ",\n".join(json.dumps(r, default=float) for r in rows)
    return text[: text.rindex("}")].rstrip() + ',\n "rows": [\n' + body + "\n ]\n}\n"


def _row(name: str, s: dict) -> str:
    cells = [s["mape_pct"], s.get("p50_err_pct", np.nan), s.get("p95_err_pct", np.nan), s["max_err_pct"]]
    corr = [s["spearman"], s.get("kendall", np.nan)]
    return (
        f"| {name} | {s['n']} | "
        + " | ".join(f"{c:.1f}" for c in cells)
        + " | "
        + " | ".join(f"{c:.3f}" for c in corr)
        + " |"
    )


HEADER = [
    "| metric | n | MAPE % | p50 err % | p95 err % | max err % | Spearman | Kendall |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
]


def breakdown_table(title: str, groups: dict) -> list[str]:
    """Latency MAPE / Spearman of each group (scenario or workload) as a Markdown table."""
    keys = (*fid.LATENCY, "tokens_per_s")
    lines = ["", f"{title} (MAPE % / Spearman):", "", f"| {title.split()[-1]} | " + " | ".join(keys) + " |"]
    lines.append("| --- |" + " ---: |" * len(keys))
    for g, st in groups.items():
        cells = [f"{st[k]['mape_pct']:.1f} / {st[k]['spearman']:.2f}" for k in keys]
        batch = f" (busiest server's mean batch {st['mean_batch']:.2f})" if "mean_batch" in st else ""
        lines.append(f"| {g}{batch} | " + " | ".join(cells) + " |")
    return lines


def markdown(summary: dict) -> str:
    """A Markdown summary of the fidelity report (the command, the headline, the tables)."""
    lines = [
        f"# Surrogate fidelity ({summary['profile']}): {summary['plans']} held-out plans, {summary['windows']} "
        f"windows on {', '.join(summary['scenarios'])}; workloads {', '.join(summary['workloads'])}",
        "",
        f"Command: `{summary['command']}`",
        "",
        f"Latency (mean TTFT, TPOT, e2e): MAPE {summary['latency_mape_pct']:.1f}%, Spearman "
        f"{summary['latency_spearman']:.3f}, Kendall {summary['latency_kendall']:.3f}",
        "",
        *HEADER,
    ]
    for k in (*fid.SCALARS, "link_bytes", *(f"memory_{t}" for t in TIERS)):
        lines.append(_row(k, summary[k]))
    lines += breakdown_table("By scenario", summary["by_scenario"])
    lines += breakdown_table("By workload", summary["by_workload"])
    if "noise_floor" in summary:
        lines += ["", "Noise floor (the same requests served twice, real vs real):", "", *HEADER]
        lines += [_row(k, s) for k, s in summary["noise_floor"].items()]
    lines += [
        "",
        f"quality_loss MAE: {summary['quality_loss']['mae']:.4f}; link bytes from the dispatcher's wire "
        f"format equal the measured bytes: {summary['link_bytes_wire_format_exact']}; memory exact: "
        + ", ".join(f"{t} {summary[f'memory_{t}']['exact']}" for t in TIERS),
    ]
    if summary.get("skipped"):
        lines += ["", f"Windows skipped (budget or server failures, see the rows file): {summary['skipped']}"]
    return "\n".join(lines) + "\n"


PLOT_KEYS = ("ttft_mean_s", "tpot_mean_s", "e2e_mean_s", "e2e_p95_s", "tokens_per_s")
MARKERS = {"scenario": "o", "light": "^", "saturating": "s"}


def plot(rows: list[dict], path: Path) -> bool:
    """Predicted vs measured per metric (colour: scenario, marker: workload) and bytes per link, as a PNG; False
    (nothing written) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOT_KEYS) + 1, figsize=(4 * (len(PLOT_KEYS) + 1), 4))
    scen = sorted({r["scenario"] for r in rows})
    colors = {s: f"C{i}" for i, s in enumerate(scen)}
    for ax, k in zip(axes, PLOT_KEYS):
        for (s, ld), rr in _groups(rows).items():
            ax.scatter(
                _arr([r["real"] for r in rr], k),
                _arr([r["pred"] for r in rr], k),
                s=14,
                c=colors[s],
                marker=MARKERS.get(ld, "o"),
                label=f"{s} {ld}",
            )
        vals = np.concatenate([_arr([r["real"] for r in rows], k), _arr([r["pred"] for r in rows], k)])
        vals = vals[vals > 0]
        if len(vals):
            lo, hi = vals.min(), vals.max()
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            if hi > 10 * lo:
                ax.set(xscale="log", yscale="log")
        ax.set(xlabel=f"measured {k}", ylabel="predicted", title=k)
    ax = axes[-1]
    ax.scatter(
        np.concatenate([r["real_link_bytes"] for r in rows]), np.concatenate([r["pred_link_bytes"] for r in rows]), s=8
    )
    ax.set(xlabel="measured link bytes", ylabel="predicted", title="bytes per link")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return True


def _groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        out.setdefault((r["scenario"], load_of(r)), []).append(r)
    return out
