"""Multi-node launch of the real backend through torchrun's c10d rendezvous: two torchrun "nodes" on localhost
(2 + 1 ranks for the 3 servers of `tiny`) serve the same work as locally spawned servers, with identical results."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import pid_alive

from coel_env import Scenario
from coel_env.errors import ConfigError
from real_backend import RealBackend
from real_backend.launch import run

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ["-m", "real_backend.launch", "--scenario", "tiny", "--check-errors"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each agent's process group (the agent stops its workers), then SIGKILL what is left."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, sig)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(grace)


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    """Two torchrun agents (nnodes=2, nproc-per-node 2 and 1) on one c10d endpoint, serving one window."""
    tmp = tmp_path_factory.mktemp("torchrun")
    out = tmp / "run.json"
    port = _free_port()
    env = {
        **os.environ,
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        "TMPDIR": str(tmp),
        "COEL_SYNC_CLOCK": "1",
    }  # exercise the clock alignment that ranks on other hosts use
    procs, logs = [], []
    for node, nproc in enumerate((2, 1)):
        # with c10d the rendezvous assigns node ranks (and so which agent hosts rank 0); --node-rank is ignored
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=coel-test",
            "--max-restarts=0",
            *LAUNCH,
            "--out",
            str(out),
        ]
        logs.append(tmp / f"node{node}.log")
        with logs[-1].open("w") as log:
            procs.append(
                subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )
    deadline = time.monotonic() + 150
    try:
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(deadline - time.monotonic(), 1.0))
    finally:
        _stop(procs)
    text = "\n".join(f.read_text()[-3000:] for f in logs)
    assert [p.returncode for p in procs] == [0, 0], text
    return json.loads(out.read_text()), tmp


@pytest.fixture(scope="module")
def spawned_run():
    return run("tiny", launcher="spawn", check_errors=True)


def test_torchrun_two_nodes_equal_local_spawn(torchrun_run, spawned_run):
    got, _ = torchrun_run
    ref = spawned_run
    assert got["launcher"] == "torchrun" and got["world_size"] == 3 and ref["launcher"] == "spawn"
    assert got["requests"] == ref["requests"] and len(got["tokens"]) >= 3  # identical work, several requests
    assert got["tokens"] == ref["tokens"]  # generated tokens, request by request
    assert got["link_bytes"] == ref["link_bytes"] and sum(got["link_bytes"]) > 0  # bytes per link
    assert got["tokens_to"] == ref["tokens_to"] and got["rows_to"] == ref["rows_to"]
    assert got["metrics"]["quality_loss"] == 0.0 and got["metrics"]["dropped_frac"] == 0.0


def test_torchrun_server_exception_reaches_driver_and_ranks_exit(torchrun_run, spawned_run):
    got, tmp = torchrun_run
    first = got["error"].splitlines()[0]
    assert first == "server s1 failed in 'reset': TypeError: 'NoneType' object is not subscriptable"
    assert first == spawned_run["error"].splitlines()[0]  # same error as with spawned servers
    assert "traceback of server s1" in got["error"] and 'arg["device"]' in got["error"]  # the rank's traceback
    assert len(got["pids"]) == 3 and not any(pid_alive(p) for p in got["pids"])  # every rank exited
    assert not list(tmp.glob("coel-real-*"))  # every rank removed its SSD tier directory


def test_world_size_must_equal_number_of_servers(monkeypatch):
    cluster = Scenario("tiny", seed=0).cluster
    for k, v in {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "2",
        "TORCHELASTIC_RUN_ID": "test",
    }.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=r"WORLD_SIZE is 2 but scenario 'tiny' has 3 servers"):
        RealBackend(cluster)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"links 'netns' needs locally spawned servers"):
        RealBackend(cluster, links="netns")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    with pytest.raises(ConfigError, match=r"launcher 'torchrun' but .* not set"):
        RealBackend(cluster, launcher="torchrun")
    with pytest.raises(ConfigError, match=r"launcher 'mpi' unknown; allowed: auto, spawn, torchrun"):
        RealBackend(cluster, launcher="mpi")
