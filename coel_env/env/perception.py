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
from numba import njit

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
        self.fields_per_server = np.bincount(self.owner, minlength=S)
        # bits of one server's full Hello (none are counted in ideal mode)
        msg = header_bits + field_bits * self.fields_per_server
        self.msg_bits = np.zeros_like(msg) if mode == "ideal" else msg
        self.rate_full = RATE_SCALE * self.base_rate  # the request rate a Hello reports as 1
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
    def reset(self, i: int, bs, z: dict[str, np.ndarray]) -> int:
        """Env i starts: every live server sends a full Hello; popularity from one routing log. `z`: one draw of
        `normals` by name (popularity [L, E], rate [S])."""
        rows = slice(i, i + 1)
        self.pop[i] = 0.0
        self._hello(bs, z["rate"][None], rows, bs.server_up[rows], full=True)  # every live server rejoins
        self._observe_popularity(bs, z["popularity"][None], rows, first=True)
        return int(self.bits[i])

    def observe(self, bs, z: dict[str, np.ndarray], rejoined: np.ndarray) -> np.ndarray:
        """One epoch of Hellos for every env (after the dynamics); returns bits sent [N]. `z`: this epoch's
        `normals` by name, batched (popularity [N, L, E], rate [N, S])."""
        rows = slice(None)
        self._hello(bs, z["rate"], rows, rejoined, full=self.mode == "ideal")
        self._observe_popularity(bs, z["popularity"], rows)
        return self.bits

    def _hello(self, bs, z_rate: np.ndarray, rows: slice, rejoined: np.ndarray, full: bool) -> None:
        """Hellos of envs `rows` (`hello_kernel`); `full`: every field is reported (reset, ideal mode)."""
        hello_kernel(
            bs.server_up[rows],
            bs.compute_avail[rows],
            bs.memory_avail[rows],
            bs.link_factor[rows],
            bs.arrival_rate[rows],
            z_rate,
            rejoined,
            self.owner,
            self.msg_bits,
            self.rate_full,
            float(self.window),
            float(self.threshold),
            int(self.max_age),
            self.mode == "hello",
            full,
            self.last[rows],
            self.age[rows],
            self.bits[rows],
        )

    def _observe_popularity(self, bs, z: np.ndarray, rows, first: bool = False) -> None:
        N = z.shape[0]
        S = self.S
        w = bs.arrival_rate[rows] * bs.server_up[rows]  # [N, S] requests/s
        total = w.sum(1)
        pop = bs.popularity[rows]
        agg = np.matmul((w / np.maximum(total, 1e-30)[:, None])[:, None, :], pop.reshape(N, S, -1))[:, 0]
        if self.mode == "ideal":
            self.pop[rows] = agg.reshape(self.pop[rows].shape)
            return
        smooth_log_kernel(
            agg,
            self._log_tokens(total),
            z.reshape(N, -1),
            1.0 if first else self.smoothing,
            self.pop[rows].reshape(N, -1, copy=False),
        )

    def _log_tokens(self, rate: np.ndarray) -> np.ndarray:
        """Tokens in an epoch's routing log of requests at `rate` (requests/s), at most `popularity_tokens`."""
        return np.minimum(rate * self.window * self.tok_per_req, self.pop_tokens)

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
        tokens = self._log_tokens(lam)  # [S] tokens in each server's log
        S = pop.shape[0]
        z = rng.standard_normal(pop.shape)
        out = np.empty_like(pop)
        routing_log_kernel(
            pop.reshape(S, -1), tokens, z.reshape(S, -1), self.pop[i].reshape(-1), out.reshape(S, -1, copy=False)
        )
        return out


# ---- kernels ------------------------------------------------------------------------------------------------------
@njit(cache=True)
def quantize(x: float, on: bool) -> float:
    """A Hello field as sent: 8 bits of clip(x, 0, 1) (x itself when `on` is False, ideal mode)."""
    return np.round(min(max(x, 0.0), 1.0) * 255.0) / 255.0 if on else x


@njit(cache=True)
def routed_share(tokens: float, p: float, z: float) -> float:
    """Share of a routing log of `tokens` tokens that used an expert of inclusion probability p: a binomial count
    (normal approximation, standard normal z) clipped to [0, tokens] and rounded, over max(tokens, 1)."""
    p = min(max(p, 0.0), 1.0)
    cnt = min(max(tokens * p + np.sqrt(tokens * p * (1 - p)) * z, 0.0), tokens)
    return np.round(cnt) / max(tokens, 1.0)


@njit(cache=True)
def hello_kernel(
    up,
    compute,
    memory,
    link,
    arrival,
    z_rate,
    rejoined,
    owner,
    msg_bits,
    rate_full,
    window,
    threshold,
    max_age,
    noisy,
    full,
    last,
    age,
    bits,
):
    """One epoch of Hellos per env n (in place: last [N, F] values, age [N, S], bits [N]). Fields: compute [D] |
    memory [D] | link factor (<= 1) [K] | measured rate [S] (Poisson count / window, normal approximation with
    z_rate when `noisy`, as a fraction of rate_full, <= 1), each 8-bit quantized when `noisy`. A live server
    sends when a field of it (`owner`) moved by more than `threshold`, it rejoined, or it was silent `max_age`
    epochs; `full`: every field is taken and every live server counted (reset, ideal mode)."""
    N, D = compute.shape
    K, S = link.shape[1], up.shape[1]
    x = np.empty(last.shape[1])
    moved = np.empty(S, dtype=np.bool_)
    for n in range(N):
        for d in range(D):
            x[d] = quantize(compute[n, d], noisy)
            x[D + d] = quantize(memory[n, d], noisy)
        for k in range(K):
            x[2 * D + k] = quantize(min(link[n, k], 1.0), noisy)
        for s in range(S):
            lam = arrival[n, s] * (1.0 if up[n, s] else 0.0)
            if noisy:
                lam = max(lam + np.sqrt(lam / window) * z_rate[n, s], 0.0)
            x[2 * D + K + s] = quantize(min(lam / rate_full[s], 1.0), noisy)
        moved[:] = False
        if not full:
            for f in range(x.shape[0]):
                if abs(x[f] - last[n, f]) > threshold:
                    moved[owner[f]] = True
        sent = 0
        for s in range(S):
            if full:
                age[n, s] = 0
                moved[s] = True
            else:
                age[n, s] += 1
                moved[s] = up[n, s] and (moved[s] or age[n, s] >= max_age or rejoined[n, s])
                if moved[s]:
                    age[n, s] = 0
            if moved[s] and up[n, s]:
                sent += msg_bits[s]
        bits[n] = sent
        for f in range(x.shape[0]):
            if moved[owner[f]]:
                last[n, f] = x[f]


@njit(cache=True)
def smooth_log_kernel(agg, tokens, z, a, pop):
    """pop[n] := (1 - a) pop[n] + a * `routed_share` of env n's routing log (tokens[n] tokens over popularity
    agg[n], normals z[n]); unchanged where the log is empty. Arrays [N, L * E], tokens [N]."""
    N, J = agg.shape
    for n in range(N):
        if tokens[n] > 0:
            for j in range(J):
                pop[n, j] = (1 - a) * pop[n, j] + a * routed_share(tokens[n], agg[n, j], z[n, j])


@njit(cache=True)
def routing_log_kernel(pop, tokens, z, fallback, out):
    """out[s] := `routed_share` of server s's routing log of tokens[s] tokens over popularity pop[s] (normals
    z[s]); `fallback` where that log is empty. Arrays [S, L * E], tokens [S], fallback [L * E]."""
    S, J = pop.shape
    for s in range(S):
        for j in range(J):
            out[s, j] = routed_share(tokens[s], pop[s, j], z[s, j]) if tokens[s] > 0 else fallback[j]
