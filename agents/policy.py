"""One Policy interface for baselines, trained agents and exported policies.

A policy answers two questions each decision epoch: *which* deployment (`plan(view, cluster)`, from the perceived
ClusterState) and *whether* to switch to it now (`should_update`). `decide` combines both; `act` runs the policy
inside CoEL-v0 by encoding the decision with the env's action codec, so every policy also works as a gymnasium agent.
Policies that only map observations to actions (SB3 models, exported ONNX policies) wrap into `ActionPolicy`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from coel_env.plan.deployment import DeploymentPlan
from coel_env.world.cluster import Cluster
from coel_env.world.state import ClusterState


@dataclass
class Decision:
    """What a policy wants this epoch: a plan and whether to migrate to it (False keeps the current one)."""

    plan: DeploymentPlan
    update: bool


class Policy(ABC):
    """Base class: subclasses implement `plan`; override `should_update` for their update rule."""

    name: str = "policy"

    def __init__(self, seed: int | None = None):
        self.rng = np.random.default_rng(seed)
        self.epoch = 0

    def reset(self, cluster: Cluster, seed: int | None = None, scenario: Any = None) -> None:
        """Forget per-episode memory (called at the start of every episode). `scenario` (a coel_env Scenario)
        gives policies that profile the model offline (routing affinity) what they need; others ignore it."""
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.epoch = 0

    @abstractmethod
    def plan(self, view: ClusterState, cluster: Cluster) -> DeploymentPlan:
        """A complete, valid deployment for what the policy perceives (`view`)."""

    def should_update(self, view: ClusterState, cluster: Cluster, current: DeploymentPlan | None) -> bool:
        """Default rule: deploy when nothing is deployed or the current plan no longer fits the cluster."""
        return current is None or needs_repair(current, view, cluster)

    def decide(self, view: ClusterState, cluster: Cluster, current: DeploymentPlan | None) -> Decision:
        """This epoch's plan and update flag (the current plan is kept, unplanned, when the policy keeps it)."""
        update = self.should_update(view, cluster, current)
        self.epoch += 1
        if not update and current is not None:
            return Decision(current, False)
        return Decision(self.plan(view, cluster), True)

    def act(self, obs: Any, env: Any) -> Any:
        """Run inside CoEL-v0: decide from the env's perceived state and encode with its action codec."""
        core = env.unwrapped
        decision = self.decide(core.perceived_state(), core.cluster, core.plan)
        return encode_action(core, decision)


class ActionPolicy(Policy):
    """Wrap an observation -> action function (SB3 `model.predict`, an ONNX session) as a Policy.

    `observe(view, cluster)` builds the observation a plan request needs and `decode(action, cluster)` turns the
    action into (plan, update); both are optional and only needed for `plan`/`decide` outside an env.
    """

    def __init__(
        self,
        predict: Callable[[Any], Any],
        name: str = "agent",
        observe: Callable[[ClusterState, Cluster], Any] | None = None,
        decode: Callable[[Any, Cluster], tuple[DeploymentPlan, bool]] | None = None,
    ):
        super().__init__()
        self.predict, self.name, self.observe, self.decode = predict, name, observe, decode
        self._update = True

    def plan(self, view: ClusterState, cluster: Cluster) -> DeploymentPlan:
        if self.observe is None or self.decode is None:
            raise NotImplementedError(f"{self.name}: give observe= and decode= to plan outside an environment")
        plan, self._update = self.decode(self.predict(self.observe(view, cluster)), cluster)
        return plan

    def decide(self, view: ClusterState, cluster: Cluster, current: DeploymentPlan | None) -> Decision:
        plan = self.plan(view, cluster)
        self.epoch += 1
        update = current is None or self._update
        return Decision(plan if update else current, update)

    def act(self, obs: Any, env: Any) -> Any:
        return self.predict(obs)


def needs_repair(plan: DeploymentPlan, view: ClusterState, cluster: Cluster) -> bool:
    """True when `plan` overflows the perceived memory or leaves an expert without a live replica."""
    if plan.problems(cluster, view.memory_avail):
        return True
    live = plan.valid & view.device_up[np.maximum(plan.device, 0)]
    return not live.any(-1).all()


def encode_action(core: Any, decision: Decision) -> Any:
    """Encode a decision with the env's action codec (which takes the update flag when it supports one)."""
    codec = core.action_codec
    try:
        return codec.encode(decision.plan, update=decision.update)
    except TypeError:
        return codec.encode(decision.plan)
