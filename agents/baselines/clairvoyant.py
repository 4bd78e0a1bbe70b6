"""`clairvoyant`: a re-planning reference that sees the future — labelled a bound on every report.

Each decision epoch it computes the *true* state of the next epoch (the env's own dynamics replayed on a copy of
its generator: drift, arrivals, resource noise, link changes, failures; the state trajectory does not depend on the
plan), builds candidate plans for that state with full knowledge of its popularity (CoEL with tuned knobs when given and
with its defaults, EPLB, greedy popularity, static) plus "keep the current plan", scores every candidate with the
surrogate on that state, and deploys the best under the official score (`coel_env.benchmark.score`: the same
quality budget as everyone; an over-budget candidate scores 0). A switch is charged its migration disruption once
and its gain is counted over the next `horizon` epochs (at most those left in the episode):

    value(candidate) = u(served with the disruption) + (H - 1) * u(served without it),  H = min(horizon, left)

It is an *optimistic reference*, not a proven upper bound: the lookahead is one epoch and greedy, the candidates
are heuristic plans. A learned agent that beats it is suspicious (check the score, not the agent). It needs the
env (an `ActionPolicy` whose `act` returns a Decision) and the surrogate backend.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from agents.policy import ActionPolicy, Decision
from coel_env.benchmark.score import epoch_utility
from coel_env.plan.deployment import DeploymentPlan
from coel_env.world.state import ClusterState, StateBatch


def peek_next_state(core) -> ClusterState:
    """The ground-truth state the env's next step will serve (CoELCore `core`, env 0), without touching the env."""
    rng = copy.deepcopy(core.rngs[0])
    batch = StateBatch(core.scenario, 1, extra=core.perception.normals)
    batch.load(0, core.states.views[0])
    batch.draw([rng])
    batch.advance()
    return batch.views[0].copy()


class ClairvoyantPolicy(ActionPolicy):
    name = "clairvoyant"
    is_bound = True

    def __init__(
        self,
        seed: int | None = None,
        coel_kwargs: dict | None = None,
        eplb_kwargs: dict | None = None,
        horizon: int = 10,
    ):
        super().__init__(predict=lambda obs: None, name=self.name)
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            from coel_env.errors import ConfigError

            raise ConfigError(f"policy clairvoyant: horizon: {horizon!r} given; must be an integer >= 1")
        self.horizon = horizon
        self.coel_kwargs, self.eplb_kwargs = dict(coel_kwargs or {}), dict(eplb_kwargs or {})
        self._backend = None
        self._scenario = None
        self.last_scores: np.ndarray | None = None

    def reset(self, cluster, seed=None, scenario=None) -> None:
        super().reset(cluster, seed, scenario)
        self._scenario = scenario
        self._backend = None

    def _planners(self, cluster):
        from agents.baselines import make_policy

        kws = [
            ("coel", {**self.coel_kwargs, "ema": 1.0}),
            ("coel", {"ema": 1.0}),
            ("eplb", self.eplb_kwargs),
            ("greedy_popularity", {}),
            ("static_linear", {}),
        ]
        out = []
        for name, kw in kws:
            p = make_policy(name, seed=0, **kw)
            p.reset(cluster, seed=0, scenario=self._scenario)
            out.append(p)
        return out

    def candidates(self, nxt: ClusterState, cluster) -> list[DeploymentPlan]:
        plans = []
        for p in self._planners(cluster):
            try:
                plans.append(p.plan(nxt, cluster))
            except RuntimeError:  # a planner that cannot place every expert on this state
                continue
        return plans

    def act(self, obs: Any, env: Any) -> Decision:
        from coel_env.backend.surrogate import SurrogateBackend
        from coel_env.plan.batch import PlanBatch

        unwrapped = env.unwrapped
        core = unwrapped.core
        c = core.cluster
        if self._backend is None:
            self._backend = SurrogateBackend(c)
        current = core.plans.plan(0) if self.epoch else None
        nxt = peek_next_state(core)
        cands = self.candidates(nxt, c)
        if current is not None:
            cands.append(current)
        window, slo = float(core.window), float(core.scenario.spec.workload.slo_s)
        m = self._backend.serve_batch(cands, nxt, window).fields
        old = PlanBatch.tile(core.plans.plan(0), len(cands))
        new = PlanBatch.from_plans(cands)
        now = core.states
        mig = self._backend.migration_arrays(
            old.dev,
            old.tier,
            old.bits,
            new.dev,
            new.tier,
            new.bits,
            np.repeat(now.server_up[:1], len(cands), 0),
            np.repeat(now.link_factor[:1], len(cands), 0),
        )
        mig_s = np.asarray(mig["time_s"], dtype=np.float64)
        if current is not None:
            mig_s[-1] = 0.0
        fields = {k: np.asarray(v) for k, v in m.items()}
        served = core.disruption(fields, mig_s)
        left = max(int(core.max_epochs) - int(core.states.epoch[0]), 1)
        h = min(self.horizon, left)
        u = epoch_utility(served, slo) + (h - 1) * epoch_utility(fields, slo)
        self.last_scores = u
        best = int(np.argmax(u))
        self.epoch += 1
        if current is not None and best == len(cands) - 1:
            return Decision(current, False)
        return Decision(cands[best], True)
