"""Shared helpers of the CLIs: scenario + plan + hardware profile from command-line values."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from coel_env.errors import ConfigError
from coel_env.plan.deployment import DeploymentPlan
from coel_env.specs import HardwareProfile, hardware_profile_names, load_hardware_profile
from coel_env.specs.hardware import unknown_profile
from coel_env.world.state import ClusterState, Scenario

BUILTIN_PLANS = ("uniform",)
_SWEEPS = ("choice(", "range(", "interval(", "glob(", "sort(", "shuffle(", "tag(", "extend_list(")


def resolve_plan(value: str, scenario: Scenario) -> DeploymentPlan:
    """`uniform` or a path to a JSON deployment manifest (validated against the scenario)."""
    if value in BUILTIN_PLANS:
        return DeploymentPlan.uniform(scenario.cluster)
    if Path(value).suffix == ".json" or Path(value).exists():
        return DeploymentPlan.load_manifest(value, scenario.cluster)
    raise ConfigError(f"plan: unknown value '{value}'; allowed: {', '.join(BUILTIN_PLANS)} or a manifest .json path")


def initial_state(scenario: Scenario, seed: int) -> ClusterState:
    return scenario.initial_state(np.random.default_rng(seed))


def hardware_from_cfg(cfg) -> HardwareProfile | None:
    """The profile chosen with `hardware=<name>` in apps whose defaults list the `conf/hardware` group
    (evaluate_plan, reproduce_paper): the option's fields, editable as `hardware.<field>=...`; None: each scenario's
    own. (Apps with a `backend` group take `backend.hardware=<name or path>`: see `scenario_with_hardware`.)"""
    node = cfg.get("hardware")
    if node is None:
        return None
    if isinstance(node, str):  # a plain name or path written into a config file
        return load_hardware_profile(node)
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    choice = HydraConfig.get().runtime.choices.get("hardware") if HydraConfig.initialized() else None
    source = f"hardware profile {choice}.yaml" if choice else "hardware"
    return load_hardware_profile(OmegaConf.to_container(node, resolve=True), source=source)


def hardware_args(argv: list[str]) -> list[str]:
    """`argv` checked for `hardware=<name>`, an option of the `conf/hardware` group: any other name is refused in one
    line before Hydra does so in several (a profile file elsewhere goes into the scenario: `hardware: <path>`), and
    `hardware=null` (the default: each scenario's own profile), which Hydra refuses for a group, is dropped."""
    out = []
    for arg in argv:
        if arg.startswith("hardware=") and not any(s in arg for s in _SWEEPS):
            value = arg.split("=", 1)[1]
            if value in ("", "null"):
                continue
            for name in value.split(","):
                if name not in hardware_profile_names():
                    raise unknown_profile(name)
        out.append(arg)
    return out
