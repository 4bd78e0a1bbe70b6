"""The dynamic cluster state and the dynamics that advance it each decision epoch."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coel_env.cluster import Cluster, build_cluster
from coel_env.errors import ConfigError
from coel_env.specs import HardwareProfile, ScenarioSpec, load_scenario_spec
from coel_env.traces import RoutingModel, RoutingTrace


@dataclass
class ClusterState:
    """What is true in the cluster now (ground truth; agents see it through perception)."""

    cluster: Cluster
    epoch: int
    server_up: np.ndarray  # [S] bool
    compute_avail: np.ndarray  # [D] fraction of each GPU's compute free for us
    memory_avail: np.ndarray  # [D] fraction of each GPU's memory free for us
    link_factor: np.ndarray  # [K] multiplier on nominal link bandwidth (0 = down)
    arrival_rate: np.ndarray  # [S] requests/s
    domain_mix: np.ndarray  # [S, M]
    domain_target: np.ndarray  # [S, M]
    popularity: np.ndarray  # [S, L, E] inclusion probabilities

    def copy(self) -> ClusterState:
        new = copy.copy(self)
        for name in ("server_up", "compute_avail", "memory_avail", "link_factor", "arrival_rate",
                     "domain_mix", "domain_target", "popularity"):
            setattr(new, name, getattr(self, name).copy())
        return new

    @property
    def device_up(self) -> np.ndarray:
        return self.server_up[self.cluster.dev_server]


class Scenario:
    """A scenario ready to run: spec, compiled cluster and routing model (seeded)."""

    def __init__(self, spec: ScenarioSpec | str | Path | dict, seed: int = 0,
                 hardware: HardwareProfile | str | None = None, trace: RoutingTrace | str | None = None):
        self.spec = load_scenario_spec(spec)
        self.cluster = build_cluster(self.spec, hardware)
        self.routing = RoutingModel.generate(self.spec.model, self.spec.routing, seed)
        self.trace = RoutingTrace.load(trace) if isinstance(trace, (str, Path)) else trace
        if self.trace is not None:
            _check_trace(self.trace, self.spec)
        self.seed = seed

    @property
    def name(self) -> str:
        return self.spec.name

    def initial_state(self, rng: np.random.Generator) -> ClusterState:
        c = self.cluster
        S, M = c.num_servers, self.routing.num_domains
        mix = rng.dirichlet(np.full(M, 0.5), size=S)
        state = ClusterState(
            cluster=c, epoch=0,
            server_up=np.ones(S, dtype=bool),
            compute_avail=np.ones(c.num_devices), memory_avail=np.ones(c.num_devices),
            link_factor=np.ones(c.num_links),
            arrival_rate=np.asarray(self.spec.arrival_rates, dtype=np.float64),
            domain_mix=mix, domain_target=mix.copy(), popularity=np.empty(0),
        )
        self._refresh_popularity(state)
        return state

    def _refresh_popularity(self, state: ClusterState) -> None:
        if self.trace is not None:
            state.popularity = self.trace.popularity(state.epoch, self.cluster.num_servers,
                                                     self.spec.model.num_experts)
        else:
            state.popularity = self.routing.popularity(state.domain_mix)

    def advance(self, state: ClusterState, rng: np.random.Generator) -> ClusterState:
        """One epoch of dynamics in place: drift, arrivals, resource noise, link changes, failures/joins."""
        dyn = self.spec.dynamics
        c = self.cluster
        S, D, K = c.num_servers, c.num_devices, c.num_links
        state.epoch += 1
        switch = rng.random(S) < dyn.domain_switch_rate
        if switch.any():
            state.domain_target[switch] = rng.dirichlet(np.full(self.routing.num_domains, 0.5), size=int(switch.sum()))
        state.domain_mix += dyn.drift_rate * (state.domain_target - state.domain_mix)
        base = np.asarray(self.spec.arrival_rates)
        state.arrival_rate = base * rng.lognormal(0.0, dyn.arrival_burstiness, size=S) if dyn.arrival_burstiness \
            else base.copy()
        noise = dyn.resource_noise
        state.compute_avail = np.clip(1 - np.abs(rng.normal(0, noise, size=D)), 0.2, 1.0) if noise else np.ones(D)
        state.memory_avail = np.clip(1 - np.abs(rng.normal(0, noise, size=D)), 0.5, 1.0) if noise else np.ones(D)
        if dyn.link_change_rate:
            change = rng.random(K) < dyn.link_change_rate
            lo, hi = dyn.link_change_range
            state.link_factor = np.where(change, rng.uniform(lo, hi, size=K),
                                         np.minimum(state.link_factor + 0.25, 1.0))
        if dyn.failure_rate or not state.server_up.all():
            fail = state.server_up & (rng.random(S) < dyn.failure_rate)
            join = ~state.server_up & (rng.random(S) < dyn.recovery_rate)
            up = (state.server_up & ~fail) | join
            if not up.any():  # the edge never loses every server at once
                up[int(rng.integers(S))] = True
            state.server_up = up
        self._refresh_popularity(state)
        return state


def _check_trace(trace: RoutingTrace, spec: ScenarioSpec) -> None:
    """One-line ConfigError if a routing trace does not fit the scenario's model and servers."""
    m, S = spec.model, len(spec.servers)
    _, L, k = trace.experts.shape
    if m.num_moe_layers != L or k > m.num_experts:
        raise ConfigError(f"trace: routes are [T, {L}, {k}]; scenario {spec.name} needs [T, {m.num_moe_layers}, "
                          f"<= {m.num_experts}] (layers, top-k)")
    if trace.experts.size and not (trace.experts.min() >= 0 and trace.experts.max() < m.num_experts):
        raise ConfigError(f"trace: expert ids must lie in 0..{m.num_experts - 1}")
    if trace.server.size and not (trace.server.min() >= 0 and trace.server.max() < S):
        raise ConfigError(f"trace: server ids must lie in 0..{S - 1} (scenario {spec.name} has {S} servers)")
    if trace.epoch.size and trace.epoch.min() < 0:
        raise ConfigError("trace: epochs must be >= 0")


def make_scenario(name: str | Path | dict | ScenarioSpec, seed: int = 0, **kwargs) -> Scenario:
    """Build a registered (or file/dict) scenario with a seeded routing model."""
    return Scenario(name, seed=seed, **kwargs)
