"""Cross-server expert dispatch over torch.distributed (gloo on CPU, NCCL on GPUs) with real token compression.

The wire format is `coel_env/backend/wire.py`'s (DeepEP-style per-destination dispatch), and the bytes booked are
exactly the tensors sent. At every MoE layer each server sends each of its tokens *once* to every remote server
that computes at least one of its top-k experts (`dispatch_targets`): one request message per destination holds
the hidden rows [n, d] and a slot header [n, 2k] int32 (the k expert ids, -1 for experts computed elsewhere, then the
k fp32 gate weights' bits, 0 where unused) with the message's float64 arrival stamp (2 int32) at its end. The
receiver computes each row's sum_j w_j * expert_j(x) over its valid slots (rows grouped by expert) and replies one
combined row per request row (an int64 stamp, then [n, d]); the sender adds it to the token's output.

Token *pruning* drops the fraction `prune[me, p]` of a message's rows (in expectation, unbiased random rounding),
those with the lowest summed gate weight to p first; a pruned token's terms from p are skipped. Token *fusion*
merges similar rows of a message (ToMe bipartite soft matching, `fuse_tokens`: each row of one half joins its most
cosine-similar row of the other half; the best-matched fraction is merged): a merged group sends one row, the mean
hidden state with the slots and weights of its representative (the b-row that absorbed the others), and every
member takes that row's combined output. This is lossy on purpose (members may differ in experts and weights); its
quality loss is measured as KL against the single-process reference.
Every transfer is booked on the LinkShaper and the receiver waits until its arrival time. The messages travel by a
transport (real_backend/transport.py): shared-memory lanes between the server processes of one host, else the
torch.distributed process group; the bytes booked are the same either way.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from coel_env.backend.wire import SLOT_BYTES, STAMP_BYTES, reply_row_bytes, request_row_bytes
from coel_env.errors import ConfigError
from real_backend.shaper import LinkShaper, now, sleep_until
from real_backend.tiers import ExpertStore
from real_backend.transport import GlooTransport, Request, ShmTransport

STREAM_ENV = "COEL_REAL_STREAM_ROWS"  # a request of more rows is served as a stream, chunks of this many rows


def stream_rows() -> int:
    """Rows per chunk of a streamed request (`COEL_REAL_STREAM_ROWS`, default 256: ~1 MB, 8 ms at 1 Gb/s)."""
    v = os.environ.get(STREAM_ENV, "256").strip()
    if not v.isdigit() or int(v) < 1:
        raise ConfigError(f"{STREAM_ENV}: '{v}' given; must be a whole number of rows >= 1")
    return int(v)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bytes [n, m] as dtype [n, m / size] (a view where the strides allow it)."""
    try:
        return t.view(dtype)
    except RuntimeError:
        return t.contiguous().view(dtype)


def dispatch_targets(
    holder_servers: list[list[set[int]]], me: int, server_up: np.ndarray, pair_latency: np.ndarray
) -> np.ndarray:
    """[L, E] server that computes each expert for tokens of server `me`: itself if it holds a replica, else the
    lowest-latency live holder (ties: lowest index); -1 if no live server holds it."""
    L, E = len(holder_servers), len(holder_servers[0])
    out = np.full((L, E), -1, dtype=np.int64)
    for l in range(L):
        for e in range(E):
            live = [s for s in holder_servers[l][e] if server_up[s]]
            if me in live:
                out[l, e] = me
            elif live:
                out[l, e] = min(live, key=lambda s: (pair_latency[me, s], s))
    return out


def fuse_tokens(
    x: torch.Tensor, frac: float, rng: np.random.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe bipartite merge of `x` [n, d]: returns (rows to send [m, d], row_of [n] index of each token's row,
    rep [m] the token each row stands for: itself, or for a merged group the b-token that absorbed the others).
    `frac * n` rows are merged away (with `rng`: that many in expectation, the fraction rounded at random)."""
    n = x.shape[0]
    r = int(frac * n)
    if rng is not None and n >= 2:
        r += int(rng.random() < frac * n - r)
    if n < 2 or r == 0:
        return x, torch.arange(n, device=x.device), torch.arange(n, device=x.device)
    a, b = torch.arange(0, n, 2, device=x.device), torch.arange(1, n, 2, device=x.device)
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    sim = xn[a] @ xn[b].T  # [na, nb]
    best_val, best_b = sim.max(-1)
    r = min(r, len(a))
    merged = best_val.argsort(descending=True)[:r]  # a-tokens merged into their best b
    keep_a = torch.ones(len(a), dtype=torch.bool, device=x.device)
    keep_a[merged] = False
    # rows: kept a-tokens, then all b-tokens (b absorbs its merged a-tokens: mean of the group)
    rows_a = a[keep_a]
    acc = x[b].float().clone()
    cnt = torch.ones(len(b), device=x.device)
    acc.index_add_(0, best_b[merged], x[a[merged]].float())
    cnt.index_add_(0, best_b[merged], torch.ones(r, device=x.device))
    rows = torch.cat([x[rows_a], (acc / cnt[:, None]).to(x.dtype)])
    row_of = torch.empty(n, dtype=torch.long, device=x.device)
    row_of[rows_a] = torch.arange(len(rows_a), device=x.device)
    row_of[b] = len(rows_a) + torch.arange(len(b), device=x.device)
    row_of[a[merged]] = len(rows_a) + best_b[merged]
    return rows, row_of, torch.cat([rows_a, b])


class Dispatcher:
    """The ExpertFn of one server process: local experts from its ExpertStore, remote ones over the process group."""

    def __init__(
        self,
        rank: int,
        world: int,
        store: ExpertStore,
        shaper: LinkShaper | None,
        device: torch.device,
        comm_device: torch.device,
        seed: int = 0,
        transport: GlooTransport | ShmTransport | None = None,
    ):
        """`transport` moves the layer's messages (default: the torch.distributed process group)."""
        self.rank, self.world, self.store, self.shaper = rank, world, store, shaper
        self.transport = transport if transport is not None else GlooTransport(device, comm_device)
        self.rng = np.random.default_rng([seed, rank])  # rounds pruned and fused counts without bias
        self.device, self.comm_device = device, comm_device
        self.target = None  # [L, E] torch long
        self.prune = np.zeros((world, world))
        self.fuse = np.zeros((world, world), dtype=bool)
        self.fusion_fraction = 0.25
        self.grouped = None  # a fast.GroupedExperts once `configure` gives one
        self.static = None  # a static.StaticServe: peers' rows served by captured graphs (set by the server)
        self.version = 0  # configurations so far (graphs capture the targets)
        self.slot_bytes = SLOT_BYTES  # int32 expert id + fp32 gate weight per slot
        self.stream_rows = stream_rows()
        self.reset_counters()

    def reset_counters(self) -> None:
        self.bytes_to = np.zeros(self.world)  # bytes this server sent to each peer (requests + replies)
        self.tokens_to = np.zeros(self.world)  # tokens sent to each peer (after pruning, before fusion)
        self.rows_to = np.zeros(self.world)  # hidden rows requested from each peer (after pruning and fusion)
        self.msgs_to = np.zeros(self.world)  # request messages (slot headers + hidden rows) sent to each peer
        self.tokens_pruned = 0  # rows pruned
        self.tokens_fused = 0  # rows merged away
        self.remote_tokens_served = 0  # request rows this server computed for its peers
        self.streams_served = 0  # requests served as streams (`_serve_stream`)
        self.comm_wait_s = 0.0
        self.transport.fallbacks = 0

    def configure(
        self,
        target: np.ndarray,
        prune: np.ndarray,
        fuse: np.ndarray,
        fusion_fraction: float,
        targets_all: list[np.ndarray] | None = None,
        grouped=None,
    ) -> None:
        """`target` [L, E]: where this server's tokens go; `targets_all[s]`: every server's (to know, per layer,
        which peers can send here at all: no message is exchanged with a peer that never can); `grouped`: a
        `fast.GroupedExperts` (layers it stacked are computed without host syncs)."""
        self.target = torch.as_tensor(target, dtype=torch.long, device=self.device)
        self.target_np = np.asarray(target)
        self.version += 1
        self.prune, self.fuse, self.fusion_fraction = prune, fuse, fusion_fraction
        self.grouped = grouped
        me, S = self.rank, self.world
        L = target.shape[0]
        if targets_all is None:  # no static knowledge: exchange with every peer at every layer
            self.send_to = [[p for p in range(S) if p != me]] * L
            self.recv_from = self.send_to
        else:
            self.send_to = [sorted({int(p) for p in target[l]} - {me, -1}) for l in range(L)]
            self.recv_from = [[q for q in range(S) if q != me and (targets_all[q][l] == me).any()] for l in range(L)]
        self.peer_ids = [torch.as_tensor(ps, dtype=torch.long, device=self.device) for ps in self.send_to]

    def _compute_grouped(self, layer: int, x: torch.Tensor, eids: torch.Tensor) -> torch.Tensor:
        """Each row of x through its expert: rows sorted by expert, one host sync, contiguous slices per expert."""
        order = torch.argsort(eids, stable=True)
        experts, counts = torch.unique_consecutive(eids[order], return_counts=True)
        xs = x[order]
        parts, start = [], 0
        for e, n in zip(experts.tolist(), counts.tolist()):
            parts.append(self.store.compute(layer, e, xs[start : start + n]))
            start += n
        y = torch.empty_like(x)
        y[order] = torch.cat(parts) if parts else xs
        return y

    def _book(self, dst: int, nbytes: int) -> float:
        self.bytes_to[dst] += nbytes
        return self.shaper.reserve(self.rank, dst, nbytes) if self.shaper is not None else now()

    def _wait(self, stamp: float) -> None:
        """Sleep until a message's arrival time (the link shaper's), counted as communication wait."""
        t0 = time.perf_counter()
        sleep_until(stamp)
        self.comm_wait_s += time.perf_counter() - t0

    def _fast(self, layer: int) -> bool:
        return self.grouped is not None and self.grouped.has(layer)

    def _combine(self, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Each row's combined output sum_j w_j * expert_j(x) over its valid slots (ids -1: unused): grouped GEMMs
        without a host sync on a stacked layer, else rows grouped by expert through the ExpertStore's tiers."""
        if self._fast(layer):
            return self.grouped.combine(layer, x, ids.long(), w)
        row, slot = (ids >= 0).nonzero(as_tuple=True)
        y = self._compute_grouped(layer, x[row], ids[row, slot].long())
        out = torch.zeros_like(x)
        out.index_add_(0, row, y * w[row, slot, None].to(y.dtype))
        return out

    def pack(
        self, layer: int, x: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor, dest: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The device part of the dispatch to the R peers of `send_to[layer]` (no host sync): `order` [R, T] (each
        peer's tokens first), `counts` [R] int64 and `rows` [R, T, row] bytes, a row = k int32 expert ids (-1:
        computed elsewhere; every id -1 past a peer's count), k fp32 weights, the hidden state."""
        R, (T, k) = len(self.send_to[layer]), idx.shape
        at = dest[None] == self.peer_ids[layer][:, None, None]  # [R, T, k]
        hit = at.any(2)
        order = torch.argsort((~hit).to(torch.int8), dim=1, stable=True)  # [R, T]: each peer's tokens first
        at_o = at.gather(1, order[..., None].expand(R, T, k))
        ids = torch.where(at_o, idx[order], -1).to(torch.int32)
        w = torch.where(at_o, wts[order].float(), 0.0)
        rows = torch.cat([ids.view(torch.uint8), w.view(torch.uint8), x[order].view(torch.uint8)], -1)
        return order, hit.sum(1), rows

    def _plan_fast(self, layer: int, x: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor, dest: torch.Tensor):
        """Rows for every remote destination built on the device in fixed-capacity buffers, and ONE copy to the
        host: [R] counts (int64) then [R, T, row] bytes, a row = k int32 expert ids (-1: computed elsewhere), k fp32
        weights, the hidden state. Returns {p: (tok [n] on the device, None, n, request payload bytes)}."""
        peers = self.send_to[layer]
        R, T = len(peers), idx.shape[0]
        order, cnt, rows = self.pack(layer, x, idx, wts, dest)
        host = torch.cat([cnt.view(torch.uint8), rows.view(-1)]).cpu()  # the one host sync of a request
        counts = host[: 8 * R].view(torch.int64).tolist()
        rows_h = host[8 * R :].view(R, T, -1)
        return {
            p: (order[r, : counts[r]], None, counts[r], rows_h[r, : counts[r]].reshape(-1))
            for r, p in enumerate(peers)
            if counts[r]
        }

    def _plan_generic(self, layer: int, x: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor, dest: torch.Tensor):
        """As _plan_fast, with pruning and fusion (host-side choices, per destination)."""
        me, sends = self.rank, {}
        for p in self.send_to[layer]:
            at_p = dest == p  # [T, k]
            tok = at_p.any(1).nonzero(as_tuple=True)[0]
            if tok.numel() == 0:
                continue
            at_p = at_p[tok]
            ids = torch.where(at_p, idx[tok], -1).to(torch.int32)  # the slots of the experts p computes
            w = torch.where(at_p, wts[tok].float(), 0.0)
            r = float(self.prune[me, p])
            if r > 0:
                n = tok.numel()
                drop = r * n  # r of the rows in expectation, also in messages of one or two rows
                n_keep = n - int(drop) - int(self.rng.random() < drop - int(drop))
                self.tokens_pruned += n - n_keep
                if n_keep == 0:  # every row for this peer pruned: no message at all
                    continue
                keep = w.sum(1).argsort(descending=True)[:n_keep].sort().values  # lowest summed weight to p first
                tok, ids, w = tok[keep], ids[keep], w[keep]
            rows_x, row_of = x[tok], None
            if self.fuse[me, p] and tok.numel() > 1:
                rows_x, row_of, rep = fuse_tokens(rows_x, self.fusion_fraction, self.rng)
                ids, w = ids[rep], w[rep]  # a merged row carries its representative's slots
                self.tokens_fused += tok.numel() - rows_x.shape[0]
            rows = torch.cat([ids.view(torch.uint8), w.view(torch.uint8), rows_x.view(torch.uint8)], -1)
            sends[p] = (tok, row_of, rows_x.shape[0], rows.reshape(-1).cpu())
        return sends

    def __call__(self, layer: int, x: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
        """The layer's routed-expert output for this server's tokens x [T, d] (experts idx [T, k], weights wts).

        Messages per peer p this server can send to at this layer: a header (int64 row count n, float64 arrival
        stamp), then, if n > 0, the request payload (n rows of k int32 ids, k fp32 weights, d activations); the
        reply is one message (the stamp, then n combined rows). Bytes booked: n * request_row + stamp and
        n * reply_row + stamp, as wire.py counts them (the row count travels unbooked, as the count exchange did)."""
        me = self.rank
        T, d = x.shape
        k = idx.shape[1]
        elem = x.element_size()
        req_row = request_row_bytes(d, elem, self.slot_bytes, k)
        rep_row = reply_row_bytes(d, elem)
        out = torch.zeros_like(x)
        dest = self.target[layer][idx] if T else None
        sends = {}
        if T and self.send_to[layer]:
            compress = any(self.prune[me, p] > 0 or self.fuse[me, p] for p in self.send_to[layer])
            sends = (self._plan_generic if compress else self._plan_fast)(layer, x, idx, wts, dest)
        # ---- requests: a header to every peer that may expect one, the rows where there are any ----
        requests = self._requests(sends, req_row)
        self.transport.post(layer, requests, self.send_to[layer], self.recv_from[layer], req_row, rep_row)
        # ---- local experts while the requests travel ----
        if T:
            mine = dest == me
            if self._fast(layer):
                out += self.grouped.combine(layer, x, torch.where(mine, idx, -1), torch.where(mine, wts, 0))
            else:
                loc_tok, loc_slot = mine.nonzero(as_tuple=True)
                if loc_tok.numel():
                    eid = idx[loc_tok, loc_slot]
                    self.store.prefetch(layer, eid)
                    y = self._compute_grouped(layer, x[loc_tok], eid)
                    out.index_add_(0, loc_tok, y * wts[loc_tok, loc_slot, None])
        self._serve_peers(layer, x.dtype, k, req_row, rep_row)
        # ---- collect the replies (gate weights already applied by the receiver) ----
        for p, (tok, row_of, n, _) in sends.items():
            stamp, buf = self.transport.response(p)
            self._wait(stamp)
            y = buf.to(self.device, non_blocking=True).view(x.dtype).view(n, d)
            out.index_add_(0, tok, y if row_of is None else y[row_of])
        self.transport.done()
        return out

    def _serve_peers(self, layer: int, dtype: torch.dtype, k: int, req_row: int, rep_row: int) -> None:
        """Serve the peers' rows of the layer: one combined row back per request row (a captured graph straight
        from and to the lanes' regions where `self.static` can, real_backend/static.py)."""
        for q in self.recv_from[layer]:
            n, stamp, buf = self.transport.request(q)
            if n == 0:
                continue
            self.remote_tokens_served += n
            if n > self.stream_rows and self.shaper is not None:
                self._serve_stream(layer, q, self._rows(buf, n, req_row), stamp, dtype, k, req_row, rep_row)
                continue
            self._wait(stamp)
            if self.static is not None and self.static.serves(layer, q, n):
                self.static.serve(layer, q, n)
                self.transport.reply_written(q, self._book(q, n * rep_row + STAMP_BYTES), n)
                continue
            rows = self._rows(buf, n, req_row)
            y = self._combine(layer, *self._slots(rows, dtype, k))
            self.transport.reply(q, self._book(q, n * rep_row + STAMP_BYTES), y)

    def _rows(self, buf: torch.Tensor, n: int, req_row: int) -> torch.Tensor:
        return buf.to(self.device, non_blocking=True).view(n, req_row)

    @staticmethod
    def _slots(rows: torch.Tensor, dtype: torch.dtype, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Request rows [n, row] bytes as (hidden [n, d], expert ids [n, k] int32, weights [n, k] fp32)."""
        hb = 8 * k  # slot-header bytes of a row (ids then weights)
        return _as(rows[:, hb:], dtype), _as(rows[:, : hb // 2], torch.int32), _as(rows[:, hb // 2 : hb], torch.float32)

    def _serve_stream(
        self, layer: int, q: int, rows: torch.Tensor, stamp: float, dtype, k: int, req_row: int, rep_row: int
    ) -> None:
        """A long request served as the stream it is on the wire: each chunk of `stream_rows` rows computed once it
        has arrived (the stamp is the last byte's arrival; earlier bytes arrive earlier by the rest's
        serialization), the reply booked once the first chunk is computed (it streams back while the request still
        streams in, on the other direction) and delivered no earlier than its last chunk can follow. One message
        each way, the bytes booked as for any message."""
        n, me, sh, c = rows.shape[0], self.rank, self.shaper, self.stream_rows
        self.streams_served += 1
        x, ids, w = self._slots(rows, dtype, k)
        y = torch.empty_like(x)
        booked = None
        for a in range(0, n, c):
            b = min(a + c, n)
            self._wait(stamp - sh.serialization_s(q, me, (n - b) * req_row))
            y[a:b] = self._combine(layer, x[a:b], ids[a:b], w[a:b])
            if booked is None:
                if self.device.type == "cuda":
                    torch.cuda.current_stream(self.device).synchronize()  # the first chunk is computed
                booked = self._book(q, n * rep_row + STAMP_BYTES)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        last = (n - 1) % c + 1
        self.transport.reply(q, max(booked, sh.tail_arrival(me, q, last * rep_row)), y)

    def row_bytes(self, d: int, elem: int, k: int) -> tuple[int, int]:
        """Bytes of a request row and of a reply row (wire.py)."""
        return request_row_bytes(d, elem, self.slot_bytes, k), reply_row_bytes(d, elem)

    def exchange_written(self, layer: int, counts: list[int], dtype: torch.dtype, d: int, k: int) -> None:
        """The layer's messages for rows a static decode step already wrote into the lanes' request regions
        (`counts[r]` rows for `send_to[layer][r]`): booked, counted and headed as by `__call__`; then the peers'
        rows served and the replies awaited (their rows stay in the reply regions: the next graph adds them)."""
        req_row, rep_row = self.row_bytes(d, torch.empty(0, dtype=dtype).element_size(), k)
        requests = {}
        for p, n in zip(self.send_to[layer], counts):
            if n:
                requests[p] = (n, self._book(p, n * req_row + STAMP_BYTES), None)
                self._count(p, n, n)
        self.transport.post(layer, requests, self.send_to[layer], self.recv_from[layer], req_row, rep_row)
        self._serve_peers(layer, dtype, k, req_row, rep_row)
        for p in requests:
            self._wait(self.transport.response(p)[0])
        self.transport.done()

    def _count(self, p: int, tokens: int, rows: int) -> None:
        self.tokens_to[p] += tokens
        self.rows_to[p] += rows
        self.msgs_to[p] += 1

    def _requests(self, sends: dict, req_row: int) -> dict[int, Request]:
        """Book each request message on its link and count it: {peer: (rows, arrival stamp, payload)}."""
        out = {}
        for p, (tok, _, n, payload) in sends.items():
            nbytes = n * req_row + STAMP_BYTES
            assert payload.numel() + STAMP_BYTES == nbytes  # the wire format is what is counted
            out[p] = (n, self._book(p, nbytes), payload)
            self._count(p, tok.numel(), n)
        return out

    def compressing(self) -> bool:
        """Whether any of this server's messages is pruned or fused (the static step does neither)."""
        return bool((self.prune[self.rank] > 0).any() or self.fuse[self.rank].any())
