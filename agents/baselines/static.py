"""`static` (vLLM-style expert parallelism): contiguous `linear` blocks or `round_robin` placement per layer,
one replica, 16-bit where it fits else the highest precision that fits, overflow to host RAM; planned once and
only re-planned when the deployment no longer fits (a failed server, less free memory)."""

from __future__ import annotations

import numpy as np

from agents.baselines.common import SEED, Arg, PlanBuilder, checked_args, highest_bits_that_fit
from agents.policy import Policy
from coel_env.errors import ConfigError
from coel_env.plan.deployment import DeploymentPlan
from coel_env.world.cluster import Cluster
from coel_env.world.state import ClusterState

LAYOUTS = ("linear", "round_robin")


class StaticPolicy(Policy):
    name = "static"

    @checked_args(layout=Arg(str), seed=SEED)
    def __init__(self, layout: str = "linear", seed: int | None = None):
        super().__init__(seed)
        if layout not in LAYOUTS:
            raise ConfigError(f"static.layout: unknown '{layout}'; allowed: {', '.join(LAYOUTS)}")
        self.layout = layout
        self.name = f"static_{layout}"

    def assignment(self, num_experts: int, num_devices: int) -> np.ndarray:
        """[E] index (into the live devices) of each expert of a layer."""
        e = np.arange(num_experts)
        return e * num_devices // num_experts if self.layout == "linear" else e % num_devices

    def plan(self, view: ClusterState, cluster: Cluster) -> DeploymentPlan:
        b = PlanBuilder(view, cluster)
        L, E, _ = b.plan.device.shape
        live = np.flatnonzero(view.device_up)
        dev = live[self.assignment(E, len(live))]  # [E], the same for every layer
        count = np.bincount(dev, minlength=cluster.num_devices) * L
        bits = highest_bits_that_fit(count, b.gpu_free, b.ebytes)
        for l in range(L):
            for e in range(E):
                d = int(dev[e])
                bb = int(bits[d]) or 4
                if not b.add(l, e, d, 0, bb):
                    b.add_offloaded(l, e, bb, prefer=d)
        return b.complete()
