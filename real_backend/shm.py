"""Shared memory between the server processes of one host: the lanes of the per-layer dispatch messages (issue 19).

One segment per `PipeChannel`: a memfd the driver creates before it spawns the servers and hands to each of them as a
file descriptor. It has no name in /dev/shm, and the kernel frees it when the last process holding it exits (a crash
included), so nothing can leak. Layout, in 64-byte lines:
- a header line (magic, world, layers, region sizes: a server checks that it maps the segment it expects);
- one line per rank: its pid (peers check that it lives while they wait) and its all-reduce board slot;
- one `Lane` per ordered server pair (src -> dst): a line of the reader's counters, a ring of header records
  (sequence number, kind, layer, row count, arrival stamp, payload bytes) and one request and one reply region.
Protocol (one writer and one reader per lane): the writer copies the payload into its region, fills the record, and
publishes it by writing the record's sequence number last; the reader waits for that number, reads the record, frees
its ring slot (read count), and frees the payload region once it has used it (release count). The writer waits for a
free slot / region: in the dispatcher's protocol it never has to (at most one request and one reply payload per lane
are in flight, and a step's records fit the ring). Stores become visible in program order on x86-64 (TSO), which the
publication relies on: elsewhere the transport is off unless `COEL_REAL_SHM=1` forces it.
Waits spin briefly, then yield, then sleep; they raise `ShmPeerGone` when the peer process exited and `ShmTimeout`
after the process group's timeout (channels.py counts both as communication errors: the peer is blamed). A payload
larger than its region is a `ShmCapacityError`: the transport sends such a message over the process group instead.
"""

from __future__ import annotations

import mmap
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.reduction import DupFd

import numpy as np
import torch

from coel_env.backend.wire import SLOT_BYTES, reply_row_bytes, request_row_bytes

SHM_ENV = "COEL_REAL_SHM"  # "0": the process group (gloo) for every message; "1": shared memory on any CPU
MAGIC = 0x31_4D_48_53_4C_45_4F_43  # b"COELSHM1"
LINE = 64  # bytes: every record, counter block and region starts on its own cache line
WORDS = LINE // 8
REQ, REP = 1, 2  # record kinds; also the index of their release count in a lane's reader line
KIND = {REQ: "request", REP: "reply"}
MIN_ROWS = 16  # rows a region holds at least (small prefills fit too)
ACT_BYTES = 4  # regions are sized for fp32 activations (CPU), which bounds bf16 (GPU)
SPIN_S, YIELD_S, SLEEP_S = 20e-6, 2e-3, 2e-4  # a wait spins, then yields the CPU, then sleeps this long per check
CHECK_S = 0.05  # how often a long wait checks the peers' pids and the deadline


class ShmError(RuntimeError):
    """The shared-memory transport failed."""


class ShmTimeout(ShmError):
    """A peer sent nothing within the timeout (hung or stopped)."""


class ShmPeerGone(ShmError):
    """A peer process exited while this one waited for it."""


class ShmCapacityError(ShmError):
    """A payload larger than its lane's region."""


class ShmProtocolError(ShmError):
    """A record of another kind or layer than expected: the servers are out of step (a bug)."""


def shm_enabled() -> bool:
    """Whether the servers of a PipeChannel use shared memory (`COEL_REAL_SHM`; default: on x86-64 Linux)."""
    v = os.environ.get(SHM_ENV, "auto").strip()
    if v == "0" or not hasattr(os, "memfd_create"):  # memfd: Linux
        return False
    return v == "1" or platform.machine().lower() in ("x86_64", "amd64")


def _lines(nbytes: int) -> int:
    return -(-nbytes // LINE) * LINE


@dataclass(frozen=True)
class Layout:
    """Sizes and offsets of a segment for `world` servers and `layers` MoE layers."""

    world: int
    layers: int
    req_cap: int  # bytes of a lane's request region
    rep_cap: int  # bytes of a lane's reply region

    @property
    def slots(self) -> int:
        """Header records in a lane's ring: a step's (one request and one reply per layer) and spare."""
        return 2 * self.layers + 8

    @property
    def lane_bytes(self) -> int:
        return LINE * (1 + self.slots) + _lines(self.req_cap) + _lines(self.rep_cap)

    @property
    def nbytes(self) -> int:
        return LINE * (1 + self.world) + self.world * (self.world - 1) * self.lane_bytes

    def rank_word(self, rank: int) -> int:
        """First word of a rank's line: pid, all-reduce round, two value slots."""
        return WORDS * (1 + rank)

    def lane_offset(self, src: int, dst: int) -> int:
        k = src * (self.world - 1) + (dst if dst < src else dst - 1)
        return LINE * (1 + self.world) + k * self.lane_bytes

    def header(self) -> np.ndarray:
        return np.array([MAGIC, self.world, self.layers, self.req_cap, self.rep_cap], dtype=np.int64)


def layout_for(world: int, layers: int, d_model: int, top_k: int, max_batch: int) -> Layout:
    """A layout whose regions hold max(max_batch * top_k, MIN_ROWS) rows (a decode step's messages; larger ones,
    long prefills, go over the process group)."""
    rows = max(max_batch * top_k, MIN_ROWS)
    req = request_row_bytes(d_model, ACT_BYTES, SLOT_BYTES, top_k)
    return Layout(world, layers, rows * req, rows * reply_row_bytes(d_model, ACT_BYTES))


class Segment:
    """The shared memory of one channel's servers: a memfd, passed to spawned processes as a file descriptor."""

    def __init__(self, layout: Layout, fd: int):
        self.layout, self.fd = layout, fd
        self._views: tuple[np.ndarray, torch.Tensor] | None = None
        self._pinned: bool | None = None

    @classmethod
    def create(cls, layout: Layout) -> Segment:
        fd = os.memfd_create("coel-real-shm", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, layout.nbytes)  # zero-filled
            os.pwrite(fd, layout.header().tobytes(), 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(layout, fd)

    def __reduce__(self):
        return _rebuild, (self.layout, DupFd(self.fd))

    def close(self) -> None:
        """Close this process's descriptor (a mapping made by `attach` stays until the process exits)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def attach(self) -> tuple[np.ndarray, torch.Tensor]:
        """Map the segment (once): its int64 words (numpy) and its bytes (torch uint8), views of one mapping."""
        if self._views is None:
            mm = mmap.mmap(self.fd, self.layout.nbytes)
            words = np.frombuffer(mm, dtype=np.int64)
            head = self.layout.header()
            if not np.array_equal(words[: len(head)], head):
                raise ShmError(f"shm transport: segment header {words[: len(head)].tolist()} != {head.tolist()}")
            self._views = (words, torch.frombuffer(mm, dtype=torch.uint8))
        return self._views

    def pin(self) -> bool:
        """Page-lock this process's mapping for the GPU (cudaHostRegister), once: device copies to and from the
        lanes' regions become asynchronous and can be captured in CUDA graphs. False where that fails."""
        if self._pinned is None:
            data = self.attach()[1]
            try:
                err = torch.cuda.cudart().cudaHostRegister(data.data_ptr(), data.numel(), 0)
                self._pinned = int(err) == 0 and bool(data.is_pinned())
            except Exception:
                self._pinned = False
        return self._pinned


def _rebuild(layout: Layout, dup) -> Segment:
    return Segment(layout, dup.detach())


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie has exited); True where unknown (0: not registered yet)."""
    if pid <= 0:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        return True


class Waiter:
    """Bounded waits of one rank on its peers: spin, then yield, then sleep; fail when a watched peer exited or at
    the timeout."""

    def __init__(self, words: np.ndarray, layout: Layout, rank: int, timeout_s: float):
        self.words, self.layout, self.rank, self.timeout_s = words, layout, rank, timeout_s

    def pid(self, rank: int) -> int:
        return int(self.words[self.layout.rank_word(rank)])

    def until(self, ready: Callable[[], bool], peers: Sequence[int], what: Callable[[], str]) -> None:
        """Return once `ready()`; `peers`: whose exit fails the wait; `what()`: the awaited thing, for errors."""
        if ready():
            return
        t0 = time.perf_counter()
        check = t0 + CHECK_S
        while not ready():
            t = time.perf_counter()
            if t - t0 < SPIN_S:
                continue
            if t - t0 < YIELD_S:
                os.sched_yield()
                continue
            if t >= check:
                self._check(peers, what, t - t0)
                check = t + CHECK_S
            time.sleep(SLEEP_S)

    def _check(self, peers: Sequence[int], what: Callable[[], str], waited: float) -> None:
        for p in peers:
            pid = self.pid(p)
            if not pid_alive(pid):
                raise ShmPeerGone(
                    f"shm transport: server {p} (pid {pid}) exited while server {self.rank} waited for {what()}"
                )
        if waited > self.timeout_s:
            raise ShmTimeout(
                f"shm transport: server {self.rank} timed out after {waited:.0f} s waiting for {what()} "
                f"(server {', '.join(map(str, peers))} hung or stopped)"
            )


class Lane:
    """One ordered server pair src -> dst: the writer side (used by src) and the reader side (used by dst)."""

    def __init__(self, words: np.ndarray, data: torch.Tensor, layout: Layout, src: int, dst: int, waiter: Waiter):
        self.src, self.dst, self.waiter, self.slots = src, dst, waiter, layout.slots
        off = layout.lane_offset(src, dst)
        w = off // 8
        self.counts = words[w : w + WORDS]  # reader-owned: [0] records read, [REQ] / [REP] regions released
        self.ring = words[w + WORDS : w + WORDS * (1 + self.slots)].reshape(self.slots, WORDS)
        self.stamps = self.ring.view(np.float64)
        req = off + LINE * (1 + self.slots)
        rep = req + _lines(layout.req_cap)
        self.cap = {REQ: layout.req_cap, REP: layout.rep_cap}
        self.region = {REQ: data[req : req + layout.req_cap], REP: data[rep : rep + layout.rep_cap]}
        self.sent, self.filled = 0, {REQ: 0, REP: 0}  # writer: records published, payloads written
        self.read, self.released = 0, {REQ: 0, REP: 0}  # reader

    def fits(self, kind: int, nbytes: int) -> bool:
        return nbytes <= self.cap[kind]

    # ---- writer (src) ----
    def put(
        self, kind: int, layer: int, n: int, stamp: float, payload: torch.Tensor | None = None, *, away: bool = False
    ) -> None:
        """Publish a record; `payload` (flat uint8, any device) is copied into the kind's region first; `away`: the
        payload travels another way (the record says so with payload bytes -1)."""
        nbytes = -1 if away else 0
        if payload is not None:
            nbytes = payload.numel()
            self._check_fits(kind, nbytes)
            self.claim(kind)
            self.region[kind][:nbytes].copy_(payload)
        self._record(kind, layer, n, stamp, nbytes, filled=payload is not None)

    def publish_written(self, kind: int, layer: int, n: int, stamp: float, nbytes: int) -> None:
        """Publish a record whose payload (`nbytes`) is already in the kind's region: written there, after `claim`,
        by device copies (static decode, real_backend/static.py) that have completed."""
        self._check_fits(kind, nbytes)
        self._record(kind, layer, n, stamp, nbytes, filled=True)

    def claim(self, kind: int) -> None:
        """Wait until the reader released the kind's region (before writing a payload into it)."""
        done = self.filled[kind]
        if self.counts[kind] < done:
            self.waiter.until(
                lambda: self.counts[kind] >= done,
                (self.dst,),
                lambda: f"server {self.dst} to free its {KIND[kind]} region",
            )

    def _check_fits(self, kind: int, nbytes: int) -> None:
        if nbytes > self.cap[kind]:
            raise ShmCapacityError(
                f"shm transport: a {KIND[kind]} of {nbytes} bytes from server {self.src} to server {self.dst} "
                f"exceeds its {self.cap[kind]}-byte region"
            )

    def _record(self, kind: int, layer: int, n: int, stamp: float, nbytes: int, filled: bool) -> None:
        self.filled[kind] += filled
        seq, slot = self.sent, self.sent % self.slots
        if seq - self.counts[0] >= self.slots:
            self.waiter.until(
                lambda: seq - self.counts[0] < self.slots, (self.dst,), lambda: f"a free record slot to {self.dst}"
            )
        rec = self.ring[slot]
        rec[1], rec[2], rec[3], rec[5] = kind, layer, n, nbytes
        self.stamps[slot, 4] = stamp
        rec[0] = seq + 1  # publish: the record's fields (and the payload) are written before this store
        self.sent = seq + 1

    # ---- reader (dst) ----
    def take(self, kind: int, layer: int) -> tuple[int, float, int]:
        """The next record, which must be of `kind` at `layer`: (rows, stamp, payload bytes: -1 = sent elsewhere)."""
        seq, slot = self.read, self.read % self.slots
        rec = self.ring[slot]
        if rec[0] != seq + 1:
            self.waiter.until(
                lambda: rec[0] == seq + 1, (self.src,), lambda: f"server {self.src}'s {KIND[kind]} at layer {layer}"
            )
        got, at, n, nbytes = int(rec[1]), int(rec[2]), int(rec[3]), int(rec[5])
        stamp = float(self.stamps[slot, 4])
        if (got, at) != (kind, layer):
            raise ShmProtocolError(
                f"shm transport: server {self.dst} expected a {KIND[kind]} of layer {layer} from server {self.src}, "
                f"got a {KIND.get(got, got)} of layer {at}"
            )
        self.read = seq + 1
        self.counts[0] = self.read  # the ring slot is free again
        return n, stamp, nbytes

    def payload(self, kind: int, nbytes: int) -> torch.Tensor:
        return self.region[kind][:nbytes]

    def release(self, kind: int) -> None:
        """The reader is done with the kind's region (the writer may fill it again)."""
        self.released[kind] += 1
        self.counts[kind] = self.released[kind]


class ReduceBoard:
    """All-reduce (max) of one float per rank: each rank posts round r's value and waits for every peer's round r.
    Two value slots alternate: a rank can be at most one round ahead of a peer still reading."""

    def __init__(self, words: np.ndarray, layout: Layout, rank: int, waiter: Waiter):
        first = layout.rank_word(0)
        self.rows = words[first : first + WORDS * layout.world].reshape(layout.world, WORDS)  # pid, round, v0, v1
        self.vals = self.rows.view(np.float64)
        self.rank, self.waiter, self.round = rank, waiter, 0
        self.peers = [q for q in range(layout.world) if q != rank]

    def max(self, v: float) -> float:
        r = self.round + 1
        col = 2 + r % 2
        self.vals[self.rank, col] = v
        self.rows[self.rank, 1] = r  # publish
        for q in self.peers:
            if self.rows[q, 1] < r:
                self.waiter.until(lambda q=q: self.rows[q, 1] >= r, (q,), lambda q=q: f"server {q}'s clock (round {r})")
        self.round = r
        return float(self.vals[:, col].max())


def register(words: np.ndarray, layout: Layout, rank: int) -> None:
    """Write this process's pid into its rank line (peers watch it while they wait)."""
    words[layout.rank_word(rank)] = os.getpid()
