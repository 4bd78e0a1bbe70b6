"""The static cluster: a scenario compiled into numpy arrays and a networkx topology.

Indices used everywhere: servers `s` (0..S-1), devices `d` (all GPUs, 0..D-1, grouped by server),
physical links `k` (topology edges), logical links `p` (unordered server pairs, token compression is per pair).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import cached_property

import networkx as nx
import numpy as np

from coel_env.errors import ConfigError
from coel_env.specs import BIT_WIDTHS, HardwareProfile, ModelSpec, ScenarioSpec, load_hardware_profile

TIERS: tuple[str, ...] = ("gpu", "cpu", "ssd")
GB = 1e9


@dataclass
class Cluster:
    """Immutable arrays derived from a ScenarioSpec (built once, shared by every state and backend)."""

    spec: ScenarioSpec
    hw: HardwareProfile
    graph: nx.Graph
    server_names: list[str]
    device_names: list[str]
    dev_server: np.ndarray  # [D] server of each GPU
    dev_mem: np.ndarray  # [D] bytes
    dev_bw: np.ndarray  # [D] bytes/s (vendor)
    dev_flops: np.ndarray  # [D] FLOP/s (vendor)
    dev_p_idle: np.ndarray
    dev_p_max: np.ndarray
    cpu_bw: np.ndarray  # [S] bytes/s
    cpu_flops: np.ndarray  # [S]
    cpu_p_idle: np.ndarray
    cpu_p_max: np.ndarray
    cpu_ram: np.ndarray  # [S] bytes
    ssd_bytes: np.ndarray  # [S]
    ssd_bw: np.ndarray  # [S] bytes/s
    pcie_bw: np.ndarray  # [S] bytes/s
    link_ends: list[tuple[str, str]]  # [K] physical links
    link_bw: np.ndarray  # [K] bytes/s nominal
    link_latency: np.ndarray  # [K] seconds
    pair_index: np.ndarray  # [S, S] logical link id of a server pair (-1 on the diagonal)
    pair_links: np.ndarray  # [P, K] 1 where the pair's route uses the physical link
    pair_latency: np.ndarray  # [S, S] one-way seconds along the route
    first_gpu: np.ndarray = field(default=None)  # [S] index of each server's first GPU

    @property
    def model(self) -> ModelSpec:
        return self.spec.model

    @property
    def num_servers(self) -> int:
        return len(self.server_names)

    @property
    def num_devices(self) -> int:
        return len(self.device_names)

    @property
    def num_links(self) -> int:
        return len(self.link_ends)

    @property
    def num_pairs(self) -> int:
        return self.pair_links.shape[0]

    @cached_property
    def gpus_per_server(self) -> np.ndarray:
        return np.bincount(self.dev_server, minlength=self.num_servers)

    @cached_property
    def expert_bytes_by_bits(self) -> np.ndarray:
        """[17] bytes of one expert indexed by bit-width (0 where unsupported)."""
        table = np.zeros(17, dtype=np.float64)
        for b in BIT_WIDTHS:
            table[b] = self.model.expert_bytes(b)
        return table

    @cached_property
    def non_expert_bytes_per_gpu(self) -> np.ndarray:
        """[D] non-expert weights each GPU holds: every server keeps a full copy, split over its GPUs."""
        return self.model.non_expert_bytes(16) / self.gpus_per_server[self.dev_server]

    @cached_property
    def gpu_expert_capacity(self) -> np.ndarray:
        """[D] bytes of GPU memory left for routed experts when every GPU is fully free."""
        return self.gpu_expert_capacity_at(1.0)

    def gpu_expert_capacity_at(self, memory_avail: np.ndarray | float) -> np.ndarray:
        """[..., D] bytes of GPU memory for routed experts, given each GPU's free fraction `memory_avail` ([..., D]):
        `max(mem · (free · gpu_memory_utilization − kv_reserve_frac) − non-expert bytes, 0)` — the one capacity rule
        of plans, repair and observations (a plan within it leaves every GPU kv_reserve_frac of its memory for KV)."""
        hw = self.hw
        cap = self.dev_mem * (memory_avail * hw.gpu_memory_utilization - hw.kv_reserve_frac)
        return np.maximum(cap - self.non_expert_bytes_per_gpu, 0.0)

    def kv_room_at(self, memory_avail: np.ndarray) -> np.ndarray:
        """[..., S] bytes each server's GPUs offer the KV cache before any expert is placed, for free fractions
        [..., D]: sum over its GPUs of max(mem · free · gpu_memory_utilization − non-expert bytes, 0). The KV cache
        of a plan is this minus the expert bytes the plan puts on the server's GPUs (`physics.kv_sequences`)."""
        room = np.maximum(
            self.dev_mem * np.asarray(memory_avail) * self.hw.gpu_memory_utilization - self.non_expert_bytes_per_gpu,
            0.0,
        )
        return room @ self.dev_onehot

    @cached_property
    def dev_onehot(self) -> np.ndarray:
        """[D, S] 1 where GPU d belongs to server s: per-GPU quantities @ dev_onehot sums them per server."""
        return (self.dev_server[:, None] == np.arange(self.num_servers)[None]).astype(np.float64)

    @cached_property
    def cpu_expert_capacity(self) -> np.ndarray:
        return np.maximum(self.cpu_ram - self.hw.cpu_reserve_gb * GB, 0.0)

    @cached_property
    def pair_servers(self) -> np.ndarray:
        """[P, 2] the two servers of each logical link."""
        out = np.zeros((self.num_pairs, 2), dtype=np.int64)
        for a in range(self.num_servers):
            for b in range(a + 1, self.num_servers):
                out[self.pair_index[a, b]] = (a, b)
        return out

    @cached_property
    def route(self) -> np.ndarray:
        """[S, S, H] physical links on each server pair's route, padded with -1 (H: the longest route, at least 1;
        the diagonal is all -1)."""
        S = self.num_servers
        hops = int(self.pair_links.sum(1).max()) if self.num_pairs else 1
        route = -np.ones((S, S, max(hops, 1)), dtype=np.int64)
        for p, (a, b) in enumerate(self.pair_servers):
            links = np.flatnonzero(self.pair_links[p])
            route[a, b, : len(links)] = links
            route[b, a, : len(links)] = links
        return route

    def pair_to_links(self, pair_matrix: np.ndarray) -> np.ndarray:
        """Per-server-pair quantities [..., S, S] (e.g. bytes src -> dst) summed onto the physical links [..., K]:
        link k gets pair[a, b] + pair[b, a] of every pair (a, b) whose route uses it (both directions of a pair
        together; the diagonal is ignored). Batched over the leading axes; zeros when there are no pairs."""
        pair_matrix = np.asarray(pair_matrix)
        if not self.num_pairs:
            return np.zeros((*pair_matrix.shape[:-2], self.num_links))
        a, b = self.pair_servers[:, 0], self.pair_servers[:, 1]
        return (pair_matrix[..., a, b] + pair_matrix[..., b, a]) @ self.pair_links

    def pair_bandwidth(self, link_factor: np.ndarray) -> np.ndarray:
        """[..., S, S] bytes/s each server pair's route carries one way, for link factors [..., K]: the bottleneck
        (`pair_goodput`) of the links' goodput (`link_goodput`: nominal * link factor *
        hw.link_efficiency, at least 1); inf on the diagonal. What the surrogate's transfers and migrations use."""
        return pair_goodput(link_goodput(self.link_bw, np.asarray(link_factor), self.hw.link_efficiency), self.route)


def link_goodput(link_bw: np.ndarray, link_factor: np.ndarray, efficiency: float) -> np.ndarray:
    """Bytes/s one direction of a physical link carries: max(nominal * link factor * link_efficiency, 1)."""
    return np.maximum(link_bw * link_factor * efficiency, 1.0)


def pair_goodput(goodput: np.ndarray, route: np.ndarray) -> np.ndarray:
    """[..., S, S] bottleneck goodput of each server pair's route for link goodputs [..., K] (inf on the diagonal):
    the least goodput among the route's links."""
    return np.where(route >= 0, goodput[..., route], np.inf).min(-1)


def _check_kv_reserve(c: Cluster) -> None:
    """Continuous batching: the KV share every plan leaves (kv_reserve_frac of each GPU) must hold one sequence of
    the workload's mean lengths (`physics.held_kv_tokens`, as `kv_sequences` counts it) on every server, so that a
    valid plan always serves (ConfigError otherwise)."""
    from coel_env.backend.physics import held_kv_tokens  # the physics imports this module

    wl, m = c.spec.workload, c.model
    held = held_kv_tokens(float(wl.input_len.mean), float(wl.output_len.mean), float(wl.kv_block_tokens))
    one_seq = m.kv_bytes_per_token() * held
    reserve = np.bincount(c.dev_server, weights=c.dev_mem * c.hw.kv_reserve_frac, minlength=c.num_servers)
    short = np.flatnonzero(reserve < one_seq)
    if short.size:
        s = int(short[0])
        need = one_seq / np.bincount(c.dev_server, weights=c.dev_mem, minlength=c.num_servers)[s]
        raise ConfigError(
            f"hardware: kv_reserve_frac: {c.hw.kv_reserve_frac:g} leaves server '{c.server_names[s]}' "
            f"{reserve[s] / GB:.3g} GB of KV cache, less than one sequence ({held:g} tokens held, "
            f"{one_seq / GB:.3g} GB); allowed: >= {need:.3g}"
        )


def _build_graph(spec: ScenarioSpec) -> nx.Graph:
    g = nx.Graph()
    names = [s.name for s in spec.servers]
    g.add_nodes_from(names, kind="server")
    topo = spec.topology
    gbps = topo.bandwidth_gbps
    if topo.kind == "star":
        g.add_node("switch", kind="switch")
        for n in names:
            g.add_edge(n, "switch", bandwidth_gbps=gbps, latency_ms=topo.latency_ms / 2)
    elif topo.kind == "mesh":
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                g.add_edge(a, b, bandwidth_gbps=gbps, latency_ms=topo.latency_ms)
    else:
        for link in topo.links:
            for end in (link.a, link.b):
                if end not in g:
                    g.add_node(end, kind="switch")
            g.add_edge(link.a, link.b, bandwidth_gbps=link.bandwidth_gbps, latency_ms=link.latency_ms)
    if len(names) > 1 and not nx.is_connected(g):
        raise ConfigError(f"scenario {spec.name}: topology: servers are not all connected")
    return g


def build_cluster(spec: ScenarioSpec, hardware: HardwareProfile | str | None = None) -> Cluster:
    """Compile `spec` (with its hardware profile unless one is given) into a Cluster."""
    hw = load_hardware_profile(hardware if hardware is not None else spec.hardware)
    if spec.workload.concurrency is not None and hw.serving != "continuous":
        raise ConfigError(
            f"workload.concurrency: a closed-loop workload needs a hardware profile with serving: continuous "
            f"(profile '{hw.name}' has serving: {hw.serving}); e.g. hardware: continuous"
        )
    graph = _build_graph(spec)
    servers = spec.servers
    S = len(servers)
    dev_server, dev_names, devs = [], [], []
    first_gpu = np.zeros(S, dtype=np.int64)
    for s, srv in enumerate(servers):
        first_gpu[s] = len(devs)
        for g, gpu in enumerate(srv.gpus):
            dev_server.append(s)
            dev_names.append(f"{srv.name}/gpu{g}")
            devs.append(hw.device(gpu))
    edges = list(graph.edges(data=True))
    link_ends = [(a, b) for a, b, _ in edges]
    link_bw = np.array([d["bandwidth_gbps"] * 1e9 / 8 for *_, d in edges], dtype=np.float64)
    link_lat = np.array([d["latency_ms"] / 1e3 for *_, d in edges], dtype=np.float64)
    edge_id = {frozenset((a, b)): k for k, (a, b) in enumerate(link_ends)}
    names = [s.name for s in servers]
    P = S * (S - 1) // 2
    pair_index = -np.ones((S, S), dtype=np.int64)
    pair_links = np.zeros((P, len(edges)), dtype=np.float64)
    pair_latency = np.zeros((S, S), dtype=np.float64)
    paths = dict(nx.all_pairs_dijkstra_path(graph, weight="latency_ms")) if S > 1 else {}
    p = 0
    for a in range(S):
        for b in range(a + 1, S):
            pair_index[a, b] = pair_index[b, a] = p
            path = paths[names[a]][names[b]]
            for u, v in itertools.pairwise(path):
                k = edge_id[frozenset((u, v))]
                pair_links[p, k] = 1.0
                pair_latency[a, b] += link_lat[k]
            pair_latency[b, a] = pair_latency[a, b]
            p += 1
    arr = np.asarray
    cpus = [hw.device(s.cpu) for s in servers]
    cluster = Cluster(
        spec=spec,
        hw=hw,
        graph=graph,
        server_names=names,
        device_names=dev_names,
        dev_server=arr(dev_server, dtype=np.int64),
        dev_mem=arr([d.memory_gb * GB for d in devs]),
        dev_bw=arr([d.mem_bw_gbs * GB for d in devs]),
        dev_flops=arr([d.peak_tflops * 1e12 for d in devs]),
        dev_p_idle=arr([d.power_idle_w for d in devs], dtype=np.float64),
        dev_p_max=arr([d.power_max_w for d in devs], dtype=np.float64),
        cpu_bw=arr([cpu.mem_bw_gbs * GB for cpu in cpus]),
        cpu_flops=arr([cpu.peak_tflops * 1e12 for cpu in cpus]),
        cpu_p_idle=arr([cpu.power_idle_w for cpu in cpus], dtype=np.float64),
        cpu_p_max=arr([cpu.power_max_w for cpu in cpus], dtype=np.float64),
        cpu_ram=arr([s.cpu_ram_gb * GB for s in servers]),
        ssd_bytes=arr([s.ssd_gb * GB for s in servers]),
        ssd_bw=arr([(hw.ssd_bw_gbs or s.ssd_bw_gbs) * GB for s in servers]),
        pcie_bw=arr([(hw.pcie_bw_gbs or s.pcie_bw_gbs) * GB for s in servers]),
        link_ends=link_ends,
        link_bw=link_bw,
        link_latency=link_lat,
        pair_index=pair_index,
        pair_links=pair_links,
        pair_latency=pair_latency,
        first_gpu=first_gpu,
    )
    _check_finite(cluster)
    if hw.serving == "continuous":
        _check_kv_reserve(cluster)
    return cluster


def _check_finite(cluster: Cluster) -> None:
    """Last guard before the kernels: every compiled number is finite (the specs bound each input already)."""
    for name, value in vars(cluster).items():
        if isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ConfigError(
                f"scenario {cluster.spec.name}: {name}: not finite; every spec value must be a finite "
                "number in its range"
            )
