"""The seed paper's three testbed experiments (DESIGN.md §3) on the real backend, next to the surrogate's curves.

Each GPU group is one "server" process (RealBackend: NCCL between servers, the 1 Gb/s LAN emulated by the
application-level LinkShaper, or the raw link with `links=none`); full Qwen1.5-MoE-A2.7B architecture with random
bf16 weights; the uniform (vLLM-style) plan; one request at a time, sent to server 1, greedy decoding.
(a)/(b): throughput and latency vs output length at input 128 (1 server with 2 GPUs vs 2 servers with 1 GPU);
(c): latency vs input length at output 128 (2 vs 3 servers).

    # on a GPU host (one instance per GPU group; CUDA_VISIBLE_DEVICES picks the group), partial CSV always written:
    python -m benchmarks.bench_testbed measure --jobs 1srv-2gpu:ab 2srv-raw:ab --budget-s 200 --out $OUT --tag A
    # here (CPU): the surrogate's curves, then plots + comparison table from the measured CSVs
    python -m benchmarks.bench_testbed surrogate --out benchmarks/results/testbed
    python -m benchmarks.bench_testbed report --out benchmarks/results/testbed
    # CPU smoke test of the whole path (gloo, tiny model, short lengths)
    python -m benchmarks.bench_testbed measure --model tiny-moe --device cpu --jobs 2srv-app:ab --output-lens 4 8 \
        --input-lens 4 8 --fixed-len 8 --budget-s 60 --out /tmp/tb --tag cpu
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import numpy as np

from coel_env.atomic import atomic_write_text
from experiments.results_io import save_png, write_csv

for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)  # NVLink multicast stays off (inherited by the server processes)

JOBS = {  # name -> (scenario, links)
    "1srv-2gpu": ("paper-1server-2gpu", "app"),
    "2srv-app": ("paper-2server-1gpu", "app"),
    "2srv-raw": ("paper-2server-1gpu", "none"),
    "3srv-app": ("paper-3server-1gpu", "app"),
    "3srv-raw": ("paper-3server-1gpu", "none"),
}
LENS = [64, 128, 256, 512, 1024, 2048]
FIELDS = [
    "job",
    "scenario",
    "links",
    "sweep",
    "batch",
    "input_len",
    "output_len",
    "status",
    "latency_s",
    "tok_s",
    "batch_tok_s",
    "ttft_s",
    "tpot_s",
    "wall_s",
    "comm_wait_s",
    "link_bytes",
    "note",
]
OUT_DIR = Path(__file__).resolve().parent / "results" / "testbed"


def scenario_spec(name: str, model: str | None = None, gpu: str | None = None, max_batch: int | None = None):
    """The scenario's spec, optionally with another model preset, every GPU replaced by `gpu`, or another batch cap."""
    from coel_env.specs import load_scenario_spec, model_preset

    spec = load_scenario_spec(name)
    if not (model or gpu or max_batch):
        return spec
    d = spec.model_dump()
    if max_batch:
        d["workload"]["max_batch"] = max_batch
    if model:
        d["model"] = model_preset(model).model_dump()
    if gpu:
        for s in d["servers"]:
            s["gpus"] = [gpu] * len(s["gpus"])
    return load_scenario_spec(d)


def sweep_points(sweep: str, output_lens: list[int], input_lens: list[int], fixed: int) -> list[tuple[int, int]]:
    """(input_len, output_len) of a sweep: 'ab' varies the output at input `fixed`, 'c' the input at output `fixed`."""
    if sweep == "ab":
        return [(fixed, o) for o in output_lens]
    if sweep == "c":
        return [(i, fixed) for i in input_lens]
    raise SystemExit(f"error: sweep '{sweep}' unknown; allowed: ab, c")


class Estimator:
    """Conservative time of a point from the points already run: ttft scales with input, tpot is the worst seen."""

    def __init__(self, startup_s: float = 0.0):
        self.obs: list[tuple[int, float, float]] = []  # (input_len, ttft_s, tpot_s)
        self.startup_s = startup_s

    def add(self, n_in: int, ttft: float, tpot: float) -> None:
        self.obs.append((n_in, ttft, tpot))

    def __call__(self, n_in: int, n_out: int) -> float:
        if not self.obs:
            return 0.0
        big = max(self.obs)
        ttft = big[1] * max(1.0, n_in / big[0])
        tpot = max(o[2] for o in self.obs)
        return 1.2 * (ttft + tpot * n_out) + 2.0


class Writer:
    """Appends rows to a CSV (flushed per row, so a killed run leaves what it measured)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "w", newline="")  # noqa: SIM115 (closed in close())
        self.w = csv.DictWriter(self.f, fieldnames=FIELDS)
        self.w.writeheader()
        self.f.flush()

    def row(self, **kw) -> None:
        self.w.writerow({k: kw.get(k, "") for k in FIELDS})
        self.f.flush()
        print("row", {k: kw.get(k) for k in FIELDS if kw.get(k, "") != ""}, flush=True)

    def close(self) -> None:
        self.f.close()


def make_request(backend, state, n_in: int, n_out: int, rid: int, rng: np.random.Generator) -> dict:
    prompt = rng.integers(0, backend.cfg.vocab_size, n_in)
    routes = backend.routing.sample(state.domain_mix[0], n_in + n_out - 1, rng).astype(np.int16)
    return {"rid": rid, "arrival": 0.0, "max_new": n_out, "prompt": prompt, "routes": routes, "server": 0}


def run_job(job: str, sweep: str, points: list[tuple[int, int]], writer: Writer, deadline: float, args) -> None:
    """Start the job's server processes, warm up, then run the points in order while the budget allows."""
    from coel_env.plan.deployment import DeploymentPlan
    from coel_env.world.state import Scenario
    from real_backend.backend import RealBackend, ServerError

    scen_name, links = JOBS[job]
    base = dict(job=job, scenario=scen_name, links=links, sweep=sweep, batch=args.batch)

    def skip(pts, note):
        for n_in, n_out in pts:
            writer.row(**base, input_len=n_in, output_len=n_out, status="skipped", note=note)

    if deadline - time.monotonic() < args.min_job_s:
        skip(points, "budget: job not started")
        return
    scenario = Scenario(scenario_spec(scen_name, args.model, max_batch=args.batch), seed=args.seed)
    c = scenario.cluster
    plan = DeploymentPlan.uniform(c)
    state = scenario.initial_state(np.random.default_rng(args.seed))
    rng = np.random.default_rng(args.seed)
    t0 = time.monotonic()
    backend = RealBackend(
        c,
        seed=args.seed,
        device=args.device,
        links=links,
        timeout_s=args.timeout_s,
        start_timeout_s=max(deadline - t0, 30.0),
        measure_quality=False,
        gen_device="cuda" if args.device == "cuda" else "cpu",
    )
    done = 0
    try:
        backend.reset(plan, state)
        rid = 1
        backend.serve_requests(
            plan,
            state,
            [[make_request(backend, state, 16, 8, rid, rng)]] + [[] for _ in range(c.num_servers - 1)],
            60.0,
        )  # warm-up (NCCL links, kernels)
        print(f"{job}: servers up and warm in {time.monotonic() - t0:.1f} s", flush=True)
        est = Estimator()
        for n_in, n_out in points:
            rid += 1
            left = deadline - time.monotonic()
            need = est(n_in, n_out)
            if need > left:
                skip(points[done:], f"budget: needs ~{need:.0f} s, {left:.0f} s left")
                return
            backend.timeout_s = max(left, 10.0)
            batch = [make_request(backend, state, n_in, n_out, rid + b, rng) for b in range(args.batch)]
            rid += args.batch - 1
            reqs = [batch] + [[] for _ in range(c.num_servers - 1)]
            t1 = time.perf_counter()
            m = backend.serve_requests(plan, state, reqs, 60.0)
            wall = time.perf_counter() - t1
            d = backend.last_details
            n_tok = sum(len(d["tokens"][q["rid"]]) for q in batch)
            status = "ok" if n_tok == n_out * args.batch else "short"
            writer.row(
                **base,
                input_len=n_in,
                output_len=n_out,
                status=status,
                latency_s=m.e2e_mean_s,
                tok_s=m.request_tokens_per_s,
                ttft_s=m.ttft_mean_s,
                batch_tok_s=n_tok / max(d["makespan_s"], 1e-9),
                tpot_s=m.tpot_mean_s,
                wall_s=wall,
                comm_wait_s=d["comm_wait_s"][0],
                link_bytes=float(np.sum(m.link_bytes)),
            )
            est.add(n_in, m.ttft_mean_s, m.tpot_mean_s)
            done += 1
    except ServerError as exc:
        print(f"{job}: {exc}", flush=True)
        skip(points[done : done + 1], f"error: {str(exc)[:160]}")
        skip(points[done + 1 :], "not run after an error")
    finally:
        backend.close()


def cmd_measure(args) -> None:
    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    out = Path(args.out)
    writer = Writer(out / f"measured_{args.tag}.csv")
    try:
        for spec in args.jobs:
            job, _, sweep = spec.partition(":")
            if job not in JOBS:
                raise SystemExit(f"error: job '{job}' unknown; allowed: {', '.join(JOBS)}")
            pts = sweep_points(sweep or "ab", args.output_lens, args.input_lens, args.fixed_len)
            run_job(job, sweep or "ab", pts, writer, deadline, args)
    finally:
        writer.close()
    print(f"measure {args.tag}: {time.monotonic() - t_start:.1f} s", flush=True)


def surrogate_rows(
    output_lens: list[int],
    input_lens: list[int],
    fixed: int,
    model: str | None = None,
    gpus: tuple[str, ...] = ("rtx4090d", "h200"),
) -> list[dict]:
    """The surrogate's curves (experiments.reproduce_paper.measure) for the paper's GPUs and for this testbed's."""
    from omegaconf import OmegaConf

    from experiments.reproduce_paper import measure

    cfg = OmegaConf.create({"seed": 0, "hardware": None, "plan": "uniform"})
    rows = []
    todo = [("1srv-2gpu", "ab"), ("2srv-app", "ab"), ("2srv-app", "c"), ("3srv-app", "c")]
    for gpu in gpus:
        for job, sweep in todo:
            spec = scenario_spec(JOBS[job][0], model, gpu)
            for n_in, n_out in sweep_points(sweep, output_lens, input_lens, fixed):
                r = measure(spec, n_in, n_out, cfg)
                rows.append(
                    {
                        "gpu": gpu,
                        "job": job,
                        "sweep": sweep,
                        "input_len": n_in,
                        "output_len": n_out,
                        "latency_s": r["latency_s"],
                        "tok_s": r["tok_s"],
                        "ttft_s": r["ttft_s"],
                        "tpot_s": r["tpot_s"],
                    }
                )
    return rows


def cmd_surrogate(args) -> None:
    rows = surrogate_rows(args.output_lens, args.input_lens, args.fixed_len, args.model)
    path = Path(args.out) / "surrogate.csv"
    write_csv(path, rows)
    print(f"wrote {path} ({len(rows)} rows)")


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load_results(out: Path) -> tuple[list[dict], list[dict]]:
    measured = [r for p in sorted(out.glob("measured_*.csv")) for r in _read(p)]
    surrogate = _read(out / "surrogate.csv") if (out / "surrogate.csv").exists() else []
    return measured, surrogate


def comparison(measured: list[dict], surrogate: list[dict]) -> list[dict]:
    """Measured points joined with the surrogate's prediction (H200 and RTX 4090D) of the same configuration."""
    sur = {(r["gpu"], r["job"], r["sweep"], int(r["input_len"]), int(r["output_len"])): r for r in surrogate}
    rows = []
    for m in measured:
        if m["status"] not in ("ok", "short"):
            continue
        key = (m["job"].replace("-raw", "-app"), m["sweep"], int(m["input_len"]), int(m["output_len"]))
        row = {
            "job": m["job"],
            "sweep": m["sweep"],
            "input_len": int(m["input_len"]),
            "output_len": int(m["output_len"]),
            "latency_s": float(m["latency_s"]),
            "tok_s": float(m["tok_s"]),
        }
        for gpu in ("h200", "rtx4090d"):
            s = sur.get((gpu, *key))
            row[f"pred_{gpu}_latency_s"] = float(s["latency_s"]) if s else float("nan")
            row[f"ratio_{gpu}"] = row["latency_s"] / row[f"pred_{gpu}_latency_s"] if s else float("nan")
        rows.append(row)
    return rows


def comparison_md(rows: list[dict], measured: list[dict]) -> str:
    lines = [
        "| config | sweep | in | out | measured latency (s) | measured tok/s | surrogate H200 (s) | "
        "measured / H200 | surrogate 4090D (s) | measured / 4090D |",
        "|" + " --- |" * 4 + " ---: |" * 6,
    ]
    for r in sorted(rows, key=lambda r: (r["sweep"], r["job"], r["input_len"], r["output_len"])):
        lines.append(
            f"| {r['job']} | {r['sweep']} | {r['input_len']} | {r['output_len']} | {r['latency_s']:.3f} | "
            f"{r['tok_s']:.1f} | {r['pred_h200_latency_s']:.3f} | {r['ratio_h200']:.2f} | "
            f"{r['pred_rtx4090d_latency_s']:.3f} | {r['ratio_rtx4090d']:.2f} |"
        )
    ran = {(r["job"], r["sweep"], r["input_len"], r["output_len"]) for r in rows}
    miss = [
        m
        for m in measured
        if m["status"] not in ("ok", "short")
        and (m["job"], m["sweep"], int(m["input_len"]), int(m["output_len"])) not in ran
    ]
    if miss:
        lines += [
            "",
            "Not run: "
            + "; ".join(
                f"{m['job']} {m['sweep']} in {m['input_len']} out {m['output_len']} ({m['note']})" for m in miss
            ),
        ]
    return "\n".join(lines) + "\n"


def plot(measured: list[dict], surrogate: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    panels = [
        (
            "ab",
            "output_len",
            "tok_s",
            "generation throughput (tokens/s)",
            "(a) throughput vs output (input 128)",
            ["1srv-2gpu", "2srv-app", "2srv-raw"],
        ),
        (
            "ab",
            "output_len",
            "latency_s",
            "end-to-end latency (s)",
            "(b) latency vs output (input 128)",
            ["1srv-2gpu", "2srv-app", "2srv-raw"],
        ),
        (
            "c",
            "input_len",
            "latency_s",
            "end-to-end latency (s)",
            "(c) latency vs input (output 128)",
            ["2srv-app", "3srv-app"],
        ),
    ]
    colors = {"1srv-2gpu": "C0", "2srv-app": "C1", "2srv-raw": "C2", "3srv-app": "C3"}
    for ax, (sweep, xk, yk, ylab, title, jobs) in zip(axes, panels):
        for job in jobs:
            pts = sorted(
                (int(r[xk]), float(r[yk]))
                for r in measured
                if r["job"] == job and r["sweep"] == sweep and r["status"] in ("ok", "short")
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", color=colors[job], label=f"{job} measured (H200)")
            for gpu, ls in (("h200", "--"), ("rtx4090d", ":")):
                sp = sorted(
                    (int(r[xk]), float(r[yk]))
                    for r in surrogate
                    if r["job"] == job and r["sweep"] == sweep and r["gpu"] == gpu
                )
                if sp:
                    ax.plot(*zip(*sp), ls=ls, color=colors[job], alpha=0.8, label=f"{job} surrogate {gpu}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xk.replace("_", " "))
        ax.set_ylabel(ylab)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5)
    fig.suptitle("Seed-paper experiments: real backend on H200s (1 Gb/s app-shaped LAN) vs the surrogate")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def cmd_report(args) -> None:
    out = Path(args.out)
    measured, surrogate = load_results(out)
    if not measured:
        print(f"report: no measured_*.csv in {out}; nothing to do")
        return
    rows = comparison(measured, surrogate)
    atomic_write_text(out / "comparison.md", comparison_md(rows, measured))
    plot(measured, surrogate, out / "testbed.png")
    print(f"wrote {out / 'comparison.md'} and {out / 'testbed.png'}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cmd", nargs="?", default="report", choices=("measure", "surrogate", "report"))
    p.add_argument("--out", default=str(OUT_DIR))
    p.add_argument(
        "--jobs",
        nargs="+",
        default=["1srv-2gpu:ab", "2srv-app:ab", "2srv-app:c", "3srv-app:c"],
        help=f"job:sweep, job in {', '.join(JOBS)}, sweep ab or c",
    )
    p.add_argument("--tag", default="run")
    p.add_argument("--model", default=None, help="model preset instead of the scenario's (e.g. tiny-moe)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--output-lens", type=int, nargs="+", default=LENS)
    p.add_argument("--input-lens", type=int, nargs="+", default=LENS)
    p.add_argument("--fixed-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=1, help="requests sent together to server 0 (one continuous batch)")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of this measure run")
    p.add_argument("--min-job-s", type=float, default=20.0, help="do not start a job with less budget left")
    p.add_argument("--timeout-s", type=float, default=120.0, help="server hang timeout (NCCL too)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    {"measure": cmd_measure, "surrogate": cmd_surrogate, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
