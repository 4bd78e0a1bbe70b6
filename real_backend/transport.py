"""How a server's Dispatcher exchanges one MoE layer's messages with its peers (the wire format: dist.py, wire.py).

Per layer, in this order: `post` sends a header (row count, arrival stamp) to every peer this server may send to,
with the request rows where there are any, and starts receiving; `request(q)` waits for peer q's header (and rows);
`reply(q, ...)` sends q one combined row per request row; `response(p)` waits for p's reply to this server's
request; `done()` ends the layer (every send finished, every received buffer free again). `all_max` is the step
clock's all-reduce. Booking bytes on the links is the Dispatcher's: a transport only moves them.
- `GlooTransport`: torch.distributed isend/irecv (gloo through TCP, or NCCL); torchrun and `COEL_REAL_SHM=0`.
- `ShmTransport`: the shared-memory lanes of real_backend/shm.py, for the server processes of one PipeChannel (one
  host, the default); a payload larger than its lane's region travels over the process group (the header says so).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from coel_env.backend.wire import STAMP_BYTES
from real_backend.shm import REP, REQ, Lane, ReduceBoard, Segment, Waiter, register

TAG_META, TAG_HIDDEN, TAG_REPLY, TAG_REPLY_HDR, TAG_MIGRATE = 11, 12, 13, 14, 15
Request = tuple[int, float, torch.Tensor]  # rows, arrival stamp, payload (flat uint8 on the host)


def _f64_bits(t: float) -> torch.Tensor:
    return torch.tensor([t], dtype=torch.float64).view(torch.int64)


def _bits_f64(x: torch.Tensor) -> float:
    return float(x.view(torch.float64)[0])


class HostBuffers:
    """Receive buffers of a transport: reusable pinned host memory when computing on a GPU over a host-memory
    process group, fresh ones otherwise."""

    def __init__(self, device: torch.device, comm_device: torch.device):
        self.device, self.comm_device = device, comm_device
        self._pinned: dict[tuple[str, int], torch.Tensor] = {}

    def get(self, kind: str, peer: int, nbytes: int) -> torch.Tensor:
        if self.comm_device.type != "cpu":
            return torch.empty(nbytes, dtype=torch.uint8, device=self.comm_device)
        if self.device.type != "cuda":
            return torch.empty(nbytes, dtype=torch.uint8)
        buf = self._pinned.get((kind, peer))
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 2 * (0 if buf is None else buf.numel())), dtype=torch.uint8).pin_memory()
            self._pinned[(kind, peer)] = buf
        return buf[:nbytes]

    def to_comm(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.comm_device).contiguous()


class GlooTransport:
    """The layer's messages over the torch.distributed process group: header and rows as two messages (tags
    TAG_META, TAG_HIDDEN), the reply as one (the stamp, then the rows; TAG_REPLY)."""

    name = "gloo"

    def __init__(self, device: torch.device, comm_device: torch.device):
        self.bufs = HostBuffers(device, comm_device)
        self.fallbacks = 0  # messages a shared-memory lane could not hold (none here)
        self._flag = torch.zeros(1, dtype=torch.float64, device=comm_device)
        self._works: list = []

    def post(
        self,
        layer: int,
        requests: dict[int, Request],
        send_to: list[int],
        recv_from: list[int],
        req_row: int,
        rep_row: int,
    ) -> None:
        self._req_row, self._works = req_row, []
        for p in send_to:
            n, stamp, payload = requests.get(p, (0, 0.0, None))
            hdr = torch.zeros(2, dtype=torch.int64)
            if n:
                hdr[0], hdr[1:] = n, _f64_bits(stamp)
            self._works.append(dist.isend(self.bufs.to_comm(hdr), p, tag=TAG_META))
            if n:
                self._works.append(dist.isend(self.bufs.to_comm(payload), p, tag=TAG_HIDDEN))
        self._hdrs = {}
        for q in recv_from:
            h = torch.empty(2, dtype=torch.int64, device=self.bufs.comm_device)
            self._hdrs[q] = (h, dist.irecv(h, q, tag=TAG_META))
        self._replies = {}
        for p, (n, _, _) in requests.items():
            buf = self.bufs.get("reply", p, STAMP_BYTES + n * rep_row)
            self._replies[p] = (buf, dist.irecv(buf, p, tag=TAG_REPLY))

    def request(self, q: int) -> tuple[int, float, torch.Tensor | None]:
        h, work = self._hdrs[q]
        work.wait()
        h = h.cpu()
        n = int(h[0])
        if n == 0:
            return 0, 0.0, None
        buf = self.bufs.get("req", q, n * self._req_row)
        dist.recv(buf, q, tag=TAG_HIDDEN)
        return n, _bits_f64(h[1:]), buf

    def reply(self, q: int, stamp: float, y: torch.Tensor) -> None:
        msg = torch.empty(STAMP_BYTES + y.numel() * y.element_size(), dtype=torch.uint8, device=self.bufs.comm_device)
        msg[STAMP_BYTES:] = y.reshape(-1).view(torch.uint8)
        msg[:STAMP_BYTES] = _f64_bits(stamp).view(torch.uint8).to(self.bufs.comm_device)
        self._works.append(dist.isend(msg, q, tag=TAG_REPLY))

    def response(self, p: int) -> tuple[float, torch.Tensor]:
        buf, work = self._replies[p]
        work.wait()
        return _bits_f64(buf[:STAMP_BYTES].cpu().view(torch.int64)), buf[STAMP_BYTES:]

    def done(self) -> None:
        for w in self._works:
            w.wait()
        self._works = []

    def all_max(self, v: float) -> float:
        self._flag.fill_(v)
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
        return float(self._flag.item())


class ShmTransport:
    """The layer's messages through shared-memory lanes: a header record per message, the rows in the lane's request
    or reply region (or over the process group when larger than it: tags TAG_HIDDEN, TAG_REPLY)."""

    name = "shm"

    def __init__(self, seg: Segment, rank: int, timeout_s: float, device: torch.device, comm_device: torch.device):
        words, data = seg.attach()
        self.seg = seg
        layout = seg.layout
        register(words, layout, rank)
        waiter = Waiter(words, layout, rank, timeout_s)
        peers = [p for p in range(layout.world) if p != rank]
        self.out = {p: Lane(words, data, layout, rank, p, waiter) for p in peers}
        self.inn = {q: Lane(words, data, layout, q, rank, waiter) for q in peers}
        self.board = ReduceBoard(words, layout, rank, waiter)
        self.rank = rank
        self.bufs = HostBuffers(device, comm_device)
        self.fallbacks = 0  # messages sent or received over the process group (larger than a region)
        self._works: list = []
        self._held_req: dict[int, Lane] = {}  # request regions read this layer: freed once the reply is computed
        self._held_rep: list[Lane] = []  # reply regions read this layer: freed by done()

    def post(
        self,
        layer: int,
        requests: dict[int, Request],
        send_to: list[int],
        recv_from: list[int],
        req_row: int,
        rep_row: int,
    ) -> None:
        self.layer, self._req_row, self._rep_row = layer, req_row, rep_row
        for p in send_to:
            n, stamp, payload = requests.get(p, (0, 0.0, None))
            lane = self.out[p]
            if n and payload is None:  # the rows are in the lane's region already (static decode)
                lane.publish_written(REQ, layer, n, stamp, n * req_row)
            elif n and not lane.fits(REQ, payload.numel()):
                self._isend(payload, p, TAG_HIDDEN)
                lane.put(REQ, layer, n, stamp, away=True)
            else:
                lane.put(REQ, layer, n, stamp, payload if n else None)

    def request(self, q: int) -> tuple[int, float, torch.Tensor | None]:
        lane = self.inn[q]
        n, stamp, nbytes = lane.take(REQ, self.layer)
        if n == 0:
            return 0, stamp, None
        if nbytes >= 0:
            self._held_req[q] = lane
            return n, stamp, lane.payload(REQ, nbytes)
        buf = self.bufs.get("req", q, n * self._req_row)
        dist.recv(buf, q, tag=TAG_HIDDEN)
        self.fallbacks += 1
        return n, stamp, buf

    def reply(self, q: int, stamp: float, y: torch.Tensor) -> None:
        held = self._held_req.pop(q, None)
        if held is not None:  # y is computed (and on a GPU copied from the region): q may fill it again
            held.release(REQ)
        data = y.reshape(-1).view(torch.uint8)
        lane = self.out[q]
        if lane.fits(REP, data.numel()):
            lane.put(REP, self.layer, y.shape[0], stamp, data)
        else:
            self._isend(data, q, TAG_REPLY)
            lane.put(REP, self.layer, y.shape[0], stamp, away=True)

    def reply_written(self, q: int, stamp: float, n: int) -> None:
        """As `reply`, for n rows that device copies wrote into the reply region (after `claim(q, REP)`)."""
        self._held_req.pop(q).release(REQ)
        self.out[q].publish_written(REP, self.layer, n, stamp, n * self._rep_row)

    def in_region(self, q: int) -> bool:
        """Whether peer q's request of this layer (taken by `request`) lies in its lane's region."""
        return q in self._held_req

    def claim(self, peer: int, kind: int) -> None:
        """Wait until `peer` released this server's outgoing region of `kind` (before device copies write it)."""
        self.out[peer].claim(kind)

    def region(self, src: int, dst: int, kind: int) -> torch.Tensor:
        """The request (REQ) or reply (REP) region of lane src -> dst, flat uint8 (this server is src or dst)."""
        return (self.out[dst] if src == self.rank else self.inn[src]).region[kind]

    def response(self, p: int) -> tuple[float, torch.Tensor]:
        lane = self.inn[p]
        n, stamp, nbytes = lane.take(REP, self.layer)
        if nbytes >= 0:
            self._held_rep.append(lane)
            return stamp, lane.payload(REP, nbytes)
        buf = self.bufs.get("reply", p, n * self._rep_row)
        dist.recv(buf, p, tag=TAG_REPLY)  # received in the order sent (NCCL matches a pair's messages by order only)
        self.fallbacks += 1
        return stamp, buf

    def done(self) -> None:
        for w in self._works:
            w.wait()
        self._works = []
        for lane in self._held_rep:
            lane.release(REP)
        for lane in self._held_req.values():  # a request without a reply (not in the dispatcher's protocol)
            lane.release(REQ)
        self._held_rep, self._held_req = [], {}

    def all_max(self, v: float) -> float:
        return self.board.max(v)

    def _isend(self, payload: torch.Tensor, peer: int, tag: int) -> None:
        self._works.append(dist.isend(self.bufs.to_comm(payload), peer, tag=tag))
        self.fallbacks += 1
