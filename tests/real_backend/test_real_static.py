"""Static decode steps (real_backend/static.py; COEL_REAL_STATIC=1 forces them on CPU): the same tokens, logits and
booked bytes as the eager decode over the same shared-memory lanes, with the static steps and serving taken."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coel_env import DeploymentPlan, Scenario
from real_backend import make_real_backend
from real_backend.shm import SHM_ENV, Segment, layout_for
from real_backend.static import STATIC_ENV, bucket, static_enabled


def _serve(static: str, monkeypatch) -> dict:
    monkeypatch.setenv(SHM_ENV, "1")
    monkeypatch.setenv(STATIC_ENV, static)
    sc = Scenario("tiny", seed=0)
    state = sc.initial_state(np.random.default_rng(0))
    plan = DeploymentPlan.uniform(sc.cluster)
    backend = make_real_backend(sc.cluster, seed=0, timeout_s=30, max_requests_per_server=4)
    try:
        backend.reset(plan, state)
        backend.window_index = 0
        m = backend.serve(plan, state, 4.0)
        return dict(backend.last_details, link_bytes=m.link_bytes)
    finally:
        backend.close()


@pytest.fixture(scope="module")
def runs():
    with pytest.MonkeyPatch.context() as mp:
        return {v: _serve(v, mp) for v in ("1", "0")}


@pytest.mark.slow
def test_static_steps_serve_the_same_tokens_logits_and_bytes(runs):
    st, ref = runs["1"], runs["0"]
    assert st["transport"] == ["shm"] * 3
    assert st["tokens"] == ref["tokens"] and sum(len(t) for t in st["tokens"].values()) >= 3
    for rid, lg in st["prompt_logits"].items():
        np.testing.assert_array_equal(lg, ref["prompt_logits"][rid])
    for key in ("bytes_to", "rows_to", "msgs_to", "tokens_to", "tiers"):
        assert st[key] == ref[key], key
    np.testing.assert_array_equal(st["link_bytes"], ref["link_bytes"])


@pytest.mark.slow
def test_static_path_is_taken_only_when_asked(runs):
    steps, served = np.array(runs["1"]["static"]).sum(0)
    assert steps == sum(runs["1"]["fast_steps"]) > 0  # every batched decode step was static
    assert served > 0  # peers' rows served by the static graphs' code
    assert np.array(runs["0"]["static"]).sum() == 0


def test_static_switch_and_buckets(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(STATIC_ENV, raising=False)
    assert static_enabled(gpu) and not static_enabled(cpu)  # default: on for servers on a GPU
    monkeypatch.setenv(STATIC_ENV, "0")
    assert not static_enabled(gpu)
    monkeypatch.setenv(STATIC_ENV, "1")
    assert static_enabled(cpu)
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 17)] == [1, 2, 4, 4, 8, 32]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_segment_takes_async_device_copies():
    seg = Segment.create(layout_for(world=2, layers=2, d_model=8, top_k=2, max_batch=2))
    try:
        assert seg.pin()
        data = seg.attach()[1]
        src = torch.arange(64, dtype=torch.uint8, device="cuda")
        data[-64:].copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        torch.testing.assert_close(data[-64:].cuda(), src)
    finally:
        seg.close()
