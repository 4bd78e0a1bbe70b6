"""Calibrate the surrogate from the real backend and report its fidelity.

    python -m experiments.calibrate                                  # CPU/gloo profile + fidelity (tiny variants)
    python -m experiments.calibrate scenario=tiny fidelity.plans=8   # another base scenario (a conf/scenario option)
    python -m experiments.calibrate --config-name calibrate_h200     # one H200: every server process on the GPU
    python -m experiments.calibrate --config-name calibrate_h200 rows_from=rows_h200.jsonl   # refit + report only
    python -m experiments.calibrate --config-name calibrate_h200 rows_from=... predict_with=h200   # no refit

1. micro sweeps on real_backend's own modules: expert matmul vs tokens x bits, attention vs context, the link
   shaper and gloo messages (α/β), tier fetches (CPU memory, SSD file);
2. fits: roofline (bandwidth, FLOP/s, per-expert overhead, dequant slowdowns), α/β, tier bandwidths; quality loss
   per bit-width and per prune/fusion setting from real-backend runs (top-1 disagreement with the 16-bit model);
3. end-to-end windows (calib/campaign.py): per scenario one real backend (on the GPU with device=cuda) serves its
   training plans and held-out plans, each under every workload of `workloads.names` (calib/workloads.py: the
   scenario's own rates, light, saturating); rows go to rows_<profile>.jsonl as they come, within `budget_s`;
4. a regression of the per-layer, per-expert and per-message overheads on the training windows -> the profile
   (conf/hardware/<profile>.yaml or profile_path), sweeps_<profile>.json; the held-out windows predicted by the
   fitted surrogate -> <fidelity.stem>.json (headline keys latency_mape_pct, latency_spearman), .md, .png.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Mapping
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from coel_env.atomic import atomic_write_json, atomic_write_text
from coel_env.backend.surrogate import SurrogateBackend
from coel_env.errors import CoELError, ConfigError
from coel_env.plan.deployment import DeploymentPlan
from coel_env.specs.hardware import HardwareProfile, QualityModel, load_hardware_profile
from coel_env.specs.scenario import scenario_from_dict
from coel_env.world.cluster import build_cluster
from experiments.calib import fidelity as fid
from experiments.calib import fit
from experiments.calib import report as rep
from experiments.calib.campaign import INSTALLS, Budget, Campaign, PlanJob, Priors, RowLog, ScenarioJob, read_rows
from experiments.calib.micro import _arr, base_profile, micro
from experiments.calib.profile import profile_dict, write_profile
from experiments.calib.workloads import build_loads, check_load_names
from experiments.cli_checks import (
    error_line,
    optional_seconds,
    require_int,
    require_nonnegative,
    require_positive,
)

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


OVERHEADS = (
    "layer_overhead_s",
    "prefill_layer_overhead_s",
    "ungrouped_layer_overhead_s",
    "expert_overhead_s",
    "transfer_latency_s",
    "shared_gpu_handoff_s",
)


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
    """Regress the per-layer overheads of decode and prefill steps and of layers on the per-expert path, the
    per-expert and per-message overheads (and, for servers sharing host cores, the oversubscription exponent) on
    measured TTFT and TPOT (log residuals)."""
    meas = np.concatenate([[r["real"]["ttft_mean_s"] for r in rows], [r["real"]["tpot_mean_s"] for r in rows]])
    # servers sharing host cores (the CPU rig): the oversubscription exponent, not GPU hand-offs
    names = (
        (*(n for n in OVERHEADS if n != "shared_gpu_handoff_s"), "oversubscription_exponent")
        if profile.host_cores
        else OVERHEADS
    )

    def make(x):
        return profile.model_copy(update=dict(zip(names, np.exp(x).tolist())))

    def predict(x):
        p = predict_rows(make(x), spec_dicts, rows, seed)
        return np.concatenate([p["ttft_mean_s"], p["tpot_mean_s"]])

    start = {
        "layer_overhead_s": 1e-3,
        "prefill_layer_overhead_s": 1e-3,
        "ungrouped_layer_overhead_s": 1e-4,
        "expert_overhead_s": max(profile.expert_overhead_s, 1e-5),
        "transfer_latency_s": max(profile.transfer_latency_s, 1e-5),
        "shared_gpu_handoff_s": 1e-4,
        "oversubscription_exponent": 1.0,
    }
    x0 = np.log([start[k] for k in names])
    lo = np.log([1e-2 if k == "oversubscription_exponent" else 1e-7 for k in names])
    hi = np.log([10.0 if k == "oversubscription_exponent" else 1.0 for k in names])
    x, _ = fit.fit_black_box(predict, meas, x0, lo, hi)
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
        plans[f"train{i}"] = fid.random_plan(sc.cluster, rng, tier_probs=tuple(cfg.tier_probs))
    for i in range(cfg.e2e.fast_plans):
        plans[f"fast{i}"] = full_precision_gpu(fid.random_plan(sc.cluster, rng), sc.cluster)
    return {name: p for name, p in plans.items() if not p.problems(sc.cluster)}  # e.g. two replicas do not fit


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
    for field in ("workloads.light_load", "workloads.light_requests", "workloads.saturating_rounds"):
        require_positive(OmegaConf.select(cfg, field), field)
    probs = cfg.tier_probs
    if len(probs) != 3 or min(probs) < 0 or abs(sum(probs) - 1) > 1e-9:
        raise ConfigError(f"tier_probs: {list(probs)} must be 3 probabilities (GPU, CPU, SSD) summing to 1")
    for field in ("priors.step_s", "priors.mixed_step_s", "priors.install_s", "priors.start_s"):
        require_positive(OmegaConf.select(cfg, field), field)
    optional_seconds(cfg.budget_s, "budget_s")
    require_nonnegative(cfg.analysis_reserve_s, "analysis_reserve_s")
    check_load_names(cfg.workloads.names)
    if cfg.device not in ("cpu", "cuda"):
        raise ConfigError(f"device: '{cfg.device}' unknown; allowed: cpu, cuda")
    if cfg.install not in INSTALLS:
        raise ConfigError(f"install: '{cfg.install}' unknown; allowed: {', '.join(INSTALLS)}")
    if cfg.rows_from is not None and not Path(str(cfg.rows_from)).is_file():
        raise ConfigError(f"rows_from: '{cfg.rows_from}' is not a file (a rows_<profile>.jsonl of an earlier run)")
    if cfg.get("predict_with") is not None and cfg.rows_from is None:
        raise ConfigError("predict_with: needs rows_from (the windows of an earlier run it predicts)")
    if not isinstance(cfg.spec_overrides, Mapping):
        raise ConfigError(f"spec_overrides: {cfg.spec_overrides!r} must be a mapping of scenario fields")


def scenario_names(cfg: DictConfig) -> list[str]:
    """The e2e and fidelity scenarios, each once, e2e ones first."""
    return list(dict.fromkeys([*cfg.e2e.scenarios, *(cfg.fidelity.scenarios if cfg.fidelity.enabled else [])]))


def scenario_specs(cfg: DictConfig) -> dict[str, dict]:
    """Spec dicts of every e2e / fidelity scenario, `spec_overrides` merged in."""
    for field in ("e2e.scenarios", "fidelity.scenarios"):
        try:
            fid.scenario_dicts(cfg.scenario_name, list(OmegaConf.select(cfg, field)))
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("calibrate: scenarios", f"calibrate: {field}")) from None
    overrides = OmegaConf.to_container(cfg.spec_overrides, resolve=True)
    return fid.scenario_dicts(cfg.scenario_name, scenario_names(cfg), overrides)


def gpu_names(specs: dict[str, dict]) -> list[str]:
    """The GPU presets of the scenarios (the device overrides a GPU run's fits replace)."""
    return sorted({g.name for d in specs.values() for s in scenario_from_dict(dict(d)).servers for g in s.gpus})


def first_profile(cfg: DictConfig, base, fits: dict, specs: dict[str, dict]) -> HardwareProfile:
    """The profile of the micro fits. On the GPU: the fits replace the scenarios' GPU presets (and `device_names`)
    only, CPU-tier experts are fetched to the GPU (what the tier sweep measured) and one token's attention block is
    the first per-layer overhead (the regression refits it)."""
    if cfg.device == "cpu":
        return base_profile(cfg, base, fits)
    names = sorted({*gpu_names(specs), *map(str, cfg.device_names)})
    prof = base_profile(cfg, base, fits, device_names=names)
    return prof.model_copy(update={"cpu_compute": False, "layer_overhead_s": fits["attention"]["base_s"]})


def heldout_plans(cfg: DictConfig, i: int, sc, state) -> dict[str, DeploymentPlan]:
    """The i-th fidelity scenario's held-out plans: every baseline and random valid plans up to its share of
    fidelity.plans (seeds disjoint from the training plans'), alternating while both last (a budget that cuts the
    tail cuts both kinds)."""
    per = int(np.ceil(cfg.fidelity.plans / len(cfg.fidelity.scenarios)))
    base = fid.baseline_plans(sc, state, tuple(cfg.fidelity.baselines), cfg.seed)
    rng = np.random.default_rng(20_000 + 100 * i + cfg.seed)
    probs = tuple(cfg.tier_probs)
    rand = {
        f"random_plan{j}": fid.random_plan(sc.cluster, rng, tier_probs=probs) for j in range(max(per - len(base), 0))
    }
    order = [n for pair in itertools.zip_longest(base, rand) for n in pair if n is not None]
    return {n: base.get(n, rand.get(n)) for n in order}


def scenario_job(cfg: DictConfig, name: str, spec: dict, profile: HardwareProfile) -> ScenarioJob:
    """One scenario's training plans (if an e2e scenario), held-out plans (if a fidelity one; the first fidelity
    scenario's first `fidelity.repeats` served twice) and loads (workloads.names) per role."""
    sc = fid.with_profile(spec, profile, cfg.seed)
    state = sc.initial_state(np.random.default_rng(cfg.seed))
    plans = []
    if name in cfg.e2e.scenarios:
        plans += [PlanJob("train", n, p) for n, p in training_plans(spec, profile, cfg).items()]
    fids = list(cfg.fidelity.scenarios) if cfg.fidelity.enabled else []
    if name in fids:
        i = fids.index(name)
        held = heldout_plans(cfg, i, sc, state)
        plans += [
            PlanJob("heldout", n, p, repeat=i == 0 and k < cfg.fidelity.repeats)
            for k, (n, p) in enumerate(held.items())
        ]
    sur = SurrogateBackend(sc.cluster)
    names = check_load_names(cfg.workloads.names)
    loads = {
        "train": build_loads(names, sur, state, cfg.workloads, cfg.e2e.window_s),
        "heldout": build_loads(names, sur, state, cfg.workloads, cfg.fidelity.window_s),
    }
    return ScenarioJob(name, spec, plans, loads)


def measure_windows(cfg: DictConfig, specs: dict, profile: HardwareProfile, out: Path, deadline, log) -> Path:
    """Every scenario's windows on the real backend, written to out/rows_<profile>.jsonl as they come."""
    path = out / f"rows_{cfg.profile}.jsonl"
    rows = RowLog(path)
    try:
        rows.write("meta", profile=profile_dict(profile), command=command(cfg), device=cfg.device)
        jobs = []
        for name, spec in specs.items():
            job = scenario_job(cfg, name, spec, profile)
            rows.write(
                "scenario", name=name, spec=spec, loads={k: [ld.as_dict() for ld in v] for k, v in job.loads.items()}
            )
            log(
                f"{name}: {len(job.plans)} plans x loads "
                + ", ".join(
                    f"{ld.name} ({ld.expected_requests:.1f} req in {ld.window_s:.2f} s)" for ld in job.loads["heldout"]
                )
            )
            jobs.append(job)
        p = cfg.priors
        budget = Budget(deadline, Priors(float(p.step_s), float(p.mixed_step_s), float(p.install_s), float(p.start_s)))
        Campaign(profile, cfg.device, cfg.seed, cfg.threads, cfg.install, budget, rows, log).run(jobs)
    finally:
        rows.close()
    return path


def predict_heldout(profile: HardwareProfile, specs: dict, rows: list[dict], seed: int) -> list[dict]:
    """Held-out rows with the surrogate's prediction (under `profile`) of each on its realized workload."""
    cache = {}
    out = []
    for row in rows:
        name = row["scenario"]
        if name not in cache:
            sc = fid.with_profile(specs[name], profile, seed)
            cache[name] = (SurrogateBackend(sc.cluster), sc.initial_state(np.random.default_rng(seed)))
        sur, state = cache[name]
        out.append({**row, **fid.predict_row(sur, plan_from_row(row), state, row)})
    return out


def analyze(cfg: DictConfig, profile: HardwareProfile, record: dict, out: Path, report: dict, log) -> HardwareProfile:
    """The overhead regression on the training rows, the fitted profile, and the fidelity report of the held-out
    rows (`record`: what read_rows returns)."""
    specs = {n: s["spec"] for n, s in record["scenarios"].items()}
    train = [r for r in record["rows"] if r["role"] == "train"]
    held = [r for r in record["rows"] if r["role"] == "heldout"]
    if train:
        profile = fit_overheads(profile, specs, train, cfg.seed)
        report["overheads"] = {k: getattr(profile, k) for k in (*OVERHEADS, "oversubscription_exponent")}
        tr = predict_rows(profile, specs, train, cfg.seed)
        report["train_fit"] = {k: fit.error_stats(tr[k], _arr([r["real"] for r in train], k)) for k in fid.LATENCY}
        log(f"overheads {report['overheads']} train fit {report['train_fit']}")
    if cfg.write_profile and cfg.get("predict_with") is None:
        header = (
            f"Hardware profile '{cfg.profile}' measured by experiments.calibrate "
            f"(device={(record.get('meta') or {}).get('device', cfg.device)}).\n"
            f"Micro sweeps + regression on real-backend windows; details in {cfg.out_dir}/sweeps_{cfg.profile}.json"
        )
        log(f"wrote {write_profile(profile, header, cfg.profile_path)}")
    if held:
        report["fidelity"] = fidelity_report(cfg, profile, specs, held, len(record["skipped"]), out, log)
    return profile


def fidelity_report(
    cfg: DictConfig, profile: HardwareProfile, specs: dict, held: list[dict], skipped: int, out: Path, log
) -> dict:
    """<stem>.json (headline keys, summary, every row), <stem>.md and <stem>.png of the held-out rows."""
    rows = predict_heldout(profile, specs, held, cfg.seed)
    summary = rep.summarize(rows)
    summary.update(command=command(cfg), profile=profile.name, device=cfg.device, skipped=skipped)
    top = rep.headline(summary)
    summary.update(top)
    stem = out / str(cfg.fidelity.stem)
    atomic_write_text(stem.with_suffix(".json"), rep.json_text({**top, "summary": summary}, rows))
    atomic_write_text(stem.with_suffix(".md"), rep.markdown(summary))
    if not rep.plot(rows, stem.with_suffix(".png")):
        log("matplotlib missing: no plot (rerun with rows_from=... where it is installed)")
    log(f"fidelity: {json.dumps(top)} -> {stem}.json")
    return summary


def command(cfg: DictConfig) -> str:
    name = cfg.get("config_name", "calibrate")
    return " ".join(
        [
            "python -m experiments.calibrate",
            *([f"--config-name {name}"] if name != "calibrate" else []),
            *cfg.get("overrides", []),
        ]
    )


def run(cfg: DictConfig) -> dict:
    """Sweeps, fits, the end-to-end windows (overhead regression + held-out plans), the profile and the fidelity
    report; `cfg.scenario_name` is the base scenario. With `rows_from`: only the regression and the report, from
    the windows of an earlier run."""
    check_values(cfg)
    torch.set_num_threads(cfg.threads)
    out = ROOT / cfg.out_dir if not Path(cfg.out_dir).is_absolute() else Path(cfg.out_dir)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    specs = scenario_specs(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.rows_from is not None:
        record = read_rows(Path(str(cfg.rows_from)))
        report = {"command": command(cfg), "rows_from": str(cfg.rows_from)}
        if cfg.get("predict_with") is not None:  # out of sample: a profile fitted on other windows, as it is
            record["rows"] = [r for r in record["rows"] if r["role"] == "heldout"]
            analyze(cfg, load_hardware_profile(cfg.predict_with, "predict_with"), record, out, report, log)
        else:
            analyze(cfg, HardwareProfile(**record["meta"]["profile"]), record, out, report, log)
        log("done")
        return report
    from coel_env.world.state import Scenario

    base = Scenario(
        scenario_from_dict(dict(fid.scenario_variants(cfg.scenario_name)[cfg.scenario_name])), seed=cfg.seed
    )
    if cfg.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    log("micro sweeps")
    raw, fits = micro(cfg, base)
    if cfg.device == "cuda":
        torch.cuda.empty_cache()  # the servers share this GPU
    profile = first_profile(cfg, base, fits, specs)
    log(f"micro fits: {json.dumps(fits['expert_roofline'])}")
    report = {"command": command(cfg), "fits": fits}
    sweeps_path = out / f"sweeps_{cfg.profile}.json"
    atomic_write_json(sweeps_path, {"raw": raw, **report}, default=float)
    if cfg.device == "cpu" and cfg.quality.enabled:
        log("quality runs")
        qm, qrows = quality_runs(cfg, fid.scenario_variants(cfg.scenario_name)[cfg.scenario_name], profile, log)
        profile = profile.model_copy(update={"quality": qm})
        report["quality_runs"] = qrows
    deadline = None if cfg.budget_s is None else t_start + float(cfg.budget_s) - float(cfg.analysis_reserve_s)
    log("end-to-end windows (regression + held-out plans)")
    path = measure_windows(cfg, specs, profile, out, deadline, log)
    analyze(cfg, profile, read_rows(path), out, report, log)
    kept = {k: v for k, v in report.items() if k != "fidelity"}  # the fidelity summary has its own file
    atomic_write_json(sweeps_path, {"raw": raw, **kept}, default=float)
    log("done")
    return report


@hydra.main(version_base=None, config_path="../conf", config_name="calibrate")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    OmegaConf.set_struct(cfg, False)
    cfg.overrides = list(HydraConfig.get().overrides.task)
    cfg.config_name = HydraConfig.get().job.config_name
    cfg.scenario_name = HydraConfig.get().runtime.choices["scenario"]
    try:
        run(cfg)
    except CoELError as exc:
        raise SystemExit(error_line(exc, HydraConfig.get().runtime.output_dir)) from None


if __name__ == "__main__":
    main()
