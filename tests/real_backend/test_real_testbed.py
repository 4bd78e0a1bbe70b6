"""benchmarks/bench_testbed.py on CPU: the tiny model over gloo, the budget logic and the comparison table."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: `benchmarks` is not installed
from benchmarks.bench_testbed import Estimator, comparison, comparison_md, parse, sweep_points
from benchmarks.bench_testbed import main as bench_main


def _measure(out, tag: str, *args: str) -> list[dict]:
    """`bench_testbed measure` of the tiny model on CPU into `out`; the rows of its measured_<tag>.csv."""
    bench_main(["measure", "--model", "tiny-moe", "--device", "cpu", *args, "--out", str(out), "--tag", tag])
    with open(out / f"measured_{tag}.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_points_and_estimator():
    assert sweep_points("ab", [64, 128], [8], 128) == [(128, 64), (128, 128)]
    assert sweep_points("c", [8], [64, 2048], 128) == [(64, 128), (2048, 128)]
    est = Estimator()
    assert est(128, 64) == 0.0  # nothing seen: run it
    est.add(128, 0.5, 0.1)
    assert est(256, 100) == pytest.approx(1.2 * (1.0 + 10.0) + 2.0)


def test_zero_budget_skips_every_point_without_starting_servers(tmp_path):
    rows = _measure(tmp_path, "z", "--jobs", "2srv-app:c", "--input-lens", "4", "8", "--budget-s", "0")
    assert [(r["input_len"], r["status"]) for r in rows] == [("4", "skipped"), ("8", "skipped")]


@pytest.mark.slow
def test_tiny_two_servers_measure_and_compare(tmp_path):
    rows = _measure(
        tmp_path, "t", "--jobs", "2srv-app:ab", "--output-lens", "2", "4", "--fixed-len", "4", "--budget-s", "120"
    )
    assert [(r["output_len"], r["status"]) for r in rows] == [("2", "ok"), ("4", "ok")]
    for r in rows:
        assert float(r["latency_s"]) > float(r["ttft_s"]) > 0
        assert float(r["link_bytes"]) > 0  # half the layers' experts live on the other server
    sur = [
        {
            "gpu": g,
            "job": "2srv-app",
            "sweep": "ab",
            "input_len": "4",
            "output_len": o,
            "latency_s": "0.5",
            "tok_s": "1",
            "ttft_s": "0.1",
            "tpot_s": "0.1",
        }
        for g in ("h200", "rtx4090d")
        for o in ("2", "4")
    ]
    cmp = comparison(rows, sur)
    assert len(cmp) == 2 and cmp[0]["ratio_h200"] == pytest.approx(float(rows[0]["latency_s"]) / 0.5)
    assert "| 2srv-app | ab | 4 | 4 |" in comparison_md(cmp, rows)


def test_default_is_report(tmp_path):
    assert parse([]).cmd == "report"
    bench_main(["report", "--out", str(tmp_path)])  # no measured CSV: a message, no error
