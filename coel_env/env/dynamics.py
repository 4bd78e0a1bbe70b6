"""N cluster states as stacked arrays, advanced in one vectorized call.

`BatchedStates` mirrors `Scenario.advance` (same equations, same clipping, same rates), but draws its randomness
as one fixed-size block per env and epoch (`draw`), so that one env's trajectory depends only on its own seed,
whatever the batch size, and a batch of envs needs two generator calls per env. Dirichlet(0.5) targets are
normalized squared normals (Gamma(1/2) = Z²/2). Each env also has a `ClusterState` view onto its rows.
"""

from __future__ import annotations

import numpy as np

from coel_env.state import ClusterState, Scenario

_FIELDS = ("server_up", "compute_avail", "memory_avail", "link_factor", "arrival_rate", "domain_mix",
           "domain_target", "popularity")


class BatchedStates:
    def __init__(self, scenario: Scenario, num_envs: int, extra_normals: int = 0):
        self.scenario = sc = scenario
        c = self.cluster = sc.cluster
        N = self.N = num_envs
        S, D, K = c.num_servers, c.num_devices, c.num_links
        M = sc.routing.num_domains
        L, E = c.model.num_moe_layers, c.model.num_experts
        self.S, self.D, self.K, self.M = S, D, K, M
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
        self._dp = sc.routing.domain_popularity.reshape(M, L * E)
        self.views = [ClusterState(c, 0, *(getattr(self, f)[i] for f in _FIELDS)) for i in range(N)]
        # random block per env and epoch: normals [dirichlet S*M | arrivals S | compute D | memory D | extra]
        self.nz = S * M + S + 2 * D + extra_normals
        self.nu = S + 2 * K + 2 * S + 1  # uniforms [switch S | link change K | link value K | fail S | join S | 1]
        self.z = np.zeros((N, self.nz))
        self.u = np.zeros((N, self.nu))
        self.z_extra = self.z[:, S * M + S + 2 * D:]

    def load(self, i: int, state: ClusterState) -> None:
        """Row i := a ClusterState (e.g. Scenario.initial_state)."""
        for f in _FIELDS:
            getattr(self, f)[i] = getattr(state, f)
        self.epoch[i] = state.epoch
        self.views[i].epoch = state.epoch

    def draw(self, rngs: list[np.random.Generator]) -> None:
        """One epoch's randomness for every env from its own generator."""
        for i, rng in enumerate(rngs):
            if rng is None:
                continue
            rng.standard_normal(out=self.z[i])
            rng.random(out=self.u[i])

    def advance(self) -> None:
        """One epoch of dynamics for every env, in place (after `draw`)."""
        dyn = self.scenario.spec.dynamics
        N, S, D, K, M = self.N, self.S, self.D, self.K, self.M
        z, u = self.z, self.u
        self.epoch += 1
        g = z[:, :S * M].reshape(N, S, M) ** 2
        g /= np.maximum(g.sum(-1, keepdims=True), 1e-300)
        switch = u[:, :S] < dyn.domain_switch_rate
        np.copyto(self.domain_target, g, where=switch[..., None])
        self.domain_mix += dyn.drift_rate * (self.domain_target - self.domain_mix)
        o = S * M
        if dyn.arrival_burstiness:
            np.multiply(self.base_rate, np.exp(dyn.arrival_burstiness * z[:, o:o + S]), out=self.arrival_rate)
        else:
            self.arrival_rate[:] = self.base_rate
        o += S
        noise = dyn.resource_noise
        if noise:
            np.clip(1 - np.abs(noise * z[:, o:o + D]), 0.2, 1.0, out=self.compute_avail)
            np.clip(1 - np.abs(noise * z[:, o + D:o + 2 * D]), 0.5, 1.0, out=self.memory_avail)
        if dyn.link_change_rate and K:
            change = u[:, S:S + K] < dyn.link_change_rate
            lo, hi = dyn.link_change_range
            new = lo + (hi - lo) * u[:, S + K:S + 2 * K]
            self.link_factor[:] = np.where(change, new, np.minimum(self.link_factor + 0.25, 1.0))
        o = S + 2 * K
        up = self.server_up
        if dyn.failure_rate or not up.all():
            fail = up & (u[:, o:o + S] < dyn.failure_rate)
            join = ~up & (u[:, o + S:o + 2 * S] < dyn.recovery_rate)
            new_up = (up & ~fail) | join
            none = ~new_up.any(1)
            if none.any():  # the edge never loses every server at once
                new_up[none, np.minimum((u[none, -1] * S).astype(np.int64), S - 1)] = True
            up[:] = new_up
        self.refresh_popularity()
        for i, v in enumerate(self.views):
            v.epoch = int(self.epoch[i])

    def refresh_popularity(self, rows=None) -> None:
        sc = self.scenario
        rows = range(self.N) if rows is None else rows
        S = self.S
        for i in rows:
            if sc.trace is not None:
                self.popularity[i] = sc.trace.popularity(int(self.epoch[i]), S, self.popularity.shape[-1])
            else:
                np.matmul(self.domain_mix[i], self._dp, out=self.popularity[i].reshape(S, -1))
