"""Emulated edge links.

(a) `LinkShaper`: application-level bandwidth + latency per physical link, for hosts whose server processes share
    NVLink/PCIe/loopback (e.g. a GPU host emulating a 1 Gb/s LAN). Every link direction is a FIFO token bucket
    whose next-free time lives in shared memory, so flows of different server processes that cross one link
    contend for it. A transfer reserves each hop of its route; it arrives after the last hop's serialization plus
    the route's latency. The receiver waits until that arrival time (one host: CLOCK_MONOTONIC is shared).
(b) Network namespaces joined by veth pairs to a bridge, each rate-limited with `tc qdisc tbf` (root only; the
    kernel has no netem, so latency is still added by `LinkShaper` with `bandwidth=False`).
"""

from __future__ import annotations

import ctypes
import itertools
import multiprocessing as mp
import os
import shutil
import subprocess
import time

import networkx as nx
import numpy as np

from coel_env.errors import ConfigError
from coel_env.world.cluster import Cluster

_clock_offset = 0.0  # added to time.monotonic(): 0 on one host; multi-node ranks align it to rank 0's clock


def now() -> float:
    """The servers' common clock: time.monotonic(), plus this host's offset to rank 0's clock on multi-node runs."""
    return time.monotonic() + _clock_offset


def set_clock_offset(offset_s: float) -> None:
    """Align `now()` with rank 0's clock (real_backend.torchrun measures the offset when ranks span hosts)."""
    global _clock_offset
    _clock_offset = float(offset_s)


def sleep_until(t: float) -> None:
    """Sleep until now() reaches t (no spinning: server processes may share few cores)."""
    while (left := t - now()) > 0:
        time.sleep(left)


BURST_S = 0.02  # bucket depth: a late sender may catch up this much idle time (like tbf's burst), so scheduler
# jitter on a busy host does not lower the average rate below the set one. The credit keeps the rate; it never makes
# one message faster than its own bytes: each arrives no earlier than its serialization after it is sent (before,
# an idle link delivered up to 20 ms of bytes at once: prefill messages crossed a 0.1 Gb/s link for free)


class TokenBucket:
    """One FIFO link of `rate` bytes/s and one-way `latency` s (single process): `send(n)` returns arrival time."""

    def __init__(self, rate: float, latency: float = 0.0):
        if rate <= 0:
            raise ConfigError(f"shaper: rate must be > 0 bytes/s, got {rate}")
        self.rate, self.latency, self.free = rate, latency, 0.0

    def send(self, nbytes: int, t: float | None = None) -> float:
        t = now() if t is None else t
        self.free = max(t - BURST_S, self.free) + nbytes / self.rate
        return max(self.free, t + nbytes / self.rate) + self.latency


class LinkShaper:
    """Bandwidth and latency of the cluster's physical links (and the WAN to the cloud), shared by processes."""

    def __init__(
        self,
        cluster: Cluster,
        link_factor: np.ndarray | None = None,
        *,
        bandwidth: bool = True,
        latency: bool = True,
        shared=None,
    ):
        self.cluster = c = cluster
        K = c.num_links
        factor = np.ones(K) if link_factor is None else np.asarray(link_factor, dtype=np.float64)
        self.rate = np.maximum(c.link_bw * factor, 1.0)
        self.bandwidth, self.latency = bandwidth, latency
        self.cloud_rate = c.hw.cloud_bandwidth_gbps * 1e9 / 8
        self.free = shared if shared is not None else self.new_shared(cluster)
        self.routes = self._routes(c)

    @staticmethod
    def new_shared(cluster: Cluster, ctx=None):
        """Shared next-free times: 2 per link (directions) + 1 for the cloud WAN."""
        return (ctx or mp).Array("d", 2 * cluster.num_links + 1, lock=True)

    @staticmethod
    def _routes(c: Cluster) -> dict[tuple[int, int], list[tuple[int, int]]]:
        """(src, dst) server -> hops [(link k, direction)] along the lowest-latency path."""
        edge = {(a, b): k for k, (a, b) in enumerate(c.link_ends)}
        out = {}
        for a in range(c.num_servers):
            for b in range(c.num_servers):
                if a == b:
                    continue
                path = nx.dijkstra_path(c.graph, c.server_names[a], c.server_names[b], weight="latency_ms")
                out[a, b] = [
                    (edge[(u, v)], 0) if (u, v) in edge else (edge[(v, u)], 1) for u, v in itertools.pairwise(path)
                ]
        return out

    def set_link_factor(self, link_factor: np.ndarray) -> None:
        self.rate = np.maximum(self.cluster.link_bw * np.asarray(link_factor, dtype=np.float64), 1.0)

    def reserve(self, src: int, dst: int, nbytes: int) -> float:
        """Book `nbytes` from server src to dst; return when they arrive (on the `now()` clock)."""
        if src == dst:
            return now()
        t = now()
        arrive = t
        hops = self.routes[src, dst]
        if self.bandwidth and nbytes > 0:
            with self.free.get_lock():
                for k, direction in hops:
                    i = 2 * k + direction
                    start = max(t - BURST_S, self.free[i])
                    self.free[i] = start + nbytes / self.rate[k]
                    arrive = max(arrive, self.free[i], t + nbytes / self.rate[k])
        if self.latency:
            arrive += float(self.cluster.pair_latency[src, dst])
        return arrive

    def serialization_s(self, src: int, dst: int, nbytes: int) -> float:
        """Seconds `nbytes` take on the route's slowest hop (0 without bandwidth shaping): how long before a booked
        message's last byte its earlier bytes arrive (the route is cut-through)."""
        if not self.bandwidth or src == dst:
            return 0.0
        return nbytes / float(min(self.rate[k] for k, _ in self.routes[src, dst]))

    def tail_arrival(self, src: int, dst: int, nbytes: int) -> float:
        """When the last `nbytes` of a stream already booked arrive if they are sent now: their serialization on
        the route plus its latency (a streamed reply cannot end before its last chunk, computed now, crosses)."""
        lat = float(self.cluster.pair_latency[src, dst]) if self.latency else 0.0
        return now() + self.serialization_s(src, dst, nbytes) + lat

    def reserve_cloud(self, nbytes: int) -> float:
        """Book a download from the checkpoint store over the WAN."""
        t = now()
        with self.free.get_lock():
            i = len(self.free) - 1
            start = max(t - BURST_S, self.free[i])
            self.free[i] = start + nbytes / self.cloud_rate
            arrive = max(self.free[i], t + nbytes / self.cloud_rate)
        return arrive + self.cluster.hw.cloud_latency_s


# ---- (b) network namespaces + tc tbf (root) ----------------------------------------------------------------
def _tbf(dev: str, rate_bits: float) -> list[str]:
    burst = max(16_000, int(rate_bits / 8 / 250))
    return [
        "tc",
        "qdisc",
        "replace",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        f"{int(rate_bits)}bit",
        "burst",
        str(burst),
        "latency",
        "200ms",
    ]


def netns_commands(
    rates_bits: list[float], prefix: str = "coel", subnet: str = "10.77.0"
) -> tuple[list[list[str]], list[list[str]]]:
    """Commands (setup, teardown) for one namespace per server, a star through bridge `{prefix}br`.

    Server s lives in namespace `{prefix}{s}` with address `{subnet}.{s+1}` on device `{prefix}n{s}`; its uplink
    (device in the namespace) and downlink (its bridge port) are each shaped to rates_bits[s] bit/s with tbf."""
    br = f"{prefix}br"
    setup = [["ip", "link", "add", br, "type", "bridge"], ["ip", "link", "set", br, "up"]]
    teardown = []
    for s, rate in enumerate(rates_bits):
        ns, host, inner = f"{prefix}{s}", f"{prefix}h{s}", f"{prefix}n{s}"
        setup += [
            ["ip", "netns", "add", ns],
            ["ip", "link", "add", host, "type", "veth", "peer", "name", inner],
            ["ip", "link", "set", inner, "netns", ns],
            ["ip", "link", "set", host, "master", br],
            ["ip", "link", "set", host, "up"],
            ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{subnet}.{s + 1}/24", "dev", inner],
            ["ip", "netns", "exec", ns, "ip", "link", "set", inner, "up"],
            ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
            ["ip", "netns", "exec", ns, *_tbf(inner, rate)],
            _tbf(host, rate),
        ]
        teardown += [["ip", "link", "del", host], ["ip", "netns", "del", ns]]
    teardown.append(["ip", "link", "del", br])
    return setup, teardown


def netns_available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None


class NetnsTopology:
    """Create (and on close remove) the namespaces of `netns_commands`; a context manager."""

    def __init__(self, rates_bits: list[float], prefix: str = "coel", subnet: str = "10.77.0"):
        if not netns_available():
            raise ConfigError("links.mode=netns: needs root and the 'ip' and 'tc' tools; allowed without them: 'app'")
        self.prefix, self.subnet, self.n = prefix, subnet, len(rates_bits)
        self.setup_cmds, self.teardown_cmds = netns_commands(rates_bits, prefix, subnet)
        self.up = False

    def namespace(self, s: int) -> str:
        return f"{self.prefix}{s}"

    def address(self, s: int) -> str:
        return f"{self.subnet}.{s + 1}"

    def device(self, s: int) -> str:
        return f"{self.prefix}n{s}"

    def __enter__(self) -> NetnsTopology:
        self.close()  # leftovers of an earlier run
        try:
            for cmd in self.setup_cmds:
                subprocess.run(cmd, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            self.close()
            raise ConfigError(f"links.mode=netns: '{' '.join(exc.cmd)}' failed: {exc.stderr.strip()}") from None
        self.up = True
        return self

    def close(self) -> None:
        for cmd in self.teardown_cmds:
            subprocess.run(cmd, capture_output=True)
        self.up = False

    def __exit__(self, *exc) -> None:
        self.close()


def enter_netns(name: str) -> None:
    """Move the calling process into network namespace `name` (root; before opening any socket)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns({name}) failed")
    finally:
        os.close(fd)
