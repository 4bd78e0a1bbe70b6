"""Backend factory: the one place that turns a backend name into a Backend instance (extensible by name)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable

from coel_env.backend.contract import Backend, BatchBackend
from coel_env.backend.surrogate import SurrogateBackend
from coel_env.errors import ConfigError
from coel_env.world.cluster import Cluster
from coel_env.world.traces import RoutingModel

BackendFactory = Callable[..., Backend | BatchBackend]
BACKENDS: dict[str, BackendFactory] = {"surrogate": lambda cluster, **kw: SurrogateBackend(cluster, **kw)}


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make `make_backend(name, cluster, **kw)` call `factory(cluster, **kw)` (e.g. the real backend)."""
    BACKENDS[name] = factory


def make_backend(
    name: str | Backend | BatchBackend, cluster: Cluster, routing: RoutingModel | None = None, **kw
) -> Backend | BatchBackend:
    """A backend for `cluster`: a registered name ("surrogate", "real") or an instance passed through.

    `routing`: the scenario's routing model, given to a factory that declares a `routing` argument: a backend that
    draws its own token routes (the real one) then routes the traffic whose popularity the env's states, its
    policies and the surrogate see, not a model of its own seed. (The surrogate reads popularity from the states.)"""
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
    factory = BACKENDS[name]
    if routing is not None and _accepts(factory, "routing"):
        kw["routing"] = routing
    return factory(cluster, **kw)


def _accepts(factory: Callable, arg: str) -> bool:
    return arg in inspect.signature(factory).parameters
