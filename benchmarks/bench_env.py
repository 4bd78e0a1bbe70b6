"""Random-action step rate of CoEL-v0 against Gymnasium's CartPole-v1, measured in the same run (medians).

Usage: .venv/bin/python benchmarks/bench_env.py [--trial-s 1.0] [--trials 5] [--quick]
Writes benchmarks/results/env.json and env.md. Actions come from a pre-sampled pool of random (unmasked) actions
so that sampling a 90k-dimensional MultiDiscrete does not count; episodes reset when they end. Envs are stepped
unwrapped (no checker/order wrappers) for both CoEL and CartPole. `env overhead` rows stub the backend's serve
(replaying one fixed metrics result) to show the environment's own cost per step, separately from the surrogate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import gymnasium as gym

import coel_env  # noqa: F401
from coel_env.env import CoELEnv
from coel_env.env.vector import CoELVectorEnv

RESULTS = Path(__file__).resolve().parent / "results"


def rate(step, n_per_call: int, trial_s: float, trials: int) -> list[float]:
    for _ in range(3):
        step()
    out = []
    for _ in range(trials):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < trial_s:
            step()
            n += 1
        out.append(n * n_per_call / (time.perf_counter() - t0))
    return out


def single_stepper(env, pool_size: int = 32, seed: int = 0):
    env.reset(seed=seed)
    env.action_space.seed(seed)
    pool = [env.action_space.sample() for _ in range(pool_size)]
    k = [0]

    def step():
        _, _, term, trunc, _ = env.step(pool[k[0] % pool_size])
        k[0] += 1
        if term or trunc:
            env.reset()
    return step


def vector_stepper(venv, pool_size: int = 8, seed: int = 0):
    venv.reset(seed=seed)
    venv.action_space.seed(seed)
    pool = [venv.action_space.sample() for _ in range(pool_size)]
    k = [0]

    def step():
        venv.step(pool[k[0] % pool_size])
        k[0] += 1
    return step


def stub_serve(core) -> None:
    fields = core._serve()
    core._serve = lambda: {key: v.copy() for key, v in fields.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trial-s", type=float, default=1.0)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one short trial each (smoke test)")
    args = ap.parse_args()
    trial_s, trials = (0.2, 1) if args.quick else (args.trial_s, args.trials)
    rows = []

    def record(name, scenario, envs, rates, note=""):
        med = statistics.median(rates)
        rows.append({"name": name, "scenario": scenario, "num_envs": envs, "median_steps_per_s": med,
                     "trials": rates, "note": note})
        print(f"{name:<44} {scenario:<15} N={envs:<3} median {med:10.1f} env-steps/s", flush=True)

    cart = gym.make("CartPole-v1").unwrapped
    record("CartPole-v1 (unwrapped)", "-", 1, rate(single_stepper(cart, 256), 1, trial_s, trials))
    for space in ("full", "edit", "threshold"):
        env = CoELEnv(scenario="paper-testbed", action_space=space, info_action_mask=space != "full")
        record(f"CoEL-v0 {space}", "paper-testbed", 1, rate(single_stepper(env), 1, trial_s, trials),
               "info_action_mask off" if space == "full" else "")
    env = CoELEnv(scenario="paper-testbed", action_space="full")
    record("CoEL-v0 full + info action_mask", "paper-testbed", 1, rate(single_stepper(env), 1, trial_s, trials))
    for space in ("full", "edit"):
        env = CoELEnv(scenario="paper-testbed", action_space=space, info_action_mask=False)
        stub_serve(env.core)
        record(f"CoEL-v0 {space}: env overhead (serve stubbed)", "paper-testbed", 1,
               rate(single_stepper(env), 1, trial_s, trials), "not a CoEL step rate: the surrogate is replaced")
    for n in (64,):
        venv = CoELVectorEnv(n, scenario="paper-testbed", action_space="full")
        record("CoELVectorEnv full (native batch)", "paper-testbed", n, rate(vector_stepper(venv), n, trial_s, trials))
        venv = CoELVectorEnv(n, scenario="paper-testbed", action_space="full")
        stub_serve(venv.core)
        record("CoELVectorEnv full: env overhead (serve stubbed)", "paper-testbed", n,
               rate(vector_stepper(venv), n, trial_s, trials), "not a CoEL step rate: the surrogate is replaced")
    for space in ("edit", "full"):
        env = CoELEnv(scenario="deepseek-scale", action_space=space, info_action_mask=False)
        record(f"CoEL-v0 {space}", "deepseek-scale", 1, rate(single_stepper(env, 4), 1, max(trial_s, 2.0), trials))
    env = CoELEnv(scenario="deepseek-scale", action_space="edit", info_action_mask=False)
    stub_serve(env.core)
    record("CoEL-v0 edit: env overhead (serve stubbed)", "deepseek-scale", 1,
           rate(single_stepper(env, 4), 1, trial_s, trials), "not a CoEL step rate: the surrogate is replaced")

    cart_rate = rows[0]["median_steps_per_s"]
    for r in rows:
        r["step_time_vs_cartpole"] = cart_rate / r["median_steps_per_s"] * r["num_envs"] / r["num_envs"]
    targets = {
        "paper-testbed single >= 10k steps/s": rows[1]["median_steps_per_s"] >= 1e4,
        "paper-testbed single step time <= 6x CartPole": rows[1]["step_time_vs_cartpole"] <= 6,
        "native vector (64 envs) >= 100k env-steps/s": next(r for r in rows if r["name"].startswith(
            "CoELVectorEnv full (native"))["median_steps_per_s"] >= 1e5,
        "deepseek-scale single >= 1k steps/s": max(r["median_steps_per_s"] for r in rows
                                                   if r["scenario"] == "deepseek-scale" and "overhead" not in
                                                   r["name"]) >= 1e3,
    }
    meta = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0], "trial_s": trial_s, "trials": trials,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "env.json").write_text(json.dumps({"meta": meta, "rows": rows, "targets_met": targets}, indent=1))
    lines = ["# CoEL-v0 step rate (random actions, medians)", "",
             f"{meta['time']}, Python {meta['python']}, {meta['cpus']} CPUs, 1-min load average "
             f"{meta['load_avg_1m']:.2f} (other jobs share this machine), {trials} trials x {trial_s} s.", "",
             "| benchmark | scenario | envs | median env-steps/s | step time vs CartPole |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['scenario']} | {r['num_envs']} | {r['median_steps_per_s']:,.0f} | "
                     f"{r['step_time_vs_cartpole']:.1f}x |")
    lines += ["", "Targets (issue 3):", ""] + [f"- {k}: {'met' if v else 'NOT met'}" for k, v in targets.items()]
    lines += ["", "`env overhead` rows replace the surrogate's serve with a replayed result: they measure the "
              "environment's own cost (decode, repair, dynamics, faults, perception, observation, reward), not "
              "a CoEL step rate."]
    (RESULTS / "env.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-8:]))


if __name__ == "__main__":
    main()
