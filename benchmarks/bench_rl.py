"""Training throughput of the default agent: SB3 PPO (conf/agent/ppo.yaml) on the default training env (conf/train.yaml:
8 subprocess envs, the `knobs` wrapper over train.yaml's base (tuned CoEL: tuned first, untimed), `plan` not
observed, VecNormalize; env group conf/env/knobs.yaml on paper-testbed), frames (env steps) per second of
`model.learn`, setup excluded.

Usage: .venv/bin/python -m benchmarks.bench_rl [--rollouts 3] [--n-envs 8] [--vec-env subproc]
Writes benchmarks/results/rl_speed.json and rl_speed.md. Run it with PYTHONPATH at an export of another revision
(`git archive REV | tar -x -C DIR`) to time that revision the same way (it imports coel_env and agents from there).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

RESULTS = Path(__file__).resolve().parent / "results"
CONF = Path(__file__).resolve().parents[1] / "conf"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rollouts", type=int, default=3, help="PPO rollouts (n_steps * n_envs frames each) timed")
    ap.add_argument("--n-envs", type=int, default=8)
    ap.add_argument("--vec-env", default="subproc")
    ap.add_argument("--out", default="rl_speed")
    args = ap.parse_args()
    import coel_env
    from agents.knobs import resolve_knobs
    from agents.sb3 import make_algorithm, make_training_env
    from coel_env.atomic import atomic_write_json, atomic_write_text

    train = OmegaConf.load(CONF / "train.yaml")
    env = OmegaConf.merge(OmegaConf.load(CONF / "env" / "default.yaml"), OmegaConf.load(CONF / "env" / "knobs.yaml"))
    env.pop("defaults", None)
    kwargs = dict(OmegaConf.to_container(env, resolve=True), scenario="paper-testbed", backend="surrogate")
    agent = OmegaConf.load(CONF / "agent" / "ppo.yaml")
    torch.set_num_threads(int(train.torch_threads))
    tuning = OmegaConf.to_container(OmegaConf.load(CONF / "tuning" / "default.yaml"))
    knobs, _ = resolve_knobs(train.knobs, kwargs, tuning)  # a tuned base: tuned first (setup, not timed)
    venv = make_training_env(
        kwargs, args.n_envs, 0, args.vec_env, bool(train.normalize_obs), knobs, tuple(train.obs_exclude)
    )
    model = make_algorithm(agent, venv, 0)
    frames = int(agent.kwargs.n_steps) * args.n_envs
    model.learn(frames)  # warm-up: subprocess start, numba caches, torch
    t0 = time.perf_counter()
    model.learn(args.rollouts * frames, reset_num_timesteps=False)
    dt = time.perf_counter() - t0
    venv.close()
    rate = args.rollouts * frames / dt
    res = {
        "frames_per_s": rate,
        "frames": args.rollouts * frames,
        "seconds": dt,
        "n_envs": args.n_envs,
        "vec_env": args.vec_env,
        "knobs": train.knobs,
        "coel_env": str(Path(coel_env.__file__).parent),
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / f"{args.out}.json", res)
    atomic_write_text(
        RESULTS / f"{args.out}.md",
        "# SB3 PPO training throughput (default agent)\n\n"
        f"{res['time']}, {res['cpus']} CPUs, 1-min load average {res['load_avg_1m']:.2f}: "
        f"{rate:,.0f} frames/s ({res['frames']} frames in {dt:.1f} s, {args.n_envs} {args.vec_env} envs, "
        f"knobs={train.knobs}), coel_env from {res['coel_env']}.\n",
    )
    print(f"{rate:,.1f} frames/s")


if __name__ == "__main__":
    main()
