"""The real backend never hangs and never hides a crash: Ctrl-C, a server killed between steps, a stopped (hung)
server, a server dying at start. CPU/gloo on the tiny scenario; every test checks that no server process is left."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from coel_env import DeploymentPlan, Scenario
from coel_env.env.env import CoELEnv
from real_backend import RealBackend, ServerError
from real_backend import channels as channels_mod
from real_backend.channels import PipeChannel
from real_backend.server import FAIL_START_ENV

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BACKEND_KW = dict(timeout_s=30, start_timeout_s=150, max_requests_per_server=2)


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie is not: it has exited and only waits to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_gone(pids, timeout: float = 20.0) -> list[int]:
    """The pids still running after up to `timeout` s."""
    deadline = time.monotonic() + timeout
    while any(running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if running(p)]


def children() -> set[int]:
    """Pids of this process's live children."""
    me, out = os.getpid(), set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me and fields[0] != "Z":
                out.add(int(d))
    return out


@pytest.fixture(scope="module")
def env():
    e = CoELEnv(scenario="tiny", backend="real", backend_kwargs=BACKEND_KW)
    yield e
    e.close()


SIGINT_SCRIPT = textwrap.dedent("""
    import json, os, sys, time

    if __name__ == "__main__":
        import faulthandler
        import signal

        faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test dumps the stacks if close() hangs
        # Ctrl-C as at a terminal, even when the test runner ignores SIGINT (a shell's background job does, and a
        # Python started with SIGINT ignored installs no KeyboardInterrupt handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from coel_env.env.env import CoELEnv

        env = CoELEnv(scenario="tiny", backend="real", backend_kwargs=json.loads(sys.argv[1]))
        env.reset(seed=0)
        print(json.dumps({"pids": env.backend.pids(), "pgid": os.getpgrp()}), flush=True)
        try:
            while True:  # the episode, until Ctrl-C
                env.step_plan(env.plan)
        except KeyboardInterrupt:
            t0 = time.monotonic()
            env.close()
            env.close()  # idempotent
            print(json.dumps({"closed_s": time.monotonic() - t0, "left": env.backend.pids()}), flush=True)
            sys.exit(130)
""")


def test_ctrl_c_to_the_process_group_mid_episode_closes_in_bounded_time(tmp_path):
    script = tmp_path / "episode.py"
    script.write_text(SIGINT_SCRIPT)
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with (tmp_path / "stderr.log").open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(script), json.dumps(BACKEND_KW)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,
        )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, proc.stdout), lines.put("null")], daemon=True).start()
    pids: list[int] = []
    try:
        started = json.loads(lines.get(timeout=200))
        assert started is not None, (tmp_path / "stderr.log").read_text()[-3000:]
        pids = started["pids"]
        assert len(pids) == 3 and all(running(p) for p in pids)
        time.sleep(1.5)  # mid-episode
        os.killpg(started["pgid"], signal.SIGINT)  # what Ctrl-C in a terminal does
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGUSR1)  # every thread's stack into stderr.log
            time.sleep(3)
            pytest.fail("no exit within 90 s of Ctrl-C; stacks:\n" + (tmp_path / "stderr.log").read_text()[-8000:])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        left = wait_gone(pids)
        for p in left:
            os.kill(p, signal.SIGKILL)
    stderr = (tmp_path / "stderr.log").read_text()[-3000:]
    assert rc == 130, stderr
    closed = json.loads(lines.get(timeout=10))
    assert closed["left"] == [] and closed["closed_s"] < 45, closed
    assert left == [], f"server processes left behind: {left}"


def _exited(pid: int, timeout: float = 20.0) -> None:
    """Wait until child `pid` has exited and can be reaped (without reaping it: its owner does that)."""
    deadline = time.monotonic() + timeout
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        assert time.monotonic() < deadline, f"pid {pid} did not exit"
        time.sleep(0.02)


def test_server_killed_between_steps_is_reported_then_reset_starts_fresh(env):
    env.reset(seed=0)
    env.step_plan(env.plan)
    pids = env.backend.pids()
    os.kill(pids[1], signal.SIGKILL)
    _exited(pids[1])
    with pytest.raises(ServerError) as ei:
        env.step_plan(env.plan)
    msg = str(ei.value)
    assert "\n" not in msg  # one line
    assert re.match(
        rf"real backend: server s1 \(pid {pids[1]}\) died \(exit code -9 = SIGKILL\) between steps; ", msg
    ), msg
    assert wait_gone(pids) == []  # the other servers were stopped with it
    env.close()  # works (nothing left to close), and again
    env.close()
    env.reset(seed=0)  # documented: the next reset starts fresh servers
    fresh = env.backend.pids()
    assert len(fresh) == 3 and set(fresh).isdisjoint(pids)
    env.step_plan(env.plan)


def test_stopped_server_is_the_one_named_in_the_timeout(env):
    env.reset(seed=0)
    backend: RealBackend = env.backend
    pids = backend.pids()
    backend.timeout_s = 3.0  # the driver's deadline (the servers' own gloo timeout stays 30 s: all three pend)
    os.kill(pids[2], signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(ServerError) as ei:  # a window without requests: the serve deadline is timeout_s
            backend.serve_requests(env.plan, env.state, [[], [], []], 1.0)
        elapsed = time.monotonic() - t0
    finally:
        backend.timeout_s = BACKEND_KW["timeout_s"]
        if running(pids[2]):
            os.kill(pids[2], signal.SIGCONT)
    msg = str(ei.value)
    assert re.match(
        rf"server s2 \(pid {pids[2]}\) did not answer 'serve' within \d+ s \(hung, process stopped\)", msg
    ), msg
    assert "s0" not in msg and "s1" not in msg
    assert elapsed < 60
    assert wait_gone(pids) == [] and not backend.alive and backend.current is None


def _stand_in(conn, behaviour: str) -> None:
    """A stand-in server (forked: no torch start-up): answers one command as `behaviour` says, then idles."""
    conn.recv()
    if behaviour == "peer-timeout":  # what a real server reports when a lock-step peer never shows up
        time.sleep(0.3)
        conn.send(
            (
                "error",
                "Traceback (most recent call last):\nRuntimeError: [../third_party/gloo/gloo/transport/"
                "tcp/unbound_buffer.cc:81] Timed out waiting 3000ms for recv operation to complete",
            )
        )
    time.sleep(600)  # "hang": never answers


def test_hung_server_blamed_not_the_peers_that_timed_out_waiting_for_it(monkeypatch):
    monkeypatch.setattr(channels_mod, "GRACE_S", 1.0)
    ctx = mp.get_context("fork")
    procs, conns = [], []
    for behaviour in ("peer-timeout", "hang", "peer-timeout"):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_stand_in, args=(child, behaviour), daemon=True)
        p.start()
        child.close()
        procs.append(p)
        conns.append(parent)
    pids = [p.pid for p in procs]
    ch = PipeChannel.attach(["s0", "s1", "s2"], procs, conns)
    t0 = time.monotonic()
    with pytest.raises(ServerError) as ei:
        ch.call("serve", None, 120.0)
    msg = str(ei.value)
    assert re.match(
        rf"server s1 \(pid {pids[1]}\) did not answer 'serve' within \d+ s \(hung; 2 peer\(s\) timed out", msg
    ), msg
    assert time.monotonic() - t0 < 60  # the peers' timeouts, not the driver's 120 s deadline
    assert wait_gone(pids) == []


@pytest.mark.parametrize("how", ["raise", "exit"])
def test_server_dying_at_start_fails_the_start_at_once(monkeypatch, how):
    sc = Scenario("tiny", seed=0)
    state = sc.initial_state(np.random.default_rng(0))
    before = children()
    monkeypatch.setenv(FAIL_START_ENV, "1" if how == "raise" else "2:exit")
    backend = RealBackend(sc.cluster, **{**BACKEND_KW, "start_timeout_s": 120})
    t0 = time.monotonic()
    with pytest.raises(ServerError) as ei:
        backend.reset(DeploymentPlan.uniform(sc.cluster), state)
    elapsed = time.monotonic() - t0
    msg = str(ei.value)
    if how == "raise":
        assert msg.startswith("server s1 failed in 'start': RuntimeError: test hook"), msg
        assert "traceback of server s1" in msg
    else:
        assert re.match(r"server s2 \(pid \d+\) exited with code 3 during 'start'", msg), msg
    assert elapsed < backend.start_timeout_s / 2
    assert not backend.alive and backend.pids() == []
    assert wait_gone(children() - before) == []  # no server process left
    backend.close()


# ---- options, error classes, CLI reporting, atomic files ----------------------------------------------------------
BAD_OPTIONS = [
    ({"timeout_s": float("nan")}, "real backend: timeout_s: nan given; must be a finite number in (0, 1000000]"),
    ({"timeout_s": -1}, "real backend: timeout_s: -1 given; must be a finite number in (0, 1000000]"),
    ({"timeout_s": 0}, "real backend: timeout_s: 0 given; must be a finite number in (0, 1000000]"),
    ({"timeout_s": "5"}, "real backend: timeout_s: '5' given; must be a finite number in (0, 1000000]"),
    (
        {"start_timeout_s": float("inf")},
        "real backend: start_timeout_s: inf given; must be a finite number in (0, 1000000]",
    ),
    ({"seed": -1}, "real backend: seed: -1 given; must be an integer >= 0"),
    ({"threads": 0}, "real backend: threads: 0 given; must be an integer in [1, 1024]"),
    ({"prefetch": 1.5}, "real backend: prefetch: 1.5 given; must be an integer in [0, 4096]"),
    (
        {"max_requests_per_server": 0},
        "real backend: max_requests_per_server: 0 given; must be an integer >= 1 or null",
    ),
    ({"measure_quality": "yes"}, "real backend: measure_quality: 'yes' given; must be a boolean or null"),
]


@pytest.mark.parametrize(("kwargs", "expected"), BAD_OPTIONS, ids=[str(i) for i in range(len(BAD_OPTIONS))])
def test_bad_backend_options_are_refused_in_one_line_before_any_server_starts(kwargs, expected):
    from coel_env.errors import ConfigError

    before = children()
    with pytest.raises(ConfigError) as ei:
        CoELEnv(scenario="tiny", backend="real", backend_kwargs=kwargs)
    assert str(ei.value) == expected
    with pytest.raises(ConfigError, match=r"^real backend: unknown option 'bogus'; allowed: seed, checkpoint, "):
        CoELEnv(scenario="tiny", backend="real", backend_kwargs={"bogus": 1})
    assert children() == before  # nothing was started


def test_server_error_is_a_coel_error_and_still_a_runtime_error(tmp_path):
    from coel_env.errors import CoELError
    from experiments.cli_checks import error_line

    assert issubclass(ServerError, CoELError) and issubclass(ServerError, RuntimeError)
    with pytest.raises(RuntimeError):  # callers that catch RuntimeError keep working
        raise ServerError("server s1 (pid 1) exited with code -9 during 'serve'")
    one = ServerError("server s1 (pid 1) exited with code -9 during 'serve'; all server processes stopped")
    assert error_line(one, tmp_path) == f"error: {one}" and not (tmp_path / "error.txt").exists()
    full = ServerError(
        "server s1 failed in 'serve': RuntimeError: boom\n--- traceback of server s1 ---\n"
        "Traceback (most recent call last):\nRuntimeError: boom"
    )
    line = error_line(full, tmp_path)
    assert line == f"error: server s1 failed in 'serve': RuntimeError: boom (details: {tmp_path / 'error.txt'})"
    assert (tmp_path / "error.txt").read_text() == str(full) + "\n"  # the server's traceback is kept, in the file
    assert error_line(full) == "error: server s1 failed in 'serve': RuntimeError: boom"


def test_evaluate_reports_a_failing_server_in_one_line(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", FAIL_START_ENV: "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.evaluate",
            "backend=real",
            "scenarios=[tiny]",
            "seeds=1",
            "max_epochs=1",
            "policies=[static_linear]",
            "logger=disabled",
            "plots=false",
            "progress_bar=false",
            f"hydra.run.dir={out}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        f"error: server s1 failed in 'start': RuntimeError: test hook {FAIL_START_ENV}=1: server 1 fails while "
        f"starting (details: {out / 'error.txt'})"
    ), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "traceback of server s1" in (out / "error.txt").read_text()
    assert not {"leaderboard.csv", "leaderboard.md", "episodes.csv"} & {p.name for p in out.iterdir()}


def test_launch_checks_its_window_and_writes_out_atomically(tmp_path, monkeypatch):
    from real_backend import launch

    with pytest.raises(SystemExit, match=r"^error: window: nan given; must be a finite number in \(0, 1000000\]$"):
        launch.main(["--window", "nan"])
    target = tmp_path / "run.json"
    target.write_text('{"old": true}')
    result = {
        "scenario": "tiny",
        "servers": 3,
        "launcher": "spawn",
        "tokens": {},
        "link_bytes": [],
        "metrics": {"tokens_per_s": 1.0},
        "bad": object(),
    }  # not JSON: the write fails half-way
    monkeypatch.setattr(launch, "run", lambda *a, **k: result)
    with pytest.raises(TypeError):
        launch.main(["--out", str(target)])
    assert target.read_text() == '{"old": true}' and [p.name for p in tmp_path.iterdir()] == ["run.json"]
    del result["bad"]
    launch.main(["--out", str(target)])
    assert json.loads(target.read_text())["scenario"] == "tiny" and len(list(tmp_path.iterdir())) == 1


def test_save_checkpoint_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    from real_backend.model import MoEConfig, save_checkpoint

    cfg = MoEConfig.from_spec(Scenario("tiny", seed=0).cluster.model)
    path = save_checkpoint(cfg, 0, tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    good = (path / "model.safetensors").read_bytes()
    real_save = safetensors.torch.save_file

    def crash(tensors, filename, *args, **kwargs):  # writes part of the file, then dies (disk full, Ctrl-C)
        real_save(tensors, filename, *args, **kwargs)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(cfg, 1, path)
    # no temp file, the old weights intact, and no config.json: an interrupted overwrite is no checkpoint at all
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors"]
    assert (path / "model.safetensors").read_bytes() == good
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    save_checkpoint(cfg, 1, path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((path / "config.json").read_text()) == cfg.hf_config_dict()
