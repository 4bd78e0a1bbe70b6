"""`never_update`: deploy the base policy's first plan and keep it for the whole episode (the env still restores
experts orphaned by a failed server, as it does for every policy). Measures what re-planning is worth.

`coel_quality_exploit`: the CoEL heuristic forced to 4-bit experts everywhere, token pruning 0.8 and fusion on every
server pair — fast and over any sensible quality budget. It is the adversarial check of the official score: a
benchmark that ranks it above the tuned heuristic rewards destroying the model (tests/agents/test_benchmark.py).
"""

from __future__ import annotations

from agents.baselines.coel import CoELPolicy
from agents.baselines.common import SEED, Arg, checked_args
from agents.policy import Decision, Policy
from coel_env.plan.deployment import MAX_PRUNE, DeploymentPlan
from coel_env.world.cluster import Cluster
from coel_env.world.state import ClusterState


class NeverUpdatePolicy(Policy):
    name = "never_update"

    @checked_args(seed=SEED, base=Arg(str))
    def __init__(self, seed: int | None = None, base: str = "coel", base_kwargs: dict | None = None):
        super().__init__(seed)
        from agents.baselines import make_policy

        self.base = make_policy(base, seed=seed, **(base_kwargs or {}))

    def reset(self, cluster: Cluster, seed: int | None = None, scenario=None) -> None:
        super().reset(cluster, seed, scenario)
        self.base.reset(cluster, seed=seed, scenario=scenario)

    def plan(self, view: ClusterState, cluster: Cluster) -> DeploymentPlan:
        return self.base.plan(view, cluster)

    def decide(self, view: ClusterState, cluster: Cluster, current: DeploymentPlan | None) -> Decision:
        self.epoch += 1
        if current is None:
            return Decision(self.base.plan(view, cluster), True)
        return Decision(current, False)


class QualityExploitPolicy(CoELPolicy):
    name = "coel_quality_exploit"

    @checked_args(seed=SEED, prune=Arg(float, 0, MAX_PRUNE))
    def __init__(self, seed: int | None = None, prune: float = 0.8):
        super().__init__(seed=seed, fill=0.25, prune_ratio=prune, compress_below_gbps=1e3, fuse=True)
        self.force_prune = prune

    def plan(self, view: ClusterState, cluster: Cluster) -> DeploymentPlan:
        plan = super().plan(view, cluster)
        plan.bits[plan.device >= 0] = 4
        plan.prune[:] = self.force_prune
        plan.fuse[:] = True
        return plan
