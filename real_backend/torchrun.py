"""Multi-node launch: one torchrun rank per edge server, SPMD (every rank runs the same command).

    torchrun --nnodes=2 --nproc-per-node=2 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=job1 \\
        -m experiments.evaluate backend=real scenarios=[tiny]          # and --nproc-per-node=1 on the other node

When a `RealBackend` is built in a torchrun-launched process, rank 0 becomes the driver *and* edge server 0; rank r
becomes edge server r: it enters a command loop inside the constructor and never returns into the user's script.
It serves every RealBackend the driver opens (evaluate builds one per scenario) and exits with code 0 when the
driver's process exits (an atexit hook sends "exit") or its connection is lost (the job's outcome is rank 0's).

Commands and replies are pickled objects sent point to point between rank 0 and each rank over a gloo process group
of their own (control traffic never mixes with the expert dispatch on the default group, gloo or NCCL). Rank 0 sends
the command, runs its own server's part in-process, then collects one reply per rank; every wait of the driver is
bounded by the command's timeout (the backend's `timeout_s`, which is also the default group's timeout), so a hung
or dead rank becomes a `ServerError`. Servers wait for the next command up to IDLE_TIMEOUT_S.
Not supported under torchrun (the processes are torchrun's): crash/hang injection, and restarting servers after a
failure (relaunch the job). Network interfaces come from the environment (MASTER_ADDR, GLOO_SOCKET_IFNAME,
NCCL_SOCKET_IFNAME); when ranks span hosts, the link shaper's clock is aligned to rank 0's (error about half a
round trip) and each rank books its own link buckets (flows of different senders do not contend).
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import pickle
import shutil
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from datetime import timedelta
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist

from coel_env.errors import ConfigError
from coel_env.world.cluster import Cluster
from real_backend.channels import COMM_ERRORS, ServerError, failure_message
from real_backend.server import ServerProcess, WorkerSpec, _die_with_parent, run_command
from real_backend.shaper import set_clock_offset

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")
IDLE_TIMEOUT_S = 24 * 3600.0  # how long a server waits for the driver's next command
GRACE_S = 2.0  # the driver still collects replies this long after a command's deadline (its own part ran late)
EXIT_TIMEOUT_S = 10.0
CLOCK_PINGS = 8
TAG_CMD, TAG_REPLY, TAG_CLOCK = 101, 103, 105


def torchrun_env() -> dict | None:
    """rank, world, local_rank, local_world, run_id when this process was launched by torchrun, else None."""
    if not all(k in os.environ for k in LAUNCH_VARS):
        return None
    world = int(os.environ["WORLD_SIZE"])
    return {
        "rank": int(os.environ["RANK"]),
        "world": world,
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "local_world": int(os.environ.get("LOCAL_WORLD_SIZE", world)),
        "run_id": os.environ["TORCHELASTIC_RUN_ID"],
    }


def check_launch(cluster: Cluster, env: dict, links: str) -> None:
    """One rank per server, and no per-host link emulation that needs local spawning."""
    n = cluster.num_servers
    if env["world"] != n:
        raise ConfigError(
            f"torchrun: WORLD_SIZE is {env['world']} but scenario '{cluster.spec.name}' has {n} servers; "
            f"launch one rank per server (--nproc-per-node summed over the nodes = {n})"
        )
    if links == "netns":
        raise ConfigError("real backend: links 'netns' needs locally spawned servers; under torchrun: app, none")


def select_gpu(cluster: Cluster, env: dict) -> None:
    """Pin this rank to its server's first GPU: cluster device d runs on cuda:(d mod visible GPUs), as in local mode."""
    n_gpu = torch.cuda.device_count()
    rank = env["rank"]
    if not n_gpu:
        raise ConfigError(f"real backend: device 'cuda' but no GPU is visible to rank {rank} on {socket.gethostname()}")
    base = rank - env["local_rank"]
    srv = cluster.dev_server
    node_devs = np.flatnonzero((srv >= base) & (srv < base + env["local_world"]))
    if len(set((node_devs % n_gpu).tolist())) < len(node_devs):
        raise ConfigError(
            f"real backend: servers {base}..{base + env['local_world'] - 1} on {socket.gethostname()} "
            f"have {len(node_devs)} GPUs in the scenario but {n_gpu} are visible"
        )
    torch.cuda.set_device(int(np.flatnonzero(srv == rank)[0]) % n_gpu)


def _pack(obj) -> tuple[torch.Tensor, torch.Tensor]:
    body = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
    return torch.tensor([body.numel()], dtype=torch.int64), body


def _unpack(body: torch.Tensor):
    return pickle.loads(body.numpy().tobytes())  # our own ranks' messages (as torch's object collectives do)


def _first_line(text: str) -> str:
    return next((ln for ln in str(text).strip().splitlines() if ln.strip()), str(text))


def _last_line(text: str) -> str:
    return next((ln for ln in reversed(str(text).strip().splitlines()) if ln.strip()), str(text))


class TorchrunSession:
    """This process's place in the torchrun job: the default process group (expert traffic), a gloo control group,
    and the servers this rank holds (one per open RealBackend, by backend id)."""

    current: TorchrunSession | None = None

    @classmethod
    def attach(cls, cluster: Cluster, env: dict, *, device: str, links: str, timeout_s: float) -> TorchrunSession:
        """The process's session (joining the job on first use). On ranks != 0 this serves the driver and exits."""
        check_launch(cluster, env, links)
        if cls.current is None:
            cls.current = cls(cluster, env, device, timeout_s)
        if cls.current.rank != 0:
            cls.current.serve_forever()
        return cls.current

    def __init__(self, cluster: Cluster, env: dict, device: str, timeout_s: float):
        self.rank, self.world = env["rank"], env["world"]
        if device == "cuda":
            select_gpu(cluster, env)
        self.owns_pg = not dist.is_initialized()
        if self.owns_pg:  # env:// rendezvous: MASTER_ADDR / MASTER_PORT from torchrun
            dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
        self.ctrl = dist.new_group(backend="gloo", timeout=timedelta(seconds=IDLE_TIMEOUT_S))
        self.local: dict[int, ServerProcess] = {}
        self.ssd_dirs: dict[int, str] = {}
        self.next_id = 0
        self.broken: str | None = None  # the first failure: no more commands (servers cannot be restarted)
        self.unreachable: set[int] = set()  # ranks that hung or are gone
        self._pinned: list = []  # buffers of abandoned async ops (gloo may still write into them)
        self.closed = False
        set_clock_offset(self._clock_offset(force=os.environ.get("COEL_SYNC_CLOCK") == "1"))
        if self.rank == 0:
            atexit.register(self.shutdown)

    # ---- both sides ------------------------------------------------------------------------------------------
    def _clock_offset(self, force: bool) -> float:
        """This rank's offset to rank 0's monotonic clock (0 on rank 0's host): best of CLOCK_PINGS round trips."""
        hosts: list = [None] * self.world
        dist.all_gather_object(hosts, socket.gethostname(), group=self.ctrl)
        buf = torch.zeros(1, dtype=torch.float64)
        best_rtt, offset = math.inf, 0.0
        for r in range(1, self.world):
            if not force and hosts[r] == hosts[0]:
                continue
            for _ in range(CLOCK_PINGS):
                if self.rank == 0:
                    dist.recv(buf, r, group=self.ctrl, tag=TAG_CLOCK)
                    dist.send(buf.fill_(time.monotonic()), r, group=self.ctrl, tag=TAG_CLOCK)
                elif self.rank == r:
                    t0 = time.monotonic()
                    dist.send(buf, 0, group=self.ctrl, tag=TAG_CLOCK)
                    dist.recv(buf, 0, group=self.ctrl, tag=TAG_CLOCK)
                    t1 = time.monotonic()
                    if t1 - t0 < best_rtt:
                        best_rtt, offset = t1 - t0, float(buf.item()) - (t0 + t1) / 2
        return offset

    def run(self, bid: int, cmd: str, arg) -> tuple[str, object]:
        """This rank's part of a command: ("ok", result) or ("error", traceback)."""
        if cmd == "open":
            try:
                self.local[bid] = self._open(bid, arg)
            except Exception:
                self._drop(bid)
                return "error", traceback.format_exc()
            return "ok", os.getpid()
        server = self.local.get(bid)
        if server is None:
            return "error", f"RuntimeError: rank {self.rank} holds no server of backend {bid} (closed?)"
        out = run_command(server, cmd, arg)
        if cmd == "close":
            self._drop(bid)
        return out

    def _open(self, bid: int, spec: WorkerSpec) -> ServerProcess:
        os.environ.update(spec.env)
        torch.set_num_threads(spec.threads)  # on rank 0 this is the driver's process: the script's threads too
        if self.rank != 0:  # the driver's temporary directory is on rank 0's host
            self.ssd_dirs[bid] = tempfile.mkdtemp(prefix=f"coel-real-rank{self.rank}-")
            spec = replace(spec, ssd_root=self.ssd_dirs[bid])
        return ServerProcess(self.rank, spec, None)

    def _drop(self, bid: int) -> None:
        server = self.local.pop(bid, None)
        if server is not None:
            with contextlib.suppress(Exception):
                server.close(None)
        if bid in self.ssd_dirs:
            shutil.rmtree(self.ssd_dirs.pop(bid), ignore_errors=True)

    def _close_local(self) -> None:
        for bid in list(self.local) + list(self.ssd_dirs):
            self._drop(bid)

    # ---- servers (rank != 0) ---------------------------------------------------------------------------------
    def serve_forever(self) -> NoReturn:
        """Run the driver's commands until it says "exit" or is gone, then exit the process with code 0: the job's
        outcome is rank 0's (a failing exit here would make torchrun kill a driver that is handling the error)."""
        _die_with_parent()  # if the torchrun agent is killed, so is this server
        try:
            while True:
                hdr = torch.empty(1, dtype=torch.int64)
                dist.recv(hdr, 0, group=self.ctrl, tag=TAG_CMD)
                body = torch.empty(int(hdr.item()), dtype=torch.uint8)
                dist.recv(body, 0, group=self.ctrl, tag=TAG_CMD + 1)
                bid, cmd, arg = _unpack(body)
                if cmd == "exit":
                    break
                reply = self.run(bid, cmd, arg)
                try:
                    hdr, body = _pack(reply)
                except Exception:
                    hdr, body = _pack(("error", traceback.format_exc()))
                dist.send(hdr, 0, group=self.ctrl, tag=TAG_REPLY)
                dist.send(body, 0, group=self.ctrl, tag=TAG_REPLY + 1)
        except Exception as e:  # the driver's connection closed, or it sent nothing for IDLE_TIMEOUT_S
            print(
                f"coel real backend: rank {self.rank} lost the driver (rank 0), exiting: {_first_line(str(e))}",
                file=sys.stderr,
                flush=True,
            )
            lost = True
        else:
            lost = False
        self._close_local()
        if not lost and self.owns_pg:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        sys.exit(0)

    # ---- the driver (rank 0) ---------------------------------------------------------------------------------
    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _wait(self, works: list, bufs: tuple, deadline: float) -> None:
        try:
            for w in works:
                w.wait(timeout=timedelta(seconds=max(deadline - time.monotonic(), GRACE_S)))
        except Exception:
            self._pinned.append((works, bufs))  # never free a buffer an abandoned op may still use
            raise

    def call(self, bid: int, cmd: str, args: list | None, timeout: float) -> list[tuple[str, object]]:
        """Run a command on every rank; per rank ("ok", result) / ("error", traceback) / ("hung" | "gone", text)."""
        deadline = time.monotonic() + timeout
        out: list = [None] * self.world
        sends = {}
        for r in range(1, self.world):
            hdr, body = _pack((bid, cmd, None if args is None else args[r]))
            try:
                sends[r] = (
                    [
                        dist.isend(hdr, r, group=self.ctrl, tag=TAG_CMD),
                        dist.isend(body, r, group=self.ctrl, tag=TAG_CMD + 1),
                    ],
                    (hdr, body),
                )
            except Exception as e:
                out[r] = ("gone", _first_line(str(e)))
        out[0] = self.run(bid, cmd, None if args is None else args[0])
        for r, (works, bufs) in sends.items():
            try:
                self._wait(works, bufs, deadline)
                hdr = torch.empty(1, dtype=torch.int64)
                self._wait([dist.irecv(hdr, r, group=self.ctrl, tag=TAG_REPLY)], (hdr,), deadline)
                body = torch.empty(int(hdr.item()), dtype=torch.uint8)
                self._wait([dist.irecv(body, r, group=self.ctrl, tag=TAG_REPLY + 1)], (body,), deadline)
                out[r] = _unpack(body)
            except Exception as e:
                out[r] = ("hung" if "Timed out" in str(e) else "gone", _first_line(str(e)))
        return out

    def fail(self, out: list, msg: str) -> None:
        """Record the job's first failure; hung/gone ranks get no more messages."""
        self.unreachable |= {r for r, o in enumerate(out) if o[0] in ("hung", "gone")}
        if self.broken is None:
            self.broken = _first_line(msg)

    def shutdown(self) -> None:
        """Tell every reachable server to exit (rank 0's atexit hook) and close this rank's servers."""
        if self.closed or self.rank != 0:
            return
        self.closed = True
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        for r in range(1, self.world):
            if r in self.unreachable:
                continue
            hdr, body = _pack((0, "exit", None))
            with contextlib.suppress(Exception):
                self._wait(
                    [
                        dist.isend(hdr, r, group=self.ctrl, tag=TAG_CMD),
                        dist.isend(body, r, group=self.ctrl, tag=TAG_CMD + 1),
                    ],
                    (hdr, body),
                    deadline,
                )
        self._close_local()
        if self.owns_pg and not self.unreachable:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


class TorchrunChannel:
    """The driver's side of one RealBackend's servers in a torchrun job (rank r = server r; rank 0 in-process).

    Not supported here: crash/hang injection (ConfigError) and restarting servers after a failure (ServerError:
    relaunch the job)."""

    def __init__(self, session: TorchrunSession, spec: WorkerSpec, start_timeout_s: float):
        if session.broken is not None:
            raise ServerError(
                f"torchrun: servers cannot be restarted after a failure in this job "
                f"({session.broken}); relaunch torchrun"
            )
        self.session, self.names = session, list(spec.cluster.server_names)
        self.bid = session.new_id()
        self.open = True
        self._pids = self.call("open", [spec] * session.world, start_timeout_s)

    @property
    def alive(self) -> bool:
        return self.open and self.session.broken is None and not self.session.closed

    def pids(self) -> list[int]:
        """Process ids of the ranks (each on its own host)."""
        return list(self._pids) if self.open else []

    def call(self, cmd: str, args: list | None, timeout: float) -> list:
        if cmd in ("crash", "hang"):
            self.inject(0, cmd)  # raises: test hooks of local spawning only
        if not self.alive:
            raise ServerError(
                f"torchrun: servers of this backend are closed or failed ({self.session.broken}); "
                "servers cannot be restarted under torchrun"
            )
        try:
            out = self.session.call(self.bid, cmd, args, timeout)
        except BaseException:  # Ctrl-C mid-command: the control group is out of step; no more commands but "exit"
            self.session.fail([("ok", None)] * self.session.world, f"interrupted during '{cmd}'")
            self.open = False
            self.session._drop(self.bid)
            raise
        msg = self._failure(cmd, out, timeout)
        if msg is not None:
            self.session.fail(out, msg)
            self.stop()
            raise ServerError(msg + "\n(torchrun: servers cannot be restarted in this job)")
        if cmd == "close":
            self.open = False
        return [v for _, v in out]

    def _failure(self, cmd: str, out: list, timeout: float) -> str | None:
        """The most telling failure: a gone rank, else a hung one, else an exception that is not a mere
        communication error (a peer's failure shows up as one), else any exception."""
        for r, (status, val) in enumerate(out):
            if status == "gone":
                return f"server {self.names[r]} (rank {r}) is gone during '{cmd}': {val}"
        for r, (status, _) in enumerate(out):
            if status == "hung":
                return f"server {self.names[r]} (rank {r}) did not answer '{cmd}' within {timeout:.0f} s (hung)"
        errors = [(r, val) for r, (status, val) in enumerate(out) if status == "error"]
        if not errors:
            return None
        root = [(r, tb) for r, tb in errors if not any(k in _last_line(tb) for k in COMM_ERRORS)]
        r, tb = (root or errors)[0]
        return failure_message(self.names[r], cmd, tb)

    def inject(self, server: int, fault: str) -> None:
        raise ConfigError(f"inject: '{fault}' injection needs locally spawned servers (launcher 'spawn'), not torchrun")

    def check(self, when: str) -> None:
        """Nothing to check between steps: the ranks are torchrun's (a lost rank fails the next command)."""

    def stop(self, wait_s: float = 0.0) -> None:
        """Close this backend's servers (all ranks when the job is healthy, else this rank's); idempotent and
        bounded (EXIT_TIMEOUT_S)."""
        if not self.open:
            return
        self.open = False
        if self.session.broken is None and not self.session.closed:
            out = self.session.call(self.bid, "close", None, EXIT_TIMEOUT_S)
            msg = self._failure("close", out, EXIT_TIMEOUT_S)
            if msg is not None:
                self.session.fail(out, msg)
        self.session._drop(self.bid)
