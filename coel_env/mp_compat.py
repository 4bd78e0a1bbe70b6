"""Child processes started from inside a foreign process pool.

Hydra's joblib launcher runs each job in a loky worker, where multiprocessing's global start method is `loky`.
Every process the job starts (SB3's SubprocVecEnv, the real backend's servers) inherits that name in its
preparation data and dies at start-up (`ValueError: cannot find context for 'loky'`, then a BrokenPipeError in the
parent): a stock interpreter has no `loky` context. `standard_start_method` puts a standard method back while the
children start, and restores the pool's own afterwards."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from contextlib import contextmanager


def foreign_start_method() -> str | None:
    """The global start method when it is not one of this platform's standard ones (`loky` in a joblib worker)."""
    current = mp.get_start_method(allow_none=True)
    return current if current is not None and current not in mp.get_all_start_methods() else None


@contextmanager
def standard_start_method(method: str = "forkserver") -> Iterator[None]:
    """Within the block, a foreign global start method is replaced by `method` (children started here can
    unpickle their preparation data); outside a foreign pool this does nothing."""
    foreign = foreign_start_method()
    if foreign is None:
        yield
        return
    if method not in mp.get_all_start_methods():
        method = "spawn"
    mp.set_start_method(method, force=True)
    try:
        yield
    finally:
        mp.set_start_method(foreign, force=True)
