"""The shared-memory transport of the server processes (real_backend/shm.py, transport.py): the same tokens and bytes
as gloo, bounded waits on a dead or hung peer, the capacity check, no segment left after close."""

from __future__ import annotations

import os
import re
import signal
import time
import traceback

import numpy as np
import pytest
import torch
from conftest import pid_alive

from coel_env import DeploymentPlan, Scenario
from real_backend import make_real_backend
from real_backend.channels import is_comm_error
from real_backend.shm import (
    REP,
    REQ,
    SHM_ENV,
    Lane,
    ReduceBoard,
    Segment,
    ShmCapacityError,
    ShmPeerGone,
    ShmTimeout,
    Waiter,
    layout_for,
    register,
    shm_enabled,
)

MEMFD = "memfd:coel-real-shm"


def _memfd_maps(pid: int) -> bool:
    """Whether process `pid` maps the transport's segment."""
    with open(f"/proc/{pid}/maps") as f:
        return MEMFD in f.read()


def _memfd_fds(pid: int) -> int:
    """The segment's descriptors process `pid` holds."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += MEMFD in os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
    return n


def _serve(shm: str, monkeypatch) -> dict:
    """One window of the tiny scenario with COEL_REAL_SHM=`shm`: its details, and what held the segment."""
    monkeypatch.setenv(SHM_ENV, shm)
    sc = Scenario("tiny", seed=0)
    state = sc.initial_state(np.random.default_rng(0))
    plan = DeploymentPlan.uniform(sc.cluster)
    dev_shm = set(os.listdir("/dev/shm"))
    backend = make_real_backend(sc.cluster, seed=0, timeout_s=30, max_requests_per_server=2)
    try:
        backend.reset(plan, state)
        pids = backend.pids()
        mapped = [_memfd_maps(p) for p in pids]
        backend.window_index = 0
        m = backend.serve(plan, state, 4.0)
        out = dict(backend.last_details, link_bytes=m.link_bytes, mapped=mapped, pids=pids)
        out["driver_fds"] = _memfd_fds(os.getpid())
    finally:
        backend.close()
    out["left"] = [p for p in pids if pid_alive(p)]
    out["driver_maps"] = _memfd_maps(os.getpid())
    out["new_dev_shm"] = sorted(set(os.listdir("/dev/shm")) - dev_shm)
    return out


@pytest.fixture(scope="module")
def runs():
    with pytest.MonkeyPatch.context() as mp:
        return {v: _serve(v, mp) for v in ("1", "0")}


@pytest.mark.slow
def test_shm_serves_the_same_tokens_and_books_the_same_bytes_as_gloo(runs):
    shm, gloo = runs["1"], runs["0"]
    assert shm["transport"] == ["shm"] * 3 and gloo["transport"] == ["gloo"] * 3
    assert shm["tokens"] == gloo["tokens"] and len(shm["tokens"]) >= 3
    assert shm["prompt_logits"].keys() == gloo["prompt_logits"].keys()
    for rid, lg in shm["prompt_logits"].items():
        np.testing.assert_array_equal(lg, gloo["prompt_logits"][rid])
    for key in ("bytes_to", "rows_to", "msgs_to", "tokens_to"):
        np.testing.assert_array_equal(shm[key], gloo[key], err_msg=key)
    np.testing.assert_array_equal(shm["link_bytes"], gloo["link_bytes"])
    # prefill messages exceed the lanes (8 x 2 rows): over gloo; decode messages through the lanes
    big, msgs = sum(shm["transport_fallbacks"]), int(np.sum(shm["msgs_to"]))
    assert 0 < big < 4 * msgs and sum(gloo["transport_fallbacks"]) == 0


@pytest.mark.slow
def test_segment_held_by_the_servers_only_and_gone_after_close(runs):
    shm, gloo = runs["1"], runs["0"]
    assert all(shm["mapped"]) and not any(gloo["mapped"])  # the servers map it; with COEL_REAL_SHM=0 none exists
    assert shm["driver_fds"] == 0 and not shm["driver_maps"]  # the driver closed its descriptor after the spawn
    assert shm["left"] == [] and gloo["left"] == []  # no server left: the kernel freed the memfd with them
    assert shm["new_dev_shm"] == [] and gloo["new_dev_shm"] == []


def test_shm_env_switch(monkeypatch):
    monkeypatch.setenv(SHM_ENV, "0")
    assert not shm_enabled()
    monkeypatch.setenv(SHM_ENV, "1")
    assert shm_enabled()


# ---- the lanes, without server processes (forked peers) ---------------------------------------------------------
def _lanes(seg: Segment, rank: int, timeout_s: float) -> tuple[dict, dict, Waiter]:
    words, data = seg.attach()
    register(words, seg.layout, rank)
    w = Waiter(words, seg.layout, rank, timeout_s)
    peer = 1 - rank
    return Lane(words, data, seg.layout, rank, peer, w), Lane(words, data, seg.layout, peer, rank, w), w


def _fork(child) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 0
        try:
            child()
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


def _reap(pid: int) -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.fixture
def seg():
    s = Segment.create(layout_for(world=2, layers=3, d_model=8, top_k=2, max_batch=2))  # 16 rows per region
    yield s
    s.close()


def test_lanes_round_trip_a_request_and_its_reply_across_processes(seg):
    req = torch.arange(96, dtype=torch.int32).view(torch.uint8)  # 384 bytes: fits the request and the reply region

    def peer():
        out, inn, w = _lanes(seg, 1, 20.0)
        n, stamp, nbytes = inn.take(REQ, 2)
        rows = inn.payload(REQ, nbytes).clone()
        inn.release(REQ)
        out.put(REP, 2, n, stamp + 1.0, (rows.view(torch.int32) * 2).view(torch.uint8))
        ReduceBoard(seg.attach()[0], seg.layout, 1, w).max(7.0)

    pid = _fork(peer)
    out, inn, w = _lanes(seg, 0, 20.0)
    out.put(REQ, 2, 5, 0.25, req)
    n, stamp, nbytes = inn.take(REP, 2)
    got = inn.payload(REP, nbytes).view(torch.int32).clone()
    inn.release(REP)
    assert ReduceBoard(seg.attach()[0], seg.layout, 0, w).max(3.0) == 7.0  # the step clock's max over both
    assert _reap(pid) == 0
    assert (n, stamp, nbytes) == (5, 1.25, 384)
    torch.testing.assert_close(got, torch.arange(96, dtype=torch.int32) * 2)


def test_payload_larger_than_its_region_is_a_one_line_error(seg):
    out, _inn, _w = _lanes(seg, 0, 1.0)
    cap = seg.layout.req_cap
    assert out.fits(REQ, cap) and not out.fits(REQ, cap + 1)
    with pytest.raises(ShmCapacityError) as ei:
        out.put(REQ, 0, 1, 0.0, torch.zeros(cap + 1, dtype=torch.uint8))
    msg = str(ei.value)
    assert "\n" not in msg and f"{cap + 1} bytes from server 0 to server 1 exceeds its {cap}-byte region" in msg
    assert out.sent == 0  # nothing was published


def test_peer_dying_mid_exchange_is_a_clear_error_not_a_hang(seg):
    def peer():  # registers, takes the request, dies before it replies
        _out, inn, _w = _lanes(seg, 1, 20.0)
        inn.take(REQ, 0)
        os._exit(9)

    pid = _fork(peer)
    out, inn, _w = _lanes(seg, 0, 20.0)
    out.put(REQ, 0, 1, 0.0, torch.zeros(40, dtype=torch.uint8))
    t0 = time.monotonic()
    with pytest.raises(ShmPeerGone) as ei:
        inn.take(REP, 0)
    assert time.monotonic() - t0 < 5  # well within the 20 s timeout
    assert _reap(pid) == 9
    assert re.fullmatch(
        rf"shm transport: server 1 \(pid {pid}\) exited while server 0 waited for server 1's reply "
        r"at layer 0",
        str(ei.value),
    ), str(ei.value)
    assert is_comm_error(traceback.format_exception(ei.value)[-1])  # channels.py blames the dead peer


def test_hung_peer_times_out(seg):
    def peer():  # registers, then never sends
        _lanes(seg, 1, 20.0)
        time.sleep(30)

    pid = _fork(peer)
    try:
        _out, inn, _w = _lanes(seg, 0, 0.5)
        t0 = time.monotonic()
        with pytest.raises(ShmTimeout) as ei:
            inn.take(REQ, 0)
        assert 0.5 <= time.monotonic() - t0 < 5
        assert "timed out after" in str(ei.value) and "server 1's request at layer 0" in str(ei.value)
        assert is_comm_error(traceback.format_exception(ei.value)[-1])
    finally:
        os.kill(pid, signal.SIGKILL)
        _reap(pid)
