"""cProfile of CoEL-v0 stepping with random actions (the top functions by own time), written to
benchmarks/results/speed_profile.md.

Usage: .venv/bin/python -m benchmarks.profile_env [--steps 2000] [--spaces full edit] [--scenario NAME] [--stub]
(--stub adds, per space, a profile with the surrogate's serve stubbed as bench_env's `env overhead` rows do: the
environment's own cost.)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time
from pathlib import Path

import coel_env.env
from benchmarks.bench_env import stub_serve
from coel_env.atomic import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def profile(space: str, scenario: str, steps: int, top: int, stub: bool = False) -> tuple[float, str]:
    env = coel_env.env.CoELEnv(scenario=scenario, action_space=space, info_action_mask=False)
    if stub:
        stub_serve(env.core)
    env.reset(seed=0)
    env.action_space.seed(0)
    pool = [env.action_space.sample() for _ in range(32)]
    for k in range(20):  # warm-up (numba caches)
        env.step(pool[k % 32])

    def run() -> None:
        for k in range(steps):
            out = env.step(pool[k % 32])
            if out[2] or out[3]:
                env.reset()

    t0 = time.perf_counter()
    run()
    rate = steps / (time.perf_counter() - t0)
    prof = cProfile.Profile()
    prof.runcall(run)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    text = buf.getvalue()
    text = text[text.index("   ncalls") :].rstrip() if "   ncalls" in text else text
    return rate, text.replace(str(Path(coel_env.__file__).resolve().parents[1]) + "/", "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--spaces", nargs="+", default=["full", "edit"])
    ap.add_argument("--scenario", default="paper-testbed")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--stub", action="store_true", help="also profile each space with the serve stubbed")
    args = ap.parse_args()
    cmd = "python -m benchmarks.profile_env " + " ".join(
        [f"--steps {args.steps}", "--spaces " + " ".join(args.spaces), f"--scenario {args.scenario}"]
        + ["--stub"] * args.stub
    )
    lines = [
        "# CoEL-v0 step profile (random actions, cProfile, top functions by own time)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} CPUs, 1-min load average {os.getloadavg()[0]:.2f} "
        "(other jobs share this machine). Command: `" + cmd + "`",
        "",
    ]
    runs = [(space, stub) for space in args.spaces for stub in ((False, True) if args.stub else (False,))]
    for space, stub in runs:
        rate, text = profile(space, args.scenario, args.steps, args.top, stub)
        what = ", env overhead (serve stubbed)" if stub else ""
        lines += [f"## {args.scenario}, `{space}`{what}: {rate:,.0f} steps/s without the profiler", ""]
        lines += ["```", text, "```", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "speed_profile.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
