"""The paper reproduction and plan-evaluation CLIs, run as subprocesses (CleanRL style)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}


def run_module(module: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=240
    )


def _reproduce(out: Path, *args: str, output_lens: str = "[64,512,2048]") -> dict:
    proc = run_module(
        "experiments.reproduce_paper",
        f"hydra.run.dir={out}",
        f"output_lens={output_lens}",
        "input_lens=[64,2048]",
        *args,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("fig4.csv", "fig5.csv", "fig6.csv", "figures.png", "results.json"):
        assert (out / name).is_file(), name
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def paper_results(tmp_path_factory) -> dict:
    """The default: the paper's concurrent load (a closed loop of 256 requests, continuous batching) on vLLM's
    parallelism (tensor parallel in the one server, pipeline parallel over servers)."""
    return _reproduce(tmp_path_factory.mktemp("paper"))


@pytest.fixture(scope="module")
def coel_results(tmp_path_factory) -> dict:
    """The same load on CoEL's expert placement (the uniform plan)."""
    return _reproduce(tmp_path_factory.mktemp("paper-coel"), "engine=coel", output_lens="[512]")


@pytest.fixture(scope="module")
def single_results(tmp_path_factory) -> dict:
    return _reproduce(tmp_path_factory.mktemp("paper-single"), "load=single")


def test_paper_results_schema(paper_results, single_results):
    for results in (paper_results, single_results):
        assert [r["output_len"] for r in results["fig4"]] == [64, 512, 2048]
        assert set(results["fig4"][0]) == {"output_len", "single_server_tok_s", "two_servers_tok_s"}
        assert set(results["fig5"][0]) == {"output_len", "single_server_latency_s", "two_servers_latency_s"}
        assert set(results["fig6"][0]) == {"input_len", "two_servers_latency_s", "three_servers_latency_s"}
    assert paper_results["load"] == {
        "mode": "concurrent",
        "engine": "vllm",
        "in_flight": 256,
        "max_num_seqs": 256,
        "serving": "continuous",
    }
    assert single_results["load"] == {"mode": "single", "engine": "vllm"}


def test_paper_findings_under_concurrent_load(paper_results, coel_results):
    """The seed paper's Fig. 6 under its concurrent load: three servers are faster than two (they hold more KV cache,
    so they run more sequences at once) and, on vLLM's pipeline parallelism, the gap grows with the input length.
    CoEL's uniform expert placement sends every layer's tokens over the 1 GbE link, which binds: three servers are
    still faster, by a flat margin. Fig. 4: one server with 2 GPUs (tensor parallel) out-serves two servers
    (pipeline parallel over 1 GbE) once decoding dominates (memory-bound decode reads each stage's weights once per
    micro-batch), by less than the paper's 1.7x; at 64 output tokens the prefill-bound engines nearly tie."""
    ratios = [r["two_servers_latency_s"] / r["three_servers_latency_s"] for r in paper_results["fig6"]]
    assert all(x > 1.0 for x in ratios) and ratios[-1] > ratios[0]
    assert all(r["two_servers_latency_s"] > r["three_servers_latency_s"] for r in coel_results["fig6"])
    for row in paper_results["fig4"]:
        ratio = row["single_server_tok_s"] / row["two_servers_tok_s"]
        assert ratio < 1.7
        if row["output_len"] >= 512:
            assert ratio > 1.2


def test_single_request_trends(single_results):
    """One request at a time: collaboration over a 1 GbE LAN costs per-request speed and latency, every extra server
    one more set of hops. Batch-1 decode is memory-bound: tensor parallel reads half the weights on each GPU at once,
    a pipeline reads its stages one after the other, so the latency ratio is flat in the output length (the paper's
    Fig. 5: about 1.69, flat)."""
    ratios = []
    for row, lat in zip(single_results["fig4"], single_results["fig5"]):
        assert row["single_server_tok_s"] > 1.3 * row["two_servers_tok_s"] > 0
        ratios.append(lat["two_servers_latency_s"] / lat["single_server_latency_s"])
    assert max(ratios) < 1.1 * min(ratios)
    lat = [r["two_servers_latency_s"] for r in single_results["fig5"]]
    assert lat == sorted(lat) and lat[-1] > 10 * lat[0]  # ~linear in output length
    for row in single_results["fig6"]:
        assert row["three_servers_latency_s"] > row["two_servers_latency_s"]
    fig6 = single_results["fig6"]
    assert fig6[-1]["two_servers_latency_s"] > fig6[0]["two_servers_latency_s"]  # longer prompts cost more


def test_bad_load_is_one_line(tmp_path):
    proc = run_module("experiments.reproduce_paper", f"hydra.run.dir={tmp_path}", "load=batchy")
    assert proc.returncode != 0 and "load: 'batchy'; allowed: concurrent, single" in proc.stderr


def test_evaluate_plan_prints_metrics_json():
    proc = run_module("experiments.evaluate_plan", "scenario=tiny", "plan=uniform")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["scenario"] == "tiny" and out["backend"] == "surrogate"
    m = out["metrics"]
    assert m["e2e_p95_s"] >= m["e2e_mean_s"] * 0.5 > 0
    assert len(m["gpu_mem_bytes"]) == 3 and len(m["link_bytes"]) == 3


def test_evaluate_plan_manifest_round_trip(tmp_path):
    from coel_env import DeploymentPlan, make_scenario

    sc = make_scenario("tiny")
    plan = DeploymentPlan.uniform(sc.cluster)
    plan.bits[:] = 8
    path = plan.save_manifest(tmp_path / "plan.json", sc.cluster)
    proc = run_module("experiments.evaluate_plan", "scenario=tiny", f"plan={path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["metrics"]["quality_loss"] > 0  # 8-bit experts lose a little quality


def test_evaluate_plan_bad_manifest_is_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "coel-deployment-manifest", "version": 1, "model": "tiny-moe", "experts": [')
    proc = run_module("experiments.evaluate_plan", "scenario=tiny", f"plan={bad}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not valid JSON" in lines[0]
