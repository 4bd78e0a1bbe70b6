"""The workloads a calibration plan is served under: the scenario's own arrival rates, a light load (requests rarely
overlap) and a saturating one (every server's batch near its limit).

Light and saturating are derived from the scenario's workload fields (lengths, `max_batch`) and the surrogate's
service times for the uniform plan under the current (pre-fit) profile:
- light: the cluster's arrival rate Λ = `light_load` / T1, T1 the predicted e2e latency of a request alone, so a
  request finds another in service with probability about 1 - exp(-light_load); split over the servers like the
  scenario's own rates; the window holds `light_requests` requests in expectation (whole cluster).
- saturating: a closed loop, as vLLM's benchmark with `--max-concurrency` runs: every server has max_batch clients,
  each sending its next request when its last one completes, `saturating_rounds` requests per client. Every slot is
  busy in steady state whatever the plan's speed (an open-loop rate above a plan's capacity would only measure a
  growing queue, below it a part-empty batch), and TTFT counts from each request's sending. The window is the
  predicted time the chains take (its rates give the request count per server).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coel_env.backend.surrogate import SurrogateBackend
from coel_env.errors import ConfigError
from coel_env.plan.deployment import DeploymentPlan
from coel_env.world.state import ClusterState
from experiments.calib.fidelity import with_rates

LOADS = ("scenario", "light", "saturating")


@dataclass(frozen=True)
class Load:
    """One workload: arrival rate per server (requests/s) and window length (s)."""

    name: str
    rates: tuple[float, ...]
    window_s: float
    concurrency: int = 0  # closed-loop clients per server (0: Poisson arrivals at `rates`)

    @property
    def expected_requests(self) -> float:
        return float(sum(self.rates) * self.window_s)

    def state(self, state: ClusterState) -> ClusterState:
        """`state` with this load's arrival rates."""
        return with_rates(state, self.rates)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "rates": list(self.rates),
            "window_s": self.window_s,
            "concurrency": self.concurrency,
        }


def check_load_names(names) -> list[str]:
    """The configured load names, each one of LOADS (one-line ConfigError otherwise)."""
    names = [str(n) for n in names]
    bad = [n for n in names if n not in LOADS]
    if bad or not names:
        raise ConfigError(f"workloads.names: {bad or names} unknown or empty; allowed: {', '.join(LOADS)}")
    return names


def rate_shares(state: ClusterState) -> np.ndarray:
    """Each server's share of the scenario's arrival rate (equal shares when every rate is 0)."""
    r = np.maximum(np.asarray(state.arrival_rate, dtype=np.float64), 0.0)
    return r / r.sum() if r.sum() > 0 else np.full(len(r), 1.0 / len(r))


def predicted_e2e(sur: SurrogateBackend, plan: DeploymentPlan, state: ClusterState, rates) -> float:
    """The surrogate's mean e2e latency of `plan` at per-server arrival `rates`."""
    return float(sur.serve(plan, with_rates(state, rates), 60.0).e2e_mean_s)


def light_load(sur: SurrogateBackend, plan: DeploymentPlan, state: ClusterState, load: float, requests: float) -> Load:
    """Requests that rarely overlap: Λ · T1 = `load` (see the module docstring)."""
    shares = rate_shares(state)
    t1 = predicted_e2e(sur, plan, state, shares * 1e-6)
    total = load / t1
    return Load("light", tuple((shares * total).tolist()), requests / total)


def saturating_load(
    sur: SurrogateBackend, plan: DeploymentPlan, state: ClusterState, max_batch: int, rounds: float
) -> Load:
    """A closed loop of max_batch clients per server, `rounds` requests each (see the module docstring): the window
    is those requests over the predicted completion rate (the slowest server's, servers served alike)."""
    S = len(state.arrival_rate)
    per_server = rounds * max_batch
    m = sur.with_concurrency(max_batch).serve(plan, with_rates(state, np.ones(S)), 60.0)
    completions = m.tokens_per_s / sur.out_mean / S  # requests/s per server
    window = per_server / completions
    return Load("saturating", tuple([per_server / window] * S), window, concurrency=max_batch)


def scenario_load(state: ClusterState, window_s: float) -> Load:
    """The scenario's own arrival rates."""
    return Load("scenario", tuple(np.asarray(state.arrival_rate, dtype=np.float64).tolist()), float(window_s))


def build_loads(names: list[str], sur: SurrogateBackend, state: ClusterState, wcfg, window_s: float) -> list[Load]:
    """The loads `names` for one scenario (`wcfg`: the `workloads` config; `window_s`: the scenario load's window)."""
    plan = DeploymentPlan.uniform(sur.cluster)
    max_batch = int(sur.cluster.spec.workload.max_batch)
    make = {
        "scenario": lambda: scenario_load(state, window_s),
        "light": lambda: light_load(sur, plan, state, float(wcfg.light_load), float(wcfg.light_requests)),
        "saturating": lambda: saturating_load(sur, plan, state, max_batch, float(wcfg.saturating_rounds)),
    }
    return [make[n]() for n in names]
