"""Profiling sweeps on the real backend's own modules (quantized expert matmuls, attention, the link shaper, gloo
messages, expert tiers). Each sweep returns a list of row dicts (what `fit.py` fits and calibrate.py stores)."""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from coel_env.world.cluster import Cluster
from real_backend.model import KVCache, MoEConfig, MoETransformer, WeightSource
from real_backend.quant import quantize
from real_backend.shaper import LinkShaper, sleep_until
from real_backend.tiers import TIER_CPU, TIER_SSD, ExpertStore, expert_forward, expert_nbytes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, reps: int) -> float:
    """Fastest wall seconds of `fn()` over `reps` after one warm-up call (noise on a shared host only adds)."""
    fn()
    _sync(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return min(ts)


def expert_sweep(
    shapes: list[tuple[int, int]], tokens: list[int], bits: list[int], device: str = "cpu", reps: int = 5, seed: int = 0
) -> list[dict]:
    """Time of one routed expert (gate/up/down SwiGLU through real_backend.quant) per (d_model, d_ff, tokens,
    bits): the data `fit.fit_roofline` turns into bandwidth, FLOP/s, per-expert overhead and dequant slowdowns."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(seed)
    rows = []
    for d, f in shapes:
        base = [
            torch.randn(f, d, generator=g) / d**0.5,
            torch.randn(f, d, generator=g) / d**0.5,
            torch.randn(d, f, generator=g) / f**0.5,
        ]
        for b in bits:
            w = tuple(quantize(t, b).to(dev) for t in base)
            for n in tokens:
                x = torch.randn(n, d, generator=g).to(dev, dtype)
                t = _time(lambda: expert_forward(x, w), dev, reps)  # noqa: B023
                rows.append(
                    {
                        "d_model": d,
                        "d_ff": f,
                        "tokens": n,
                        "bits": b,
                        "bytes": expert_nbytes(w),
                        "flops": 2.0 * 3 * d * f * n,
                        "seconds": t,
                    }
                )
    return rows


def attention_sweep(cfg: MoEConfig, contexts: list[int], device: str = "cpu", reps: int = 5) -> list[dict]:
    """Time of one decode token's attention (real_backend.model) in one layer vs context length."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = MoETransformer(cfg, WeightSource(cfg, 0).non_expert(dev), dev, dtype)
    rows = []
    for T in contexts:
        cache = KVCache(cfg.num_layers)
        hd, Hkv = cfg.head_dim, cfg.num_kv_heads
        kv = [torch.randn(Hkv, T, hd, device=dev, dtype=dtype) for _ in range(2)]
        cache.append(0, *kv)
        cache.length = T
        x = torch.randn(1, cfg.d_model, device=dev, dtype=dtype)

        def step(cache=cache, T=T, x=x):
            model._attention(0, x, [1], [cache])
            cache.truncate(0, T)  # undo the append

        rows.append({"context": T, "seconds": _time(step, dev, reps)})
    return rows


def shaper_sweep(cluster: Cluster, sizes: list[int], reps: int = 3) -> list[dict]:
    """Delivery time of messages through real_backend's app-level LinkShaper (booking + sleep) per server pair."""
    rows = []
    shaper = LinkShaper(cluster)
    for a in range(cluster.num_servers):
        for b in range(cluster.num_servers):
            if a >= b:
                continue
            for n in sizes:
                ts = []
                for _ in range(reps):
                    t0 = time.monotonic()
                    sleep_until(shaper.reserve(a, b, n))
                    ts.append(time.monotonic() - t0)
                rows.append(
                    {
                        "src": a,
                        "dst": b,
                        "pair": int(cluster.pair_index[a, b]),
                        "bytes": n,
                        "seconds": statistics.median(ts),
                    }
                )
    return rows


def _pingpong(rank: int, port: int, sizes: list[int], reps: int, out) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    res = []
    for n in sizes:
        buf = torch.zeros(max(n, 1), dtype=torch.uint8)
        ts = []
        for i in range(reps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            if i:
                ts.append((time.perf_counter() - t0) / 2)
        res.append({"bytes": n, "seconds": statistics.median(ts)})
    if rank == 0:
        out.put(res)
    dist.destroy_process_group()


def run_pair(target, args: tuple, timeout_s: float, started=None):
    """Spawn two processes `target(rank, port, *args, queue)` (a free local port for their process group) and
    return what rank 0 puts on the queue; `started()` runs once both are started (e.g. to close a handle)."""
    import torch.multiprocessing as tmp

    from real_backend.backend import _free_port

    ctx = tmp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, port, *args, q), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    if started is not None:
        started()
    out = q.get(timeout=timeout_s)
    for p in procs:
        p.join(min(timeout_s, 60))
    return out


def gloo_sweep(sizes: list[int], reps: int = 5) -> list[dict]:
    """One-way time of a gloo message between two local processes (the software α/β under the shaper)."""
    return run_pair(_pingpong, (sizes, reps), timeout_s=120)


def tier_sweep(cfg: MoEConfig, bits: list[int], device: str = "cpu", reps: int = 5) -> list[dict]:
    """Fetch time of one expert from CPU memory and from its SSD file to the compute device (real_backend.tiers)."""
    dev = torch.device(device)
    rows = []
    src = WeightSource(cfg, 0)
    with tempfile.TemporaryDirectory(prefix="coel-cal-") as tmpdir:
        store = ExpertStore({0: dev}, tmpdir, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
        for b in bits:
            w = tuple(quantize(t, b) for t in src.expert(0, 0))
            for tier, name in ((TIER_CPU, "cpu"), (TIER_SSD, "ssd")):
                rep = store.put(0, 0, 0, tier, w)
                t = _time(lambda rep=rep: store._fetch(rep), dev, reps)
                rows.append({"tier": name, "bits": b, "bytes": expert_nbytes(w), "seconds": t})
        store.close()
    return rows
