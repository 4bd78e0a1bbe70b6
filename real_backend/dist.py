"""Cross-server expert dispatch over torch.distributed (gloo on CPU, NCCL on GPUs) with real token compression.

At every MoE layer each server sends the hidden states of its tokens whose expert lives elsewhere to the server
that computes it, and gets the weighted outputs back. Token *pruning* drops the lowest-gate-weight fraction of the
tokens crossing a link (their remote expert term is skipped); token *fusion* merges similar tokens bound for the
same expert (ToMe bipartite soft matching: each token of one half joins its most cosine-similar token of the other
half; the best-matched fraction is averaged and sent once, and the merged tokens share the returned output).
Every transfer is booked on the LinkShaper and the receiver waits until its arrival time.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist

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
) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe bipartite merge of `x` [n, d]: returns (rows to send [m, d], row_of [n] index of each token's row).
    `frac * n` rows are merged away (with `rng`: that many in expectation, the fraction rounded at random)."""
    n = x.shape[0]
    r = int(frac * n)
    if rng is not None and n >= 2:
        r += int(rng.random() < frac * n - r)
    if n < 2 or r == 0:
        return x, torch.arange(n, device=x.device)
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
    return rows, row_of


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
        self.reset_counters()

    def reset_counters(self) -> None:
        self.bytes_to = np.zeros(self.world)  # bytes this server sent to each peer (requests + replies)
        self.tokens_to = np.zeros(self.world)
        self.rows_to = np.zeros(self.world)  # hidden rows requested from each peer (after pruning and fusion)
        self.msgs_to = np.zeros(self.world)  # request messages (meta + hidden) sent to each peer
        self.tokens_pruned = 0
        self.tokens_fused = 0
        self.remote_tokens_served = 0
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

    def __call__(self, layer: int, x: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
        me, S = self.rank, self.world
        out = torch.zeros_like(x)
        dest = self.target[layer][idx] if idx.numel() else idx
        # ---- plan what crosses each link (after pruning and fusion) ----
        sends: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        counts = torch.zeros(S, dtype=torch.int64)
        for p in range(S):
            if p == me or idx.numel() == 0:
                continue
            tok, slot = (dest == p).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            w = wts[tok, slot]
            eid = idx[tok, slot]
            r = float(self.prune[me, p])
            if r > 0:
                drop = r * tok.numel()  # r of the tokens in expectation, also in messages of one or two tokens
                n_keep = tok.numel() - int(drop) - int(self.rng.random() < drop - int(drop))
                keep = w.float().argsort(descending=True)[:n_keep].sort().values
                self.tokens_pruned += tok.numel() - n_keep
                tok, slot, w, eid = tok[keep], slot[keep], w[keep], eid[keep]
                if n_keep == 0:  # every token for this peer pruned: no message at all
                    continue
            rows_x, rows_e, row_of = x[tok], eid, torch.arange(tok.numel(), device=x.device)
            if self.fuse[me, p] and tok.numel() > 1:
                xs, es, ro = [], [], torch.empty(tok.numel(), dtype=torch.long, device=x.device)
                base = 0
                for e in eid.unique().tolist():
                    sel = (eid == e).nonzero(as_tuple=True)[0]
                    rx, rof = fuse_tokens(x[tok[sel]], self.fusion_fraction, self.rng)
                    xs.append(rx)
                    es.append(torch.full((rx.shape[0],), e, dtype=eid.dtype, device=x.device))
                    ro[sel] = base + rof
                    base += rx.shape[0]
                rows_x, rows_e, row_of = torch.cat(xs), torch.cat(es), ro
                self.tokens_fused += tok.numel() - rows_x.shape[0]
            sends[p] = (tok, w, rows_x, rows_e, row_of)
            counts[p] = rows_x.shape[0]
            self.tokens_to[p] += tok.numel()
            self.rows_to[p] += rows_x.shape[0]
            self.msgs_to[p] += 1
        # ---- who sends what to whom ----
        gathered = [torch.zeros(S, dtype=torch.int64, device=self.comm_device) for _ in range(S)]
        dist.all_gather(gathered, counts.to(self.comm_device))
        gathered = [g.cpu() for g in gathered]
        incoming = {q: int(gathered[q][me]) for q in range(S) if q != me and int(gathered[q][me]) > 0}
        d = x.shape[1]
        reqs = []
        for p, (_, _, rx, re_, _) in sends.items():
            hidden = self._to_comm(rx)
            arrive = self._book(p, hidden.numel() * hidden.element_size() + 8 * (re_.numel() + 1))
            meta = self._to_comm(torch.cat([re_.long().cpu(), _f64_bits(arrive)]))
            reqs += [dist.isend(meta, p, tag=TAG_META), dist.isend(hidden, p, tag=TAG_HIDDEN)]
        recv_bufs = {}
        for q, n in incoming.items():
            meta = torch.empty(n + 1, dtype=torch.int64, device=self.comm_device)
            hidden = torch.empty(n, d, dtype=x.dtype, device=self.comm_device)
            recv_bufs[q] = (meta, hidden, dist.irecv(meta, q, tag=TAG_META), dist.irecv(hidden, q, tag=TAG_HIDDEN))
        reply_bufs = {}
        for p, (_, _, rx, _, _) in sends.items():
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
        # ---- serve the peers' tokens ----
        for q, (meta, hidden, w1, w2) in recv_bufs.items():
            w1.wait()
            w2.wait()
            t0 = time.perf_counter()
            sleep_until(_bits_f64(meta[-1:].cpu()))
            self.comm_wait_s += time.perf_counter() - t0
            eids = meta[:-1].to(self.device)
            y = self._to_comm(self._compute_grouped(layer, hidden.to(self.device), eids))
            self.remote_tokens_served += y.shape[0]
            arrive = self._book(q, y.numel() * y.element_size() + 8)
            reqs += [
                dist.isend(self._to_comm(_f64_bits(arrive)), q, tag=TAG_REPLY_HDR),
                dist.isend(y, q, tag=TAG_REPLY),
            ]
        # ---- collect the replies ----
        for p, (hdr, y, w1, w2) in reply_bufs.items():
            w1.wait()
            w2.wait()
            t0 = time.perf_counter()
            sleep_until(_bits_f64(hdr.cpu()))
            self.comm_wait_s += time.perf_counter() - t0
            tok, w, _, _, row_of = sends[p]
            out.index_add_(0, tok, y.to(self.device)[row_of] * w[:, None])
        for r in reqs:
            r.wait()
        return out
