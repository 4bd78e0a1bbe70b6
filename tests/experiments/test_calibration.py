"""Calibration: fitting code on synthetic data with known constants, hardware-profile overrides, and a gymnax-style
parity test of the surrogate (cpu-gloo profile) against the real backend on `tiny`.

The parity test asserts only what holds on any machine, idle or loaded: bytes per link and memory per tier (exact)
and the plan ranking the emulated link latency decides (a sleep, not this host's speed). Wall-clock agreement with a
committed profile is a property of the host it was fitted on: `python -m experiments.calibrate` measures it there
(`benchmarks/results/calibration/fidelity.md`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coel_env import DeploymentPlan, Scenario
from coel_env.errors import ConfigError
from coel_env.specs.hardware import DeviceOverride, HardwareProfile, load_hardware_profile
from experiments.calib import fit
from experiments.calib.profile import write_profile


def test_fit_alpha_beta_recovers_known_link():
    rng = np.random.default_rng(0)
    n = np.array([8, 4096, 65536, 1 << 20, 1 << 22], dtype=float)
    t = 2e-4 + n / 117e6
    a, b = fit.fit_alpha_beta(n, t * (1 + 1e-3 * rng.standard_normal(n.size)))
    assert a == pytest.approx(2e-4, rel=0.05) and b == pytest.approx(117e6, rel=0.01)


def test_fit_roofline_recovers_bandwidth_flops_overhead_and_slowdowns():
    bw, fl, c0, slow = 8e9, 6e10, 3e-5, {16: 1.0, 8: 1.5, 4: 3.0}
    rows = []
    for d, f in ((64, 128), (512, 1408), (1024, 2816)):
        for b in (16, 8, 4):
            for n in (1, 4, 16, 64, 256, 1024):
                nbytes = 3 * d * f * b / 8
                flops = 6.0 * d * f * n
                rows.append((nbytes, flops, b, c0 + max(nbytes * slow[b] / bw, flops / fl)))
    a = np.array(rows)
    got = fit.fit_roofline(a[:, 0], a[:, 1], a[:, 2], a[:, 3])
    assert got["bandwidth_Bps"] == pytest.approx(bw, rel=0.02)
    assert got["flops"] == pytest.approx(fl, rel=0.02)
    assert got["overhead_s"] == pytest.approx(c0, rel=0.05)
    assert got["slowdown"][8] == pytest.approx(1.5, rel=0.02) and got["slowdown"][4] == pytest.approx(3.0, rel=0.02)


def test_fit_prune_loss_and_black_box():
    r = np.array([0.1, 0.25, 0.5, 0.6, 0.75, 0.9])
    lin, quad = fit.fit_prune_loss(r, 0.01 * r + 0.4 * np.maximum(r - 0.5, 0) ** 2, 0.5)
    assert lin == pytest.approx(0.01, rel=1e-6) and quad == pytest.approx(0.4, rel=1e-6)
    # black box: recover (a, b) of y = a * x + b from a model called through a closure (like the surrogate)
    x = np.linspace(1, 10, 20)
    y = 3e-3 * x + 2e-2
    est, cost = fit.fit_black_box(lambda p: p[0] * x + p[1], y, np.array([1e-3, 1e-3]), np.zeros(2), np.ones(2))
    assert est == pytest.approx([3e-3, 2e-2], rel=1e-4) and cost < 1e-12


def test_error_stats_numbers():
    s = fit.error_stats([1.1, 2.0, 2.7, 4.0], [1.0, 2.0, 3.0, 4.0])
    assert s["n"] == 4 and s["mape_pct"] == pytest.approx(5.0) and s["max_err_pct"] == pytest.approx(10.0)
    assert s["spearman"] == pytest.approx(1.0)


def test_device_overrides_apply_and_validate(tmp_path):
    hw = HardwareProfile(
        name="x",
        device_overrides={"cpu-small": DeviceOverride(mem_bw_gbs=5.0, peak_tflops=0.05)},
        pcie_bw_gbs=3.0,
        ssd_bw_gbs=0.5,
    )
    c = Scenario("tiny", hardware=hw).cluster
    assert np.all(c.dev_bw == 5e9) and np.all(c.dev_flops == 5e10) and np.all(c.cpu_bw == 5e9)
    assert np.all(c.pcie_bw == 3e9) and np.all(c.ssd_bw == 0.5e9)
    assert np.all(Scenario("tiny").cluster.dev_bw == 20e9)  # default profile: vendor numbers
    with pytest.raises(ConfigError, match="mem_bw_gbs"):
        load_hardware_profile({"device_overrides": {"cpu-small": {"mem_bw_gbs": -1}}})
    path = write_profile(hw, "test header", tmp_path / "x.yaml")
    assert load_hardware_profile(path) == hw


def test_wire_format_fields_scale_surrogate_link_bytes():
    from coel_env.backend.surrogate import SurrogateBackend

    bf16 = Scenario("tiny", seed=0, hardware=HardwareProfile(row_header_bytes=0))
    fp32 = Scenario("tiny", seed=0, hardware=HardwareProfile(activation_bytes=4, row_header_bytes=0))
    hdr = Scenario("tiny", seed=0, hardware=HardwareProfile(activation_bytes=4, row_header_bytes=8))
    state = bf16.initial_state(np.random.default_rng(0))
    plan = DeploymentPlan.uniform(bf16.cluster)
    b2, b4, b4h = (SurrogateBackend(sc.cluster).serve(plan, state, 10.0).link_bytes for sc in (bf16, fp32, hdr))
    assert b2.sum() > 0
    np.testing.assert_allclose(b4, 2 * b2, rtol=1e-9)
    m = bf16.cluster.model  # a round trip per row: 2 * d * 4 + top_k slots of 8 bytes instead of 2 * d * 4
    np.testing.assert_allclose(b4h, b4 * (2 * m.d_model * 4 + 8 * m.top_k) / (2 * m.d_model * 4), rtol=1e-9)


def test_local_first_routing_keeps_tokens_home():
    """The real dispatcher computes an expert on the own server whenever that server holds a replica."""
    from coel_env.backend.surrogate import SurrogateBackend
    from experiments.calib.fidelity import scenario_variants

    spec = scenario_variants()["tiny-2srv"]
    out = {}
    for routing in ("load_aware", "local_first"):
        hw = load_hardware_profile("cpu-gloo").model_copy(update={"routing": routing})
        sc = Scenario(dict(spec), seed=0, hardware=hw)
        plan = DeploymentPlan.uniform(sc.cluster)
        plan.device[..., 1] = 1 - plan.device[..., 0]  # every expert on both servers, GPU tier, 16 bits
        plan.tier[..., 1], plan.bits[..., 1] = 0, 16
        plan.bits[..., 0] = 16
        state = sc.initial_state(np.random.default_rng(0))
        out[routing] = SurrogateBackend(sc.cluster).serve(plan, state, 10.0).link_bytes.sum()
    assert out["local_first"] == 0.0 and out["load_aware"] >= out["local_first"]


def test_shipped_cpu_gloo_profile_loads():
    hw = load_hardware_profile("cpu-gloo")
    assert hw.name == "cpu-gloo" and "cpu-small" in hw.device_overrides
    assert hw.activation_bytes == 4 and hw.row_header_bytes == 8  # the CPU backend's fp32 wire format
    assert hw.routing == "local_first"
    assert load_hardware_profile("h100").device_overrides["h100-sxm"].mem_bw_gbs > 1000
    assert hw.quality.loss_per_bits[4] >= hw.quality.loss_per_bits[8] >= 0.0


# Every link of the parity scenario has this one-way latency (emulated in the application, so machine-free): a plan
# that sends tokens to a peer pays it at every MoE layer, a plan that keeps every token home never does. The compute
# of a tiny-moe decode step is a few ms, so even a loaded host keeps the two plans apart by far more than the margin.
PARITY_LATENCY_MS = 20.0
RANKING_MARGIN = 3.0


def _parity_scenario() -> Scenario:
    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "conf" / "scenario" / "tiny.yaml").read_text())
    spec.update(
        name="tiny-parity",
        max_replicas=3,
        topology={"kind": "star", "bandwidth_gbps": 1.0, "latency_ms": PARITY_LATENCY_MS},
    )
    return Scenario(spec, seed=0, hardware="cpu-gloo")


def _parity_plans(cluster) -> dict[str, DeploymentPlan]:
    uni = DeploymentPlan.uniform(cluster)
    mixed = uni.copy()
    mixed.bits[1] = 8  # one layer at 8 bits
    mixed.device[2, :, 1] = (mixed.device[2, :, 0] + 1) % cluster.num_devices  # a second replica
    mixed.bits[2, :, 1] = 16
    pruned = uni.copy()
    pruned.prune[:] = 0.5
    local = uni.copy()  # every expert on every server: local-first routing never crosses a link
    for r in range(cluster.num_devices):
        local.device[..., r] = (uni.device[..., 0] + r) % cluster.num_devices
    local.tier[:], local.bits[:] = 0, 16
    return {"uniform": uni, "mixed": mixed, "pruned": pruned, "local": local}


@pytest.mark.slow
def test_parity_surrogate_vs_real_backend_on_tiny():
    from coel_env.backend.surrogate import SurrogateBackend
    from experiments.calib import fidelity as fid
    from real_backend import RealBackend

    sc = _parity_scenario()
    state = sc.initial_state(np.random.default_rng(0))
    sur = SurrogateBackend(sc.cluster)
    plans = _parity_plans(sc.cluster)
    rows = {}
    with RealBackend(sc.cluster, seed=0, timeout_s=120) as rb:
        rb.reset(plans["uniform"], state)
        for name, plan in plans.items():
            row = rows[name] = fid.measure(rb, sur, plan, state, 4.0, elem_bytes=4)
            # bytes per link: the wire-format model is exact
            assert row["count_link_bytes"] == row["real_link_bytes"], name
            # memory per tier: exact (16/8-bit experts, GPU tier)
            assert row["pred_mem"] == row["real_mem"], name
    assert sum(rows["uniform"]["real_link_bytes"]) > 0 and sum(rows["local"]["real_link_bytes"]) == 0
    # ranking: both backends put the plan that keeps tokens home far ahead of the one that sends them over links
    for side in ("pred", "real"):
        for k in ("tpot_mean_s", "ttft_mean_s"):
            slow, fast = rows["uniform"][side][k], rows["local"][side][k]
            assert slow > RANKING_MARGIN * fast, (side, k, slow, fast)


def test_calibrate_rejects_unknown_scenario_variants_in_one_line(tmp_path):
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.calibrate", "fidelity.scenarios=[tiny,nope]", f"hydra.run.dir={tmp_path}"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: calibrate: fidelity.scenarios ['nope'] unknown; allowed: tiny, tiny-slowlink, tiny-2srv, tiny-busy"
    )
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("e2e.window_s=0", "error: e2e.window_s: 0 must be a finite number > 0"),
        ("fidelity.window_s=-1", "error: fidelity.window_s: -1 must be a finite number > 0"),
        ("seed=1.5", "error: seed: 1.5 must be an integer >= 0"),
        ("sweeps.reps=0", "error: sweeps.reps: 0 must be an integer >= 1"),
    ],
)
def test_calibrate_accepts_scenario_override_and_refuses_bad_values(tmp_path, override, message):
    """`scenario=tiny` selects the base scenario (a config-group option, no collision); bad numbers stop the run
    in one line before any sweep starts or any file is written."""
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.calibrate",
            "scenario=tiny",
            override,
            f"out_dir={out}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in proc.stderr and not out.exists()
