"""Issue 19 (the real backend as a serving engine): profiles and micro-benchmarks of the server processes' decode.

# two processes sharing one GPU: cost of handing the GPU back and forth (one small launch + sync each turn)
python -m benchmarks.bench_real_engine ctxswitch --out $OUT
# top functions of the cProfile dumps that COEL_PROFILE_DIR makes (real_backend.server.PROFILE_ENV)
python -m benchmarks.bench_real_engine pstats --dir $OUT/prof --top 25
# the physical floor of a scenario's decode step: engine step + link serialization + latency per crossing
python -m benchmarks.bench_real_engine floor --scenario paper-2server-1gpu --engine-step-ms 3.85
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _ping(rank: int, conn, iters: int, launches: int, out) -> None:
    import torch

    x = torch.zeros(1 << 16, device="cuda")
    for it in range(iters + 10):
        if it == 10 and rank == 0:
            t0 = time.perf_counter()
        if rank == 1 or it > 0:
            conn.recv()
        for _ in range(launches):
            x.add_(1.0)
        torch.cuda.synchronize()
        conn.send(1)
    if rank == 0:
        conn.recv()
        out.put((time.perf_counter() - t0) / iters)


def ctxswitch(args) -> dict:
    """Turn-taking on one GPU: two processes (a pipe passes the turn) vs one process doing both turns."""
    import torch
    import torch.multiprocessing as mp

    res = {}
    for launches in (1, 40):
        x = torch.zeros(1 << 16, device="cuda")
        for it in range(args.iters + 10):
            if it == 10:
                t0 = time.perf_counter()
            for _ in range(2):  # both "servers'" turns in one process
                for _ in range(launches):
                    x.add_(1.0)
                torch.cuda.synchronize()
        one = (time.perf_counter() - t0) / args.iters
        ctx = mp.get_context("spawn")
        a, b = ctx.Pipe()
        q = ctx.Queue()
        ps = [ctx.Process(target=_ping, args=(r, c, args.iters, launches, q)) for r, c in ((0, a), (1, b))]
        for p in ps:
            p.start()
        two = q.get(timeout=120)
        for p in ps:
            p.join(30)
        # a pipe round trip without the GPU, for the host part of a turn
        c1, c2 = ctx.Pipe()
        t0 = time.perf_counter()
        res[f"launches_{launches}"] = {"one_process_round_us": one * 1e6, "two_process_round_us": two * 1e6}
        del c1, c2
    return res


def pstats_top(args) -> str:
    import pstats

    lines = []
    for f in sorted(Path(args.dir).glob("*.prof")):
        st = pstats.Stats(str(f))
        lines.append(f"==== {f.name}: total {st.total_tt:.3f} s")
        rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[: args.top]  # by tottime
        for (file, line, fn), (_cc, nc, tt, ct, _) in rows:
            lines.append(f"{tt:8.3f} s self {ct:8.3f} s cum {nc:8d} calls  {Path(file).name}:{line} {fn}")
    return "\n".join(lines)


def floor(args) -> dict:
    """Per-step floor of a decode step of `--batch` sequences on server 0: the engine's step plus, per MoE layer that
    crosses, the requests' serialization (they share server 0's uplink), the replies' (they share its downlink) and
    the pair latency each way; the shaper books a route's hops at once (cut-through), so a hop count does not
    multiply. Experts drawn uniformly at random per token; the uniform plan (whole layers per server)."""
    import numpy as np

    from coel_env.backend.wire import SLOT_BYTES, STAMP_BYTES, reply_row_bytes, request_row_bytes
    from coel_env.plan.deployment import DeploymentPlan
    from coel_env.world.state import Scenario
    from real_backend.dist import dispatch_targets

    c = Scenario(args.scenario, seed=0).cluster
    m = c.model
    plan = DeploymentPlan.uniform(c)
    L, E, _ = plan.device.shape
    S = c.num_servers
    holders = [[{int(c.dev_server[x]) for x in plan.device[l, e] if x >= 0} for e in range(E)] for l in range(L)]
    target = dispatch_targets(holders, 0, np.ones(S, bool), c.pair_latency)
    rng = np.random.default_rng(0)
    req = request_row_bytes(m.d_model, 2, SLOT_BYTES, m.top_k)
    rep = reply_row_bytes(m.d_model, 2)
    bw = float(c.link_bw.min())
    per_step, crossings = [], []
    for _ in range(args.tokens):
        t, n = 0.0, 0
        for l in range(L):
            rows = np.zeros(S)
            for _b in range(args.batch):
                for p in {int(target[l, e]) for e in rng.choice(E, m.top_k, replace=False)} - {0}:
                    rows[p] += 1
            dests = np.flatnonzero(rows)
            if not len(dests):
                continue
            n += 1
            t += sum(rows[p] * req + STAMP_BYTES for p in dests) / bw
            t += sum(rows[p] * rep + STAMP_BYTES for p in dests) / bw
            t += 2 * max(float(c.pair_latency[0, p]) for p in dests)
        per_step.append(t)
        crossings.append(n)
    link_ms = 1e3 * float(np.mean(per_step))
    return {
        "scenario": args.scenario,
        "batch": args.batch,
        "engine_step_ms": args.engine_step_ms,
        "layers_crossing_per_step": float(np.mean(crossings)),
        "link_ms_per_step": link_ms,
        "floor_ms": args.engine_step_ms + link_ms,
    }


def parity(args) -> dict:
    """Tokens of the tiny scenario's window served on `--device` with the generic path, the fast path without
    CUDA graphs and the fast path with them (same seeds): the share of tokens equal to the generic path's."""
    import os

    import numpy as np

    from coel_env.plan.deployment import DeploymentPlan
    from coel_env.world.state import Scenario
    from real_backend import make_real_backend

    sc = Scenario("tiny", seed=0)
    state = sc.initial_state(np.random.default_rng(0))
    plan = DeploymentPlan.uniform(sc.cluster)
    runs = {}
    for name, fast, graphs in (("generic", "0", "0"), ("fast_eager", "1", "0"), ("fast_graphs", "1", "1")):
        os.environ["COEL_REAL_FAST"], os.environ["COEL_REAL_GRAPHS"] = fast, graphs
        b = make_real_backend(sc.cluster, seed=0, timeout_s=60, max_requests_per_server=4, device=args.device)
        try:
            b.reset(plan, state)
            b.serve(plan, state, 4.0)
            d = b.last_details
            runs[name] = {"tokens": d["tokens"], "fast_steps": sum(d["fast_steps"])}
        finally:
            b.close()
    ref = runs["generic"]["tokens"]
    out = {}
    for name, r in runs.items():
        same = sum(int(a == b) for rid in ref for a, b in zip(ref[rid], r["tokens"][rid]))
        out[name] = {"fast_steps": r["fast_steps"], "tokens_equal_generic": same / sum(len(t) for t in ref.values())}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cmd", choices=("ctxswitch", "pstats", "floor", "parity"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--dir", default=".")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--scenario", default="paper-2server-1gpu")
    p.add_argument("--engine-step-ms", type=float, default=3.85)
    p.add_argument("--tokens", type=int, default=50, help="floor: decode steps sampled")
    p.add_argument("--batch", type=int, default=1, help="floor: sequences per decode step")
    args = p.parse_args(argv)
    if args.cmd == "pstats":
        print(pstats_top(args))
        return
    res = {"ctxswitch": ctxswitch, "floor": floor, "parity": parity}[args.cmd](args)
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"{args.cmd}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
