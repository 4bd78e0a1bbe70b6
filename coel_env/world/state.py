"""The dynamic cluster state and the dynamics that advance it each decision epoch.

One implementation of the dynamics: `StateBatch` holds N states as stacked arrays and advances them in one
vectorized call; `Scenario.advance` runs it on a batch of one. Randomness is one fixed-size block per state and
epoch (`StateBatch.draw`), so a state's trajectory depends only on its own generator, whatever the batch size.
The blocks are named layouts (coel_env/rng.py, `dynamics_layouts`): a new stream is appended at the END of a
layout (after `extra`), so existing streams never shift. Dirichlet(0.5) domain targets are normalized squared
normals (Gamma(1/2) = Z^2/2).

Caches (the surrogate's) key on `ClusterState.version`: whoever writes a state's arrays in place calls `touch()`.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numba import njit

from coel_env.errors import ConfigError
from coel_env.rng import Layout
from coel_env.specs import HardwareProfile, ScenarioSpec, load_scenario_spec
from coel_env.world.cluster import Cluster, build_cluster
from coel_env.world.traces import RoutingModel, RoutingTrace

STATE_FIELDS: tuple[str, ...] = (
    "server_up",
    "compute_avail",
    "memory_avail",
    "link_factor",
    "arrival_rate",
    "domain_mix",
    "domain_target",
    "popularity",
)
_VERSIONS = itertools.count(1)  # process-wide, so a version never repeats (not even for a recycled id())


def new_version() -> int:
    return next(_VERSIONS)


@dataclass
class ClusterState:
    """What is true in the cluster now (ground truth; agents see it through perception).

    `version` changes on every `touch()`: call it after writing any array in place (Scenario.advance and the
    environment do), so that backends caching per-state inputs see the change."""

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
    version: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        self.version = new_version()

    def touch(self) -> ClusterState:
        """Mark the state as changed in place (new `version`)."""
        self.version = new_version()
        return self

    def copy(self) -> ClusterState:
        new = copy.copy(self)
        for name in STATE_FIELDS:
            setattr(new, name, getattr(self, name).copy())
        return new.touch()

    @property
    def device_up(self) -> np.ndarray:
        return self.server_up[self.cluster.dev_server]


class Scenario:
    """A scenario ready to run: spec, compiled cluster and routing model (seeded)."""

    def __init__(
        self,
        spec: ScenarioSpec | str | Path | dict,
        seed: int = 0,
        hardware: HardwareProfile | str | None = None,
        trace: RoutingTrace | str | None = None,
    ):
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
            cluster=c,
            epoch=0,
            server_up=np.ones(S, dtype=bool),
            compute_avail=np.ones(c.num_devices),
            memory_avail=np.ones(c.num_devices),
            link_factor=np.ones(c.num_links),
            arrival_rate=np.array(self.spec.arrival_rates, dtype=np.float64),
            domain_mix=mix,
            domain_target=mix.copy(),
            popularity=np.empty(0),
        )
        state.popularity = self.popularity(mix, 0)
        return state.touch()

    def popularity(self, domain_mix: np.ndarray, epoch: int) -> np.ndarray:
        """Ground-truth popularity [S, L, E] of one state (the trace's epoch if replaying, else the mixture's)."""
        out = np.empty((self.cluster.num_servers, *self.routing.domain_popularity.shape[1:]))
        self.popularity_into(domain_mix[None], np.array([epoch]), out[None])
        return out

    def popularity_into(self, domain_mix: np.ndarray, epochs: np.ndarray, out: np.ndarray) -> None:
        """out[n] := popularity of state n, from mixtures [N, S, M] (or the trace's epochs [N])."""
        if self.trace is not None:
            S, E = self.cluster.num_servers, self.spec.model.num_experts
            for n, ep in enumerate(epochs):
                out[n] = self.trace.popularity(int(ep), S, E)
            return
        M = self.routing.domain_popularity.shape[0]
        dp = self.routing.domain_popularity.reshape(M, -1)
        for n in range(domain_mix.shape[0]):  # one BLAS call per state: a row never depends on the batch size
            np.matmul(domain_mix[n], dp, out=out[n].reshape(domain_mix.shape[1], -1))

    def advance(self, state: ClusterState, rng: np.random.Generator) -> ClusterState:
        """One epoch of dynamics in place: drift, arrivals, resource noise, link changes, failures/joins (the
        batched dynamics of `StateBatch` on a batch of one; the state's arrays are replaced by new ones)."""
        batch = StateBatch(self, 1)
        batch.load(0, state)
        batch.draw([rng])
        batch.advance()
        state.epoch = int(batch.epoch[0])
        for name in STATE_FIELDS:
            setattr(state, name, getattr(batch, name)[0])
        return state.touch()


def dynamics_layouts(S: int, D: int, K: int, M: int, extra_normals: int = 0) -> tuple[Layout, Layout]:
    """The per-env, per-epoch random layouts of the dynamics, in draw order (append new streams at the end):

    normals: domain [S, M] (Dirichlet targets) | arrival [S] (burstiness) | compute [D] | memory [D] (resource
    noise) | extra [extra_normals] (drawn here for the env's perception, see perception.py);
    uniforms: switch [S] (domain switches) | link_change [K] | link_value [K] | fail [S] | join [S] | keep_one [1]
    (which server stays up when all would be down). A new uniform stream goes at the end of `uniforms`; a new
    normal stream goes after `extra` (it then shifts if the perception's layout grows) or, safest, is drawn from
    a generator of its own."""
    normals = Layout({"domain": (S, M), "arrival": S, "compute": D, "memory": D, "extra": extra_normals}, "normal")
    uniforms = Layout({"switch": S, "link_change": K, "link_value": K, "fail": S, "join": S, "keep_one": 1}, "uniform")
    return normals, uniforms


class StateBatch:
    """N cluster states as stacked arrays [N, ...], advanced in one vectorized call; `views[i]` is a
    ClusterState onto row i. `version` changes whenever any row does (`touch`).

    Each epoch's randomness lives in persistent buffers `z` (normals) and `u` (uniforms) [N, size], read through
    named views `normals[name]` / `uniforms[name]` [N, *shape] (`dynamics_layouts`); `extra` holds the views of an
    `extra` layout (e.g. the perception's) nested in the `extra` normals block."""

    def __init__(self, scenario: Scenario, num_envs: int, extra: Layout | None = None):
        self.scenario = sc = scenario
        c = sc.cluster
        N = self.N = num_envs
        S, D, K = c.num_servers, c.num_devices, c.num_links
        M = sc.routing.num_domains
        L, E = c.model.num_moe_layers, c.model.num_experts
        self.S, self.D, self.K, self.M = S, D, K, M
        self.cluster = c
        self.epoch = np.zeros(N, dtype=np.int64)
        self.server_up = np.ones((N, S), dtype=bool)
        self.compute_avail = np.ones((N, D))
        self.memory_avail = np.ones((N, D))
        self.link_factor = np.ones((N, K))
        self.arrival_rate = np.zeros((N, S))
        self.domain_mix = np.zeros((N, S, M))
        self.domain_target = np.zeros((N, S, M))
        self.popularity = np.zeros((N, S, L, E))
        self.base_rate = np.asarray(sc.spec.arrival_rates, dtype=np.float64)
        self.views = [ClusterState(c, 0, *(getattr(self, f)[i] for f in STATE_FIELDS)) for i in range(N)]
        if extra is not None and extra.kind != "normal":
            raise ValueError("extra: a layout of normals is required")
        self.normal_layout, self.uniform_layout = dynamics_layouts(S, D, K, M, extra.size if extra else 0)
        self.z = np.zeros((N, self.normal_layout.size))
        self.u = np.zeros((N, self.uniform_layout.size))
        self.normals = self.normal_layout.views(self.z)
        self.uniforms = self.uniform_layout.views(self.u)
        self.extra = extra.views(self.normals["extra"]) if extra is not None else {}
        self.version = new_version()

    def touch(self, rows=None) -> None:
        """Mark rows (default: all) as changed in place."""
        self.version = new_version()
        for i in range(self.N) if rows is None else rows:
            v = self.views[i]
            v.epoch = int(self.epoch[i])
            v.touch()

    def load(self, i: int, state: ClusterState) -> None:
        """Row i := a ClusterState (e.g. Scenario.initial_state)."""
        for f in STATE_FIELDS:
            getattr(self, f)[i] = getattr(state, f)
        self.epoch[i] = state.epoch
        self.touch([i])

    def draw(self, rngs: list[np.random.Generator | None]) -> None:
        """One epoch's randomness for every env from its own generator (None: that row draws nothing)."""
        for i, rng in enumerate(rngs):
            if rng is None:
                continue
            self.normal_layout.draw_into(rng, self.z[i])
            self.uniform_layout.draw_into(rng, self.u[i])

    def advance(self) -> None:
        """One epoch of dynamics for every env, in place (after `draw`)."""
        dyn = self.scenario.spec.dynamics
        z, u = self.normals, self.uniforms
        self.epoch += 1
        g = z["domain"] ** 2
        g /= np.maximum(g.sum(-1, keepdims=True), 1e-300)
        if dyn.arrival_burstiness:
            np.multiply(self.base_rate, np.exp(dyn.arrival_burstiness * z["arrival"]), out=self.arrival_rate)
        else:
            self.arrival_rate[:] = self.base_rate
        lo, hi = dyn.link_change_range
        dynamics_kernel(
            g,
            z["compute"],
            z["memory"],
            u["switch"],
            u["link_change"],
            u["link_value"],
            u["fail"],
            u["join"],
            u["keep_one"],
            float(dyn.domain_switch_rate),
            float(dyn.drift_rate),
            float(dyn.resource_noise),
            float(dyn.link_change_rate),
            float(lo),
            float(hi - lo),
            float(dyn.failure_rate),
            float(dyn.recovery_rate),
            self.domain_target,
            self.domain_mix,
            self.compute_avail,
            self.memory_avail,
            self.link_factor,
            self.server_up,
        )
        self.refresh_popularity()

    def refresh_popularity(self, rows=None) -> None:
        """Ground-truth popularity of rows (default: all) from their mixtures (or the replayed trace)."""
        sl = slice(None) if rows is None else np.asarray(rows, dtype=np.int64)
        if rows is None:
            self.scenario.popularity_into(self.domain_mix, self.epoch, self.popularity)
        else:
            pop = np.empty((len(sl), *self.popularity.shape[1:]))
            self.scenario.popularity_into(self.domain_mix[sl], self.epoch[sl], pop)
            self.popularity[sl] = pop
        self.touch(rows)


@njit(cache=True)
def dynamics_kernel(
    g,
    z_compute,
    z_memory,
    u_switch,
    u_link_change,
    u_link_value,
    u_fail,
    u_join,
    u_keep_one,
    switch_rate,
    drift_rate,
    noise,
    link_change_rate,
    link_lo,
    link_span,
    failure_rate,
    recovery_rate,
    domain_target,
    domain_mix,
    compute_avail,
    memory_avail,
    link_factor,
    server_up,
):
    """One epoch of `StateBatch.advance` in place, per env n: a server's domain target switches to g (normalized
    squared normals) with chance switch_rate and its mix drifts towards the target by drift_rate; free compute /
    memory are clip(1 - |noise z|, 0.2 / 0.5, 1) (1 without noise); a link changes to U(lo, lo + span) with
    chance link_change_rate, else recovers by 0.25 (up to 1); live servers fail with chance failure_rate, failed
    ones rejoin with chance recovery_rate, and one server (u_keep_one) stays up when all would be down."""
    N, S, M = g.shape
    D, K = compute_avail.shape[1], link_factor.shape[1]
    for n in range(N):
        for s in range(S):
            switch = u_switch[n, s] < switch_rate
            for m in range(M):
                if switch:
                    domain_target[n, s, m] = g[n, s, m]
                domain_mix[n, s, m] += drift_rate * (domain_target[n, s, m] - domain_mix[n, s, m])
        for d in range(D):
            if noise:
                compute_avail[n, d] = min(max(1 - abs(noise * z_compute[n, d]), 0.2), 1.0)
                memory_avail[n, d] = min(max(1 - abs(noise * z_memory[n, d]), 0.5), 1.0)
            else:
                compute_avail[n, d] = 1.0
                memory_avail[n, d] = 1.0
        if link_change_rate:
            for k in range(K):
                if u_link_change[n, k] < link_change_rate:
                    link_factor[n, k] = link_lo + link_span * u_link_value[n, k]
                else:
                    link_factor[n, k] = min(link_factor[n, k] + 0.25, 1.0)
        any_up = False
        for s in range(S):
            if server_up[n, s]:
                server_up[n, s] = not u_fail[n, s] < failure_rate
            else:
                server_up[n, s] = u_join[n, s] < recovery_rate
            any_up = any_up or server_up[n, s]
        if not any_up:  # the edge never loses every server at once
            server_up[n, min(int(u_keep_one[n, 0] * S), S - 1)] = True


def _check_trace(trace: RoutingTrace, spec: ScenarioSpec) -> None:
    """One-line ConfigError if a routing trace does not fit the scenario's model and servers."""
    m, S = spec.model, len(spec.servers)
    _, L, k = trace.experts.shape
    if m.num_moe_layers != L or k > m.num_experts:
        raise ConfigError(
            f"trace: routes are [T, {L}, {k}]; scenario {spec.name} needs [T, {m.num_moe_layers}, "
            f"<= {m.num_experts}] (layers, top-k)"
        )
    if trace.experts.size and not (trace.experts.min() >= 0 and trace.experts.max() < m.num_experts):
        raise ConfigError(f"trace: expert ids must lie in 0..{m.num_experts - 1}")
    if trace.server.size and not (trace.server.min() >= 0 and trace.server.max() < S):
        raise ConfigError(f"trace: server ids must lie in 0..{S - 1} (scenario {spec.name} has {S} servers)")
    if trace.epoch.size and trace.epoch.min() < 0:
        raise ConfigError("trace: epochs must be >= 0")


def make_scenario(name: str | Path | dict | ScenarioSpec, seed: int = 0, **kwargs) -> Scenario:
    """Build a registered (or file/dict) scenario with a seeded routing model."""
    return Scenario(name, seed=seed, **kwargs)
