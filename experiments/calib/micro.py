"""Micro sweeps + their fits -> a first HardwareProfile (no Hydra, so it also runs on the GPU machine).
`cfg` is any object with the attributes of conf/calibrate.yaml (profile, device, seed, sweeps.*)."""

from __future__ import annotations

import os
import time

import numpy as np

from coel_env.backend.wire import SLOT_BYTES
from coel_env.specs.hardware import DeviceOverride, HardwareProfile
from experiments.calib import fit, sweeps
from real_backend.fast import fast_enabled


def _arr(rows: list[dict], key: str) -> np.ndarray:
    return np.array([r[key] for r in rows], dtype=np.float64)


def micro(cfg, scenario) -> tuple[dict, dict]:
    """Run the micro sweeps; return (raw rows, fitted numbers)."""
    from real_backend.model import MoEConfig

    sw = cfg.sweeps
    mcfg = MoEConfig.from_spec(scenario.cluster.model)
    raw = {
        "expert": sweeps.expert_sweep(
            [tuple(s) for s in sw.expert_shapes], list(sw.tokens), list(sw.bits), cfg.device, sw.reps, cfg.seed
        ),
        "attention": sweeps.attention_sweep(mcfg, list(sw.contexts), cfg.device, sw.reps),
        "tiers": sweeps.tier_sweep(mcfg, list(sw.bits), cfg.device, sw.reps),
        "shaper": sweeps.shaper_sweep(scenario.cluster, list(sw.shaper_bytes), 3),
        "gloo": sweeps.gloo_sweep(list(sw.message_bytes), sw.reps),
    }
    return raw, fit_raw(raw, cfg)


def fit_raw(raw: dict, cfg) -> dict:
    """Fits of raw sweep rows (see `micro`)."""
    e = raw["expert"]
    roof = fit.fit_roofline(
        _arr(e, "bytes"), _arr(e, "flops"), _arr(e, "bits"), _arr(e, "seconds"), overlap=cfg.device == "cuda"
    )
    att = raw["attention"]
    a0, a1 = np.polyfit(_arr(att, "context"), _arr(att, "seconds"), 1)[::-1]
    shaper = {}
    for p in sorted({r["pair"] for r in raw["shaper"]}):
        rows = [r for r in raw["shaper"] if r["pair"] == p]
        alpha, beta = fit.fit_alpha_beta(_arr(rows, "bytes"), _arr(rows, "seconds"))
        shaper[int(p)] = {"alpha_s": alpha, "beta_Bps": beta}
    g_alpha, g_beta = fit.fit_alpha_beta(_arr(raw["gloo"], "bytes"), _arr(raw["gloo"], "seconds"))
    tiers = {}
    for t in ("cpu", "ssd"):
        rows = [r for r in raw["tiers"] if r["tier"] == t]
        alpha, beta = fit.fit_alpha_beta(_arr(rows, "bytes"), _arr(rows, "seconds"))
        # the surrogate has no per-fetch latency: it uses the effective bytes/s at this model's expert sizes
        eff = float(np.median(_arr(rows, "bytes") / _arr(rows, "seconds")))
        tiers[t] = {"alpha_s": alpha, "beta_Bps": beta, "effective_Bps": eff}
    fits = {
        "expert_roofline": roof,
        "attention": {"base_s": float(a0), "per_context_token_s": float(a1)},
        "shaper": shaper,
        "gloo": {"alpha_s": g_alpha, "beta_Bps": g_beta},
        "tiers": tiers,
    }
    return fits


def base_profile(cfg, scenario, fits: dict, device_names: list[str] | None = None) -> HardwareProfile:
    """A profile from the micro fits (overheads refined later by the end-to-end regression)."""
    c = scenario.cluster
    roof = fits["expert_roofline"]
    bw_gbs, tflops = roof["bandwidth_Bps"] / 1e9, roof["flops"] / 1e12
    names = device_names or {d for s in c.spec.servers for d in [g.name for g in s.gpus] + [s.cpu.name]}
    link_eff = (
        float(np.clip(np.median([v["beta_Bps"] for v in fits["shaper"].values()]) / np.median(c.link_bw), 0.05, 1.0))
        if fits["shaper"]
        else 1.0
    )
    tiers = fits["tiers"]
    return HardwareProfile(
        name=cfg.profile,
        source=f"experiments.calibrate on {cfg.device} ({time.strftime('%Y-%m-%d')})",
        compute_efficiency=1.0,
        memory_efficiency=1.0,
        link_efficiency=link_eff,
        pcie_efficiency=1.0,
        layer_overhead_s=2.5e-5,
        expert_overhead_s=float(roof["overhead_s"]),
        dequant_slowdown={int(k): float(v) for k, v in sorted(roof["slowdown"].items(), reverse=True)},
        prefetch_hit_rate=0.0,
        transfer_latency_s=float(fits["gloo"]["alpha_s"]),
        # the real dispatcher's wire format: fp32 (CPU) / bf16 (CUDA) rows, top_k slots of int32 id + fp32 weight
        activation_bytes=2 if cfg.device == "cuda" else 4,
        row_header_bytes=SLOT_BYTES,
        routing="local_first",
        # the real backend steps its servers in lock-step; on CPU they are processes sharing this host's cores
        serving="lockstep",
        # the fast path stacks a layer's 16-bit GPU experts into one grouped GEMM (real_backend.fast.GroupedExperts)
        grouped_expert_bits=[16] if fast_enabled() else [],
        host_cores=None if cfg.device == "cuda" else os.cpu_count(),
        emulated_latency=True,
        device_overrides={n: DeviceOverride(mem_bw_gbs=bw_gbs, peak_tflops=tflops) for n in sorted(names)},
        pcie_bw_gbs=float(np.clip(tiers["cpu"]["effective_Bps"] / 1e9, 0.01, 1e4)),
        ssd_bw_gbs=float(np.clip(tiers["ssd"]["effective_Bps"] / 1e9, 0.001, 1e3)),
    )
