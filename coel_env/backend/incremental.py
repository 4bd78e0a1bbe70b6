"""Incremental serving: plans served again against the same states reuse the routing of their unchanged layers.

Within one routing pass the layers are independent (`physics.route_pass` sums each layer's additions to the
per-server totals, layer by layer), so the first pass of a plan that differs from the one last served in its row
(an `edit` changes a few cells) routes only the layers that differ and re-sums every layer's kept terms in the
same order: the same totals, bit for bit. The re-routing passes are coupled across layers: their unit inflation
comes from the utilization all layers cause, so a re-routing pass routes again every layer whose routing depends
on the load (a replica choice or a GPU/CPU path decision; `LT_LOADED`) and reuses the first pass's terms of the
others (their routing ignores the load). `finish` is the full one. Kernels: `physics.serve_plans_inc`.

Used by `SurrogateBackend.serve_arrays` when the states are the ones of its previous serve (its per-state cache
hit) and the serving model has no continuous batching (`continuous` or `lockstep`: its decode-step grid is not
cached here; the full evaluation serves it); the first serve against new states is the full evaluation.
"""

from __future__ import annotations

import numpy as np

from coel_env.backend.physics import LayerCache, layer_terms_size

MAX_CACHE_BYTES = 512 * 2**20  # at most this much of per-layer terms (both caches) is kept for one state set


def new_cache(dev: np.ndarray, tier: np.ndarray, bits: np.ndarray, fuse: np.ndarray, servers: int, units: int):
    """An empty LayerCache with a row per plan, for plans shaped like dev/tier/bits [N, L, E, R] and fuse [N, P]."""
    N, L = dev.shape[:2]
    return LayerCache(
        dev=np.full(dev.shape, -1, dtype=dev.dtype),
        tier=np.zeros(tier.shape, dtype=tier.dtype),
        bits=np.zeros(bits.shape, dtype=bits.dtype),
        prune=np.zeros(fuse.shape),
        fuse=np.zeros(fuse.shape, dtype=fuse.dtype),
        state=np.full(N, -1, dtype=np.int64),
        terms=np.zeros((N, servers, L, layer_terms_size(units, servers))),
    )


def cache_bytes(dev: np.ndarray, servers: int, units: int) -> int:
    """Bytes of the per-layer terms of both caches for plans shaped like `dev` [N, L, E, R]."""
    N, L = dev.shape[:2]
    return 2 * 8 * N * servers * L * int(layer_terms_size(units, servers))


class IncrementalCache:
    """The two LayerCaches (all replicas; primary replicas only, for `prefer_primary`) of one state set and one
    set of kernel constants, a row per plan of the batch."""

    def __init__(self) -> None:
        self.key: tuple = ()
        self.states: dict | None = None
        self.params: object = None
        self.main: LayerCache | None = None
        self.primary: LayerCache | None = None
        self.crow = np.zeros(0, dtype=np.int64)

    def get(self, states: dict, params: object, dev, tier, bits, fuse, servers: int, units: int) -> tuple:
        """(main, primary, crow) for a serve of these plans against the backend's per-state dict `states` with
        kernel constants `params`: empty caches when either changed, or the batch size or the plans' shapes."""
        key = tuple((a.shape, a.dtype) for a in (dev, tier, bits, fuse))
        if key != self.key or self.states is not states or self.params is not params:
            first = (slice(None), slice(None), slice(None), slice(0, 1))
            self.main = new_cache(dev, tier, bits, fuse, servers, units)
            self.primary = new_cache(dev[first], tier[first], bits[first], fuse, servers, units)
            self.crow = np.arange(dev.shape[0], dtype=np.int64)
            self.key, self.states, self.params = key, states, params
        return self.main, self.primary, self.crow

    def clear(self) -> None:
        """Forget everything (the next serve through this cache is a full one)."""
        self.__init__()
