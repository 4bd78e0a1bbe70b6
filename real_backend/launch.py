"""Serve one window of a fixed plan on the real backend and report it: a smoke test of a (multi-node) setup.

    python -m real_backend.launch --scenario tiny --out run.json                     # servers spawned on this host
    torchrun --nnodes=2 --nproc-per-node=2 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=smoke \\
        -m real_backend.launch --scenario tiny --out run.json                         # node 1: --nproc-per-node=1

The plan is the scenario's uniform plan, the requests are the backend's seeded first window (`--requests` per
server at most), so every launcher serves identical work: the generated tokens and the bytes per link must match.
Under torchrun only rank 0 (the driver) gets past the backend's constructor; it prints the summary and writes
`--out`. `--check-errors` then makes server 1 raise and records the ServerError the driver receives.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from coel_env import DeploymentPlan, Scenario
from coel_env.atomic import atomic_write_json
from coel_env.errors import CoELError
from coel_env.specs.bounds import MAX_SECONDS, Arg
from real_backend.backend import LAUNCHERS, LINK_MODES, RealBackend, ServerError


def run(
    scenario: str = "tiny",
    *,
    seed: int = 0,
    requests: int = 2,
    window_s: float = 4.0,
    links: str = "app",
    device: str = "cpu",
    timeout_s: float = 60.0,
    launcher: str = "auto",
    check_errors: bool = False,
) -> dict:
    """Reset to the uniform plan, serve the seeded first window; tokens per request id, bytes per link, metrics."""
    window_s = Arg(float, 0, MAX_SECONDS, open_low=True).check("window", window_s)
    sc = Scenario(scenario, seed=seed)
    state = sc.initial_state(np.random.default_rng(seed))
    plan = DeploymentPlan.uniform(sc.cluster)
    with RealBackend(
        sc.cluster,
        seed=seed,
        timeout_s=timeout_s,
        links=links,
        device=device,
        launcher=launcher,
        max_requests_per_server=requests,
    ) as backend:
        backend.reset(plan, state)
        reqs, arrived, dropped = backend.workload(plan, state, window_s)
        m = backend.serve_requests(plan, state, reqs, window_s, arrived, dropped)
        d = backend.last_details
        out = {
            "scenario": scenario,
            "seed": seed,
            "launcher": backend.launcher,
            "servers": sc.cluster.num_servers,
            "world_size": int(os.environ.get("WORLD_SIZE", sc.cluster.num_servers)),
            "pids": backend.pids(),
            "requests": {str(q["rid"]): int(s) for s, rs in enumerate(reqs) for q in rs},
            "tokens": {str(rid): [int(t) for t in toks] for rid, toks in d["tokens"].items()},
            "link_bytes": [float(x) for x in m.link_bytes],
            "tokens_to": d["tokens_to"],
            "rows_to": d["rows_to"],
            "metrics": m.to_dict(),
        }
        if check_errors:
            bad = [{"device": plan.device, "tier": plan.tier, "bits": plan.bits}] * sc.cluster.num_servers
            bad[1] = None  # server 1 raises TypeError inside its 'reset'
            try:
                backend._call("reset", bad)
                out["error"] = None
            except ServerError as e:
                out["error"] = str(e)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m real_backend.launch", description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="tiny", help="scenario name or YAML path (default: tiny)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--requests", type=int, default=2, help="at most this many requests per server (default: 2)")
    ap.add_argument("--window", type=float, default=4.0, help="window length in seconds (default: 4)")
    ap.add_argument("--links", default="app", choices=LINK_MODES)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--timeout", type=float, default=60.0, help="server timeout in seconds (default: 60)")
    ap.add_argument("--launcher", default="auto", choices=LAUNCHERS)
    ap.add_argument("--check-errors", action="store_true", help="also check that a server's exception reaches here")
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    a = ap.parse_args(argv)
    try:
        res = run(
            a.scenario,
            seed=a.seed,
            requests=a.requests,
            window_s=a.window,
            links=a.links,
            device=a.device,
            timeout_s=a.timeout,
            launcher=a.launcher,
            check_errors=a.check_errors,
        )
    except CoELError as e:  # a ServerError too: its first line (a server's traceback follows it in the message)
        raise SystemExit(f"error: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    m = res["metrics"]
    print(
        f"{res['scenario']}: {res['servers']} servers ({res['launcher']}), {len(res['tokens'])} requests served, "
        f"{m['tokens_per_s']:.1f} tokens/s, link bytes {[round(x) for x in res['link_bytes']]}"
    )
    if a.out:
        atomic_write_json(a.out, res)


if __name__ == "__main__":
    main()
