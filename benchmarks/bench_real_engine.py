"""Issue 19 (the real backend as a serving engine): profiles and micro-benchmarks of the server processes' decode.

# two processes sharing one GPU: cost of handing the GPU back and forth (one small launch + sync each turn)
python -m benchmarks.bench_real_engine ctxswitch --out $OUT
# top functions of the cProfile dumps that COEL_PROFILE_DIR makes (real_backend.server.PROFILE_ENV)
python -m benchmarks.bench_real_engine pstats --dir $OUT/prof --top 25
# the physical floor of a scenario's decode step: engine step + link serialization + latency per crossing
python -m benchmarks.bench_real_engine floor --scenario paper-2server-1gpu --engine-step-ms 3.85
# one MoE layer's message exchange between two server processes (header + request + reply), gloo vs shared memory
python -m benchmarks.bench_real_engine exchange --device cpu --iters 2000 --out benchmarks/results/engine
# closed-loop saturating throughput (clients per server, the scenario's lengths) next to its link bound
python -m benchmarks.bench_real_engine saturate --job 2srv-app --batch 64 --clients 64 --client-servers 0 --out $OUT
# a plan change's migration on the real backend (bytes by kind, seconds by phase) next to the surrogate's prediction
python -m benchmarks.bench_real_engine migrate --scenario PATH --links none --lan-gbps 10 --repeats 3 --out $OUT
# TPOT (tokens/s) per job and batch of a device run's measured_<variant>_b<batch>.csv files, a column per variant
python -m benchmarks.bench_real_engine table --dir $OUT --variants gloo shm
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np


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
    CUDA graphs and the fast path with them (same seeds; the default transport: shared memory on one host), and the
    last over gloo (COEL_REAL_SHM=0): the share of tokens equal to the generic path's, and whether the booked bytes
    equal the generic path's."""
    import os

    import numpy as np

    from coel_env.plan.deployment import DeploymentPlan
    from coel_env.world.state import Scenario
    from real_backend import make_real_backend

    sc = Scenario("tiny", seed=0)
    state = sc.initial_state(np.random.default_rng(0))
    plan = DeploymentPlan.uniform(sc.cluster)
    runs = {}
    variants = (
        ("generic", "0", "0", "auto", "0"),
        ("fast_eager", "1", "0", "auto", "0"),
        ("fast_graphs", "1", "1", "auto", "0"),
        ("fast_graphs_gloo", "1", "1", "0", "0"),
        ("static_eager", "1", "0", "auto", "1"),
        ("static_graphs", "1", "1", "auto", "1"),
    )
    for name, fast, graphs, shm, static in [v for v in variants if not args.variants or v[0] in args.variants]:
        os.environ["COEL_REAL_FAST"], os.environ["COEL_REAL_GRAPHS"], os.environ["COEL_REAL_SHM"] = fast, graphs, shm
        os.environ["COEL_REAL_STATIC"] = static
        b = make_real_backend(sc.cluster, seed=0, timeout_s=60, max_requests_per_server=4, device=args.device)
        try:
            b.reset(plan, state)
            b.serve(plan, state, 4.0)
            d = b.last_details
            runs[name] = {"tokens": d["tokens"], "fast_steps": sum(d["fast_steps"]), "bytes": d["bytes_to"]}
            runs[name]["transport"] = d["transport"][0]
            runs[name]["static"] = np.sum(d["static"], 0).tolist()  # static decode steps, messages served
        finally:
            b.close()
    ref = runs["generic"]
    out = {}
    for name, r in runs.items():
        same = sum(int(a == b) for rid in ref["tokens"] for a, b in zip(ref["tokens"][rid], r["tokens"][rid]))
        out[name] = {
            "fast_steps": r["fast_steps"],
            "transport": r["transport"],
            "tokens_equal_generic": same / sum(len(t) for t in ref["tokens"].values()),
            "bytes_equal_generic": r["bytes"] == ref["bytes"],
            "static": r["static"],
        }
    return out


EXCHANGE_D, EXCHANGE_K, EXCHANGE_LAYERS = 2048, 4, 24  # Qwen1.5-MoE-A2.7B: d_model, top_k, MoE layers


def _layer_exchange(tr, rank: int, layer: int, rows: int, payload, y, rows_bytes: tuple[int, int], dev) -> None:
    """One MoE layer as the dispatcher runs it with all tokens on rank 0: rank 0 sends a header and `rows` request
    rows, rank 1 a header without rows; rank 1 replies `rows` combined rows. Copies to `dev` as the dispatcher's."""
    req_row, rep_row = rows_bytes
    if rank == 0:
        tr.post(layer, {1: (rows, 0.0, payload)}, [1], [1], req_row, rep_row)
        tr.request(1)
        tr.response(1)[1].to(dev, non_blocking=True)
    else:
        tr.post(layer, {}, [0], [0], req_row, rep_row)
        tr.request(0)[2].to(dev, non_blocking=True)
        tr.reply(0, 0.0, y)
    tr.done()


def _timed(fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
    return out


def _time_exchanges(trs: dict, rank: int, cfg: dict, dev, times: dict) -> None:
    """One block: every case (rows, dtype) through every transport, appended to `times`."""
    import torch

    from coel_env.backend.wire import SLOT_BYTES, reply_row_bytes, request_row_bytes

    for rows in cfg["rows"]:
        for dt in (torch.bfloat16, torch.float32):
            rb = (
                request_row_bytes(EXCHANGE_D, dt.itemsize, SLOT_BYTES, EXCHANGE_K),
                reply_row_bytes(EXCHANGE_D, dt.itemsize),
            )
            payload = torch.zeros(rows * rb[0], dtype=torch.uint8)  # host rows, as _plan_fast hands them over
            y = torch.zeros(rows, EXCHANGE_D, dtype=dt, device=dev)
            for name, tr in trs.items():

                def one(i, tr=tr, rows=rows, payload=payload, y=y, rb=rb):
                    _layer_exchange(tr, rank, i % EXCHANGE_LAYERS, rows, payload, y, rb, dev)

                _timed(one, cfg["warmup"])
                key = (name, rows, str(dt).removeprefix("torch."), *rb)
                times.setdefault(key, []).extend(_timed(one, cfg["iters"]))
    for name, tr in trs.items():
        _timed(lambda i, tr=tr: tr.all_max(float(i)), cfg["warmup"])
        times.setdefault((name, "all_max"), []).extend(_timed(lambda i, tr=tr: tr.all_max(float(i)), cfg["iters"]))


def _exchange_worker(rank: int, port: int, seg, cfg: dict, out) -> None:
    """Server-process stand-in: a gloo process group and both transports; rank 0 times every round trip."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from real_backend.transport import GlooTransport, ShmTransport

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    dev, cpu = torch.device(cfg["device"]), torch.device("cpu")
    trs = {"gloo": GlooTransport(dev, cpu), "shm": ShmTransport(seg, rank, 120.0, dev, cpu)}
    times: dict[tuple, list[float]] = {}
    for _block in range(cfg["blocks"]):  # transports interleaved in blocks: drift of a shared machine hits both
        _time_exchanges(trs, rank, cfg, dev, times)
    if rank == 0:
        out.put(times)
    dist.barrier()
    dist.destroy_process_group()


def _us(ts: list[float]) -> dict:
    q = statistics.quantiles(ts, n=10)
    return {"median_us": 1e6 * statistics.median(ts), "p10_us": 1e6 * q[0], "p90_us": 1e6 * q[-1], "reps": len(ts)}


def exchange(args) -> dict:
    """Round trip of one MoE layer's messages between two processes (header + request rows + reply rows, as the
    dispatcher sends them with every token on server 0), gloo isend/irecv vs the shared-memory lanes, and the
    step clock's all-reduce; median over repetitions, timed by rank 0."""
    from experiments.calib.sweeps import run_pair
    from real_backend.shm import Segment, layout_for

    rows = [1, 32]
    seg = Segment.create(layout_for(2, EXCHANGE_LAYERS, EXCHANGE_D, EXCHANGE_K, max(rows)))
    cfg = {"device": args.device, "rows": rows, "iters": max(args.iters // 3, 10), "warmup": 100, "blocks": 3}
    times = run_pair(_exchange_worker, (seg, cfg), timeout_s=600, started=seg.close)
    cases = []
    for key, ts in times.items():
        if key[1] == "all_max":
            cases.append({"transport": key[0], "what": "all_max (step clock)", **_us(ts)})
        else:
            name, n, dt, req_row, rep_row = key
            what = f"layer exchange, {n} row(s) {dt}"
            cases.append({"transport": name, "what": what, "request_bytes": n * req_row, "reply_bytes": n * rep_row})
            cases[-1].update(_us(ts))
    return {
        "command": "python -m benchmarks.bench_real_engine " + " ".join(sys.argv[1:]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_avg_1min": os.getloadavg()[0],  # other work on the machine (shared cores) disturbs gloo most
            "device": args.device,
        },
        "model": {"d_model": EXCHANGE_D, "top_k": EXCHANGE_K},
        "cases": cases,
    }


def exchange_md(res: dict) -> str:
    """The exchange results side by side (gloo | shm | ratio)."""
    by = {(c["what"], c["transport"]): c for c in res["cases"]}
    lines = [
        "# One MoE layer's message exchange between two server processes: gloo vs shared memory",
        "",
        f"`{res['command']}` ({res['machine']['cores']} cores, load {res['machine']['load_avg_1min']:.1f}, device "
        f"{res['machine']['device']}; d_model "
        f"{res['model']['d_model']}, top_k {res['model']['top_k']}). Round trip timed by rank 0: it sends a header and "
        "the request rows, receives rank 1's header (no rows) and the reply rows (as the dispatcher at a crossing "
        "layer with every token on server 0). Median (p10-p90) over the repetitions.",
        "",
        "| what | request B | reply B | gloo µs | shm µs | gloo / shm |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for what in dict.fromkeys(c["what"] for c in res["cases"]):
        g, s = by[(what, "gloo")], by[(what, "shm")]
        cell = lambda c: f"{c['median_us']:.1f} ({c['p10_us']:.0f}-{c['p90_us']:.0f})"  # noqa: E731
        lines.append(
            f"| {what} | {g.get('request_bytes', '')} | {g.get('reply_bytes', '')} | {cell(g)} | {cell(s)} | "
            f"{g['median_us'] / s['median_us']:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def _tpot_cell(v: tuple[float, float] | None) -> str:
    return "—" if v is None else f"{v[0]:.1f} ({v[1]:.0f})"


def measured_table(directory: str, columns: list[str]) -> str:
    """Markdown TPOT ms (tokens/s) per job and batch of the `measured_<variant>_b<batch>.csv` files of
    bench_testbed in `directory`, one column per variant (e.g. gloo shm), "—" where a run is missing."""
    import csv

    rows = {}
    for f in sorted(Path(directory).glob("measured_*_b*.csv")):
        variant = f.stem.split("_")[1]
        for r in csv.DictReader(f.open()):
            if r["status"] == "ok":
                rows[(r["job"], r["batch"], variant)] = (1e3 * float(r["tpot_s"]), float(r["batch_tok_s"]))
    lines = [
        "| job | batch | " + " | ".join(f"{c} TPOT ms (tok/s)" for c in columns) + " |",
        "| --- | ---: |" + " ---: |" * len(columns),
    ]
    for job, batch in sorted({(j, b) for j, b, _ in rows}, key=lambda k: (int(k[1]), k[0])):
        cells = [_tpot_cell(rows.get((job, batch, c))) for c in columns]
        lines.append(f"| {job} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def link_directions(cluster, bytes_to: np.ndarray) -> np.ndarray:
    """Bytes per link direction [2K] (the shaper's buckets) of a [S, S] src -> dst byte matrix."""
    from real_backend.shaper import LinkShaper

    out = np.zeros(2 * cluster.num_links)
    for (a, b), hops in LinkShaper._routes(cluster).items():
        for k, direction in hops:
            out[2 * k + direction] += bytes_to[a, b]
    return out


def saturation_bound(cluster, bytes_to: np.ndarray, n_out: float) -> dict:
    """The link-bound throughput of a run's traffic: output tokens per second if its busiest link direction carried
    its bytes at the nominal rate (directions full duplex, as the shaper's buckets), and if each link's two
    directions took turns (one chain of requests then replies, no overlap)."""
    per_dir = link_directions(cluster, bytes_to)
    rate = np.repeat(cluster.link_bw, 2)
    busiest = float((per_dir / rate).max())
    turns = float(((per_dir[0::2] + per_dir[1::2]) / cluster.link_bw).max())
    return {
        "bytes_per_out_token_busiest_dir": float(per_dir.max() / n_out),
        "link_bound_tok_s": n_out / busiest if busiest else float("inf"),
        "half_duplex_bound_tok_s": n_out / turns if turns else float("inf"),
    }


def saturate(args) -> dict:
    """Closed-loop saturating run: `--clients` clients on each of `--client-servers`, each sending
    `--per-client` requests of the scenario's lengths one after another; output tokens/s over the makespan, next
    to the link bound of the same traffic (`saturation_bound`)."""
    from benchmarks.bench_testbed import JOBS, scenario_spec
    from coel_env.plan.deployment import DeploymentPlan
    from coel_env.world.state import Scenario
    from real_backend.backend import RealBackend

    name, links = JOBS[args.job]
    spec = scenario_spec(name, args.model, max_batch=args.batch)
    if args.batched_tokens:
        d = spec.model_dump()
        d["workload"]["max_num_batched_tokens"] = args.batched_tokens
        spec = type(spec).model_validate(d)
    sc = Scenario(spec, seed=0)
    c = sc.cluster
    plan = DeploymentPlan.uniform(c)
    state = sc.initial_state(np.random.default_rng(0))
    window = 60.0
    state.arrival_rate = np.zeros(c.num_servers)
    state.arrival_rate[args.client_servers] = args.clients * args.per_client / window
    be = RealBackend(c, device=args.device, links=links, timeout_s=300.0, measure_quality=False, gen_device=args.device)
    try:
        be.reset(plan, state)
        warm = state.copy()
        warm.arrival_rate = np.where(state.arrival_rate > 0, 1.0 / window, 0.0)
        be.concurrency = 1
        be.serve(plan, warm, window)  # warm-up: one request per client server
        be.concurrency = args.clients
        t0 = time.perf_counter()
        m = be.serve(plan, state, window)
        wall = time.perf_counter() - t0
        d = be.last_details
    finally:
        be.close()
    n_out = float(sum(len(t) for t in d["tokens"].values()))
    bytes_to = np.asarray(d["bytes_to"])
    return {
        "job": args.job,
        "batch": args.batch,
        "batched_tokens": spec.workload.max_num_batched_tokens,
        "clients": args.clients,
        "client_servers": args.client_servers,
        "requests": d["served"],
        "input_len": spec.workload.input_len.mean,
        "output_len": spec.workload.output_len.mean,
        "out_tokens": n_out,
        "tok_s": m.tokens_per_s,
        "makespan_s": d["makespan_s"],
        "wall_s": wall,
        "ttft_mean_s": m.ttft_mean_s,
        "tpot_mean_s": m.tpot_mean_s,
        "steps": d["steps"],
        "fast_steps": d["fast_steps"],
        "static": d["static"],
        "streams_served": d.get("streams_served"),
        "link_bytes": float(bytes_to.sum()),
        **saturation_bound(c, bytes_to, n_out),
    }


def migrate(args) -> dict:
    """A plan change's migration, measured: the scenario's initial (uniform) plan and `--policy`'s first plan applied
    in turn, `--repeats` times each way, on the real backend (`--device`, `--links`; the topology's bandwidth
    replaced by `--lan-gbps` when given), next to the surrogate's predicted migration time for the same plan pair
    (profile `--hardware`)."""
    from agents.baselines import make_policy
    from coel_env import DeploymentPlan, Scenario
    from coel_env.backend.surrogate import SurrogateBackend
    from coel_env.specs.scenario import load_scenario_spec, scenario_from_dict
    from real_backend import RealBackend

    if args.repeats < 1:
        raise SystemExit(f"migrate: --repeats {args.repeats} given; must be >= 1")
    spec = load_scenario_spec(args.scenario)
    if args.lan_gbps is not None:  # validated like any scenario's topology
        d = spec.model_dump()
        spec = scenario_from_dict({**d, "topology": {**d["topology"], "bandwidth_gbps": args.lan_gbps}})
    sc = Scenario(spec, seed=args.seed, hardware=args.hardware)
    c = sc.cluster
    state = sc.initial_state(np.random.default_rng(args.seed))
    policy = make_policy(args.policy)
    policy.reset(c, seed=args.seed, scenario=sc)
    plans = [DeploymentPlan.uniform(c), policy.decide(state, c, None).plan]
    surrogate = SurrogateBackend(c)
    rows = []
    with RealBackend(c, device=args.device, gen_device=args.device, links=args.links, warmup=False) as real:
        t0 = time.perf_counter()
        real.reset(plans[0], state)
        install_s = time.perf_counter() - t0
        for k in range(2 * args.repeats):
            old, new = plans[k % 2], plans[(k + 1) % 2]
            rep = real.apply(new, state)
            pred = surrogate.migration(old, new, state)
            rows.append(
                {
                    "direction": "initial -> policy" if k % 2 == 0 else "policy -> initial",
                    "bytes_peer": rep.bytes_peer,
                    "bytes_local": rep.bytes_local,
                    "bytes_cloud": rep.bytes_cloud,
                    "time_s": rep.time_s,
                    "pred_time_s": pred.time_s,
                    "pred_bytes_total": pred.bytes_total,
                    "phase_s": getattr(real, "last_migration_phases", None),  # None: session 9's server code
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    ratio = [r["time_s"] / r["pred_time_s"] for r in rows if r["pred_time_s"] > 0]
    goodput = [(r["bytes_peer"] + r["bytes_local"] + r["bytes_cloud"]) / r["time_s"] / 1e9 for r in rows]
    return {
        "scenario": str(args.scenario),
        "lan_gbps": args.lan_gbps,
        "links": args.links,
        "policy": args.policy,
        "device": args.device,
        "install_s": install_s,
        "median_measured_over_predicted": statistics.median(ratio) if ratio else None,
        "median_goodput_gbs": statistics.median(goodput),
        "rows": rows,
    }


COMMANDS = {
    "ctxswitch": ctxswitch,
    "floor": floor,
    "parity": parity,
    "exchange": exchange,
    "saturate": saturate,
    "migrate": migrate,
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cmd", choices=(*COMMANDS, "pstats", "table"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--dir", default=".")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--scenario", default="paper-2server-1gpu")
    p.add_argument("--engine-step-ms", type=float, default=3.85)
    p.add_argument("--tokens", type=int, default=50, help="floor: decode steps sampled")
    p.add_argument("--batch", type=int, default=1, help="floor: sequences per decode step")
    p.add_argument("--variants", nargs="*", default=None, help="parity / table: the variants (default: all)")
    p.add_argument("--model", default=None, help="saturate: a model preset instead of the scenario's (tiny-moe)")
    p.add_argument("--tag", default="", help="saturate: the result file's tag")
    p.add_argument("--job", default="2srv-app", help="saturate: a bench_testbed job (scenario, links)")
    p.add_argument("--clients", type=int, default=64, help="saturate: closed-loop clients per client server")
    p.add_argument("--client-servers", type=int, nargs="+", default=[0], help="saturate: servers with clients")
    p.add_argument("--per-client", type=int, default=2, help="saturate: requests each client sends in turn")
    p.add_argument("--batched-tokens", type=int, default=0, help="saturate: max_num_batched_tokens (0: scenario)")
    p.add_argument("--links", default="none", help="migrate: the real backend's link mode (none, app, netns)")
    p.add_argument("--lan-gbps", type=float, default=None, help="migrate: replaces the topology's bandwidth")
    p.add_argument("--policy", default="static_linear", help="migrate: the policy whose first plan is applied")
    p.add_argument("--hardware", default="h200", help="migrate: the surrogate's hardware profile")
    p.add_argument("--repeats", type=int, default=2, help="migrate: plan changes each way")
    p.add_argument("--seed", type=int, default=0, help="migrate: scenario, state and policy seed")
    args = p.parse_args(argv)
    if args.cmd == "pstats":
        print(pstats_top(args))
        return
    if args.cmd == "table":
        print(measured_table(args.dir, args.variants or []))
        return
    res = COMMANDS[args.cmd](args)
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        name = f"shm_{args.device}" if args.cmd == "exchange" else args.cmd
        if args.cmd == "saturate":
            name = f"saturate_{args.tag or args.job}_b{args.batch}_c{args.clients}"
        if args.cmd == "migrate":
            name = f"migrate_{args.tag or args.links}"
        (Path(args.out) / f"{name}.json").write_text(json.dumps(res, indent=1))
        if args.cmd == "exchange":
            (Path(args.out) / f"{name}.md").write_text(exchange_md(res))


if __name__ == "__main__":
    main()
