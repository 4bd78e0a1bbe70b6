"""RealBackend on the tiny scenario: 3 gloo server processes on CPU (one backend shared by the module)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch
from conftest import pid_alive

from coel_env import Backend, DeploymentPlan, PlanError, Scenario
from coel_env.backend.wire import (
    SLOT_BYTES,
    STAMP_BYTES,
    destination_rows,
    dispatch_bytes,
    reply_row_bytes,
    request_row_bytes,
    row_round_trip_bytes,
)
from real_backend import RealBackend, ServerError, make_real_backend
from real_backend.dist import dispatch_targets

pytestmark = pytest.mark.slow
EXPERT16 = 3 * 64 * 128 * 2  # tiny-moe expert at 16 bits


@pytest.fixture(scope="module")
def env():
    sc = Scenario("tiny", seed=0)
    state = sc.initial_state(np.random.default_rng(0))
    plan = DeploymentPlan.uniform(sc.cluster)
    backend = make_real_backend(sc.cluster, seed=0, timeout_s=30, max_requests_per_server=2)
    backend.reset(plan, state)
    yield sc, state, plan, backend
    backend.close()


def _replay(backend: RealBackend, plan, state, window: int = 0):
    backend.window_index = window
    m = backend.serve(plan, state, 4.0)
    return m, dict(backend.last_details["tokens"]), dict(backend.last_details["prompt_logits"])


def test_protocol_and_factory(env):
    _, _, _, backend = env
    assert isinstance(backend, Backend) and backend.name == "real"
    assert len(backend.pids()) == 3 and all(pid_alive(p) for p in backend.pids())


def test_distributed_equals_single_process(env):
    _, state, plan, backend = env
    m, tokens, logits = _replay(backend, plan, state)
    reqs = [q for r in backend.last_requests for q in r]
    assert len(reqs) >= 3 and m.dropped_frac == 0.0 and m.requests >= len(reqs)
    assert backend.last_details["tokens_to"][0][1] > 0  # tokens really crossed servers
    for q in reqs:
        ref_tokens, ref_logits = backend.reference_generate(q)
        assert tokens[q["rid"]] == ref_tokens
        torch.testing.assert_close(torch.as_tensor(logits[q["rid"]]), ref_logits, atol=1e-4, rtol=1e-4)
    assert m.quality_loss == 0.0 and m.tokens_per_s > 0 and m.ttft_mean_s > 0 and m.tpot_mean_s > 0
    assert m.link_bytes.sum() > 0 and m.gpu_mem_bytes.sum() == 32 * EXPERT16
    d = backend.last_details  # the fast path ran: batched decode steps over KV slots, grouped-GEMM experts
    assert sum(d["fast_steps"]) > 0 and d["grouped_layers"] == d["expert_layers"] and sum(d["expert_layers"]) > 0


def _routed_rows(sc: Scenario, plan: DeploymentPlan, state, requests) -> tuple[np.ndarray, np.ndarray]:
    """[S, S] rows each server sends each destination by the wire format for the requests' forced routes, and
    the old count of one row per (token, expert) pair."""
    c = sc.cluster
    L, E, _ = plan.device.shape
    S = c.num_servers
    holders = [[{int(c.dev_server[x]) for x in plan.device[l, e] if x >= 0} for e in range(E)] for l in range(L)]
    rows, pairs = np.zeros((S, S), dtype=np.int64), np.zeros((S, S), dtype=np.int64)
    for q in (q for r in requests for q in r):
        s = q["server"]
        target = dispatch_targets(holders, s, state.server_up, c.pair_latency)
        routes = np.asarray(q["routes"], dtype=np.int64)  # [tokens, L, k]: every token the server processes
        for l in range(L):
            rows[s] += destination_rows(target[l], routes[:, l], s, S)
            per_pair = np.bincount(target[l][routes[:, l]].ravel(), minlength=S)
            per_pair[s] = 0
            pairs[s] += per_pair
    return rows, pairs


def test_dispatch_bytes_equal_the_wire_format(env):
    """Compression off: every server pair carried exactly the wire format's bytes for the routes used; a token
    with two experts on one server crossed to it once."""
    sc, state, plan, backend = env
    m, _, _ = _replay(backend, plan, state)
    d = backend.last_details
    assert d["wire"] == {"activation_bytes": 4, "row_header_bytes": SLOT_BYTES}  # fp32 rows on CPU
    rows, pairs = _routed_rows(sc, plan, state, backend.last_requests)
    got_rows, msgs = np.array(d["rows_to"], dtype=np.int64), np.array(d["msgs_to"], dtype=np.int64)
    sent = np.array(d["bytes_to"], dtype=np.int64)  # requests to each peer + replies to the peer's requests
    np.testing.assert_array_equal(got_rows, rows)
    np.testing.assert_array_equal(np.array(d["tokens_to"], dtype=np.int64), rows)
    assert ((msgs > 0) == (rows > 0)).all() and (rows >= msgs).all()
    dm, k, act = sc.cluster.model.d_model, sc.cluster.model.top_k, d["wire"]["activation_bytes"]
    req, rep = request_row_bytes(dm, act, SLOT_BYTES, k), reply_row_bytes(dm, act)
    np.testing.assert_array_equal(sent, rows * req + rows.T * rep + STAMP_BYTES * (msgs + msgs.T))
    pair = dispatch_bytes(rows, msgs, row_round_trip_bytes(dm, act, SLOT_BYTES, k))  # both directions per row
    np.testing.assert_array_equal(sent + sent.T, pair + pair.T)
    np.testing.assert_array_equal(m.link_bytes, sc.cluster.pair_to_links(pair))
    assert rows.sum() > 0 and ((rows < pairs) & (rows > 0)).any() and (rows <= pairs).all()


def test_tier_moves_keep_outputs_identical(env):
    sc, state, plan, backend = env
    _, tok0, log0 = _replay(backend, plan, state)
    moved = plan.copy()
    moved.tier[0, :, 0] = 1  # layer 0 to CPU memory
    moved.tier[2, :, 0] = 2  # layer 2 to SSD files
    rep = backend.apply(moved, state)
    assert rep.bytes_local == 16 * EXPERT16 and rep.bytes_peer == 0 and rep.bytes_cloud == 0
    assert rep.replicas_added == 16 and rep.replicas_removed == 16 and rep.time_s > 0
    phases = backend.last_migration_phases  # per server, wall seconds by phase; the slowest server's sum is time_s
    assert len(phases) == sc.cluster.num_servers and all(set(p) == {"stage", "send", "install", "wait"} for p in phases)
    assert max(sum(p.values()) for p in phases) == pytest.approx(rep.time_s)
    m, tok1, log1 = _replay(backend, moved, state)
    assert tok1 == tok0
    for rid in log0:
        assert np.array_equal(log0[rid], log1[rid])
    assert m.ssd_bytes.sum() >= 8 * EXPERT16 and m.cpu_mem_bytes.sum() == 8 * EXPERT16
    assert sum(t["tier_tokens"][2] for t in backend.last_details["tiers"]) > 0
    backend.apply(plan, state)


def test_migration_peer_local_cloud_bytes(env):
    sc, state, plan, backend = env
    c = sc.cluster
    peer = plan.copy()
    peer.device[0, :4, 0] = 1  # layer-0 experts 0..3: device 0 -> device 1 (another server)
    rep = backend.apply(peer, state)
    assert rep.bytes_peer == 4 * EXPERT16 and rep.bytes_local == 0 and rep.bytes_cloud == 0
    pair = c.pair_index[0, 1]
    assert np.allclose(rep.link_bytes, 4 * EXPERT16 * c.pair_links[pair])
    low = peer.copy()
    low.bits[low.device >= 0] = 8  # requantize in place: local
    rep8 = backend.apply(low, state)
    assert rep8.bytes_local == 32 * 25216 and rep8.bytes_peer == 0
    m8, _, _ = _replay(backend, low, state)
    assert 0 <= m8.quality_loss < 0.2 and backend.last_details["kl"] < 1e-2
    rep16 = backend.apply(plan, state)  # nobody holds 16-bit copies any more: reload from the cloud
    assert rep16.bytes_cloud == 32 * EXPERT16 and rep16.bytes_peer == 0
    m16, _, _ = _replay(backend, plan, state)
    assert m16.quality_loss == 0.0


def test_pruning_and_fusion_reduce_link_bytes(env):
    _, state, plan, backend = env
    m0, _, _ = _replay(backend, plan, state)
    comp = plan.copy()
    comp.prune[:] = 0.5
    comp.fuse[:] = True
    backend.apply(comp, state)
    m1, _, _ = _replay(backend, comp, state)
    d = backend.last_details
    assert d["tokens_pruned"] > 0 and d["tokens_fused"] > 0
    assert m1.link_bytes.sum() < 0.6 * m0.link_bytes.sum()
    assert m1.quality_loss > 0 and d["kl"] > 0
    backend.apply(plan, state)


def test_bad_plan_refused_before_any_move(env):
    _sc, state, plan, backend = env
    before = backend.current.copy()
    bad = plan.copy()
    bad.device[1, 3, :] = -1  # an expert with no replica
    with pytest.raises(PlanError, match="no replica"):
        backend.apply(bad, state)
    odd = plan.copy()
    odd.bits[0, 0, 0] = 3
    with pytest.raises(PlanError, match="allowed: 16, 8, 4"):
        backend.apply(odd, state)
    assert backend.current == before and backend.alive


def test_down_server_drops_requests(env):
    _, state, plan, backend = env
    down = state.copy()
    down.server_up[2] = False
    m, _, _ = _replay(backend, plan, down)
    assert 0 < m.dropped_frac <= 1 and m.late_frac >= m.dropped_frac


def _long_serve(backend: RealBackend, plan, state, n_new: int = 2000) -> None:
    """Serve one request of `n_new` tokens on server 0 (seconds of lock-step decoding: a kill lands mid-exchange)."""
    rng = np.random.default_rng(0)
    routes = backend.routing.sample(state.domain_mix[0], 8 + n_new - 1, rng)
    q = {"rid": 1, "arrival": 0.0, "max_new": n_new, "prompt": rng.integers(0, 64, 8), "routes": routes, "server": 0}
    backend.serve_requests(plan, state, [[q], [], []], 60.0)


def test_killed_server_gives_clear_error_then_reset_recovers(env):
    _, state, plan, backend = env
    pids = backend.pids()
    victim = pids[1]
    threading.Timer(0.5, os.kill, (victim, 9)).start()
    t0 = time.monotonic()
    with pytest.raises(ServerError, match=r"server s1 \(pid \d+\) exited with code -9"):
        _long_serve(backend, plan, state)
    assert time.monotonic() - t0 < 20
    assert not any(pid_alive(p) for p in pids)  # no orphans
    backend.reset(plan, state)
    assert set(backend.pids()).isdisjoint(pids)
    m, _, _ = _replay(backend, plan, state)
    assert m.quality_loss == 0.0 and m.dropped_frac == 0.0


def test_hung_server_times_out(env):
    _, _state, _plan, backend = env
    pids = backend.pids()
    backend.timeout_s = 3.0
    backend.inject(2, "hang")
    t0 = time.monotonic()
    with pytest.raises(ServerError, match=r"hung|failed"):
        backend._call("ping")
    assert time.monotonic() - t0 < 10
    assert not any(pid_alive(p) for p in pids)
    assert not backend.alive and backend.current is None  # the next reset/serve starts fresh processes
