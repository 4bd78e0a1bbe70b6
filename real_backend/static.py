"""Static decode steps (issue 19): the servers of one host exchange a layer's rows straight between the GPU and the
shared-memory lanes' regions, from CUDA graphs.

Each server page-locks its mapping of the lanes' segment (shm.py, `Segment.pin`), so device copies to and from the
regions are asynchronous and can be captured. A decoding server (`StaticDecoder`) replays ONE graph per MoE layer:
the previous layer's remote replies added from the reply regions, attention, router and shared expert, the local
experts, and the packing of every destination's rows into its request region (a fixed capacity: all B tokens, the
peer's first, ids -1 past its count) with the row counts into pinned host memory. The host's work per layer is that
replay, one stream sync where the layer sends rows (the counts: bytes booked and headers), and the lanes' headers.
A server that serves peers' rows (`StaticServe`) replays a graph per (layer, peer, row bucket): the request rows
copied from the region, masked past the header's row count, the grouped experts, the combined rows copied into the
reply region; then one sync and the reply header.
Formats, bookings and counts are the eager path's (`Dispatcher.__call__`, wire.py): a region holds a message's rows
first; eager and static servers interoperate. Order: a region is rewritten only after the stream sync that follows
its reader's last use (the lock-step protocol: a reply is read before the next request's sync, a request before the
reply's sync). On by default for servers on a GPU (`COEL_REAL_STATIC=0`: off); `COEL_REAL_STATIC=1` also on CPU,
where the same steps run eagerly (what the CPU tests check).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from real_backend.dist import Dispatcher, _as
from real_backend.fast import FastDecoder, SlotPool, advance
from real_backend.model import rms_norm, sdpa_no_cudnn
from real_backend.shm import REP, REQ
from real_backend.transport import ShmTransport

STATIC_ENV = "COEL_REAL_STATIC"  # "0": off; "1": on (also on CPU, eager); default: on for servers on a GPU


def static_enabled(device: torch.device) -> bool:
    """Whether a server computing on `device` takes static steps (`COEL_REAL_STATIC`; default: on CUDA)."""
    v = os.environ.get(STATIC_ENV, "auto").strip()
    return v == "1" or (v != "0" and device.type == "cuda")


def bucket(n: int) -> int:
    """Rows a serving graph handles for n request rows: the next power of two."""
    return 1 << max(n - 1, 0).bit_length()


def _graphs_on(dev: torch.device) -> bool:
    return dev.type == "cuda" and os.environ.get("COEL_REAL_GRAPHS", "1") != "0"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.current_stream(dev).synchronize()


def _warn(what: str, exc: Exception) -> None:
    print(f"static decode: {what} failed ({exc!r}); eager instead", file=sys.stderr)


class _Regions:
    """The lanes' regions of one server as the device copies see them, with their row capacities."""

    def __init__(self, disp: Dispatcher, dtype: torch.dtype, d: int, k: int):
        self.tr: ShmTransport = disp.transport
        self.me = disp.rank
        self.req_row, self.rep_row = disp.row_bytes(d, torch.empty(0, dtype=dtype).element_size(), k)
        lane = next(iter(self.tr.out.values()))
        self.rows = min(lane.cap[REQ] // self.req_row, lane.cap[REP] // self.rep_row)  # rows a region holds

    def req_out(self, p: int, rows: int) -> torch.Tensor:
        return self.tr.region(self.me, p, REQ)[: rows * self.req_row]

    def rep_in(self, p: int, rows: int) -> torch.Tensor:
        return self.tr.region(p, self.me, REP)[: rows * self.rep_row]

    def req_in(self, q: int, rows: int) -> torch.Tensor:
        return self.tr.region(q, self.me, REQ)[: rows * self.req_row]

    def rep_out(self, q: int, rows: int) -> torch.Tensor:
        return self.tr.region(self.me, q, REP)[: rows * self.rep_row]


def pin_ok(disp: Dispatcher) -> bool:
    """Whether the dispatcher's transport can carry static steps: shared-memory lanes, pinned on a GPU."""
    tr = disp.transport
    if not isinstance(tr, ShmTransport) or not tr.out:
        return False
    return disp.device.type != "cuda" or tr.seg.pin()


class _Captured:
    """A body run eagerly once (for real), then captured; replays afterwards (CUDA), or always eager (CPU)."""

    def __init__(self, dev: torch.device):
        self.dev, self.graphs = dev, {}

    def run(self, key, body) -> None:
        if not _graphs_on(self.dev):
            body()
            return
        g = self.graphs.get(key)
        if g is not None:
            g.replay()
            return
        side = torch.cuda.Stream(self.dev)
        side.wait_stream(torch.cuda.current_stream(self.dev))
        with torch.cuda.stream(side):
            body()
        torch.cuda.current_stream(self.dev).wait_stream(side)
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                body()
        except Exception as exc:  # capture failed: eager from now on for this key
            _warn("serving graph capture", exc)
            g = _Eager(body)
        self.graphs[key] = g


class _Eager:
    def __init__(self, body):
        self.replay = body


class StaticServe:
    """Peers' request rows served by captured graphs straight from and to the lanes' regions."""

    def __init__(self, disp: Dispatcher, dtype: torch.dtype, d: int, k: int):
        self.disp, self.dtype, self.d, self.k = disp, dtype, d, k
        self.reg = _Regions(disp, dtype, d, k)
        dev = disp.device
        self.nrow = torch.zeros(1, dtype=torch.long, pin_memory=dev.type == "cuda")
        self.ar = torch.arange(max(self.reg.rows, 1), device=dev)
        self.cap = _Captured(dev)
        self.version = None
        self.served = 0  # messages served by the static path

    def serves(self, layer: int, q: int, n: int) -> bool:
        g = self.disp.grouped
        return g is not None and g.has(layer) and self.disp.transport.in_region(q) and bucket(n) <= self.reg.rows

    def serve(self, layer: int, q: int, n: int) -> None:
        """Compute q's n request rows of the layer into the reply region (complete on return)."""
        g = self.disp.grouped
        if self.version != g.version:  # re-stacked experts: new weights to capture
            self.cap.graphs, self.version = {}, g.version
        self.disp.transport.claim(q, REP)
        nb = bucket(n)
        self.nrow[0] = n
        with torch.no_grad():
            self.cap.run((layer, q, nb), lambda: self._body(layer, q, nb))
        _sync(self.disp.device)
        self.served += 1

    def _body(self, layer: int, q: int, nb: int) -> None:
        reg, dev, hb = self.reg, self.disp.device, 4 * self.k
        n = self.nrow.to(dev, non_blocking=True)
        rows = reg.req_in(q, nb).to(dev, non_blocking=True).view(nb, reg.req_row)
        ids = torch.where((self.ar[:nb] < n)[:, None], _as(rows[:, :hb], torch.int32), -1)  # rows past n: none
        w = _as(rows[:, hb : 2 * hb], torch.float32)
        y = self.disp.grouped.combine(layer, _as(rows[:, 2 * hb :], self.dtype), ids.long(), w)
        reg.rep_out(q, nb).copy_(y.reshape(-1).view(torch.uint8), non_blocking=True)


class StaticDecoder:
    """A decode step of one server as one graph per MoE layer around the exchanges (see the module docstring)."""

    def __init__(self, fast: FastDecoder, disp: Dispatcher):
        self.fast, self.disp = fast, disp
        m = fast.model
        self.L, self.d, self.k = m.cfg.num_layers, m.cfg.d_model, m.cfg.top_k
        self.dev, self.dtype = m.device, m.dtype
        self.reg = _Regions(disp, m.dtype, self.d, self.k)
        self.counts = torch.zeros(max(disp.world, 1), dtype=torch.long, pin_memory=self.dev.type == "cuda")
        self.ar = torch.arange(max(self.reg.rows, 1), device=self.dev)
        self._cache: dict = {}
        self._key = None
        self.steps = 0  # decode steps taken by the static path

    def usable(self, B: int) -> bool:
        """Whether B sequences can take the static step with the dispatcher's configuration: no pruning or fusion,
        every layer's local experts grouped (or none), B rows fit a region, the model without dense layers."""
        disp, cfg = self.disp, self.fast.model.cfg
        if cfg.first_k_dense or disp.compressing() or self.reg.rows < B or not pin_ok(disp):
            return False
        mine = (disp.target_np == disp.rank).any(1)
        return all(disp._fast(l) or not mine[l] for l in range(cfg.num_moe_layers))

    # ---- the device part ----
    def _body(self, i: int, st: dict, prev: dict | None) -> dict:
        """Layer i's device part (i = L: the final norm and head) after the previous layer's replies."""
        w = self.fast.model.w
        h = F.embedding(st["ids"], w["model.embed_tokens.weight"]) if prev is None else self._finish(prev)
        if i == self.L:
            h = rms_norm(h, w["model.norm.weight"], self.fast.model.cfg.rms_eps)
            return {"logits": F.linear(h, w["lm_head.weight"]).float()}
        hm, x, idx, wts, s = self.fast._pre(i, h, st)
        return {"hm": hm, "s": s, **self._experts(i, x, idx, wts)}

    def _experts(self, i: int, x: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor) -> dict:
        """Local experts into `out` and every destination's rows into its request region (counts: pinned host)."""
        disp, B = self.disp, x.shape[0]
        dest = disp.target[i][idx]
        out = torch.zeros_like(x)
        if disp._fast(i):
            mine = dest == disp.rank
            out += disp.grouped.combine(i, x, torch.where(mine, idx, -1), torch.where(mine, wts, 0))
        peers, packs = disp.send_to[i], []
        if peers:
            order, counts, rows = disp.pack(i, x, idx, wts, dest)
            for r, p in enumerate(peers):
                self.reg.req_out(p, B).copy_(rows[r].reshape(-1), non_blocking=True)
                packs.append((p, order[r], counts[r]))
            self.counts[: len(peers)].copy_(counts, non_blocking=True)
        return {"out": out, "packs": packs}

    def _finish(self, prev: dict) -> torch.Tensor:
        """The previous layer's output: local experts plus each peer's replies (rows past its count: none)."""
        out = prev["out"]
        B = out.shape[0]
        for p, order, count in prev["packs"]:
            y = self.reg.rep_in(p, B).to(self.dev, non_blocking=True).view(out.dtype).view(B, self.d)
            out.index_add_(0, order, torch.where((self.ar[:B] < count)[:, None], y, 0))
        return prev["hm"] + (out if prev["s"] is None else out + prev["s"])

    # ---- graphs ----
    def _graphs(self, B: int, forced: bool) -> dict | None:
        key = (B, forced, id(self.fast.pool), self.fast.pool.max_len, self.disp.version)
        if self._key != key[2:]:
            self._cache, self._key = {}, key[2:]
        if key not in self._cache:
            g = None
            if _graphs_on(self.dev):
                try:
                    g = self._capture(B, forced)
                except Exception as exc:
                    _warn("decode graph capture", exc)
            self._cache[key] = g
        return self._cache[key]

    def _capture(self, B: int, forced: bool) -> dict:
        fd, pool = self.fast, self.fast.pool
        st = fd.static_state(B, forced)
        st["ids"] = torch.zeros(B, dtype=torch.long, device=self.dev)
        saved = [(k[:B].clone(), v[:B].clone()) for k, v in zip(pool.k, pool.v)]  # the warm-up writes the caches
        pairs = self.disp.grouped.pairs.clone()
        side = torch.cuda.Stream(self.dev)
        side.wait_stream(torch.cuda.current_stream(self.dev))
        with torch.cuda.stream(side), sdpa_no_cudnn():
            prev = None
            for i in range(self.L + 1):
                prev = self._body(i, st, prev)
        torch.cuda.current_stream(self.dev).wait_stream(side)
        mempool = torch.cuda.graph_pool_handle()
        graphs, outs, prev = [], [], None
        with sdpa_no_cudnn():
            for i in range(self.L + 1):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=mempool):
                    prev = self._body(i, st, prev)
                graphs.append(g)
                outs.append(prev)
        for (k, v), (k0, v0) in zip(zip(pool.k, pool.v), saved):
            k[:B].copy_(k0)
            v[:B].copy_(v0)
        self.disp.grouped.pairs.copy_(pairs)
        return {"st": st, "graphs": graphs, "outs": outs}

    # ---- the step ----
    @torch.no_grad()
    def decode(self, seqs: list, pool: SlotPool, routes: torch.Tensor | None) -> torch.Tensor:
        """One new token for each sequence (in slots 0..B-1, in order): logits [B, V] (float32; a graph's output
        buffer on CUDA, valid until the next step)."""
        fd, B = self.fast, len(seqs)
        if pool is not fd.pool:
            fd.pool, fd._graph_cache = pool, {}
        fd._rope_table(pool.max_len)
        lengths = [q.cache.length for q in seqs]
        pos = torch.tensor(lengths, device=self.dev)
        ids = torch.tensor([q.out[-1] for q in seqs], device=self.dev)
        g = self._graphs(B, routes is not None)
        if g is not None:
            st = g["st"]
            fd.fill_state(st, pos, routes)
            st["ids"].copy_(ids)
        else:
            st = dict(fd.eager_state(lengths, pos, routes), ids=ids)
        prev = None
        with sdpa_no_cudnn():
            for i in range(self.L + 1):
                for p in self.disp.send_to[i] if i < self.L else ():
                    self.disp.transport.claim(p, REQ)
                if g is not None:
                    g["graphs"][i].replay()
                    prev = g["outs"][i]
                else:
                    prev = self._body(i, st, prev)
                if i < self.L:
                    self._exchange(i)
        advance(seqs, self.L)
        self.steps += 1
        return prev["logits"]

    def _exchange(self, i: int) -> None:
        n = len(self.disp.send_to[i])
        counts = []
        if n:
            _sync(self.dev)  # the layer's rows are in the regions and its counts on the host
            counts = self.counts[:n].tolist()
        self.disp.exchange_written(i, counts, self.dtype, self.d, self.k)
