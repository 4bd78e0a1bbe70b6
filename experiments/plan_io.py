"""Shared helpers of the CLIs: scenario + plan from command-line values."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from coel_env.errors import ConfigError
from coel_env.plan import DeploymentPlan
from coel_env.state import ClusterState, Scenario

BUILTIN_PLANS = ("uniform",)


def resolve_plan(value: str, scenario: Scenario) -> DeploymentPlan:
    """`uniform` or a path to a JSON deployment manifest (validated against the scenario)."""
    if value in BUILTIN_PLANS:
        return DeploymentPlan.uniform(scenario.cluster)
    if Path(value).suffix == ".json" or Path(value).exists():
        return DeploymentPlan.load_manifest(value, scenario.cluster)
    raise ConfigError(f"plan: unknown value '{value}'; allowed: {', '.join(BUILTIN_PLANS)} or a manifest .json path")


def initial_state(scenario: Scenario, seed: int) -> ClusterState:
    return scenario.initial_state(np.random.default_rng(seed))
