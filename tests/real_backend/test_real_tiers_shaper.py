"""Expert tiers (GPU / CPU / SSD) and the emulated links (application shaper, netns + tc tbf)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from coel_env import Scenario
from real_backend.quant import quantize
from real_backend.shaper import LinkShaper, NetnsTopology, TokenBucket, netns_available, netns_commands, sleep_until
from real_backend.tiers import TIER_CPU, TIER_GPU, TIER_SSD, ExpertStore


def _expert(bits: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(quantize(torch.randn(*s, generator=g) / 8, bits) for s in ((128, 64), (128, 64), (64, 128)))


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_tier_moves_keep_expert_outputs_identical(tmp_path, bits):
    store = ExpertStore({0: torch.device("cpu")}, tmp_path, cpu_compute=True)
    x = torch.randn(5, 64)
    w = _expert(bits)
    outs = []
    for tier in (TIER_GPU, TIER_CPU, TIER_SSD, TIER_GPU):
        store.put(0, 1, 0, tier, w if tier != TIER_SSD else store.read(store.best(0, 1)))
        outs.append(store.compute(0, 1, x))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert store.stats.fetches == 1 and store.stats.cpu_computes == 1  # SSD read once; CPU tier ran on the CPU
    gpu, cpu, ssd = store.memory(1)
    assert gpu[0] == sum(t.nbytes for t in w) and cpu == 0 and ssd == 0  # the SSD file went away with the move
    assert not list(tmp_path.glob("*.safetensors"))


def test_prefetch_loads_predicted_cold_experts(tmp_path):
    aff = np.zeros((1, 4, 4))
    aff[0, :, 2] = 1.0  # every layer-0 expert is followed by expert 2
    store = ExpertStore({0: torch.device("cpu")}, tmp_path, prefetch=1, affinity=aff)
    store.put(1, 2, 0, TIER_SSD, _expert(8))
    store.prefetch(0, torch.tensor([0, 3]))
    y = store.compute(1, 2, torch.randn(3, 64))
    assert store.stats.prefetch_issued == 1 and store.stats.prefetch_hits == 1 and y.shape == (3, 64)
    store.close()


def _measure_rate(pace, total: int, chunk: int) -> float:
    """Bytes/s received over a socketpair when every chunk is released at `pace(n)` (its arrival time)."""
    a, b = socket.socketpair()
    got = []

    def reader():
        n = 0
        while n < total:
            data = b.recv(1 << 20)
            if not got:
                got.append(time.monotonic())
            n += len(data)
        got.append(time.monotonic())

    t = threading.Thread(target=reader)
    t.start()
    payload = b"x" * chunk
    a.sendall(payload)  # the first chunk starts the clock
    for _ in range(total // chunk - 1):
        sleep_until(pace(chunk))
        a.sendall(payload)
    t.join(10)
    a.close()
    b.close()
    return (total - chunk) / (got[1] - got[0])


def test_token_bucket_rate_within_10_percent():
    bucket = TokenBucket(rate=4e6)
    bucket.send(0)
    rate = _measure_rate(bucket.send, total=1_600_000, chunk=16_000)
    assert abs(rate / 4e6 - 1) < 0.10


def test_an_idle_link_still_serializes_each_message():
    """The bucket's burst credit keeps the average rate under scheduler jitter; it must not deliver a message
    faster than its bytes cross the link (10 ms of bytes on an idle link arrive 10 ms after they are sent)."""
    bucket = TokenBucket(rate=5e6, latency=1e-3)
    assert bucket.send(50_000, t=100.0) == pytest.approx(100.0 + 0.01 + 1e-3)
    c = Scenario("tiny").cluster
    shaper = LinkShaper(c, np.full(c.num_links, 0.04))  # 5 MB/s per link
    t0 = time.monotonic()
    arrive = shaper.reserve(0, 1, 50_000)
    assert arrive - t0 >= 0.01 + c.pair_latency[0, 1] - 1e-6
    shaper.cloud_rate = 5e6
    t0 = time.monotonic()
    assert shaper.reserve_cloud(50_000) - t0 >= 0.01 + c.hw.cloud_latency_s - 1e-6


def test_link_shaper_rate_and_latency_follow_the_cluster():
    c = Scenario("tiny").cluster  # 1 Gb/s star, 0.1 ms per hop
    factor = np.full(c.num_links, 0.04)  # 40 Mb/s = 5 MB/s
    shaper = LinkShaper(c, factor)
    t0 = time.monotonic()
    arrive = shaper.reserve(0, 1, 0)
    assert arrive - t0 == pytest.approx(c.pair_latency[0, 1], abs=2e-3)
    rate = _measure_rate(lambda n: shaper.reserve(0, 1, n) - c.pair_latency[0, 1], total=2_000_000, chunk=20_000)
    assert abs(rate / 5e6 - 1) < 0.10
    busy_until = shaper.reserve(2, 1, 1_000_000)  # shares the switch->s1 downlink: queued behind the flow
    assert busy_until - time.monotonic() > 0.15


def test_netns_commands_shape_every_server_link():
    setup, teardown = netns_commands([1e9, 5e8])
    flat = [" ".join(c) for c in setup]
    assert sum("tbf rate 1000000000bit" in c for c in flat) == 2
    assert sum("tbf rate 500000000bit" in c for c in flat) == 2
    assert any("netns add coel1" in c for c in flat) and ["ip", "link", "del", "coelbr"] in teardown


@pytest.mark.skipif(not netns_available(), reason="needs root, ip and tc")
def test_netns_tbf_rate_within_10_percent():
    rate_bits = 40e6
    server = (
        "import socket,time,sys;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
        "s.bind(('10.79.0.2',5599));s.listen(1);c,_=s.accept();n=0;t0=None\n"
        "while True:\n d=c.recv(1<<16)\n if not d: break\n t0=t0 or time.monotonic();n+=len(d)\n"
        "print(n/(time.monotonic()-t0))"
    )
    client = (
        "import socket,time;time.sleep(0.5);s=socket.create_connection(('10.79.0.2',5599));"
        "s.sendall(b'x'*2_500_000);s.close()"
    )
    try:
        with NetnsTopology([rate_bits, rate_bits], prefix="coelt", subnet="10.79.0") as topo:
            srv = subprocess.Popen(
                ["ip", "netns", "exec", topo.namespace(1), sys.executable, "-c", server],
                stdout=subprocess.PIPE,
                text=True,
            )
            subprocess.run(
                ["ip", "netns", "exec", topo.namespace(0), sys.executable, "-c", client], check=True, timeout=30
            )
            out, _ = srv.communicate(timeout=30)
    except Exception as exc:  # e.g. a container without veth/bridge support
        pytest.skip(f"network namespaces unusable here: {exc}")
    goodput = float(out.strip())
    assert abs(goodput * 8 / rate_bits - 1) < 0.10
