"""How the driver (`RealBackend`) reaches its server processes: one command to every server, one reply from each.

    replies = channel.call("serve", [arg_for_server_0, ...], timeout)   # a list in server order

The command is a `ServerProcess` method run by `real_backend.server.run_command` (reset, apply, serve, memory,
close, ping; crash and hang are test hooks). Two transports:

- `PipeChannel` (here): server processes spawned on this host with torch.multiprocessing, one pipe each (default).
- `TorchrunChannel` (`real_backend.torchrun`): one torchrun rank per server, possibly on several nodes; rank 0 is the
  driver and server 0, and commands travel over a gloo control group.

A failure (a server raised, crashed, hung past the timeout, or its connection closed) stops the channel's processes
and raises `ServerError`.
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection as mpc
import time
import weakref

import torch.multiprocessing as tmp

from coel_env.errors import ConfigError
from real_backend.server import WorkerSpec, worker_main
from real_backend.shaper import LinkShaper


class ServerError(RuntimeError):
    """A server process crashed, hung past the timeout, or raised; all server processes have been stopped."""


def failure_message(name: str, cmd: str, tb: str) -> str:
    """One line naming the server, the command and the exception, then the server's traceback."""
    lines = [ln for ln in str(tb).strip().splitlines() if ln.strip()] or ["(no traceback)"]
    return f"server {name} failed in '{cmd}': {lines[-1]}\n--- traceback of server {name} ---\n{str(tb).rstrip()}"


def _stop(procs: list, conns: list) -> None:
    for c in conns:
        with contextlib.suppress(OSError):
            c.close()
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(3)
        if p.is_alive():
            p.kill()
            p.join(3)


class PipeChannel:
    """One spawned process per server on this host, driven over a pipe each; supports crash/hang injection."""

    def __init__(self, spec: WorkerSpec, start_timeout_s: float):
        c = spec.cluster
        self.names = list(c.server_names)
        ctx = tmp.get_context("spawn")
        shared = LinkShaper.new_shared(c, ctx)
        self.procs: list = []
        self.conns: list = []
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns)
        for rank in range(c.num_servers):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(rank, spec, child, shared), daemon=True,
                            name=f"coel-real-{c.server_names[rank]}")
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        self._gather("start", start_timeout_s)

    @property
    def alive(self) -> bool:
        return bool(self.procs) and all(p.is_alive() for p in self.procs)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        """Stop every server process (terminate, then kill); idempotent."""
        self._finalizer()

    def _fail(self, msg: str) -> None:
        self.stop()
        raise ServerError(msg)

    def call(self, cmd: str, args: list | None, timeout: float) -> list:
        dead = [self.names[i] for i, p in enumerate(self.procs) if not p.is_alive()]
        if dead or not self.procs:
            self._fail(f"server process(es) {', '.join(dead) or 'not started'} not running; call reset() first")
        for r, conn in enumerate(self.conns):
            try:
                conn.send((cmd, None if args is None else args[r]))
            except (BrokenPipeError, OSError):
                self._fail(f"server {self.names[r]} is gone (pipe closed) before '{cmd}'")
        return self._gather(cmd, timeout)

    def inject(self, server: int, fault: str) -> None:
        """Make one server crash or hang on its next command."""
        self.conns[server].send((fault, None))

    def _gather(self, cmd: str, timeout: float) -> list:
        names = self.names
        out: list = [None] * len(self.procs)
        pending = set(range(len(self.procs)))
        deadline = time.monotonic() + timeout
        while pending:
            conns = {self.conns[r]: r for r in pending}
            sentinels = {self.procs[r].sentinel: r for r in pending}
            ready = mpc.wait(list(conns) + list(sentinels), timeout=max(deadline - time.monotonic(), 0))
            if not ready:
                r = min(pending)
                self._fail(f"server {names[r]} did not answer '{cmd}' within {timeout:.0f} s (hung); "
                           "all server processes stopped; reset() starts new ones")
            for obj in ready:
                r = conns.get(obj)
                if r is None or r not in pending:
                    continue
                try:
                    status, val = obj.recv()
                except (EOFError, OSError):
                    continue  # the sentinel reports the exit
                if status == "error":
                    self._dead_peer(cmd, grace=1.0)  # a peer's crash shows up first as a socket error here
                    self._fail(failure_message(names[r], cmd, val))
                out[r] = val
                pending.discard(r)
            for obj in ready:
                r = sentinels.get(obj)
                if r is not None and r in pending and not self.conns[r].poll():
                    self._dead_peer(cmd, grace=0.0)
        return out

    def _dead_peer(self, cmd: str, grace: float) -> None:
        """If a server process has exited (waiting up to `grace` s for one to), fail naming it."""
        deadline = time.monotonic() + grace
        while True:
            for r, p in enumerate(self.procs):
                if not p.is_alive():
                    p.join(1)
                    self._fail(f"server {self.names[r]} (pid {p.pid}) exited with code {p.exitcode} "
                               f"during '{cmd}'; all server processes stopped; reset() starts new ones")
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)


def check_fault(fault: str) -> None:
    if fault not in ("crash", "hang"):
        raise ConfigError(f"inject: fault '{fault}' unknown; allowed: crash, hang")
