"""Calibrate the surrogate from the real backend and report its fidelity.

    python -m experiments.calibrate                                  # CPU/gloo profile + fidelity (tiny variants)
    python -m experiments.calibrate scenario=tiny fidelity.plans=8   # another base scenario (a conf/scenario option)
    python -m experiments.calibrate profile=h100 device=cuda fidelity.enabled=false quality.enabled=false

1. micro sweeps on real_backend's own modules: expert matmul vs tokens x bits, attention vs context, the link
   shaper and gloo messages (α/β), tier fetches (CPU memory, SSD file);
2. fits: roofline (bandwidth, FLOP/s, per-expert overhead, dequant slowdowns), α/β, tier bandwidths; quality loss
   per bit-width and per prune/fusion setting from real-backend runs (top-1 disagreement with the 16-bit model);
   a regression of the per-layer, per-expert and per-message overheads on end-to-end real-backend windows;
3. writes conf/hardware/<profile>.yaml, sweeps.json; then fidelity.json + fidelity.png on held-out plans.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from coel_env.atomic import atomic_path, atomic_write_json, atomic_write_text
from coel_env.backend.surrogate import SurrogateBackend
from coel_env.errors import CoELError, ConfigError
from coel_env.plan.deployment import DeploymentPlan
from coel_env.specs.hardware import HardwareProfile, QualityModel
from coel_env.specs.scenario import scenario_from_dict
from coel_env.world.cluster import build_cluster
from experiments.calib import fidelity as fid
from experiments.calib import fit
from experiments.calib.micro import _arr, base_profile, micro
from experiments.calib.profile import write_profile
from experiments.cli_checks import error_line, optional_seconds, require_int, require_positive

ROOT = Path(__file__).resolve().parents[1]


def measure_plans(
    spec_dict: dict,
    profile: HardwareProfile,
    plans: dict[str, DeploymentPlan],
    cfg: DictConfig,
    window_s: float,
    log,
    repeats: int = 0,
) -> list[dict]:
    """Real measurement + surrogate prediction of every plan (one RealBackend for the scenario)."""
    from real_backend import RealBackend

    sc = fid.with_profile(spec_dict, profile, cfg.seed)
    state = sc.initial_state(np.random.default_rng(cfg.seed))
    sur = SurrogateBackend(sc.cluster)
    rows = []
    rb = RealBackend(sc.cluster, seed=cfg.seed, timeout_s=120, threads=cfg.threads)
    try:
        first = next(iter(plans.values()))
        rb.reset(first, state)
        for i, (name, plan) in enumerate(plans.items()):
            t0 = time.perf_counter()
            row = fid.measure(
                rb, sur, plan, state, window_s, elem_bytes=4 if cfg.device == "cpu" else 2, repeat=i < repeats
            )
            row.update(
                scenario=sc.name,
                plan=name,
                device=plan.device.tolist(),
                tier=plan.tier.tolist(),
                bits=plan.bits.tolist(),
                prune=plan.prune.tolist(),
                fuse=plan.fuse.tolist(),
            )
            rows.append(row)
            log(
                f"  {sc.name}/{name}: real tpot {row['real']['tpot_mean_s'] * 1e3:.1f} ms pred "
                f"{row['pred']['tpot_mean_s'] * 1e3:.1f} ms ({time.perf_counter() - t0:.1f} s)"
            )
    finally:
        rb.close()
    return rows


def plan_from_row(row: dict) -> DeploymentPlan:
    return DeploymentPlan(
        np.array(row["device"], dtype=np.int16),
        np.array(row["tier"], dtype=np.int8),
        np.array(row["bits"], dtype=np.int8),
        np.array(row["prune"], dtype=np.float32),
        np.array(row["fuse"], dtype=bool),
    )


OVERHEADS = ("layer_overhead_s", "expert_overhead_s", "transfer_latency_s")


def predict_rows(
    profile: HardwareProfile, spec_dicts: dict[str, dict], rows: list[dict], seed: int
) -> dict[str, np.ndarray]:
    """Surrogate predictions of `rows` (their plans at their realized arrival rates) under `profile`."""
    from coel_env.world.state import Scenario

    out = {k: [] for k in fid.SCALARS}
    out["link_bytes"] = []
    cache = {}
    for row in rows:
        name = row["scenario"]
        if name not in cache:
            sc = Scenario(scenario_from_dict(dict(spec_dicts[name]), name), seed=seed, hardware=profile)
            st = sc.initial_state(np.random.default_rng(seed))
            cache[name] = (SurrogateBackend(build_cluster(sc.spec, profile)), st)
        sur, st = cache[name]
        m = fid.replay(sur, plan_from_row(row), st, row["workload"], row["window_s"])
        for k in fid.SCALARS:
            out[k].append(getattr(m, k))
        out["link_bytes"].append(m.link_bytes)
    return {k: (np.array(v) if k != "link_bytes" else v) for k, v in out.items()}


def fit_overheads(profile: HardwareProfile, spec_dicts: dict, rows: list[dict], seed: int) -> HardwareProfile:
    """Regress the per-layer, per-expert and per-message overheads (and, for servers sharing host cores, the
    oversubscription exponent) on measured TTFT and TPOT (log residuals)."""
    meas = np.concatenate([[r["real"]["ttft_mean_s"] for r in rows], [r["real"]["tpot_mean_s"] for r in rows]])
    names = OVERHEADS + (("oversubscription_exponent",) if profile.host_cores else ())

    def make(x):
        return profile.model_copy(update=dict(zip(names, np.exp(x).tolist())))

    def predict(x):
        p = predict_rows(make(x), spec_dicts, rows, seed)
        return np.concatenate([p["ttft_mean_s"], p["tpot_mean_s"]])

    x0 = np.log([1e-3, max(profile.expert_overhead_s, 1e-5), max(profile.transfer_latency_s, 1e-5), 1.0])
    lo, hi = np.log([1e-7, 1e-7, 1e-7, 1e-2]), np.log([1.0, 1.0, 1.0, 10.0])
    n = len(names)
    x, _ = fit.fit_black_box(predict, meas, x0[:n], lo[:n], hi[:n])
    return make(x)


def training_plans(spec_dict: dict, profile: HardwareProfile, cfg: DictConfig) -> dict[str, DeploymentPlan]:
    """The regression's plans on one scenario: uniform, every expert twice, and random plans (seeds disjoint from
    the held-out ones)."""
    sc = fid.with_profile(spec_dict, profile, cfg.seed)
    rng = np.random.default_rng(10_000 + cfg.seed)
    plans = {"uniform": DeploymentPlan.uniform(sc.cluster)}
    rep = plans["uniform"].copy()  # every expert twice: more of the tokens stay home
    rep.device[..., 1] = (rep.device[..., 0] + 1) % sc.cluster.num_devices
    rep.tier[..., 1], rep.bits[..., 1] = 0, rep.bits[..., 0]
    plans["replicated"] = rep
    for i in range(cfg.e2e.train_plans):
        plans[f"train{i}"] = fid.random_plan(sc.cluster, rng)
    for i in range(cfg.e2e.fast_plans):
        plans[f"fast{i}"] = full_precision_gpu(fid.random_plan(sc.cluster, rng), sc.cluster)
    return plans


def full_precision_gpu(plan: DeploymentPlan, cluster) -> DeploymentPlan:
    """`plan` with every replica 16-bit in GPU memory (the real backend's grouped fast path, the placements the
    baselines choose), its placement and compression kept; the original plan if that does not fit."""
    out = plan.copy()
    held = out.device >= 0
    out.tier[held], out.bits[held] = 0, 16
    return plan if out.problems(cluster) else out


def quality_runs(cfg: DictConfig, spec_dict: dict, profile: HardwareProfile, log) -> tuple[QualityModel, list]:
    """Quality loss (1 - top-1 agreement of prompt logits with the 16-bit model) per bit-width and per
    prune/fusion setting on the base scenario; fitted into a QualityModel."""
    sc = fid.with_profile(spec_dict, profile, cfg.seed)
    c = sc.cluster
    base = DeploymentPlan.uniform(c)
    base.bits[base.device >= 0] = 16
    plans = {}
    for b in (8, 4):
        p = base.copy()
        p.bits[p.device >= 0] = b
        plans[f"bits{b}"] = p
    for r in cfg.quality.prune:
        p = base.copy()
        p.prune[:] = r
        plans[f"prune{r}"] = p
    p = base.copy()
    p.fuse[:] = True
    plans["fuse"] = p
    rows = measure_plans(spec_dict, profile, plans, cfg, cfg.quality.window_s, log)
    # share of routed expert mass that crosses a link under the uniform plan (what prune/fusion act on)
    state = sc.initial_state(np.random.default_rng(cfg.seed))
    home = c.dev_server[base.device[..., 0]]  # [L, E]
    pop = state.popularity  # [S, L, E]
    w = state.arrival_rate / state.arrival_rate.sum()
    cross = float(sum(w[s] * pop[s][home != s].sum() / pop[s].sum() for s in range(c.num_servers)))
    q = {r["plan"]: r["real"]["quality_loss"] for r in rows}
    prune_r = np.array(list(cfg.quality.prune), dtype=np.float64)
    knee = QualityModel().prune_knee
    lin, quad = fit.fit_prune_loss(prune_r, np.array([q[f"prune{r}"] for r in cfg.quality.prune]) / cross, knee)
    frac = QualityModel().fusion_fraction
    model = QualityModel(
        loss_per_bits={16: 0.0, 8: q["bits8"], 4: q["bits4"]},
        prune_linear=lin,
        prune_knee=knee,
        prune_quadratic=quad,
        fusion_loss=q["fuse"] / cross / frac,
        fusion_fraction=frac,
    )
    return model, [{"plan": r["plan"], "quality_loss": r["real"]["quality_loss"], "kl": r["kl"]} for r in rows] + [
        {"cross_fraction": cross}
    ]


def summarize(rows: list[dict]) -> dict:
    """Fidelity numbers: per metric MAPE / max error / Spearman, link bytes, memory and quality."""
    out = {}
    for k in fid.SCALARS:
        out[k] = fit.error_stats(_arr([r["pred"] for r in rows], k), _arr([r["real"] for r in rows], k))
    out["quality_loss"]["mae"] = float(
        np.mean(
            np.abs(_arr([r["pred"] for r in rows], "quality_loss") - _arr([r["real"] for r in rows], "quality_loss"))
        )
    )
    lb_p = np.concatenate([r["pred_link_bytes"] for r in rows])
    lb_r = np.concatenate([r["real_link_bytes"] for r in rows])
    lb_c = np.concatenate([r["count_link_bytes"] for r in rows])
    out["link_bytes"] = fit.error_stats(lb_p, lb_r)
    out["link_bytes_wire_format_exact"] = bool(np.array_equal(lb_c, lb_r))
    out["link_bytes_wire_format_max_abs_err"] = float(np.abs(lb_c - lb_r).max()) if len(lb_r) else 0.0
    for i, t in enumerate(("gpu", "cpu", "ssd")):
        out[f"memory_{t}"] = fit.error_stats([r["pred_mem"][i] for r in rows], [r["real_mem"][i] for r in rows])
        out[f"memory_{t}"]["exact"] = bool(all(r["pred_mem"][i] == r["real_mem"][i] for r in rows))
    out["by_scenario"] = {
        name: {
            k: fit.error_stats(
                _arr([r["pred"] for r in rows if r["scenario"] == name], k),
                _arr([r["real"] for r in rows if r["scenario"] == name], k),
            )
            for k in fid.LATENCY
        }
        for name in sorted({r["scenario"] for r in rows})
    }
    rep = [r for r in rows if "real_repeat" in r]
    if rep:  # the same requests served twice: the real measurement's own spread (a floor for any model's error)
        again, first = [r["real_repeat"] for r in rep], [r["real"] for r in rep]
        out["noise_floor"] = {k: fit.error_stats(_arr(again, k), _arr(first, k)) for k in fid.LATENCY}
    out["plans"] = len(rows)
    out["scenarios"] = sorted({r["scenario"] for r in rows})
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["ttft_mean_s", "tpot_mean_s", "e2e_mean_s", "tokens_per_s"]
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4 * (len(keys) + 1), 4))
    scen = sorted({r["scenario"] for r in rows})
    for ax, k in zip(axes, keys):
        for s in scen:
            rr = [r for r in rows if r["scenario"] == s]
            ax.scatter(_arr([r["real"] for r in rr], k), _arr([r["pred"] for r in rr], k), s=12, label=s)
        lo = min(min(r["real"][k] for r in rows), min(r["pred"][k] for r in rows))
        hi = max(max(r["real"][k] for r in rows), max(r["pred"][k] for r in rows))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set(xlabel=f"measured {k}", ylabel="predicted", title=k)
    ax = axes[-1]
    ax.scatter(
        np.concatenate([r["real_link_bytes"] for r in rows]), np.concatenate([r["pred_link_bytes"] for r in rows]), s=8
    )
    ax.set(xlabel="measured link bytes", ylabel="predicted", title="bytes per link")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def check_values(cfg: DictConfig) -> None:
    """Refuse bad numbers before any sweep runs (one line naming the field)."""
    require_int(cfg.seed, "seed", minimum=0)
    require_int(cfg.threads, "threads", minimum=1)
    require_int(cfg.sweeps.reps, "sweeps.reps", minimum=1)
    require_int(cfg.e2e.train_plans, "e2e.train_plans", minimum=0)
    require_int(cfg.e2e.fast_plans, "e2e.fast_plans", minimum=0)
    require_int(cfg.fidelity.plans, "fidelity.plans", minimum=1)
    require_int(cfg.fidelity.repeats, "fidelity.repeats", minimum=0)
    for field in ("e2e.window_s", "quality.window_s", "fidelity.window_s"):
        require_positive(OmegaConf.select(cfg, field), field)  # a None is refused too
        optional_seconds(OmegaConf.select(cfg, field), field)
    if cfg.device not in ("cpu", "cuda"):
        raise ConfigError(f"device: '{cfg.device}' unknown; allowed: cpu, cuda")


def run(cfg: DictConfig) -> dict:
    """Sweeps, fits, the profile and (on CPU) the fidelity report; `cfg.scenario_name` is the base scenario."""
    check_values(cfg)
    torch.set_num_threads(cfg.threads)
    out = ROOT / cfg.out_dir if not Path(cfg.out_dir).is_absolute() else Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    variants = fid.scenario_variants(cfg.scenario_name)
    for field in ("e2e.scenarios", "fidelity.scenarios"):
        unknown = [n for n in OmegaConf.select(cfg, field) if n not in variants]
        if unknown:
            raise ConfigError(f"calibrate: {field} {unknown} unknown; allowed: {', '.join(variants)}")
    base_spec = variants[cfg.scenario_name]
    from coel_env.world.state import Scenario

    base = Scenario(scenario_from_dict(dict(base_spec), cfg.scenario_name), seed=cfg.seed)
    log("micro sweeps")
    raw, fits = micro(cfg, base)
    profile = base_profile(cfg, base, fits)
    log(f"micro fits: {json.dumps(fits['expert_roofline'])}")
    report = {"command": "python -m experiments.calibrate " + " ".join(cfg.get("overrides", [])), "fits": fits}
    if cfg.device == "cpu":
        if cfg.quality.enabled:
            log("quality runs")
            qm, qrows = quality_runs(cfg, base_spec, profile, log)
            profile = profile.model_copy(update={"quality": qm})
            report["quality_runs"] = qrows
        log("end-to-end regression runs")
        train = []
        for name in cfg.e2e.scenarios:  # server counts on both sides of the host's core count
            train += measure_plans(
                variants[name], profile, training_plans(variants[name], profile, cfg), cfg, cfg.e2e.window_s, log
            )
        profile = fit_overheads(profile, variants, train, cfg.seed)
        report["overheads"] = {k: getattr(profile, k) for k in (*OVERHEADS, "oversubscription_exponent")}
        tr = predict_rows(profile, variants, train, cfg.seed)
        report["train_fit"] = {k: fit.error_stats(tr[k], _arr([r["real"] for r in train], k)) for k in fid.LATENCY}
        report["train_rows"] = train  # the regression's windows (refits offline: `fit_overheads` on them)
        log(f"overheads {report['overheads']} train fit {report['train_fit']}")
    header = (
        f"Hardware profile '{cfg.profile}' measured by experiments.calibrate (device={cfg.device}).\n"
        f"Micro sweeps + regression on real-backend windows; details in {cfg.out_dir}/sweeps_{cfg.profile}.json"
    )
    if cfg.write_profile:
        path = write_profile(profile, header)
        log(f"wrote {path}")
    atomic_write_json(out / f"sweeps_{cfg.profile}.json", {"raw": raw, **report}, default=float)
    if cfg.device == "cpu" and cfg.fidelity.enabled:
        report["fidelity"] = fidelity(cfg, variants, profile, out, log)
    log("done")
    return report


def fidelity(cfg: DictConfig, variants: dict, profile: HardwareProfile, out: Path, log) -> dict:
    """Held-out plans (every baseline + random plans) over the scenario variants: fidelity.json + fidelity.png."""
    from coel_env.world.state import Scenario

    names = list(cfg.fidelity.scenarios)
    per = int(np.ceil(cfg.fidelity.plans / len(names)))
    rows = []
    for i, name in enumerate(names):
        sc = Scenario(scenario_from_dict(dict(variants[name]), name), seed=cfg.seed, hardware=profile)
        state = sc.initial_state(np.random.default_rng(cfg.seed))
        plans = fid.baseline_plans(sc, state, tuple(cfg.fidelity.baselines), cfg.seed)
        rng = np.random.default_rng(20_000 + 100 * i + cfg.seed)
        j = 0
        while len(plans) < per:
            plans[f"random_plan{j}"] = fid.random_plan(sc.cluster, rng)
            j += 1
        log(f"fidelity {name}: {len(plans)} plans")
        got = measure_plans(
            variants[name],
            profile,
            plans,
            cfg,
            cfg.fidelity.window_s,
            log,
            repeats=cfg.fidelity.repeats if i == 0 else 0,
        )
        rows += got
    summary = summarize(rows)
    summary["command"] = "python -m experiments.calibrate"
    summary["profile"] = profile.name
    atomic_write_json(out / "fidelity.json", {"summary": summary, "rows": rows}, default=float)
    plot(rows, out / "fidelity.png")
    atomic_write_text(out / "fidelity.md", fidelity_markdown(summary))
    log(f"fidelity: {json.dumps({k: summary[k] for k in ('ttft_mean_s', 'tpot_mean_s', 'e2e_mean_s')})}")
    return summary


def fidelity_markdown(summary: dict) -> str:
    """A markdown table of the fidelity summary."""
    lines = [
        f"# Surrogate fidelity ({summary['profile']}): {summary['plans']} held-out plans on "
        f"{', '.join(summary['scenarios'])}",
        "",
        "| metric | n | MAPE % | max error % | Spearman |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for k in (*fid.SCALARS, "link_bytes", "memory_gpu", "memory_cpu", "memory_ssd"):
        s = summary[k]
        lines.append(f"| {k} | {s['n']} | {s['mape_pct']:.1f} | {s['max_err_pct']:.1f} | {s['spearman']:.3f} |")
    if "noise_floor" in summary:
        lines += [
            "",
            "Noise floor (the same requests served twice, real vs real):",
            "",
            "| metric | n | MAPE % | max error % | Spearman |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for k, s in summary["noise_floor"].items():
            lines.append(f"| {k} | {s['n']} | {s['mape_pct']:.1f} | {s['max_err_pct']:.1f} | {s['spearman']:.3f} |")
    lines += [
        "",
        f"quality_loss MAE: {summary['quality_loss']['mae']:.4f}; link bytes from the dispatcher's wire "
        f"format equal the measured bytes: {summary['link_bytes_wire_format_exact']}; memory exact: "
        + ", ".join(f"{t} {summary[f'memory_{t}']['exact']}" for t in ("gpu", "cpu", "ssd")),
        "",
    ]
    return "\n".join(lines)


@hydra.main(version_base=None, config_path="../conf", config_name="calibrate")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    OmegaConf.set_struct(cfg, False)
    cfg.overrides = list(HydraConfig.get().overrides.task)
    cfg.scenario_name = HydraConfig.get().runtime.choices["scenario"]
    try:
        run(cfg)
    except CoELError as exc:
        raise SystemExit(error_line(exc, HydraConfig.get().runtime.output_dir)) from None


if __name__ == "__main__":
    main()
