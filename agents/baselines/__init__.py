"""Non-learned baselines behind one registry: `make_policy(name, **kwargs)`."""

from __future__ import annotations

from collections.abc import Callable

from agents.baselines.clairvoyant import ClairvoyantPolicy
from agents.baselines.coel import CoELPolicy
from agents.baselines.eplb import EPLBPolicy, rebalance_experts
from agents.baselines.frozen import NeverUpdatePolicy, QualityExploitPolicy
from agents.baselines.greedy import GreedyPopularityPolicy
from agents.baselines.oracle import OraclePolicy
from agents.baselines.random import RandomPolicy
from agents.baselines.static import StaticPolicy
from agents.policy import Policy
from coel_env.errors import ConfigError

POLICIES: dict[str, Callable[..., Policy]] = {
    "random": RandomPolicy,
    "static": StaticPolicy,
    "static_linear": lambda **kw: StaticPolicy(layout="linear", **kw),
    "static_round_robin": lambda **kw: StaticPolicy(layout="round_robin", **kw),
    "greedy_popularity": GreedyPopularityPolicy,
    "eplb": EPLBPolicy,
    "coel": CoELPolicy,
    "oracle": OraclePolicy,
    "never_update": NeverUpdatePolicy,
    "coel_quality_exploit": QualityExploitPolicy,
    "clairvoyant": ClairvoyantPolicy,
}
BOUNDS: tuple[str, ...] = ("clairvoyant",)  # references that see the future: reported, never "the best baseline"
HEURISTICS: tuple[str, ...] = ("random", "static_linear", "static_round_robin", "greedy_popularity", "eplb", "coel")


def make_policy(name: str, **kwargs) -> Policy:
    """A baseline by registry name; keyword arguments go to its constructor (one-line error if unknown)."""
    if name not in POLICIES:
        raise ConfigError(f"policy: unknown name '{name}'; allowed: {', '.join(POLICIES)}")
    try:
        return POLICIES[name](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"policy {name}: bad arguments ({exc})") from None


__all__ = [
    "BOUNDS",
    "HEURISTICS",
    "POLICIES",
    "ClairvoyantPolicy",
    "CoELPolicy",
    "EPLBPolicy",
    "GreedyPopularityPolicy",
    "NeverUpdatePolicy",
    "OraclePolicy",
    "QualityExploitPolicy",
    "RandomPolicy",
    "StaticPolicy",
    "make_policy",
    "rebalance_experts",
]
