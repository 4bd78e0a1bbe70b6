"""Shared machinery of the baselines: capacities, demand, a capacity-tracking plan builder, bit choices."""

from __future__ import annotations

import functools
import inspect

import numpy as np

from coel_env.errors import ConfigError
from coel_env.plan.deployment import DeploymentPlan, gpu_capacity
from coel_env.specs import BIT_WIDTHS
from coel_env.specs.bounds import Arg
from coel_env.world.cluster import Cluster
from coel_env.world.state import ClusterState

BITS_DESC: tuple[int, ...] = tuple(sorted(BIT_WIDTHS, reverse=True))  # 16, 8, 4


# ---- constructor arguments ---------------------------------------------------------------------------------------
SEED = Arg(int, 0, optional=True)  # every baseline's `seed` (numpy's default_rng refuses negative seeds)
FRACTION = Arg(float, 0, 1)


def checked_args(**specs: Arg):
    """Decorate a baseline's `__init__`: unknown keyword arguments and values outside their `Arg` become one
    `ConfigError` line `policy <name>: <argument>: ... given; must be ...` (naming what is allowed), before the
    constructor runs; arguments without a spec are passed as they are."""

    def wrap(init):
        sig = inspect.signature(init)
        names = [n for n in sig.parameters if n != "self"]
        missing = set(specs) - set(names)
        if missing:
            raise TypeError(f"checked_args: {init.__qualname__} has no argument(s) {sorted(missing)}")

        @functools.wraps(init)
        def inner(self, *args, **kwargs):
            who = f"policy {getattr(self, 'name', type(self).__name__)}"
            unknown = [k for k in kwargs if k not in sig.parameters or k == "self"]
            if unknown:
                raise ConfigError(f"{who}: unknown argument '{unknown[0]}'; allowed: {', '.join(names)}")
            try:
                bound = sig.bind(self, *args, **kwargs)
            except TypeError as exc:
                raise ConfigError(f"{who}: {exc}") from None
            for key, value in list(bound.arguments.items()):
                if key in specs:
                    bound.arguments[key] = specs[key].check(f"{who}: {key}", value)
            return init(*bound.args, **bound.kwargs)

        return inner

    return wrap


def demand(view: ClusterState, cluster: Cluster) -> np.ndarray:
    """[L, E] expected expert load: popularity of live servers weighted by their request rates."""
    w = view.arrival_rate * view.server_up
    if w.sum() <= 0:
        w = view.server_up.astype(np.float64) + 1e-9
    return np.einsum("s,sle->le", w / w.sum(), view.popularity)


def device_speed(view: ClusterState, cluster: Cluster) -> np.ndarray:
    """[D] decode speed proxy of each GPU: usable memory bandwidth (0 for devices of failed servers)."""
    return cluster.dev_bw * view.compute_avail * view.device_up


class PlanBuilder:
    """Fills a DeploymentPlan replica by replica while tracking free bytes per GPU / CPU RAM / SSD.

    `headroom` keeps a fraction of each GPU's memory free so that plans stay valid under memory noise.
    """

    def __init__(self, view: ClusterState, cluster: Cluster, headroom: float = 0.03):
        self.cluster, self.view = cluster, view
        self.plan = DeploymentPlan.for_cluster(cluster)
        up = view.device_up
        mem = np.clip(view.memory_avail - headroom, 0.0, 1.0)
        self.gpu_free = np.where(up, gpu_capacity(cluster, mem), 0.0)
        self.cpu_free = np.where(view.server_up, cluster.cpu_expert_capacity, 0.0)
        self.ssd_free = np.where(view.server_up, cluster.ssd_bytes.astype(np.float64), 0.0)
        self.ebytes = cluster.expert_bytes_by_bits
        self.R = cluster.spec.max_replicas

    def free(self, d: int, tier: int) -> float:
        s = self.cluster.dev_server[d]
        return float((self.gpu_free[d], self.cpu_free[s], self.ssd_free[s])[tier])

    def fits(self, d: int, tier: int, bits: int) -> bool:
        return self.free(d, tier) >= self.ebytes[bits]

    def slot(self, l: int, e: int) -> int:
        """First empty replica slot of (l, e), -1 if full."""
        empty = np.flatnonzero(self.plan.device[l, e] < 0)
        return int(empty[0]) if len(empty) else -1

    def holds(self, l: int, e: int, d: int) -> bool:
        return bool((self.plan.device[l, e] == d).any())

    def add(self, l: int, e: int, d: int, tier: int, bits: int) -> bool:
        """Place a replica if a slot, no duplicate on `d` and memory allow; return whether it was placed."""
        r = self.slot(l, e)
        if r < 0 or self.holds(l, e, d) or not self.fits(d, tier, bits):
            return False
        self.plan.device[l, e, r], self.plan.tier[l, e, r], self.plan.bits[l, e, r] = d, tier, bits
        w, s = self.ebytes[bits], self.cluster.dev_server[d]
        if tier == 0:
            self.gpu_free[d] -= w
        elif tier == 1:
            self.cpu_free[s] -= w
        else:
            self.ssd_free[s] -= w
        return True

    def add_offloaded(self, l: int, e: int, bits: int = 16, prefer: int | None = None) -> bool:
        """Place a replica in host RAM (else SSD) of the live server with most room (`prefer`'s GPU first)."""
        c = self.cluster
        firsts = c.first_gpu[self.view.server_up]
        for tier in (1, 2):
            room = self.cpu_free if tier == 1 else self.ssd_free
            order = sorted(firsts, key=lambda d: -room[c.dev_server[d]])
            if prefer is not None and self.view.server_up[c.dev_server[prefer]]:
                order = [c.first_gpu[c.dev_server[prefer]], *order]
            for b in (bits, *[x for x in BITS_DESC if x < bits]):
                for d in order:
                    if self.add(l, e, int(d), tier, b):
                        return True
        return False

    def complete(self, bits: int = 4) -> DeploymentPlan:
        """Give every expert still without a replica one (GPU at `bits` where room, else host RAM/SSD)."""
        missing = np.argwhere(~self.plan.valid.any(-1))
        for l, e in missing:
            d_order = np.argsort(-self.gpu_free)
            if not any(
                self.add(int(l), int(e), int(d), 0, b) for b in (bits, 4) for d in d_order[:3]
            ) and not self.add_offloaded(int(l), int(e), bits):
                raise RuntimeError(f"no memory left anywhere for layer {l} expert {e}")
        return self.plan


def highest_bits_that_fit(count: np.ndarray, cap: np.ndarray, ebytes: np.ndarray) -> np.ndarray:
    """[D] the highest bit-width at which `count[d]` experts fit in `cap[d]` bytes (0 where even 4-bit fails)."""
    out = np.zeros(len(count), dtype=np.int64)
    for b in sorted(BIT_WIDTHS):
        out[count * ebytes[b] <= cap] = b
    return out


def pack_by_speed(loads: np.ndarray, speeds: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Assign items (heaviest first) to bins minimising the finish time (load / speed) of the bin they join,
    never exceeding `slots[b]` items per bin. Returns the bin of each item (-1 if no slot was left)."""
    out = -np.ones(len(loads), dtype=np.int64)
    acc = np.zeros(len(speeds))
    left = slots.astype(np.int64).copy()
    sp = np.maximum(speeds, 1e-30)
    for i in np.argsort(-loads, kind="stable"):
        ok = left > 0
        if not ok.any():
            break
        finish = np.where(ok, (acc + loads[i]) / sp, np.inf)
        b = int(np.argmin(finish))
        out[i] = b
        acc[b] += loads[i]
        left[b] -= 1
    return out
