"""Backend factory: the one place that turns a backend name into a Backend instance (extensible by name)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from coel_env.backend.contract import Backend, BatchBackend
from coel_env.backend.surrogate import SurrogateBackend
from coel_env.errors import ConfigError
from coel_env.world.cluster import Cluster

BackendFactory = Callable[..., Backend | BatchBackend]
BACKENDS: dict[str, BackendFactory] = {"surrogate": lambda cluster, **kw: SurrogateBackend(cluster, **kw)}


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make `make_backend(name, cluster, **kw)` call `factory(cluster, **kw)` (e.g. the real backend)."""
    BACKENDS[name] = factory


def make_backend(name: str | Backend | BatchBackend, cluster: Cluster, **kw) -> Backend | BatchBackend:
    """A backend for `cluster`: a registered name ("surrogate", "real") or an instance passed through."""
    if not isinstance(name, str):
        if not isinstance(name, (Backend, BatchBackend)):
            raise ConfigError(
                f"backend: {type(name).__name__} implements neither the Backend nor the BatchBackend protocol"
            )
        return name
    if name not in BACKENDS and name == "real":
        with contextlib.suppress(ImportError):  # the real backend registers itself on import
            import real_backend  # noqa: F401
    if name not in BACKENDS:
        raise ConfigError(
            f"backend: unknown name '{name}'; allowed: {', '.join(sorted(BACKENDS))} or a Backend instance"
        )
    return BACKENDS[name](cluster, **kw)
