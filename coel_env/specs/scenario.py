"""Scenario specification (hardware, topology, model, workload, dynamics) and the YAML registry."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from coel_env.errors import ConfigError
from coel_env.specs.bounds import (
    MAX_ARRIVAL_RATE,
    MAX_BATCH,
    MAX_BATCHED_TOKENS,
    MAX_DOMAINS,
    MAX_ENERGY_J,
    MAX_GB,
    MAX_GBS,
    MAX_GPUS_PER_SERVER,
    MAX_KV_BLOCK_TOKENS,
    MAX_LENGTH_TOKENS,
    MAX_POPULARITY_ENTRIES,
    MAX_REPLICAS,
    MAX_ROUTE_ENTRIES,
    MAX_SECONDS,
    MAX_SERVERS,
    MAX_SIGMA,
    MAX_UNIFORM_SPREAD,
    MAX_ZIPF_ALPHA,
    MIN_ENERGY_J,
    MIN_SECONDS,
    Float,
    Int,
    at_most,
    brief,
    not_bool,
)
from coel_env.specs.hardware import (
    CONF_DIR,
    DeviceSpec,
    load_hardware_profile,
    read_yaml,
    resolve_device,
    spec_from_mapping,
)
from coel_env.specs.model import ModelSpec, resolve_model

SCENARIO_DIR = CONF_DIR / "scenario"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ServerSpec(_Strict):
    """An edge server: its GPUs, host CPU/RAM, SSD and the intra-server link (PCIe)."""

    name: str
    gpus: list[DeviceSpec] = Field(min_length=1, max_length=MAX_GPUS_PER_SERVER)
    cpu: DeviceSpec
    cpu_ram_gb: Annotated[Float, at_most(MAX_GB)] = Field(gt=0)
    ssd_gb: Annotated[Float, at_most(MAX_GB)] = Field(512, ge=0)
    ssd_bw_gbs: Annotated[Float, at_most(MAX_GBS)] = Field(3.5, gt=0)
    pcie_bw_gbs: Annotated[Float, at_most(MAX_GBS)] = Field(
        25.0, gt=0, description="host<->GPU per direction; also GPU<->GPU in a server"
    )

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpus(cls, v):
        if isinstance(v, list) and len(v) > MAX_GPUS_PER_SERVER:
            return v  # refused by max_length before any preset is resolved
        return [resolve_device(x) for x in v] if isinstance(v, list) else v

    @field_validator("cpu", mode="before")
    @classmethod
    def _cpu(cls, v):
        return resolve_device(v)


class LinkSpec(_Strict):
    a: str
    b: str
    bandwidth_gbps: Annotated[Float, at_most(MAX_GBS)] = Field(gt=0)
    latency_ms: Annotated[Float, at_most(MAX_SECONDS)] = Field(0.2, ge=0)


class TopologySpec(_Strict):
    """`star` (every server to one switch), `mesh` (every pair) or `explicit` (the `links` list)."""

    kind: Literal["star", "mesh", "explicit"] = "star"
    bandwidth_gbps: Annotated[Float, at_most(MAX_GBS)] = Field(1.0, gt=0, description="for star/mesh")
    latency_ms: Annotated[Float, at_most(MAX_SECONDS)] = Field(0.2, ge=0, description="one-way, for star/mesh")
    links: list[LinkSpec] = Field(default_factory=list, description="for explicit: each pair of ends at most once")

    def num_links(self, num_servers: int) -> int:
        """Physical links this topology compiles to (cluster.build_cluster)."""
        if self.kind == "star":
            return num_servers
        if self.kind == "mesh":
            return num_servers * (num_servers - 1) // 2
        return len(self.links)


LENGTH_QUANTILES = (np.arange(8) + 0.5) / 8  # the quantile grid at which requests are costed (surrogate, rewards)


class LengthDist(_Strict):
    """Request lengths in tokens. `uniform`: mean x (1 ± spread), so spread <= 1 keeps them >= 0; `lognormal`: the
    given mean, sigma = spread. Both backends read it through `at` (its inverse CDF): the surrogate takes the
    values at its quantile grid as they are; the real backend draws `at(uniform)`, rounds and clips at 1 token."""

    dist: Literal["fixed", "uniform", "lognormal"] = "fixed"
    mean: Annotated[Float, at_most(MAX_LENGTH_TOKENS)] = Field(128, ge=1, description="tokens")
    spread: Float = Field(0.0, ge=0, description="uniform: ±fraction of mean; lognormal: sigma")

    def at(self, u: np.ndarray) -> np.ndarray:
        """Lengths at cumulative probabilities u in (0, 1) (the inverse CDF, element-wise): the mean (fixed, or
        spread 0), mean * (1 + spread * (2 u - 1)) (uniform), mean * exp(spread * z_u - spread^2 / 2) (lognormal,
        z_u the standard normal quantile)."""
        u = np.asarray(u, dtype=np.float64)
        if self.dist == "fixed" or self.spread == 0:
            return np.full(u.shape, self.mean)
        if self.dist == "uniform":
            return self.mean * (1 + self.spread * (2 * u - 1))
        from scipy.stats import norm

        return self.mean * np.exp(self.spread * norm.ppf(u) - self.spread**2 / 2)

    def quantiles(self) -> np.ndarray:
        """Lengths at LENGTH_QUANTILES (`at`): the grid the surrogate costs requests on."""
        return self.at(LENGTH_QUANTILES)

    @property
    def grid_mean(self) -> float:
        """Mean length over LENGTH_QUANTILES (the surrogate's mean request)."""
        return float(self.quantiles().mean())

    @model_validator(mode="after")
    def _check(self) -> LengthDist:
        if self.dist == "uniform" and self.spread > MAX_UNIFORM_SPREAD:
            raise ValueError(
                f"spread: {self.spread:g} must be <= {MAX_UNIFORM_SPREAD:g} for a uniform length "
                "(mean x (1 ± spread) would go negative)"
            )
        if self.dist == "lognormal" and self.spread > MAX_SIGMA:
            raise ValueError(f"spread: {self.spread:g} must be <= {MAX_SIGMA:g} (the lognormal sigma)")
        return self


class WorkloadSpec(_Strict):
    arrival_rate: Float | list[Float] = Field(0.2, description="requests/s per server (one value or a list)")
    input_len: LengthDist = Field(default_factory=LengthDist)
    output_len: LengthDist = Field(default_factory=LengthDist)
    max_batch: Annotated[Int, at_most(MAX_BATCH)] = Field(
        32, ge=1, description="most sequences a server decodes at once (vLLM max_num_seqs)"
    )
    max_num_batched_tokens: Annotated[Int, at_most(MAX_BATCHED_TOKENS)] = Field(
        2048, ge=1, description="tokens one step may process (decodes + prefill chunk; vLLM max_num_batched_tokens)"
    )
    chunked_prefill: bool = Field(True, description="prefills are split into chunks that share steps with decodes")
    kv_block_tokens: Annotated[Int, at_most(MAX_KV_BLOCK_TOKENS)] = Field(
        16, ge=1, description="tokens per KV-cache block (a sequence holds whole blocks; vLLM block_size)"
    )
    max_queue_wait_s: Annotated[Float, at_most(MAX_SECONDS)] | None = Field(
        None, ge=0, description="admission: a request that would wait longer is dropped (None: the SLO)"
    )
    concurrency: Annotated[Int, at_most(MAX_BATCH)] | None = Field(
        None,
        ge=1,
        description="closed loop: this many requests per server always in the system, a new one as one finishes (a "
        "throughput benchmark that submits its prompts at once); arrival_rate is then unused. Needs serving: "
        "continuous. None: Poisson arrivals at arrival_rate",
    )
    slo_s: Annotated[Float, at_most(MAX_SECONDS)] = Field(
        30.0, ge=MIN_SECONDS, description="end-to-end latency SLO per request, seconds"
    )

    @field_validator("arrival_rate", mode="before")
    @classmethod
    def _rate(cls, v):
        one = not isinstance(v, (list, tuple))
        rates = []
        for x in [v] if one else v:
            not_bool(x)
            if isinstance(x, str):  # a YAML/CLI spelling of a number, as pydantic would read it
                with contextlib.suppress(ValueError):
                    x = float(x)
            if not isinstance(x, (int, float)):
                raise ValueError(
                    f"{brief(v)} given; must be a number or a list of numbers (requests/s, one per server)"
                )
            rates.append(x)
        if not all((math.isfinite(x) if isinstance(x, float) else True) and 0 <= x <= MAX_ARRIVAL_RATE for x in rates):
            raise ValueError(f"must be finite, >= 0 and <= {MAX_ARRIVAL_RATE:g} requests/s, got {brief(v, str)}")
        return rates[0] if one else rates


class RoutingSpec(_Strict):
    """Routing-trace generator: per-layer Zipf popularity, inter-layer affinity, per-server domains."""

    num_domains: Annotated[Int, at_most(MAX_DOMAINS)] = Field(4, ge=1)
    zipf_alpha: Annotated[Float, at_most(MAX_ZIPF_ALPHA)] = Field(
        0.25, ge=0, description="popularity skew; per layer scaled by U(0.6, 1.4)"
    )
    domain_overlap: Float = Field(0.5, ge=0, le=1, description="share of popularity common to all domains")
    affinity: Float = Field(0.6, ge=0, le=1, description="weight of the previous layer in routing")
    affinity_concentration: Float = Field(0.3, gt=0, description="Dirichlet concentration of affinity rows")


class DynamicsSpec(_Strict):
    """Rates are per decision epoch."""

    epoch_s: Annotated[Float, at_most(MAX_SECONDS)] = Field(60.0, gt=0)
    drift_rate: Float = Field(0.05, ge=0, le=1, description="step of each server's domain mix to its target")
    domain_switch_rate: Float = Field(0.02, ge=0, le=1, description="chance a server's target mix changes")
    arrival_burstiness: Annotated[Float, at_most(MAX_SIGMA)] = Field(
        0.1, ge=0, description="lognormal sigma of per-epoch arrival rate"
    )
    resource_noise: Float = Field(0.03, ge=0, le=0.5, description="std of free compute/memory fractions")
    link_change_rate: Float = Field(0.0, ge=0, le=1)
    link_change_range: tuple[Float, Float] = (0.3, 1.0)
    failure_rate: Float = Field(0.0, ge=0, le=1, description="chance per server per epoch to fail")
    recovery_rate: Float = Field(0.2, ge=0, le=1, description="chance per failed server per epoch to rejoin")

    @field_validator("link_change_range")
    @classmethod
    def _range(cls, v):
        if not 0 <= v[0] <= v[1] <= 1:
            raise ValueError(f"must be [low, high] with 0 <= low <= high <= 1, got {list(v)}")
        return v


class BudgetSpec(_Strict):
    energy_j: Annotated[Float | None, at_most(MAX_ENERGY_J)] = Field(
        None, ge=MIN_ENERGY_J, description="energy per epoch, joules"
    )
    latency_s: Annotated[Float | None, at_most(MAX_SECONDS)] = Field(
        None, ge=MIN_SECONDS, description="p95 end-to-end latency, seconds"
    )
    mode: Literal["penalty", "terminate"] = "penalty"


class ScenarioSpec(_Strict):
    name: str
    description: str = ""
    model: ModelSpec
    hardware: str = "default"
    servers: list[ServerSpec] = Field(min_length=1, max_length=MAX_SERVERS)
    topology: TopologySpec = Field(default_factory=TopologySpec)
    workload: WorkloadSpec = Field(default_factory=WorkloadSpec)
    routing: RoutingSpec = Field(default_factory=RoutingSpec)
    dynamics: DynamicsSpec = Field(default_factory=DynamicsSpec)
    budgets: BudgetSpec = Field(default_factory=BudgetSpec)
    max_replicas: Annotated[Int, at_most(MAX_REPLICAS)] = Field(2, ge=1)

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, v):
        return resolve_model(v)

    @model_validator(mode="after")
    def _check(self) -> ScenarioSpec:
        names = [s.name for s in self.servers]
        if len(set(names)) != len(names):
            raise ValueError("server names must be unique")
        wl = self.workload
        if wl.max_num_batched_tokens < wl.max_batch:
            raise ValueError(
                f"workload.max_num_batched_tokens ({wl.max_num_batched_tokens}) must be >= workload.max_batch "
                f"({wl.max_batch}): a step decodes one token of every running sequence (as vLLM requires)"
            )
        rate = self.workload.arrival_rate
        if isinstance(rate, list) and len(rate) != len(self.servers):
            raise ValueError(f"workload.arrival_rate has {len(rate)} values for {len(self.servers)} servers")
        topo = self.topology
        if topo.kind != "explicit" and topo.links:
            raise ValueError(f"topology.links: only used with kind 'explicit', not '{topo.kind}'")
        if topo.kind == "explicit":
            known, seen = set(names), {}
            for i, link in enumerate(topo.links):
                for end in (link.a, link.b):
                    if end not in known and not end.startswith("switch"):
                        raise ValueError(
                            f"topology.links[{i}]: unknown server '{end}'; allowed: "
                            f"{', '.join(names)} or a name starting with 'switch'"
                        )
                if link.a == link.b:
                    raise ValueError(f"topology.links[{i}]: a self-loop ({link.a} - {link.b}); a link needs two ends")
                j = seen.setdefault(frozenset((link.a, link.b)), i)
                if j != i:
                    raise ValueError(
                        f"topology.links[{i}]: {link.a} - {link.b} duplicates topology.links[{j}]; "
                        "each pair of ends may have one link"
                    )
        S, model = len(names), self.model
        pairs, links = S * (S - 1) // 2, topo.num_links(S)
        if pairs * links > MAX_ROUTE_ENTRIES:
            raise ValueError(
                f"topology: {S} servers ({topo.kind}) give {pairs} server pairs x {links} links = "
                f"{pairs * links} route entries; must be <= {MAX_ROUTE_ENTRIES}"
            )
        for what, n in (("servers", S), ("routing.num_domains", self.routing.num_domains)):
            entries = n * model.num_moe_layers * model.num_experts
            if entries > MAX_POPULARITY_ENTRIES:
                raise ValueError(
                    f"{what} ({n}) x MoE layers ({model.num_moe_layers}) x experts ({model.num_experts}) "
                    f"= {entries} popularity entries; must be <= {MAX_POPULARITY_ENTRIES}"
                )
        return self

    @property
    def arrival_rates(self) -> list[float]:
        rate = self.workload.arrival_rate
        return list(rate) if isinstance(rate, list) else [float(rate)] * len(self.servers)


def list_scenarios() -> list[str]:
    """Names of the shipped scenarios (`conf/scenario/*.yaml`)."""
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))


def scenario_from_dict(data: dict, source: str = "scenario") -> ScenarioSpec:
    return spec_from_mapping(ScenarioSpec, data, source)


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
    data = read_yaml(path, f"scenario {path.name}")
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    return scenario_from_dict(data, f"scenario {path.name}")


def scenario_with_hardware(scenario: str | Path | dict | ScenarioSpec, hardware: str | None):
    """The rule of a hardware profile chosen on the command line (`backend.hardware=<name or YAML path>`): it
    replaces the scenario's own `hardware`; None or "" leaves `scenario` as it is. A scenario given by name or path
    becomes its full dict (plain data, as env kwargs and leaderboard configs need)."""
    if not hardware:
        return scenario
    load_hardware_profile(str(hardware))  # an unknown profile fails here, in one line
    data = dict(scenario) if isinstance(scenario, dict) else load_scenario_spec(scenario).model_dump(mode="json")
    return {**data, "hardware": str(hardware)}
