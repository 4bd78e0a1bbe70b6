"""Observations: flat (non-nested) Dicts of 1-D float32 Boxes in [0, 1], batched encoding, by name.

`default` (what CoEL-v0 has always given). Keys (empty ones are left out, e.g. `link_bw` without links):
`mem_free` free fraction of the expert capacity per GPU, then CPU RAM and SSD per server (GPU capacity from
perceived free memory); `compute_avail` per GPU; `link_bw` bandwidth factor per physical link; `server_up`;
`request_rate` per server (fraction of 4x nominal); `hello_age` epochs since each server's last Hello / max_age;
`popularity` observed per layer x expert; `plan` per (layer, expert, slot): (device + 1) / D, tier / 2, bits / 16;
`compression` per pair: prune / 0.9, fusion; `time` epoch / max_epochs. Size L·E·(3R + 1) + O(servers): 10,113 on
paper-testbed, 85% of it the agent's own plan.

`compact`: a fixed-size summary (no entry grows with the number of experts; 541 numbers on paper-testbed) of what
a plan-steering agent needs, including the per-server popularity the CoEL heuristic plans from (the routing logs of
`Perception.perceived_server_popularity`, the same values `CoELEnv.perceived_state()` reveals that epoch). Keys:
- per server [S]: `server_up`; `request_rate` (fraction of 4x nominal, perceived); `demand_share` (its share of the
  perceived live request rate); `hello_age` (/ max_age); `compute_avail` (mean over its GPUs); `gpu_free` (free
  share of its GPUs' expert capacity at perceived free memory, under the current plan); `kv_free` (sequences its KV
  cache holds under the current plan / workload.max_batch, capped at 1: 1 = the KV cache does not limit batching);
  `cpu_free`, `ssd_free` (free share of host RAM and SSD);
- per physical link [K]: `link_bw` (perceived bandwidth factor); per server pair [P]: `compression` (prune / 0.9,
  then fusion);
- per (server, layer) [S·L], server-major, each a share of server s's routing mass at layer l (its perceived
  popularity, normalised per layer): `pop_top` on its ceil(E/8) most popular experts (concentration);
  `pop_divergence` total-variation distance to the cluster's observed popularity (how much its demand differs from
  the others'); under the current plan `mass_local` on experts with a GPU replica on s, `mass_remote` on experts
  on GPUs of other live servers only, `mass_cpu` on experts with no live GPU replica but one in host RAM,
  `mass_ssd` on experts only on SSD, `mass_low_bits` on experts whose live replicas all have fewer than 16 bits;
- `time` epoch / max_epochs.
The plan-derived entries change only when the plan does; the rest follow perception.
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces
from numba import njit

from coel_env.errors import ConfigError
from coel_env.plan.deployment import MAX_PRUNE
from coel_env.plan.kernels import encode_plan_kernel, flat
from coel_env.world.cluster import Cluster

OBSERVATION_SPACES = ("default", "compact")
COMPACT_TOP_SHARE = 8  # pop_top: the ceil(E / COMPACT_TOP_SHARE) most popular experts of a layer
PAIR_KEYS = ("pop_top", "pop_divergence", "mass_local", "mass_remote", "mass_cpu", "mass_ssd", "mass_low_bits")


SERVER_KEYS = ("server_up", "request_rate", "demand_share", "hello_age", "compute_avail", "gpu_free", "kv_free")
OBSERVATION_KEYS = {  # every key a space can have, in order (a scenario without links or pairs lacks those)
    "default": (
        "mem_free",
        "compute_avail",
        "link_bw",
        "server_up",
        "request_rate",
        "hello_age",
        "popularity",
        "plan",
        "compression",
        "time",
    ),
    "compact": (*SERVER_KEYS, "cpu_free", "ssd_free", "link_bw", "compression", *PAIR_KEYS, "time"),
}
# the `default` keys `default_obs_kernel` writes, in its argument order (the plan and the time are written apart)
DEFAULT_KERNEL_KEYS = tuple(k for k in OBSERVATION_KEYS["default"] if k not in ("plan", "time"))


class ObservationEncoder:
    def __init__(self, cluster: Cluster, max_epochs: int, name: str = "default"):
        if name not in OBSERVATION_SPACES:
            raise ConfigError(f"observation_space: unknown name '{name}'; allowed: {', '.join(OBSERVATION_SPACES)}")
        c = self.c = cluster
        self.name = name
        m = c.model
        L, E, R = m.num_moe_layers, m.num_experts, c.spec.max_replicas
        D, S, K, P = c.num_devices, c.num_servers, c.num_links, c.num_pairs
        self.max_epochs = max_epochs
        if name == "default":
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
        else:
            sizes = {k: S for k in (*SERVER_KEYS, "cpu_free", "ssd_free")}
            sizes.update(link_bw=K, compression=2 * P)
            sizes.update({k: S * L for k in PAIR_KEYS})
            sizes["time"] = 1
        assert tuple(sizes) == OBSERVATION_KEYS[name]
        self.sizes = {k: v for k, v in sizes.items() if v > 0}
        self._all_sizes = sizes  # every key, empty ones too (kernel arguments)
        self.space = spaces.Dict({k: spaces.Box(0.0, 1.0, shape=(n,), dtype=np.float32) for k, n in self.sizes.items()})
        self.cpu_cap = np.maximum(c.cpu_expert_capacity, 1.0)
        self.ssd_cap = np.maximum(c.ssd_bytes, 1.0)
        self.gpu_nominal = np.maximum(c.gpu_expert_capacity, 1.0)
        self.inv_dev = 1.0 / D
        if name == "compact":
            from coel_env.backend.physics import held_kv_tokens  # the physics imports the cluster module

            wl = c.spec.workload
            held = held_kv_tokens(float(wl.input_len.mean), float(wl.output_len.mean), float(wl.kv_block_tokens))
            self.kv_per_batch = m.kv_bytes_per_token() * held * wl.max_batch  # KV bytes of a full batch
            self.srv_nominal = np.maximum(self.gpu_nominal @ c.dev_onehot, 1.0)  # [S]
            self.gpus = np.maximum(c.gpus_per_server, 1)
            self.top = -(-E // COMPACT_TOP_SHARE)

    def encode(self, core) -> dict[str, np.ndarray]:
        """Batched observation [N, ...] of a core's envs."""
        return self._default(core) if self.name == "default" else self._compact(core)

    def _blocks(self, N: int) -> dict[str, np.ndarray]:
        """Fresh float32 arrays [N, size] for every key (empty ones too)."""
        return {k: np.empty((N, n), dtype=np.float32) for k, n in self._all_sizes.items()}

    def _default(self, core) -> dict[str, np.ndarray]:
        c, pb, perc = self.c, core.plans, core.perception
        out = self._blocks(len(pb))
        gpu, cpu, ssd = core.usage
        default_obs_kernel(
            c.gpu_expert_capacity_at(perc.memory_avail),
            gpu,
            cpu,
            ssd,
            self.gpu_nominal,
            self.cpu_cap,
            self.ssd_cap,
            perc.compute_avail,
            perc.link_factor,
            perc.rate_frac,
            perc.age,
            1.0 / perc.max_age,
            core.states.server_up,
            perc.pop.reshape(len(pb), -1),
            pb.prune,
            pb.fuse,
            1 / MAX_PRUNE,
            *(out[k] for k in DEFAULT_KERNEL_KEYS),
        )
        encode_plan_kernel(*flat(pb.dev, pb.tier, pb.bits), self.inv_dev, out["plan"])
        out["time"][:] = self._time(core)
        return {k: out[k] for k in self.sizes}

    def _time(self, core) -> np.ndarray:
        return np.minimum(core.states.epoch * (1.0 / self.max_epochs), 1.0).astype(np.float32)[:, None]

    def _compact(self, core) -> dict[str, np.ndarray]:
        c, pb, perc, st = self.c, core.plans, core.perception, core.states
        N, S = len(pb), c.num_servers
        up = st.server_up
        gpu, cpu, ssd = core.usage
        onehot = c.dev_onehot
        cap = c.gpu_expert_capacity_at(perc.memory_avail)  # [N, D]
        srv_gpu = gpu @ onehot  # [N, S] expert bytes on each server's GPUs
        kv_bytes = c.kv_room_at(perc.memory_avail) - srv_gpu
        rate = perc.rate_frac * up
        out = {
            "server_up": up,
            "request_rate": perc.rate_frac,
            "demand_share": rate / np.maximum(rate.sum(1, keepdims=True), 1e-30),
            "hello_age": perc.age * (1.0 / perc.max_age),
            "compute_avail": (perc.compute_avail @ onehot) / self.gpus,
            "gpu_free": ((cap - gpu) @ onehot) / self.srv_nominal,
            "kv_free": kv_bytes / self.kv_per_batch,
            "cpu_free": 1 - cpu / self.cpu_cap,
            "ssd_free": 1 - ssd / self.ssd_cap,
            "link_bw": perc.link_factor,
            "compression": np.concatenate([pb.prune * (1 / MAX_PRUNE), pb.fuse], 1),
        }
        # per-server popularity [N, S, L, E] (perceived routing logs), normalised per (server, layer)
        pop = np.stack([perc.perceived_server_popularity(st, i) for i in range(N)])
        w = pop / np.maximum(pop.sum(-1, keepdims=True), 1e-30)
        agg = perc.pop / np.maximum(perc.pop.sum(-1, keepdims=True), 1e-30)  # [N, L, E]
        E = w.shape[-1]
        top = np.partition(w, E - self.top, axis=-1)[..., E - self.top :].sum(-1)
        # where the plan serves each (layer, expert): replicas on live servers, by tier
        dev = pb.dev.astype(np.int64)
        valid = dev >= 0
        srv = c.dev_server[np.maximum(dev, 0)]  # [N, L, E, R]
        live = valid & np.take_along_axis(up[:, None, None, :], srv, axis=-1)
        on_gpu = live & (pb.tier == 0)
        local = (on_gpu[..., None] & (srv[..., None] == np.arange(S))).any(-2)  # [N, L, E, S]
        any_gpu = on_gpu.any(-1)
        in_cpu = ~any_gpu & (live & (pb.tier == 1)).any(-1)
        in_ssd = ~any_gpu & ~in_cpu & (live & (pb.tier == 2)).any(-1)
        low = live.any(-1) & ~(live & (pb.bits >= 16)).any(-1)

        def share(mask: np.ndarray) -> np.ndarray:  # [N, L, E] (or [N, L, E, S]) -> [N, S * L]
            if mask.ndim == 4:
                return np.einsum("nsle,nles->nsl", w, mask).reshape(N, -1)
            return np.einsum("nsle,nle->nsl", w, mask).reshape(N, -1)

        out.update(
            pop_top=top.reshape(N, -1),
            pop_divergence=0.5 * np.abs(w - agg[:, None]).sum(-1).reshape(N, -1),
            mass_local=share(local),
            mass_remote=share(any_gpu[..., None] & ~local),
            mass_cpu=share(in_cpu),
            mass_ssd=share(in_ssd),
            mass_low_bits=share(low),
        )
        res = {k: np.clip(out[k], 0.0, 1.0).astype(np.float32) for k in self.sizes if k != "time"}
        res["time"] = self._time(core)
        return {k: res[k] for k in self.sizes}


@njit(cache=True)
def default_obs_kernel(
    gpu_cap,
    gpu,
    cpu,
    ssd,
    gpu_nominal,
    cpu_cap,
    ssd_cap,
    perc_compute,
    perc_link,
    perc_rate,
    age,
    inv_age,
    up,
    pop,
    prune,
    fuse,
    inv_prune,
    mem_free,
    compute_avail,
    link_bw,
    server_up,
    request_rate,
    hello_age,
    popularity,
    compression,
):
    """The `default` observation but `plan` and `time`, float32 [N, size] each (module docstring): free shares
    clip((gpu_cap - gpu) / gpu_nominal), clip(1 - cpu / cpu_cap), clip(1 - ssd / ssd_cap) in [0, 1]; the perceived
    values (compute [D], link factor [K], request rate [S]); min(age * inv_age, 1); popularity; prune * inv_prune,
    then fusion."""
    N, D = gpu.shape
    S, K, P = cpu.shape[1], link_bw.shape[1], prune.shape[1]
    for n in range(N):
        for d in range(D):
            mem_free[n, d] = min(max((gpu_cap[n, d] - gpu[n, d]) / gpu_nominal[d], 0.0), 1.0)
            compute_avail[n, d] = perc_compute[n, d]
        for s in range(S):
            mem_free[n, D + s] = min(max(1 - cpu[n, s] / cpu_cap[s], 0.0), 1.0)
            mem_free[n, D + S + s] = min(max(1 - ssd[n, s] / ssd_cap[s], 0.0), 1.0)
            server_up[n, s] = 1.0 if up[n, s] else 0.0
            request_rate[n, s] = perc_rate[n, s]
            hello_age[n, s] = min(age[n, s] * inv_age, 1.0)
        for k in range(K):
            link_bw[n, k] = perc_link[n, k]
        for j in range(pop.shape[1]):
            popularity[n, j] = pop[n, j]
        for p in range(P):
            compression[n, p] = prune[n, p] * inv_prune
            compression[n, P + p] = 1.0 if fuse[n, p] else 0.0
