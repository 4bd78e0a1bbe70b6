"""Expert routing: a seeded generator of realistic routing and replay of recorded traces.

Popularity is stored as per-token *inclusion probabilities* `p[l, e]` (the chance a token uses expert e of
MoE layer l), so `p[l].sum() == top_k` and `p <= 1`. The same generator feeds the surrogate (marginals) and the
real backend (sampled token routes), because random-weight routers route almost uniformly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coel_env.atomic import atomic_path
from coel_env.errors import ConfigError
from coel_env.specs import ModelSpec, RoutingSpec


def inclusion_probs(weights: np.ndarray, k: int, iters: int = 30) -> np.ndarray:
    """Scale routing weights (last axis sums to anything > 0) to inclusion probabilities summing to k, each <= 1."""
    w = weights / weights.sum(-1, keepdims=True)
    p = np.minimum(k * w, 1.0)
    for _ in range(iters):
        deficit = k - p.sum(-1, keepdims=True)
        if np.all(np.abs(deficit) < 1e-9):
            break
        free = np.where(p < 1.0, w, 0.0)
        p = np.minimum(p + deficit * free / np.maximum(free.sum(-1, keepdims=True), 1e-30), 1.0)
    return p


@dataclass
class RoutingModel:
    """Per-domain popularity [M, L, E] and the inter-layer affinity [L-1, E, E] (row-stochastic)."""

    domain_popularity: np.ndarray
    affinity: np.ndarray
    top_k: int
    affinity_weight: float

    @classmethod
    def generate(cls, model: ModelSpec, spec: RoutingSpec, seed: int) -> RoutingModel:
        rng = np.random.default_rng(seed)
        L, E, M = model.num_moe_layers, model.num_experts, spec.num_domains
        alphas = spec.zipf_alpha * rng.uniform(0.6, 1.4, size=L)
        ranks = np.arange(1, E + 1, dtype=np.float64)

        def zipf_layer(l: int) -> np.ndarray:
            w = np.empty(E)
            w[rng.permutation(E)] = ranks ** (-alphas[l])
            return w / w.sum()

        common = np.stack([zipf_layer(l) for l in range(L)])
        own = np.stack([np.stack([zipf_layer(l) for l in range(L)]) for _ in range(M)])
        weights = spec.domain_overlap * common[None] + (1 - spec.domain_overlap) * own
        pop = inclusion_probs(weights, model.top_k)
        aff = rng.dirichlet(np.full(E, spec.affinity_concentration), size=(max(L - 1, 0), E))
        return cls(pop, aff.astype(np.float64), model.top_k, spec.affinity)

    @property
    def num_domains(self) -> int:
        return self.domain_popularity.shape[0]

    def popularity(self, domain_mix: np.ndarray) -> np.ndarray:
        """[..., L, E] inclusion probabilities for domain mixtures [..., M]."""
        M, L, E = self.domain_popularity.shape
        flat = domain_mix @ self.domain_popularity.reshape(M, L * E)
        return flat.reshape(*domain_mix.shape[:-1], L, E)

    def sample(self, domain_mix: np.ndarray, num_tokens: int, rng: np.random.Generator) -> np.ndarray:
        """Token routes [T, L, k] (expert ids) for tokens from one server with `domain_mix` [M]."""
        M, L, E = self.domain_popularity.shape
        k = self.top_k
        domains = rng.choice(M, size=num_tokens, p=domain_mix / domain_mix.sum())
        out = np.empty((num_tokens, L, k), dtype=np.int32)
        prev = None
        for l in range(L):
            logits = np.log(np.maximum(self.domain_popularity[domains, l], 1e-12))
            if prev is not None and self.affinity_weight > 0:
                follow = self.affinity[l - 1][prev].mean(axis=1)  # [T, E]
                logits = logits + self.affinity_weight * np.log(np.maximum(follow * E, 1e-12))
            gumbel = -np.log(-np.log(rng.uniform(1e-12, 1.0, size=(num_tokens, E))))
            prev = np.argpartition(-(logits + gumbel), k - 1, axis=1)[:, :k]
            out[:, l] = prev
        return out


@dataclass
class RoutingTrace:
    """A recorded routing trace: token routes [T, L, k], the serving server and epoch of each token."""

    experts: np.ndarray
    server: np.ndarray
    epoch: np.ndarray

    def save(self, path: str | Path) -> None:
        """Write a `.npz` trace atomically (`.npz` is appended to a path without it, as numpy does)."""
        target = Path(path) if str(path).endswith(".npz") else Path(f"{path}.npz")
        with atomic_path(target, ".npz") as tmp:
            np.savez_compressed(tmp, experts=self.experts, server=self.server, epoch=self.epoch)

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        """Load a `.npz` trace (never with pickle)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                trace = cls(z["experts"], z["server"], z["epoch"])
        except (OSError, KeyError, ValueError, TypeError, AttributeError) as exc:
            raise ConfigError(f"trace: cannot read '{path}' ({exc}); expected .npz with experts/server/epoch") from None
        if trace.experts.ndim != 3 or not len(trace.server) == len(trace.experts) == len(trace.epoch):
            raise ConfigError(f"trace: '{path}' arrays disagree: experts must be [T, L, k], server/epoch [T]")
        return trace

    @property
    def num_epochs(self) -> int:
        return int(self.epoch.max()) + 1 if len(self.epoch) else 0

    def popularity(self, epoch: int, num_servers: int, num_experts: int) -> np.ndarray:
        """Empirical inclusion probabilities [S, L, E] of one epoch (uniform where a server has no tokens)."""
        _, L, k = self.experts.shape
        sel = self.epoch == epoch % max(self.num_epochs, 1)
        counts = np.zeros((num_servers, L, num_experts))
        srv = np.repeat(self.server[sel], L * k)
        lay = np.tile(np.repeat(np.arange(L), k), int(sel.sum()))
        np.add.at(counts, (srv, lay, self.experts[sel].reshape(-1)), 1.0)
        tokens = np.bincount(self.server[sel], minlength=num_servers).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            p = counts / tokens[:, None, None]
        p[tokens == 0] = k / num_experts
        return p


def record_trace(
    routing: RoutingModel, domain_mix: np.ndarray, tokens_per_epoch: int, epochs: int, seed: int
) -> RoutingTrace:
    """Sample a trace from the generator for servers with fixed mixtures [S, M] (for tests and replay)."""
    rng = np.random.default_rng(seed)
    parts = []
    for t in range(epochs):
        for s in range(domain_mix.shape[0]):
            routes = routing.sample(domain_mix[s], tokens_per_epoch, rng)
            parts.append((routes, np.full(tokens_per_epoch, s), np.full(tokens_per_epoch, t)))
    ex, sv, ep = (np.concatenate(x) for x in zip(*parts))
    return RoutingTrace(ex, sv.astype(np.int32), ep.astype(np.int32))
