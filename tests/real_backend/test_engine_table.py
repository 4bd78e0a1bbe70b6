"""The device scripts' TPOT table (`bench_real_engine table`) from bench_testbed's measured CSV files."""

from __future__ import annotations

from benchmarks.bench_real_engine import measured_table


def test_measured_table_puts_each_variant_in_its_column(tmp_path):
    head = "job,batch,status,tpot_s,batch_tok_s\n"
    (tmp_path / "measured_gloo_b1.csv").write_text(head + "2srv-app,1,ok,0.0511,19.6\n3srv-app,1,failed,0,0\n")
    (tmp_path / "measured_shm_b1.csv").write_text(head + "2srv-app,1,ok,0.0386,25.9\n")
    lines = measured_table(str(tmp_path), ["gloo", "shm"]).splitlines()
    assert lines[0] == "| job | batch | gloo TPOT ms (tok/s) | shm TPOT ms (tok/s) |"
    assert lines[2:] == ["| 2srv-app | 1 | 51.1 (20) | 38.6 (26) |"]  # a failed run is no row
