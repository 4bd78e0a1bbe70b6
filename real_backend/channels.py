"""How the driver (`RealBackend`) reaches its server processes: one command to every server, one reply from each.

    replies = channel.call("serve", [arg_for_server_0, ...], timeout)   # a list in server order

The command is a `ServerProcess` method run by `real_backend.server.run_command` (reset, apply, serve, memory,
close, ping; crash and hang are test hooks). Two transports:

- `PipeChannel` (here): server processes spawned on this host with torch.multiprocessing, one pipe each (default).
  Its servers exchange the per-layer dispatch messages and the step clock through a shared-memory segment the
  channel creates before spawning them (real_backend/shm.py; `COEL_REAL_SHM=0`: over the process group instead).
- `TorchrunChannel` (`real_backend.torchrun`): one torchrun rank per server, possibly on several nodes; rank 0 is the
  driver and server 0, and commands travel over a gloo control group.

A failure (a server raised, crashed, hung past the timeout, or its connection closed) stops the channel's processes
and raises `ServerError` naming the server. Every wait of the driver is bounded: commands are sent from helper
threads (a server that stopped reading cannot block the driver), replies are polled against a deadline together with
the processes' exit sentinels, and stopping is terminate, then kill, each with a deadline. Blame: a server that
exited is the cause; else an exception that is not a communication error; else the servers that did not answer while
their peers timed out waiting for them (processes stopped with SIGSTOP first).
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection as mpc
import os
import signal
import threading
import time
import warnings
import weakref
from multiprocessing.reduction import ForkingPickler
from typing import NoReturn

import torch.multiprocessing as tmp

from coel_env.errors import CoELError, ConfigError
from real_backend.server import WorkerSpec, worker_main
from real_backend.shaper import LinkShaper
from real_backend.shm import Segment, layout_for, shm_enabled

# last line of a server's traceback naming one of these: it waited on a peer (the peer is the cause)
COMM_ERRORS = (
    "DistBackendError",
    "DistNetworkError",
    "DistStoreError",
    "Connection closed",
    "Connection reset",
    "Timed out",
    "timed out",
    "gloo",
    "NCCL",
    "ShmTimeout",
    "ShmPeerGone",
)
GRACE_S = 5.0  # after a peer's communication error (or the deadline): how long the other servers may take to report
TERM_S = 3.0  # stop: how long terminated (SIGTERM) servers may take to exit before they are killed (SIGKILL)
RESTART_HINT = "all server processes stopped; reset() starts new ones"


class ServerError(CoELError, RuntimeError):
    """A server process crashed, hung past the timeout, or raised; all server processes have been stopped.

    A CoELError, so the CLIs report it as `error: ...` (its first line: a server that raised adds its traceback
    below), and still a RuntimeError for callers that catch that."""


def failure_message(name: str, cmd: str, tb: str) -> str:
    """One line naming the server, the command and the exception, then the server's traceback."""
    lines = [ln for ln in str(tb).strip().splitlines() if ln.strip()] or ["(no traceback)"]
    return f"server {name} failed in '{cmd}': {lines[-1]}\n--- traceback of server {name} ---\n{str(tb).rstrip()}"


def is_comm_error(tb: str) -> bool:
    """Whether a server's traceback ends in a communication error (a peer died, hung or closed its connection)."""
    lines = [ln for ln in str(tb).strip().splitlines() if ln.strip()]
    return bool(lines) and any(k in lines[-1] for k in COMM_ERRORS)


def exit_text(code: int | None) -> str:
    """'exit code -9 = SIGKILL', 'exit code 3', 'exit code unknown'."""
    if code is None:
        return "exit code unknown"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"exit code {code} = {signal.Signals(-code).name}"
    return f"exit code {code}"


def is_stopped(pid: int | None) -> bool:
    """Whether process `pid` is stopped (SIGSTOP / SIGTSTP / traced), from /proc (False where unknown)."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _stop(procs: list, conns: list, helpers: list, wait_s: float = 0.0) -> None:
    """Stop server processes: wait up to `wait_s` for them to exit by themselves, terminate (SIGTERM, SIGCONT for
    stopped ones) and wait up to TERM_S, then kill; close the pipes. Bounded, idempotent, safe to call again after
    an interruption."""
    alive = lambda: [p for p in procs if p.exitcode is None]  # noqa: E731  (exitcode polls: reaps an exited child)
    deadline = time.monotonic() + wait_s
    for p in alive():
        p.join(max(deadline - time.monotonic(), 0))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = alive()
        if not left:
            break
        for p in left:
            with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
                os.kill(p.pid, sig)
                if sig == signal.SIGTERM:
                    os.kill(p.pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
        deadline = time.monotonic() + TERM_S
        for p in left:
            p.join(max(deadline - time.monotonic(), 0))
    for t in helpers:  # their peer is gone: a blocked send or receive has failed by now
        t.join(1.0)
    for c in conns:
        with contextlib.suppress(OSError):
            c.close()


def shm_segment(spec: WorkerSpec) -> Segment | None:
    """The shared-memory lanes of a channel's servers (None: one server, or shared memory off: see shm_enabled)."""
    c, cfg = spec.cluster, spec.cfg
    if c.num_servers < 2 or not shm_enabled():
        return None
    layout = layout_for(c.num_servers, cfg.num_moe_layers, cfg.d_model, cfg.top_k, c.spec.workload.max_batch)
    try:
        return Segment.create(layout)
    except OSError as e:  # no memfd here (e.g. a sandbox refuses it): the process group carries the messages
        warnings.warn(f"real backend: shared memory unavailable ({e}); dispatch over the process group", stacklevel=2)
        return None


def _send(conn, data: bytes) -> None:
    with contextlib.suppress(OSError, ValueError):  # the server is gone: its sentinel / EOF reports it
        conn.send_bytes(data)


def _receive(conn, box: list) -> None:
    try:
        box.append(conn.recv())
    except BaseException as e:  # handed to the driver's thread
        box.append(e)


class PipeChannel:
    """One spawned process per server on this host, driven over a pipe each; supports crash/hang injection."""

    def __init__(self, spec: WorkerSpec, start_timeout_s: float):
        c = spec.cluster
        self._init(list(c.server_names))
        ctx = tmp.get_context("spawn")
        self._links = LinkShaper.new_shared(c, ctx)  # kept: a freed block could be handed to another channel
        shm = shm_segment(spec)
        try:
            for rank in range(c.num_servers):
                parent, child = ctx.Pipe()
                p = ctx.Process(
                    target=worker_main,
                    args=(rank, spec, child, self._links, shm),
                    daemon=True,
                    name=f"coel-real-{c.server_names[rank]}",
                )
                # SIGINT blocked while spawning: the child starts with it blocked (and then ignores it), so Ctrl-C
                # reaches the driver only, which stops the servers in order; a Ctrl-C meanwhile is delivered after
                old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
                try:
                    p.start()
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, old)
                child.close()
                self.procs.append(p)
                self.conns.append(parent)
            if shm is not None:
                shm.close()  # the servers hold it now: it goes when they exit
            self._gather("start", start_timeout_s)
        except BaseException:
            if shm is not None:
                shm.close()
            self.stop()
            raise

    def _init(self, names: list[str]) -> None:
        self.names = names
        self.procs: list = []
        self.conns: list = []
        self.helpers: list[threading.Thread] = []
        self.closed = False
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns, self.helpers)

    @classmethod
    def attach(cls, names: list[str], procs: list, conns: list) -> PipeChannel:
        """A channel over processes started elsewhere (multiprocessing Process + the parent's Connection each,
        speaking the server's protocol: ("ok" | "error", value) per command); tests use it with stand-in servers."""
        self = cls.__new__(cls)
        self._init(list(names))
        self.procs += procs
        self.conns += conns
        return self

    @property
    def alive(self) -> bool:
        return bool(self.procs) and not self.closed and all(p.is_alive() for p in self.procs)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self, wait_s: float = 0.0) -> None:
        """Stop every server process (after up to `wait_s` for them to exit by themselves: terminate, then kill);
        bounded and idempotent."""
        self.closed = True
        _stop(self.procs, self.conns, self.helpers, wait_s)
        self._finalizer.detach()

    def _fail(self, msg: str) -> NoReturn:
        self.stop()
        raise ServerError(msg)

    def _who(self, r: int) -> str:
        return f"{self.names[r]} (pid {self.procs[r].pid})"

    def check(self, when: str) -> None:
        """Fail naming a server process that has exited (e.g. `when` = "between steps")."""
        for r, p in enumerate(self.procs):
            if not p.is_alive():
                self._fail(f"real backend: server {self._who(r)} died ({exit_text(p.exitcode)}) {when}; {RESTART_HINT}")

    def call(self, cmd: str, args: list | None, timeout: float) -> list:
        if not self.procs or self.closed:
            self._fail(f"server processes closed or not started before '{cmd}'; call reset() first")
        self.check(f"before '{cmd}'")
        try:
            msgs = [ForkingPickler.dumps((cmd, None if args is None else args[r])) for r in range(len(self.conns))]
            self.helpers[:] = [
                threading.Thread(target=_send, args=(conn, m), daemon=True, name=f"coel-real-send-{self.names[r]}")
                for r, (conn, m) in enumerate(zip(self.conns, msgs))
            ]
            for t in self.helpers:
                t.start()
            return self._gather(cmd, timeout)
        except ServerError:
            raise
        except BaseException:  # Ctrl-C (or a bug) mid-command: the pipes are out of step, the servers go
            self.stop()
            raise

    def inject(self, server: int, fault: str) -> None:
        """Make one server crash or hang on its next command."""
        self.conns[server].send((fault, None))

    def _gather(self, cmd: str, timeout: float) -> list:
        """One reply per server within `timeout` s, else fail naming the cause (see the module docstring)."""
        n = len(self.procs)
        out: list = [None] * n
        pending = set(range(n))
        comm: dict[int, str] = {}  # communication errors: the peers of the cause
        t0 = time.monotonic()
        deadline, settle = t0 + timeout, None
        while pending:
            left = (deadline if settle is None else settle) - time.monotonic()
            if left <= 0:
                if settle is None and len(pending) > 1 and not self._stopped(pending):
                    settle = time.monotonic() + GRACE_S  # the peers' own timeouts tell which of them hangs
                    continue
                break
            conns = {self.conns[r]: r for r in pending}
            sentinels = {self.procs[r].sentinel: r for r in pending}
            ready = mpc.wait([*conns, *sentinels], timeout=left)
            for r in sorted({conns[o] if o in conns else sentinels[o] for o in ready}):
                if r not in pending:
                    continue
                conn = self.conns[r]
                if not conn.poll(0):
                    if not self.procs[r].is_alive():
                        self._exited(r, cmd)
                    continue
                status, val = self._recv(r, cmd, deadline if settle is None else settle)
                pending.discard(r)
                if status == "ok":
                    out[r] = val
                elif is_comm_error(val):
                    comm[r] = val
                    settle = settle or time.monotonic() + GRACE_S
                else:
                    self._fail(failure_message(self.names[r], cmd, val))
        if not pending and not comm:
            return out
        for r, p in enumerate(self.procs):  # a server that exited is the cause
            if not p.is_alive():
                self._exited(r, cmd)
        if pending:
            hung = self._stopped(pending) or sorted(pending)
            what = "server" if len(hung) == 1 else "servers"
            state = "hung, process stopped" if all(is_stopped(self.procs[r].pid) for r in hung) else "hung"
            peers = f"; {len(comm)} peer(s) timed out waiting" if comm else ""
            self._fail(
                f"{what} {', '.join(self._who(r) for r in hung)} did not answer '{cmd}' within "
                f"{time.monotonic() - t0:.0f} s ({state}{peers}); {RESTART_HINT}"
            )
        r = min(comm)
        self._fail(failure_message(self.names[r], cmd, comm[r]))

    def _recv(self, r: int, cmd: str, until: float) -> tuple[str, object]:
        """Server r's reply, read by a helper thread: a server stopped halfway through sending cannot block the
        driver (it gets until `until`, and at least GRACE_S, to finish)."""
        box: list = []
        t = threading.Thread(
            target=_receive, args=(self.conns[r], box), daemon=True, name=f"coel-real-recv-{self.names[r]}"
        )
        self.helpers.append(t)
        t.start()
        t.join(max(until - time.monotonic(), GRACE_S))
        if not box:
            self._fail(
                f"server {self._who(r)} stalled halfway through its reply to '{cmd}' (hung"
                f"{', process stopped' if is_stopped(self.procs[r].pid) else ''}); {RESTART_HINT}"
            )
        if isinstance(box[0], (EOFError, OSError)):
            self._exited(r, cmd)
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def _stopped(self, rs) -> list[int]:
        return [r for r in sorted(rs) if is_stopped(self.procs[r].pid)]

    def _exited(self, r: int, cmd: str) -> NoReturn:
        """Server r closed its pipe: fail naming it with its exit code (waiting up to GRACE_S for its exit)."""
        p = self.procs[r]
        p.join(GRACE_S)
        if p.exitcode is None:
            self._fail(f"server {self._who(r)} closed its pipe during '{cmd}'; {RESTART_HINT}")
        self._fail(
            f"server {self._who(r)} exited with code {p.exitcode}{self._signame(p.exitcode)} during "
            f"'{cmd}'; {RESTART_HINT}"
        )

    @staticmethod
    def _signame(code: int) -> str:
        with contextlib.suppress(ValueError):
            return f" ({signal.Signals(-code).name})" if code < 0 else ""
        return ""


def check_fault(fault: str) -> None:
    if fault not in ("crash", "hang"):
        raise ConfigError(f"inject: fault '{fault}' unknown; allowed: crash, hang")
