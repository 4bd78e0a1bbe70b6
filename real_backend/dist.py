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
Every transfer is booked on the LinkShaper and the receiver waits until its arrival time.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist

from coel_env.backend.wire import SLOT_BYTES, STAMP_BYTES, reply_row_bytes, request_row_bytes
from real_backend.shaper import LinkShaper, now, sleep_until
from real_backend.tiers import ExpertStore

TAG_META, TAG_HIDDEN, TAG_REPLY, TAG_REPLY_HDR, TAG_MIGRATE = 11, 12, 13, 14, 15


def _f64_bits(t: float) -> torch.Tensor:
    return torch.tensor([t], dtype=torch.float64).view(torch.int64)


def _bits_f64(x: torch.Tensor) -> float:
    return float(x.view(torch.float64)[0])


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
    ):
        self.rank, self.world, self.store, self.shaper = rank, world, store, shaper
        self.rng = np.random.default_rng([seed, rank])  # rounds pruned and fused counts without bias
        self.device, self.comm_device = device, comm_device
        self.target = None  # [L, E] torch long
        self.prune = np.zeros((world, world))
        self.fuse = np.zeros((world, world), dtype=bool)
        self.fusion_fraction = 0.25
        self.slot_bytes = SLOT_BYTES  # int32 expert id + fp32 gate weight per slot
        self.reset_counters()

    def reset_counters(self) -> None:
        self.bytes_to = np.zeros(self.world)  # bytes this server sent to each peer (requests + replies)
        self.tokens_to = np.zeros(self.world)  # tokens sent to each peer (after pruning, before fusion)
        self.rows_to = np.zeros(self.world)  # hidden rows requested from each peer (after pruning and fusion)
        self.msgs_to = np.zeros(self.world)  # request messages (slot headers + hidden rows) sent to each peer
        self.tokens_pruned = 0  # rows pruned
        self.tokens_fused = 0  # rows merged away
        self.remote_tokens_served = 0  # request rows this server computed for its peers
        self.comm_wait_s = 0.0

    def configure(self, target: np.ndarray, prune: np.ndarray, fuse: np.ndarray, fusion_fraction: float) -> None:
        self.target = torch.as_tensor(target, dtype=torch.long, device=self.device)
        self.prune, self.fuse, self.fusion_fraction = prune, fuse, fusion_fraction

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

    def _to_comm(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.comm_device).contiguous()

    def _combine(self, layer: int, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The receiver's side of a request message: each row's combined output sum_j w_j * expert_j(x) over its
        valid slots. x [n, d]; slots [n, 2k] int32: the k expert ids (-1: unused), then the k fp32 weights' bits."""
        k = slots.shape[1] // 2
        ids, w = slots[:, :k], slots[:, k:].contiguous().view(torch.float32)
        row, slot = (ids >= 0).nonzero(as_tuple=True)
        y = self._compute_grouped(layer, x[row], ids[row, slot].long())
        out = torch.zeros_like(x)
        out.index_add_(0, row, y * w[row, slot, None].to(y.dtype))
        return out

    def __call__(self, layer: int, x: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
        me, S = self.rank, self.world
        out = torch.zeros_like(x)
        d, k = x.shape[1], idx.shape[1]
        elem = x.element_size()
        req_row = request_row_bytes(d, elem, self.slot_bytes, k)
        rep_row = reply_row_bytes(d, elem)
        dest = self.target[layer][idx] if idx.numel() else idx
        # ---- plan what crosses each link (after pruning and fusion): one row per token and destination ----
        sends: dict[int, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]] = {}
        counts = torch.zeros(S, dtype=torch.int64)
        for p in range(S):
            if p == me or idx.numel() == 0:
                continue
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
            slots = torch.cat([ids, w.contiguous().view(torch.int32)], 1)  # [rows, 2k]
            sends[p] = (tok, row_of, rows_x, slots)
            counts[p] = rows_x.shape[0]
            self.tokens_to[p] += tok.numel()
            self.rows_to[p] += rows_x.shape[0]
            self.msgs_to[p] += 1
        # ---- who sends what to whom ----
        gathered = [torch.zeros(S, dtype=torch.int64, device=self.comm_device) for _ in range(S)]
        dist.all_gather(gathered, counts.to(self.comm_device))
        gathered = [g.cpu() for g in gathered]
        incoming = {q: int(gathered[q][me]) for q in range(S) if q != me and int(gathered[q][me]) > 0}
        reqs = []
        for p, (_, _, rx, slots) in sends.items():
            n = rx.shape[0]
            nbytes = n * req_row + STAMP_BYTES
            # the wire format is what is counted: hidden rows, the slot headers and the stamp (2 int32)
            assert rx.numel() * rx.element_size() + (slots.numel() + 2) * 4 == nbytes
            arrive = self._book(p, nbytes)
            meta = torch.cat([self._to_comm(slots).view(-1), self._to_comm(_f64_bits(arrive).view(torch.int32))])
            reqs += [dist.isend(meta, p, tag=TAG_META), dist.isend(self._to_comm(rx), p, tag=TAG_HIDDEN)]
        recv_bufs = {}
        for q, n in incoming.items():
            meta = torch.empty(n * 2 * k + 2, dtype=torch.int32, device=self.comm_device)
            hidden = torch.empty(n, d, dtype=x.dtype, device=self.comm_device)
            recv_bufs[q] = (meta, hidden, dist.irecv(meta, q, tag=TAG_META), dist.irecv(hidden, q, tag=TAG_HIDDEN))
        reply_bufs = {}
        for p, (_, _, rx, _) in sends.items():
            hdr = torch.empty(1, dtype=torch.int64, device=self.comm_device)
            y = torch.empty(rx.shape[0], d, dtype=x.dtype, device=self.comm_device)
            reply_bufs[p] = (hdr, y, dist.irecv(hdr, p, tag=TAG_REPLY_HDR), dist.irecv(y, p, tag=TAG_REPLY))
        # ---- local experts while the requests travel ----
        if idx.numel():
            loc_tok, loc_slot = (dest == me).nonzero(as_tuple=True)
            if loc_tok.numel():
                eid = idx[loc_tok, loc_slot]
                self.store.prefetch(layer, eid)
                y = self._compute_grouped(layer, x[loc_tok], eid)
                out.index_add_(0, loc_tok, y * wts[loc_tok, loc_slot, None])
        # ---- serve the peers' rows: one combined row back per request row ----
        for q, (meta, hidden, w1, w2) in recv_bufs.items():
            w1.wait()
            w2.wait()
            t0 = time.perf_counter()
            sleep_until(_bits_f64(meta[-2:].cpu()))
            self.comm_wait_s += time.perf_counter() - t0
            n = hidden.shape[0]
            slots = meta[:-2].view(n, 2 * k).to(self.device)
            y = self._to_comm(self._combine(layer, hidden.to(self.device), slots))
            self.remote_tokens_served += n
            nbytes = n * rep_row + STAMP_BYTES
            assert y.numel() * y.element_size() + STAMP_BYTES == nbytes
            arrive = self._book(q, nbytes)
            reqs += [
                dist.isend(self._to_comm(_f64_bits(arrive)), q, tag=TAG_REPLY_HDR),
                dist.isend(y, q, tag=TAG_REPLY),
            ]
        # ---- collect the replies (gate weights already applied by the receiver) ----
        for p, (hdr, y, w1, w2) in reply_bufs.items():
            w1.wait()
            w2.wait()
            t0 = time.perf_counter()
            sleep_until(_bits_f64(hdr.cpu()))
            self.comm_wait_s += time.perf_counter() - t0
            tok, row_of, _, _ = sends[p]
            y = y.to(self.device)
            out.index_add_(0, tok, y if row_of is None else y[row_of])
        for r in reqs:
            r.wait()
        return out
