"""The device scripts' TPOT table (`bench_real_engine table`) from bench_testbed's measured CSV files; the link bound
of a saturating run (`saturation_bound`)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.bench_real_engine import measured_table, saturation_bound
from coel_env.world.state import Scenario


def test_measured_table_puts_each_variant_in_its_column(tmp_path):
    head = "job,batch,status,tpot_s,batch_tok_s\n"
    (tmp_path / "measured_gloo_b1.csv").write_text(head + "2srv-app,1,ok,0.0511,19.6\n3srv-app,1,failed,0,0\n")
    (tmp_path / "measured_shm_b1.csv").write_text(head + "2srv-app,1,ok,0.0386,25.9\n")
    lines = measured_table(str(tmp_path), ["gloo", "shm"]).splitlines()
    assert lines[0] == "| job | batch | gloo TPOT ms (tok/s) | shm TPOT ms (tok/s) |"
    assert lines[2:] == ["| 2srv-app | 1 | 51.1 (20) | 38.6 (26) |"]  # a failed run is no row


def test_saturation_bound_is_the_busiest_link_direction():
    """2 servers on a 1 Gb/s star: 0 -> 1 crosses server 0's uplink and server 1's downlink; the bound is set by the
    busier direction (full duplex), the half-duplex one by both directions of a link together."""
    c = Scenario("paper-2server-1gpu", seed=0).cluster
    b = saturation_bound(c, np.array([[0.0, 3e8], [1e8, 0.0]]), n_out=1000.0)
    assert b["bytes_per_out_token_busiest_dir"] == 3e5
    assert b["link_bound_tok_s"] == pytest.approx(1000 / (3e8 / 1.25e8))
    assert b["half_duplex_bound_tok_s"] == pytest.approx(1000 / (4e8 / 1.25e8))
