"""The observation: a flat (non-nested) Dict of 1-D float32 Boxes in [0, 1], batched encoding.

Keys (empty ones are left out, e.g. `link_bw` without links): `mem_free` free fraction of the expert capacity per
GPU, then CPU RAM and SSD per server (GPU capacity from perceived free memory); `compute_avail` per GPU;
`link_bw` bandwidth factor per physical link; `server_up`; `request_rate` per server (fraction of 4x nominal);
`hello_age` epochs since each server's last Hello / max_age; `popularity` observed per layer x expert;
`plan` per (layer, expert, slot): (device + 1) / D, tier / 2, bits / 16; `compression` per pair: prune / 0.9,
fusion; `time` epoch / max_epochs.
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from coel_env.errors import ConfigError
from coel_env.plan.deployment import MAX_PRUNE
from coel_env.plan.kernels import encode_plan_kernel
from coel_env.world.cluster import Cluster

OBSERVATION_SPACES = ("default",)


class ObservationEncoder:
    def __init__(self, cluster: Cluster, max_epochs: int, name: str = "default"):
        if name not in OBSERVATION_SPACES:
            raise ConfigError(f"observation_space: unknown name '{name}'; allowed: {', '.join(OBSERVATION_SPACES)}")
        c = self.c = cluster
        m = c.model
        L, E, R = m.num_moe_layers, m.num_experts, c.spec.max_replicas
        D, S, K, P = c.num_devices, c.num_servers, c.num_links, c.num_pairs
        self.max_epochs = max_epochs
        sizes = {
            "mem_free": D + 2 * S,
            "compute_avail": D,
            "link_bw": K,
            "server_up": S,
            "request_rate": S,
            "hello_age": S,
            "popularity": L * E,
            "plan": L * E * R * 3,
            "compression": 2 * P,
            "time": 1,
        }
        self.sizes = {k: v for k, v in sizes.items() if v > 0}
        self.space = spaces.Dict({k: spaces.Box(0.0, 1.0, shape=(n,), dtype=np.float32) for k, n in self.sizes.items()})
        self.cpu_cap = np.maximum(c.cpu_expert_capacity, 1.0)
        self.ssd_cap = np.maximum(c.ssd_bytes, 1.0)
        self.gpu_nominal = np.maximum(c.gpu_expert_capacity, 1.0)
        self.inv_dev = 1.0 / D

    def encode(self, core) -> dict[str, np.ndarray]:
        """Batched observation [N, ...] of a core's envs."""
        c, pb, perc = self.c, core.plans, core.perception
        N = len(pb)
        gpu, cpu, ssd = core.usage
        cap = c.gpu_expert_capacity_at(perc.memory_avail)
        mem = np.concatenate([(cap - gpu) / self.gpu_nominal, 1 - cpu / self.cpu_cap, 1 - ssd / self.ssd_cap], 1)
        plan = np.empty((N, self.sizes["plan"]), dtype=np.float32)
        encode_plan_kernel(pb.dev, pb.tier, pb.bits, self.inv_dev, plan)
        f32 = np.float32
        out = {
            "mem_free": np.clip(mem, 0.0, 1.0).astype(f32),
            "compute_avail": perc.compute_avail.astype(f32),
            "link_bw": perc.link_factor.astype(f32),
            "server_up": core.states.server_up.astype(f32),
            "request_rate": perc.rate_frac.astype(f32),
            "hello_age": np.minimum(perc.age * (1.0 / perc.max_age), 1.0).astype(f32),
            "popularity": perc.pop.reshape(N, -1).astype(f32),
            "plan": plan,
            "compression": np.concatenate([pb.prune * (1 / MAX_PRUNE), pb.fuse], 1).astype(f32),
            "time": np.minimum(core.states.epoch * (1.0 / self.max_epochs), 1.0).astype(f32)[:, None],
        }
        return {k: out[k] for k in self.sizes}
