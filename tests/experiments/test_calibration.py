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
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: calibrate: fidelity.scenarios ['nope'] unknown; allowed: tiny, tiny-slowlink, tiny-2srv, tiny-busy "
            "or a conf/scenario name (deepseek-scale, "
        )
    )
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("e2e.window_s=0", "error: e2e.window_s: 0 must be a finite number > 0"),
        ("fidelity.window_s=-1", "error: fidelity.window_s: -1 must be a finite number > 0"),
        ("seed=1.5", "error: seed: 1.5 must be an integer >= 0"),
        ("sweeps.reps=0", "error: sweeps.reps: 0 must be an integer >= 1"),
        (
            "workloads.names=[light,heavy]",
            "error: workloads.names: ['heavy'] unknown or empty; allowed: scenario, light, saturating",
        ),
        ("install=copy", "error: install: 'copy' unknown; allowed: reset, apply"),
        ("workloads.saturating_rounds=0", "error: workloads.saturating_rounds: 0 must be a finite number > 0"),
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


# ---- named workloads, the campaign's bookkeeping and the fidelity report (no real backend: fast) ---------------
def test_error_stats_percentiles_and_kendall():
    s = fit.error_stats([1.1, 2.0, 2.7, 4.0, 6.0], [1.0, 2.0, 3.0, 4.0, 5.0])  # errors 10, 0, 10, 0, 20 %
    assert s["mape_pct"] == pytest.approx(8.0) and s["p50_err_pct"] == pytest.approx(10.0)
    assert s["p95_err_pct"] == pytest.approx(18.0) and s["max_err_pct"] == pytest.approx(20.0)
    assert s["spearman"] == pytest.approx(1.0) and s["kendall"] == pytest.approx(1.0)
    rev = fit.error_stats([3.0, 2.0, 1.0], [1.0, 2.0, 3.0])
    assert rev["spearman"] == pytest.approx(-1.0) and rev["kendall"] == pytest.approx(-1.0)
    flat = fit.error_stats([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])  # a constant prediction ranks nothing
    assert np.isnan(flat["spearman"]) and np.isnan(flat["kendall"])


def _workload_cfg(**kw):
    from types import SimpleNamespace

    return SimpleNamespace(**{"light_load": 0.1, "light_requests": 3, "saturating_rounds": 3, **kw})


def test_light_and_saturating_workloads_follow_their_definitions():
    from coel_env.backend.surrogate import SurrogateBackend
    from experiments.calib.workloads import build_loads, check_load_names, predicted_e2e

    sc = Scenario("tiny", seed=0, hardware="cpu-gloo")
    state = sc.initial_state(np.random.default_rng(0))
    sur = SurrogateBackend(sc.cluster)
    own, light, sat = build_loads(["scenario", "light", "saturating"], sur, state, _workload_cfg(), 8.0)
    plan = DeploymentPlan.uniform(sc.cluster)
    rates = np.asarray(state.arrival_rate)
    assert own.rates == tuple(rates) and own.window_s == 8.0
    # light: cluster rate x a lone request's predicted e2e = light_load, split like the scenario's rates
    lone = predicted_e2e(sur, plan, state, rates / rates.sum() * 1e-6)
    assert sum(light.rates) * lone == pytest.approx(0.1, rel=1e-9)
    np.testing.assert_allclose(np.array(light.rates) / sum(light.rates), rates / rates.sum())
    assert light.expected_requests == pytest.approx(3.0)
    # saturating: a closed loop of max_batch clients per server, 3 requests each, over the window the surrogate
    # predicts for them: Little's law, clients = completions/s x e2e (no queue: every client has a slot; the mean
    # e2e is over the length grid, the completion rate from the mean lengths: 2%)
    B = sc.spec.workload.max_batch
    assert sat.concurrency == B and len(set(sat.rates)) == 1
    assert sat.rates[0] * sat.window_s == pytest.approx(3 * B, rel=1e-9)
    closed = sur.with_concurrency(B).serve(plan, state, 60.0)
    assert sat.rates[0] * closed.e2e_mean_s == pytest.approx(B, rel=0.02)
    with pytest.raises(ConfigError, match=r"workloads.names: \['heavy'\] unknown"):
        check_load_names(["light", "heavy"])


def test_expected_steps_and_a_campaign_past_its_budget(tmp_path):
    """Light windows serve their requests one after another, saturating ones max_batch at a time; a window that
    does not fit the budget is skipped (recorded, no server started); a truncated last line reads back as absent."""
    import time

    from experiments.calib import fidelity as fid
    from experiments.calib.campaign import (
        Budget,
        Campaign,
        PlanJob,
        Priors,
        RowLog,
        ScenarioJob,
        expected_steps,
        plan_class,
        read_rows,
    )
    from experiments.calib.workloads import Load

    assert expected_steps(np.array([1.0, 2.0]), 10, 4, "light") == pytest.approx(33.0)
    assert expected_steps(np.array([8.0, 4.0]), 10, 4, "saturating") == pytest.approx(8 * 11 / 4 * 1.3)
    spec = fid.scenario_dicts("tiny", ["tiny"])["tiny"]
    sc = Scenario(dict(spec), seed=0, hardware="cpu-gloo")
    uniform = DeploymentPlan.uniform(sc.cluster)
    uniform.bits[uniform.device >= 0] = 16
    mixed = uniform.copy()
    mixed.tier[0, 0, 0] = 2  # one SSD replica: no longer the all-16-bit-GPU fast path
    assert plan_class(uniform) == "gpu16" and plan_class(mixed) == "mixed"
    job = ScenarioJob(
        "tiny",
        spec,
        [PlanJob("train", "uniform", DeploymentPlan.uniform(sc.cluster))],
        {"train": [Load("light", (0.1, 0.1, 0.1), 10.0)], "heldout": []},
    )
    path = tmp_path / "rows.jsonl"
    rows, lines = RowLog(path), []
    budget = Budget(time.perf_counter() - 1.0, Priors(0.01, 0.02, 0.1, 1.0))
    got = Campaign(sc.cluster.hw, "cpu", 0, 1, "reset", budget, rows, lines.append).run([job])
    rows.close()
    assert got == [] and any("skipped (budget" in ln for ln in lines)
    with path.open("a") as f:
        f.write('{"kind": "row", "scen')
    back = read_rows(path)
    assert back["rows"] == [] and [(s["plan"], s["load"]) for s in back["skipped"]] == [("uniform", "light")]


def test_campaign_leaves_a_scenario_after_server_failures(tmp_path, monkeypatch):
    """A window whose servers fail is skipped with the error's first line; after MAX_FAILURES the scenario's other
    windows are left out (recorded), and nothing raises: the windows already measured still make a report."""
    import real_backend
    from experiments.calib import fidelity as fid
    from experiments.calib.campaign import (
        MAX_FAILURES,
        Budget,
        Campaign,
        PlanJob,
        Priors,
        RowLog,
        ScenarioJob,
        read_rows,
    )
    from experiments.calib.workloads import Load

    class Failing:
        alive = False

        def __init__(self, *args, **kwargs):
            pass

        def reset(self, plan, state):
            raise real_backend.ServerError("server s0 failed in 'reset': CUDA out of memory\n--- traceback ---")

        def close(self):
            pass

    monkeypatch.setattr(real_backend, "RealBackend", Failing)
    spec = fid.scenario_dicts("tiny", ["tiny"])["tiny"]
    sc = Scenario(dict(spec), seed=0, hardware="cpu-gloo")
    plans = [PlanJob("heldout", f"p{i}", DeploymentPlan.uniform(sc.cluster)) for i in range(4)]
    job = ScenarioJob("tiny", spec, plans, {"train": [], "heldout": [Load("light", (0.1, 0.1, 0.1), 10.0)]})
    path = tmp_path / "rows.jsonl"
    rows = RowLog(path)
    got = Campaign(sc.cluster.hw, "cpu", 0, 1, "reset", Budget(None, Priors(0.01, 0.02, 0.1, 1.0)), rows, print).run(
        [job]
    )
    rows.close()
    reasons = [s["reason"] for s in read_rows(path)["skipped"]]
    assert got == [] and len(reasons) == 4
    assert reasons[:MAX_FAILURES] == ["error: server s0 failed in 'reset': CUDA out of memory"] * MAX_FAILURES
    assert all("server failures" in r for r in reasons[MAX_FAILURES:])


def _synthetic_rows(path: Path) -> None:
    """A rows file as a run on tiny-2srv would write it, its "measurements" the surrogate's under a profile with
    3x the per-layer overhead (so there is something to fit), a repeat 5% off."""
    from coel_env.backend.surrogate import SurrogateBackend
    from experiments.calib import fidelity as fid
    from experiments.calib.campaign import RowLog, plan_fields
    from experiments.calib.profile import profile_dict
    from experiments.calib.workloads import build_loads

    spec = fid.scenario_dicts("tiny", ["tiny-2srv"])["tiny-2srv"]
    base = load_hardware_profile("cpu-gloo")
    truth = base.model_copy(update={"layer_overhead_s": 3 * base.layer_overhead_s})
    sc = fid.with_profile(spec, truth)
    state = sc.initial_state(np.random.default_rng(0))
    sur = SurrogateBackend(sc.cluster)
    loads = build_loads(["light", "saturating"], sur, state, _workload_cfg(), 8.0)
    rng = np.random.default_rng(1)
    plans = [("train", "uniform", DeploymentPlan.uniform(sc.cluster))]
    plans += [("train", "train0", fid.random_plan(sc.cluster, rng))]
    plans += [("heldout", f"random_plan{i}", fid.random_plan(sc.cluster, rng)) for i in range(3)]
    log = RowLog(path)
    log.write("meta", profile=profile_dict(base), command="synthetic", device="cpu")
    log.write("scenario", name="tiny-2srv", spec=spec, loads={"heldout": [ld.as_dict() for ld in loads]})
    for k, (role, name, plan) in enumerate(plans):
        for ld in loads:
            n = max(round(ld.expected_requests), 1)
            wl = {"rate": list(ld.rates), "popularity": [None, None], "in_len": [32] * n, "out_len": [16] * n}
            row = {"workload": wl, "window_s": ld.window_s}
            p = fid.predict_row(sur, plan, state, row)
            row.update(real=p["pred"], real_link_bytes=p["pred_link_bytes"], count_link_bytes=p["pred_link_bytes"])
            row.update(real_mem=p["pred_mem"], scenario="tiny-2srv", load=ld.name, role=role, plan=name)
            row.update(mean_batch=[1.0, 2.0], **plan_fields(plan))
            if k == 2:
                row["real_repeat"] = {m: 1.05 * v for m, v in p["pred"].items()}
            log.write("row", **row)
    log.close()


def _calibrate_from_rows(tmp_path: Path, rows: Path, *extra: str) -> None:
    """experiments.calibrate.run on a rows file of tiny-2srv windows, writing into tmp_path."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import experiments.calibrate as cal

    overrides = [
        "e2e.scenarios=[tiny-2srv]",
        "fidelity.scenarios=[tiny-2srv]",
        f"rows_from={rows}",
        f"out_dir={tmp_path}",
        f"profile_path={tmp_path / 'fitted.yaml'}",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(Path(cal.__file__).parents[1] / "conf"), version_base=None):
        cfg = compose(config_name="calibrate", overrides=overrides)
    OmegaConf.set_struct(cfg, False)
    cfg.scenario_name = "tiny"
    cal.run(cfg)


def test_fidelity_report_from_rows_has_the_headline_keys(tmp_path):
    """rows_from: the overhead regression, the fitted profile and <stem>.json/.md/.png from a rows file, with the
    latency headline keys at the top level and the breakdown per workload."""
    import json

    rows = tmp_path / "rows.jsonl"
    _synthetic_rows(rows)
    _calibrate_from_rows(tmp_path, rows, "fidelity.stem=fidelity_test")
    out = json.loads((tmp_path / "fidelity_test.json").read_text())
    assert np.isfinite(out["latency_mape_pct"]) and -1 <= out["latency_spearman"] <= 1
    s = out["summary"]
    assert s["latency_mape_pct"] == out["latency_mape_pct"] and s["plans"] == 3 and s["windows"] == 6
    assert set(s["by_workload"]) == {"light", "saturating"} and s["by_workload"]["light"]["mean_batch"] == 2.0
    assert {"ttft_p95_s", "e2e_p95_s", "tokens_per_s", "link_bytes"} <= set(s)
    assert s["link_bytes_wire_format_exact"] and "tpot_mean_s" in s["noise_floor"]
    assert {"p50_err_pct", "p95_err_pct", "kendall"} <= set(s["tpot_mean_s"])
    md = (tmp_path / "fidelity_test.md").read_text()
    assert "Command: `python -m experiments.calibrate" in md and "| saturating" in md
    assert (tmp_path / "fidelity_test.png").stat().st_size > 0
    fitted = load_hardware_profile(tmp_path / "fitted.yaml")
    base = load_hardware_profile("cpu-gloo")
    assert fitted.layer_overhead_s != base.layer_overhead_s and fitted.dequant_slowdown == base.dequant_slowdown


def test_predict_with_reports_a_given_profile_out_of_sample(tmp_path):
    """rows_from + predict_with: the held-out rows predicted by that profile as it is (no regression, no profile
    written), the same predictions as `predict_heldout` under it."""
    import json

    import experiments.calibrate as cal
    from experiments.calib.campaign import read_rows

    rows = tmp_path / "rows.jsonl"
    _synthetic_rows(rows)
    _calibrate_from_rows(tmp_path, rows, "predict_with=cpu-gloo", "fidelity.stem=fidelity_oos")
    assert not (tmp_path / "fitted.yaml").exists()
    out = json.loads((tmp_path / "fidelity_oos.json").read_text())
    record = read_rows(rows)
    held = [r for r in record["rows"] if r["role"] == "heldout"]
    specs = {n: s["spec"] for n, s in record["scenarios"].items()}
    want = cal.predict_heldout(load_hardware_profile("cpu-gloo"), specs, held, 0)
    got = [r["pred"]["tpot_mean_s"] for r in out["rows"]]
    np.testing.assert_allclose(got, [r["pred"]["tpot_mean_s"] for r in want], rtol=1e-12)


def test_predict_with_needs_rows_from():
    from hydra import compose, initialize_config_dir

    import experiments.calibrate as cal

    with initialize_config_dir(config_dir=str(Path(cal.__file__).parents[1] / "conf"), version_base=None):
        cfg = compose(config_name="calibrate", overrides=["predict_with=h200"])
    with pytest.raises(ConfigError, match=r"^predict_with: needs rows_from"):
        cal.check_values(cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_calibrate_on_the_gpu_end_to_end(tmp_path):
    """device=cuda: sweeps and the real backend's servers on the GPU, both workloads, at the smallest scale."""
    import json

    root = Path(__file__).resolve().parents[2]
    args = [
        "scenario=tiny",
        "device=cuda",
        "install=reset",
        "quality.enabled=false",
        "workloads.names=[light,saturating]",
        "e2e.scenarios=[tiny-2srv]",
        "e2e.train_plans=0",
        "fidelity.scenarios=[tiny-2srv]",
        "fidelity.plans=2",
        "fidelity.baselines=[static_linear]",
        "fidelity.repeats=1",
        "fidelity.stem=fid",
        "sweeps.reps=1",
        "sweeps.tokens=[1,4]",
        "sweeps.expert_shapes=[[64,128]]",
        "sweeps.contexts=[16]",
        "sweeps.message_bytes=[8]",
        "sweeps.shaper_bytes=[4096]",
        f"out_dir={tmp_path}",
        f"profile_path={tmp_path / 'p.yaml'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.calibrate", *args], cwd=root, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "fid.json").read_text())
    assert {"latency_mape_pct", "latency_spearman"} <= set(out) and out["summary"]["device"] == "cuda"
    assert load_hardware_profile(tmp_path / "p.yaml").cpu_compute is False
