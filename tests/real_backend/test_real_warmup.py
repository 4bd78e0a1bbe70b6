"""Warm-up after an install (real_backend/warmup.py, RealBackend `warmup`): requests served unmeasured after every
reset / apply, so a window measures serving rather than the first steps' one-time costs; the window itself (its
tokens, bytes per link, messages) is the same as without a warm-up."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from coel_env import DeploymentPlan, Scenario
from coel_env.errors import ConfigError
from real_backend import make_real_backend
from real_backend.warmup import WARMUP_TOKENS, warm_requests


def _window(warmup: bool) -> tuple[dict, list[float]]:
    sc = Scenario("tiny", seed=0)
    state = sc.initial_state(np.random.default_rng(0))
    plan = DeploymentPlan.uniform(sc.cluster)
    other = plan.copy()
    other.device[0, 0, 0] = (plan.device[0, 0, 0] + 1) % len(sc.cluster.dev_server)  # one expert moves: an apply
    backend = make_real_backend(sc.cluster, seed=0, timeout_s=30, max_requests_per_server=3, warmup=warmup)
    try:
        backend.reset(plan, state)
        warm = [backend.last_warmup_s]
        backend.apply(other, state)
        warm.append(backend.last_warmup_s)
        m = backend.serve(other, state, 4.0)
        return dict(backend.last_details, link_bytes=m.link_bytes), warm
    finally:
        backend.close()


@pytest.mark.slow
def test_a_warm_up_leaves_the_measured_window_unchanged():
    warm, warm_s = _window(True)
    cold, cold_s = _window(False)
    assert all(s > 0 for s in warm_s) and cold_s == [0.0, 0.0]  # reset and apply each warmed the plan up
    assert warm["tokens"] == cold["tokens"] and sum(len(t) for t in warm["tokens"].values()) >= 3
    for key in ("bytes_to", "rows_to", "msgs_to", "tokens_to"):
        assert warm[key] == cold[key], key
    np.testing.assert_array_equal(warm["link_bytes"], cold["link_bytes"])


def _fake_backend(servers: int = 2):
    routing = SimpleNamespace(sample=lambda mix, n, rng: np.zeros((n, 2, 1), dtype=np.int64))  # [tokens, layers, top-k]
    cluster, cfg = SimpleNamespace(num_servers=servers), SimpleNamespace(vocab_size=50)
    return SimpleNamespace(cluster=cluster, routing=routing, cfg=cfg)


def test_warm_up_walks_the_decode_batch_down_to_one():
    """max_batch requests per server of 1, 2, ... more output tokens each: the decode batch passes through every
    size (a CUDA graph each) before a window is measured."""
    out = warm_requests(_fake_backend(), SimpleNamespace(domain_mix=np.ones((2, 1))), 8, np.random.default_rng(0), 3)
    assert [len(r) for r in out] == [3, 3]
    assert [q["max_new"] for q in out[1]] == [WARMUP_TOKENS, WARMUP_TOKENS + 1, WARMUP_TOKENS + 2]
    assert len({q["rid"] for r in out for q in r}) == 6
    assert all(q["server"] == s and len(q["routes"]) == 8 + q["max_new"] - 1 for s, r in enumerate(out) for q in r)


def test_warm_up_skips_failed_servers_and_unservable_routes():
    state = SimpleNamespace(domain_mix=np.ones((2, 1)), server_up=np.array([True, False]))
    out = warm_requests(_fake_backend(), state, 4, np.random.default_rng(0), 2)
    assert [len(r) for r in out] == [2, 0]  # a failed server serves nothing
    live = np.ones((2, 3), dtype=bool)
    live[1, 0] = False  # expert 0 of layer 1, which every fake route uses, has no live replica
    out = warm_requests(_fake_backend(), state, 4, np.random.default_rng(0), 2, live=live)
    assert [len(r) for r in out] == [0, 0]


def test_warm_up_option_is_checked_and_defaults_to_cuda_only():
    sc = Scenario("tiny", seed=0)
    with pytest.raises(ConfigError, match="warmup"):
        make_real_backend(sc.cluster, warmup="yes")
    assert make_real_backend(sc.cluster).warmup is False  # CPU: no graphs to capture (nothing is started here)
