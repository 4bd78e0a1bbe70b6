"""Scenario specification (hardware, topology, model, workload, dynamics) and the YAML registry."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from coel_env.errors import ConfigError, format_pydantic_error
from coel_env.specs.hardware import CONF_DIR, DeviceSpec, resolve_device
from coel_env.specs.model import ModelSpec, resolve_model

SCENARIO_DIR = CONF_DIR / "scenario"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSpec(_Strict):
    """An edge server: its GPUs, host CPU/RAM, SSD and the intra-server link (PCIe)."""

    name: str
    gpus: list[DeviceSpec] = Field(min_length=1)
    cpu: DeviceSpec
    cpu_ram_gb: float = Field(gt=0)
    ssd_gb: float = Field(512, ge=0)
    ssd_bw_gbs: float = Field(3.5, gt=0)
    pcie_bw_gbs: float = Field(25.0, gt=0, description="host<->GPU per direction; also GPU<->GPU in a server")

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpus(cls, v):
        return [resolve_device(x) for x in v] if isinstance(v, list) else v

    @field_validator("cpu", mode="before")
    @classmethod
    def _cpu(cls, v):
        return resolve_device(v)


class LinkSpec(_Strict):
    a: str
    b: str
    bandwidth_gbps: float = Field(gt=0)
    latency_ms: float = Field(0.2, ge=0)


class TopologySpec(_Strict):
    """`star` (every server to one switch), `mesh` (every pair) or `explicit` (the `links` list)."""

    kind: Literal["star", "mesh", "explicit"] = "star"
    bandwidth_gbps: float = Field(1.0, gt=0, description="for star/mesh")
    latency_ms: float = Field(0.2, ge=0, description="one-way, for star/mesh")
    links: list[LinkSpec] = Field(default_factory=list)


class LengthDist(_Strict):
    dist: Literal["fixed", "uniform", "lognormal"] = "fixed"
    mean: float = Field(128, gt=0)
    spread: float = Field(0.0, ge=0, description="uniform: ±fraction of mean; lognormal: sigma")


class WorkloadSpec(_Strict):
    arrival_rate: float | list[float] = Field(0.2, description="requests/s per server (one value or a list)")
    input_len: LengthDist = Field(default_factory=LengthDist)
    output_len: LengthDist = Field(default_factory=LengthDist)
    max_batch: int = Field(32, ge=1)
    slo_s: float = Field(30.0, gt=0, description="end-to-end latency SLO per request")

    @field_validator("arrival_rate")
    @classmethod
    def _rate(cls, v):
        if min(v if isinstance(v, list) else [v], default=0.0) < 0:
            raise ValueError(f"must be >= 0 requests/s, got {v}")
        return v


class RoutingSpec(_Strict):
    """Routing-trace generator: per-layer Zipf popularity, inter-layer affinity, per-server domains."""

    num_domains: int = Field(4, ge=1)
    zipf_alpha: float = Field(0.25, ge=0, description="popularity skew; per layer scaled by U(0.6, 1.4)")
    domain_overlap: float = Field(0.5, ge=0, le=1, description="share of popularity common to all domains")
    affinity: float = Field(0.6, ge=0, le=1, description="weight of the previous layer in routing")
    affinity_concentration: float = Field(0.3, gt=0, description="Dirichlet concentration of affinity rows")


class DynamicsSpec(_Strict):
    """Rates are per decision epoch."""

    epoch_s: float = Field(60.0, gt=0)
    drift_rate: float = Field(0.05, ge=0, le=1, description="step of each server's domain mix to its target")
    domain_switch_rate: float = Field(0.02, ge=0, le=1, description="chance a server's target mix changes")
    arrival_burstiness: float = Field(0.1, ge=0, description="lognormal sigma of per-epoch arrival rate")
    resource_noise: float = Field(0.03, ge=0, le=0.5, description="std of free compute/memory fractions")
    link_change_rate: float = Field(0.0, ge=0, le=1)
    link_change_range: tuple[float, float] = (0.3, 1.0)
    failure_rate: float = Field(0.0, ge=0, le=1, description="chance per server per epoch to fail")
    recovery_rate: float = Field(0.2, ge=0, le=1, description="chance per failed server per epoch to rejoin")

    @field_validator("link_change_range")
    @classmethod
    def _range(cls, v):
        if not 0 <= v[0] <= v[1] <= 1:
            raise ValueError(f"must be [low, high] with 0 <= low <= high <= 1, got {list(v)}")
        return v


class BudgetSpec(_Strict):
    energy_j: float | None = Field(None, gt=0, description="energy per epoch")
    latency_s: float | None = Field(None, gt=0, description="p95 end-to-end latency")
    mode: Literal["penalty", "terminate"] = "penalty"


class ScenarioSpec(_Strict):
    name: str
    description: str = ""
    model: ModelSpec
    hardware: str = "default"
    servers: list[ServerSpec] = Field(min_length=1)
    topology: TopologySpec = Field(default_factory=TopologySpec)
    workload: WorkloadSpec = Field(default_factory=WorkloadSpec)
    routing: RoutingSpec = Field(default_factory=RoutingSpec)
    dynamics: DynamicsSpec = Field(default_factory=DynamicsSpec)
    budgets: BudgetSpec = Field(default_factory=BudgetSpec)
    max_replicas: int = Field(2, ge=1, le=8)

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, v):
        return resolve_model(v)

    @model_validator(mode="after")
    def _check(self) -> ScenarioSpec:
        names = [s.name for s in self.servers]
        if len(set(names)) != len(names):
            raise ValueError("server names must be unique")
        rate = self.workload.arrival_rate
        if isinstance(rate, list) and len(rate) != len(self.servers):
            raise ValueError(f"workload.arrival_rate has {len(rate)} values for {len(self.servers)} servers")
        if self.topology.kind == "explicit":
            known = set(names)
            for i, link in enumerate(self.topology.links):
                for end in (link.a, link.b):
                    if end not in known and not end.startswith("switch"):
                        raise ValueError(f"topology.links[{i}]: unknown server '{end}'; allowed: "
                                         f"{', '.join(names)} or a name starting with 'switch'")
        return self

    @property
    def arrival_rates(self) -> list[float]:
        rate = self.workload.arrival_rate
        return list(rate) if isinstance(rate, list) else [float(rate)] * len(self.servers)


def list_scenarios() -> list[str]:
    """Names of the shipped scenarios (`conf/scenario/*.yaml`)."""
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))


def scenario_from_dict(data: dict, source: str = "scenario") -> ScenarioSpec:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return ScenarioSpec(**data)
    except ValidationError as exc:
        raise ConfigError(format_pydantic_error(source, exc, ScenarioSpec)) from None


def load_scenario_spec(name_or_path: str | Path | dict | ScenarioSpec) -> ScenarioSpec:
    """A scenario by registry name, YAML path, dict (e.g. a Hydra node) or spec; one-line ConfigError if bad."""
    if isinstance(name_or_path, ScenarioSpec):
        return name_or_path
    if isinstance(name_or_path, dict):
        return scenario_from_dict(name_or_path)
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = SCENARIO_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"scenario: unknown name '{name_or_path}'; allowed: {', '.join(list_scenarios())}")
    if not path.is_file():
        raise ConfigError(f"scenario: no file '{path}'")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"scenario {path.name}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    return scenario_from_dict(data, f"scenario {path.name}")
