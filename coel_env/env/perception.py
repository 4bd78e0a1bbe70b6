"""Perception: what the agent learns through Hello messages and routing logs, batched over envs.

Each live server sends a Hello with its resources as 8-bit quantized fractions (GPU compute and memory free,
the bandwidth factor of its links, its measured request rate as a fraction of 4x nominal) only when a value
moved by more than `threshold` since its last Hello, on rejoining, or after `max_age` silent epochs (heartbeat);
in between the last values stay (stale). Bits sent are counted. Popularity is observed from the epoch's routing
log: `popularity_tokens` routed tokens (or fewer if fewer were served) give binomial counts per (layer, expert)
(normal approximation), smoothed by an exponential moving average. `mode="ideal"` reveals ground truth.

Randomness: `Perception.normals`, a named layout (coel_env/rng.py) popularity [L, E] | rate [S], drawn on reset
from the env's generator and each epoch inside the dynamics' `extra` block (state.py); append new streams at the end.
"""

from __future__ import annotations

import numpy as np

from coel_env.errors import ConfigError
from coel_env.rng import Layout
from coel_env.world.cluster import Cluster

MODES = ("hello", "ideal")
RATE_SCALE = 4.0  # a Hello reports the request rate as a fraction of RATE_SCALE x nominal


class Perception:
    def __init__(
        self,
        cluster: Cluster,
        num_envs: int,
        base_rate: np.ndarray,
        window_s: float,
        tokens_per_request: float,
        mode: str = "hello",
        threshold: float = 0.04,
        max_age: int = 10,
        header_bits: int = 64,
        field_bits: int = 8,
        popularity_tokens: int = 4096,
        popularity_smoothing: float = 0.5,
    ):
        if mode not in MODES:
            raise ConfigError(f"perception: unknown mode '{mode}'; allowed: {', '.join(MODES)}")
        self.c = c = cluster
        self.mode, self.threshold, self.max_age = mode, threshold, max_age
        self.header_bits, self.field_bits = header_bits, field_bits
        self.pop_tokens, self.smoothing = popularity_tokens, popularity_smoothing
        self.window, self.tok_per_req = window_s, tokens_per_request
        N, S, D, K = num_envs, c.num_servers, c.num_devices, c.num_links
        L, E = c.model.num_moe_layers, c.model.num_experts
        self.base_rate = np.maximum(base_rate, 1e-9)
        srv_id = {n: i for i, n in enumerate(c.server_names)}
        link_owner = np.array([srv_id.get(a, srv_id.get(b, 0)) for a, b in c.link_ends], dtype=np.int64)
        self.owner = np.concatenate([c.dev_server, c.dev_server, link_owner, np.arange(S)])
        self.order = np.argsort(self.owner, kind="stable")
        owners_sorted = self.owner[self.order]
        self.starts = np.flatnonzero(np.r_[True, owners_sorted[1:] != owners_sorted[:-1]])
        self.fields_per_server = np.bincount(self.owner, minlength=S)
        self.D, self.K, self.S = D, K, S
        self.last = np.zeros((N, len(self.owner)))  # last values each server reported
        self.age = np.zeros((N, S), dtype=np.int64)
        self.pop = np.zeros((N, L, E))
        self.bits = np.zeros(N, dtype=np.int64)
        # per env and epoch: routing-log counts per (layer, expert) | measured request rate per server
        self.normals = Layout({"popularity": (L, E), "rate": S}, "normal")

    @property
    def num_normals(self) -> int:
        return self.normals.size

    # ---- perceived values ---------------------------------------------------------------------------
    @property
    def compute_avail(self) -> np.ndarray:
        return self.last[:, : self.D]

    @property
    def memory_avail(self) -> np.ndarray:
        return self.last[:, self.D : 2 * self.D]

    @property
    def link_factor(self) -> np.ndarray:
        return self.last[:, 2 * self.D : 2 * self.D + self.K]

    @property
    def rate_frac(self) -> np.ndarray:
        return self.last[:, 2 * self.D + self.K :]

    @property
    def arrival_rate(self) -> np.ndarray:
        return self.rate_frac * RATE_SCALE * self.base_rate

    # ---- updates ------------------------------------------------------------------------------------
    def _truth(self, bs, z_rate: np.ndarray | None, rows) -> np.ndarray:
        up = bs.server_up[rows]
        lam = bs.arrival_rate[rows] * up
        if z_rate is not None and self.mode == "hello":  # measured = Poisson count / window (normal approx.)
            lam = np.maximum(lam + np.sqrt(lam / self.window) * z_rate, 0.0)
        rate = np.minimum(lam / (RATE_SCALE * self.base_rate), 1.0)
        return np.concatenate(
            [bs.compute_avail[rows], bs.memory_avail[rows], np.minimum(bs.link_factor[rows], 1.0), rate], 1
        )

    def _quantize(self, x: np.ndarray) -> np.ndarray:
        if self.mode == "ideal":
            return x
        return np.round(np.clip(x, 0.0, 1.0) * 255.0) / 255.0

    def reset(self, i: int, bs, z: dict[str, np.ndarray]) -> int:
        """Env i starts: every live server sends a full Hello; popularity from one routing log. `z`: one draw of
        `normals` by name (popularity [L, E], rate [S])."""
        rows = slice(i, i + 1)
        self.last[rows] = self._quantize(self._truth(bs, z["rate"][None], rows))
        self.age[i] = 0
        self.pop[i] = 0.0
        self._observe_popularity(bs, z["popularity"][None], rows, first=True)
        up = bs.server_up[i]
        self.bits[i] = (
            0
            if self.mode == "ideal"
            else int((up * (self.header_bits + self.field_bits * self.fields_per_server)).sum())
        )
        return int(self.bits[i])

    def observe(self, bs, z: dict[str, np.ndarray], rejoined: np.ndarray) -> np.ndarray:
        """One epoch of Hellos for every env (after the dynamics); returns bits sent [N]. `z`: this epoch's
        `normals` by name, batched (popularity [N, L, E], rate [N, S])."""
        rows = slice(None)
        x = self._quantize(self._truth(bs, z["rate"], rows))
        up = bs.server_up
        self._observe_popularity(bs, z["popularity"], rows)
        if self.mode == "ideal":
            self.last[:] = x
            self.age[:] = 0
            self.bits[:] = 0
            return self.bits
        delta = np.abs(x - self.last)[:, self.order]
        moved = np.maximum.reduceat(delta, self.starts, axis=1) > self.threshold
        self.age += 1
        send = up & (moved | (self.age >= self.max_age) | rejoined)
        np.copyto(self.last, x, where=send[:, self.owner])
        self.age[send] = 0
        self.bits[:] = (send * (self.header_bits + self.field_bits * self.fields_per_server)).sum(1)
        return self.bits

    def _observe_popularity(self, bs, z: np.ndarray, rows, first: bool = False) -> None:
        N = z.shape[0]
        S = self.S
        w = bs.arrival_rate[rows] * bs.server_up[rows]  # [N, S] requests/s
        total = w.sum(1)
        pop = bs.popularity[rows]
        agg = np.matmul((w / np.maximum(total, 1e-30)[:, None])[:, None, :], pop.reshape(N, S, -1))[:, 0]
        agg = agg.reshape(self.pop[rows].shape)
        if self.mode == "ideal":
            self.pop[rows] = agg
            return
        n = np.minimum(total * self.window * self.tok_per_req, self.pop_tokens)  # [N] tokens in the log
        nn = n[:, None, None]
        p = np.clip(agg, 0.0, 1.0)
        cnt = np.clip(nn * p + np.sqrt(nn * p * (1 - p)) * z, 0.0, nn)  # z: [N, L, E] normals
        new = np.round(cnt) / np.maximum(nn, 1.0)
        a = 1.0 if first else self.smoothing
        seen = (n > 0)[:, None, None]
        self.pop[rows] = np.where(seen, (1 - a) * self.pop[rows] + a * new, self.pop[rows])

    def perceived_server_popularity(self, bs, i: int) -> np.ndarray:
        """[S, L, E] env i's per-server popularity as CoELEnv.perceived_state reveals it (and the `compact`
        observation encodes it): `server_popularity` with the epoch's own generator, so every reader of one epoch
        sees the same routing logs and the same seed gives the same values."""
        return self.server_popularity(bs, i, np.random.default_rng([int(bs.epoch[i]), 0x5EED]))

    def server_popularity(self, bs, i: int, rng: np.random.Generator) -> np.ndarray:
        """[S, L, E] per-server observed popularity of env i (one routing log per server; for perceived_state)."""
        pop = bs.popularity[i]
        if self.mode == "ideal":
            return pop.copy()
        lam = bs.arrival_rate[i] * bs.server_up[i]
        n = np.minimum(lam * self.window * self.tok_per_req, self.pop_tokens)[:, None, None]
        p = np.clip(pop, 0.0, 1.0)
        cnt = np.clip(n * p + np.sqrt(n * p * (1 - p)) * rng.standard_normal(p.shape), 0.0, n)
        return np.where(n > 0, np.round(cnt) / np.maximum(n, 1.0), self.pop[i][None])
