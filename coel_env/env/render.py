"""Rendering: `ansi` (a text summary of the deployment) and `rgb_array` (layers x experts heatmaps + link loads)."""

from __future__ import annotations

import numpy as np

from coel_env.world.cluster import GB, TIERS


def _link_load(env) -> np.ndarray:
    """Fraction of each physical link's capacity (both directions of a full-duplex link) used in the last window
    (zeros before the first step)."""
    c, core = env.cluster, env.core
    rec = core.last_record
    if rec is None or "link_bytes" not in rec.served:
        return np.zeros(c.num_links)
    cap = 2.0 * np.maximum(c.link_bw * core.states.link_factor[0], 1.0) * core.window  # link_bytes: both ways
    return np.asarray(rec.served["link_bytes"][0]) / cap


def render_ansi(env) -> str:
    c, core = env.cluster, env.core
    pb = core.plans
    dev, tier, bits = pb.dev[0], pb.tier[0], pb.bits[0]
    gpu, cpu, ssd = (u[0] for u in core.usage)
    cap = core._gpu_cap()[0]
    up = core.states.server_up[0]
    valid = dev >= 0
    lines = [
        f"CoEL-v0 | {c.spec.name} | epoch {int(core.states.epoch[0])}/{core.max_epochs} | "
        f"servers up {int(up.sum())}/{c.num_servers} | replicas {int(valid.sum())} for "
        f"{dev.shape[0] * dev.shape[1]} experts"
    ]
    for d, name in enumerate(c.device_names):
        on = valid & (dev == d)
        per_tier = [int((on & (tier == t)).sum()) for t in range(3)]
        bh = " ".join(f"{b}b:{int((on & (bits == b)).sum())}" for b in (16, 8, 4))
        state = "up" if up[c.dev_server[d]] else "DOWN"
        lines.append(
            f"  {name:<16} {state:<4} gpu {per_tier[0]:>5} cpu {per_tier[1]:>5} ssd {per_tier[2]:>5} | {bh} "
            f"| GPU {gpu[d] / GB:6.2f}/{cap[d] / GB:6.2f} GB"
        )
    for s, name in enumerate(c.server_names):
        lines.append(
            f"  {name:<16} CPU RAM {cpu[s] / GB:6.2f}/{c.cpu_expert_capacity[s] / GB:6.2f} GB SSD {ssd[s] / GB:6.2f} GB"
        )
    if c.num_pairs:
        comp = ", ".join(
            f"{c.server_names[a]}-{c.server_names[b]} prune {pb.prune[0, p]:.1f}{' +fuse' if pb.fuse[0, p] else ''}"
            for p, (a, b) in enumerate(c.pair_servers)
        )
        lines.append(f"  compression: {comp}")
    load = _link_load(env)
    if load.size:
        lines.append("  link load: " + ", ".join(f"{a}-{b} {x:.0%}" for (a, b), x in zip(c.link_ends, load)))
    rec = core.last_record
    if rec is not None:
        f = rec.served
        lines.append(
            f"  last epoch: e2e mean {f['e2e_mean_s'][0]:.2f}s p95 {f['e2e_p95_s'][0]:.2f}s | "
            f"{f['tokens_per_s'][0]:.1f} tok/s | late {f['late_frac'][0]:.1%} | dropped "
            f"{f['dropped_frac'][0]:.1%} | migration {float(np.asarray(rec.migration_time_s)[0]):.2f}s"
        )
    return "\n".join(lines) + "\n"


def render_rgb(env) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap

    c, core = env.cluster, env.core
    pb = core.plans
    dev, tier, bits = pb.dev[0], pb.tier[0], pb.bits[0]
    L, E, R = dev.shape
    # one column per (expert, replica) so replicas stay visible; empty slots are white
    grid_dev = np.where(dev >= 0, dev, -1).reshape(L, E * R).astype(float)
    grid_tier = np.where(dev >= 0, tier, -1).reshape(L, E * R).astype(float)
    grid_bits = np.where(dev >= 0, bits, 0).reshape(L, E * R).astype(float)
    D = c.num_devices
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2), gridspec_kw={"width_ratios": [3, 3, 3, 1.4]}, dpi=80)
    base = plt.get_cmap("tab10" if D <= 10 else "turbo")
    dcols = ["white"] + [base(i / max(D - 1, 1)) if D > 10 else base(i) for i in range(D)]
    panels = [
        (
            grid_dev,
            ListedColormap(dcols),
            BoundaryNorm(np.arange(-1.5, D), D + 1),
            "device",
            [-1, *range(D)],
            ["empty", *c.device_names],
        ),
        (
            grid_tier,
            ListedColormap(["white", "#2ca02c", "#ff7f0e", "#7f7f7f"]),
            BoundaryNorm([-1.5, -0.5, 0.5, 1.5, 2.5], 4),
            "tier",
            [-1, 0, 1, 2],
            ["empty", *TIERS],
        ),
        (
            grid_bits,
            ListedColormap(["white", "#fdae61", "#abd9e9", "#2c7bb6"]),
            BoundaryNorm([-1, 2, 6, 12, 17], 4),
            "bits",
            [0, 4, 8, 16],
            ["empty", "4", "8", "16"],
        ),
    ]
    for ax, (grid, cmap, norm, title, ticks, labels) in zip(axes[:3], panels):
        im = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        ax.set_title(f"{title} (layers x experts·replicas)", fontsize=9)
        ax.set_xlabel("expert (x replica slot)", fontsize=8)
        ax.set_ylabel("MoE layer", fontsize=8)
        cb = fig.colorbar(im, ax=ax, ticks=ticks, fraction=0.05, pad=0.02)
        cb.ax.set_yticklabels(labels if len(labels) <= 12 else [""] * len(labels), fontsize=7)
    load = _link_load(env)
    ax = axes[3]
    names = [f"{a}-{b}" for a, b in c.link_ends]
    if load.size:
        ax.barh(np.arange(len(load))[:24], np.minimum(load[:24], 1.5), color="#d62728")
        ax.set_yticks(np.arange(len(load))[:24], names[:24], fontsize=7)
        ax.set_xlim(0, max(1.0, float(load[:24].max(initial=0)) * 1.1))
    ax.set_title("link load (last window)", fontsize=9)
    ax.axvline(1.0, color="k", lw=0.8, ls="--")
    up = core.states.server_up[0]
    fig.suptitle(
        f"CoEL-v0 {c.spec.name} | epoch {int(core.states.epoch[0])} | servers up {int(up.sum())}/{c.num_servers}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return img
