"""Long requests served as streams (real_backend/dist.py `_serve_stream`): chunks computed as they arrive and the
reply streamed back while the request streams in. The same tokens and booked bytes as serving each request whole
(prompt logits equal to rounding: chunked GEMMs); the streamed path taken (COEL_REAL_STREAM_ROWS=2 makes the tiny
scenario's prompts long)."""

from __future__ import annotations

import numpy as np
import pytest

from coel_env import ConfigError, DeploymentPlan, Scenario
from real_backend import make_real_backend
from real_backend.dist import STREAM_ENV


def _serve(rows: str, monkeypatch) -> dict:
    monkeypatch.setenv(STREAM_ENV, rows)
    sc = Scenario("tiny", seed=0)
    state = sc.initial_state(np.random.default_rng(0))
    plan = DeploymentPlan.uniform(sc.cluster)
    backend = make_real_backend(sc.cluster, seed=0, timeout_s=30, max_requests_per_server=4)
    try:
        backend.reset(plan, state)
        m = backend.serve(plan, state, 4.0)
        return dict(backend.last_details, link_bytes=m.link_bytes)
    finally:
        backend.close()


@pytest.mark.slow
def test_streamed_requests_serve_the_same_tokens_logits_and_bytes(monkeypatch):
    st, ref = _serve("2", monkeypatch), _serve("1000000", monkeypatch)
    assert sum(st["streams_served"]) > 0 and sum(ref["streams_served"]) == 0
    assert st["tokens"] == ref["tokens"] and sum(len(t) for t in st["tokens"].values()) >= 3
    for rid, lg in st["prompt_logits"].items():
        np.testing.assert_allclose(lg, ref["prompt_logits"][rid], rtol=1e-4, atol=1e-5)  # chunked GEMMs round apart
    for key in ("bytes_to", "rows_to", "msgs_to", "tokens_to"):
        assert st[key] == ref[key], key
    np.testing.assert_array_equal(st["link_bytes"], ref["link_bytes"])


@pytest.mark.parametrize("rows", ["0", "-3", "2.5", "lots"])
def test_a_bad_stream_rows_setting_fails_in_one_line_before_any_server_starts(rows, monkeypatch):
    monkeypatch.setenv(STREAM_ENV, rows)
    sc = Scenario("tiny", seed=0)
    with pytest.raises(ConfigError, match=rf"^{STREAM_ENV}: '{rows}' given; must be a whole number of rows >= 1$"):
        make_real_backend(sc.cluster, seed=0)
