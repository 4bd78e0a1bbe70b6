"""Warm-up requests: served unmeasured after a plan is installed, so a measured window holds no one-time costs.

The first decode steps after an install re-stack the grouped experts and capture a CUDA graph per batch size (and
the links' first messages set up their buffers). A window that includes them measures the engine's start-up, not
its serving (session 7's policy evaluation: p95 latencies 9-14x the steady-state prediction).
"""

from __future__ import annotations

import numpy as np

WARMUP_TOKENS = 4  # output tokens of the shortest warm-up request


def warm_requests(
    backend, state, n_in: int, rng: np.random.Generator, batch: int = 1, live: np.ndarray | None = None
) -> list[list[dict]]:
    """`batch` short requests per live server at t = 0 (forced routes) with WARMUP_TOKENS, +1, ... output tokens, so
    the decode batch passes through every size from `batch` down to 1: kernels, per-batch-size CUDA graphs, the
    grouped experts' stacks and the links are warm before a window is measured. `live` ([L, E] bool): a request
    whose routes reach an expert with no live replica is left out (it could not be served)."""
    up = getattr(state, "server_up", None)
    out = []
    for s in range(backend.cluster.num_servers):
        reqs = []
        for j in range(batch if up is None or up[s] else 0):
            n_out = WARMUP_TOKENS + j
            routes = backend.routing.sample(state.domain_mix[s], n_in + n_out - 1, rng).astype(np.int16)
            prompt = rng.integers(0, backend.cfg.vocab_size, n_in)
            if live is not None and not live[np.arange(routes.shape[1])[None, :, None], routes].all():
                continue
            rid = 1 + s * batch + j
            reqs.append({"rid": rid, "arrival": 0.0, "max_new": n_out, "prompt": prompt, "routes": routes, "server": s})
        out.append(reqs)
    return out
