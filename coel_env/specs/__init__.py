"""Validated specifications: models, devices, hardware profiles and scenarios."""

from coel_env.specs.hardware import (
    DEVICE_PRESETS,
    DeviceSpec,
    HardwareProfile,
    QualityModel,
    device_preset,
    hardware_profile_names,
    load_hardware_profile,
)
from coel_env.specs.model import BIT_WIDTHS, MODEL_PRESETS, ModelSpec, model_from_hf_config, model_preset
from coel_env.specs.scenario import (
    BudgetSpec,
    DynamicsSpec,
    LengthDist,
    LinkSpec,
    RoutingSpec,
    ScenarioSpec,
    ServerSpec,
    TopologySpec,
    WorkloadSpec,
    list_scenarios,
    load_scenario_spec,
    scenario_with_hardware,
)

__all__ = [
    "BIT_WIDTHS",
    "DEVICE_PRESETS",
    "MODEL_PRESETS",
    "BudgetSpec",
    "DeviceSpec",
    "DynamicsSpec",
    "HardwareProfile",
    "LengthDist",
    "LinkSpec",
    "ModelSpec",
    "QualityModel",
    "RoutingSpec",
    "ScenarioSpec",
    "ServerSpec",
    "TopologySpec",
    "WorkloadSpec",
    "device_preset",
    "hardware_profile_names",
    "list_scenarios",
    "load_hardware_profile",
    "load_scenario_spec",
    "model_from_hf_config",
    "model_preset",
    "scenario_with_hardware",
]
