"""Random-action step rate of CoEL-v0 against Gymnasium's CartPole-v1, measured in the same run (medians).

Usage: .venv/bin/python -m benchmarks.bench_env [--trial-s 1.0] [--trials 5] [--quick] [--baseline DIR]
(DIR from `python -m benchmarks.baseline HEAD DIR`: that revision is timed side by side, trials alternating)
Writes benchmarks/results/env.json and env.md. Actions come from a pre-sampled pool of random (unmasked) actions
so that sampling a 90k-dimensional MultiDiscrete does not count; episodes reset when they end. Envs are stepped
unwrapped (no checker/order wrappers) for both CoEL and CartPole. `env overhead` rows stub the backend's serve
(replaying one fixed metrics result) to show the environment's own cost per step, separately from the surrogate.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import gymnasium as gym

import coel_env
import coel_env.env
import coel_env.env.vector
from coel_env.atomic import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def stepper(env, pool_size: int, seed: int = 0, reset_at_end: bool = True):
    """A step function cycling through `pool_size` pre-sampled random actions of `env`; a single env is reset when
    its episode ends (`reset_at_end`; a vector env resets its own envs)."""
    env.reset(seed=seed)
    env.action_space.seed(seed)
    pool = [env.action_space.sample() for _ in range(pool_size)]
    k = [0]

    def step():
        out = env.step(pool[k[0] % pool_size])
        k[0] += 1
        if reset_at_end and (out[2] or out[3]):
            env.reset()

    return step


def stub_serve(core) -> None:
    fields = core._serve()
    core._serve = lambda: {key: v.copy() for key, v in fields.items()}


def _interleaved(steppers: list, n_per_call: int, trial_s: float, trials: int) -> list[list[float]]:
    """Rates of several steppers, trials alternating between them (fair under a shared, noisy machine)."""
    for step in steppers:
        for _ in range(3):
            step()
    out = [[] for _ in steppers]
    for _ in range(trials):
        for j, step in enumerate(steppers):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < trial_s:
                step()
                n += 1
            out[j].append(n * n_per_call / (time.perf_counter() - t0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trial-s", type=float, default=1.0)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one short trial each (smoke test)")
    ap.add_argument(
        "--baseline",
        default=None,
        help="an exported baseline (python -m benchmarks.baseline) to time side by side, trials alternating",
    )
    args = ap.parse_args()
    trial_s, trials = (0.2, 1) if args.quick else (args.trial_s, args.trials)
    pkgs = {"new": coel_env}
    if args.baseline:
        from benchmarks.baseline import load

        pkgs["baseline"] = load(args.baseline)
    rows = []

    def record(name, scenario, envs, rates, note=""):
        med = statistics.median(rates)
        rows.append(
            {
                "name": name,
                "scenario": scenario,
                "num_envs": envs,
                "median_steps_per_s": med,
                "trials": rates,
                "note": note,
            }
        )
        print(f"{name:<44} {scenario:<15} N={envs:<3} median {med:10.1f} env-steps/s", flush=True)

    def measure(name, scenario, envs, make, n_per_call=1, t_s=None, note=""):
        """make(pkg) -> step function; one row per package, trials interleaved."""
        steppers = [make(pkg) for pkg in pkgs.values()]
        rates = _interleaved(steppers, n_per_call, t_s or trial_s, trials)
        record(name, scenario, envs, rates[0], note)
        if len(rates) > 1:
            rows[-1]["baseline_median_steps_per_s"] = statistics.median(rates[1])
            rows[-1]["baseline_trials"] = rates[1]

    def single(space, scenario="paper-testbed", mask=False, stub=False, pool=32):
        def make(pkg):
            env = pkg.env.CoELEnv(scenario=scenario, action_space=space, info_action_mask=mask)
            if stub:
                stub_serve(env.core)
            return stepper(env, pool)

        return make

    def vector(n, stub=False):
        def make(pkg):
            import importlib

            venv = importlib.import_module(pkg.__name__ + ".env.vector").CoELVectorEnv(
                n, scenario="paper-testbed", action_space="full"
            )
            if stub:
                stub_serve(venv.core)
            return stepper(venv, 8, reset_at_end=False)

        return make

    cart = gym.make("CartPole-v1").unwrapped
    record("CartPole-v1 (unwrapped)", "-", 1, _interleaved([stepper(cart, 256)], 1, trial_s, trials)[0])
    for space in ("full", "edit", "threshold"):
        measure(
            f"CoEL-v0 {space}",
            "paper-testbed",
            1,
            single(space, mask=space != "full"),
            note="info_action_mask off" if space == "full" else "",
        )
    measure("CoEL-v0 full + info action_mask", "paper-testbed", 1, single("full", mask=True))
    stub_note = "not a CoEL step rate: the surrogate is replaced"
    for space in ("full", "edit"):
        measure(
            f"CoEL-v0 {space}: env overhead (serve stubbed)",
            "paper-testbed",
            1,
            single(space, stub=True),
            note=stub_note,
        )
    for n in (64,):
        measure("CoELVectorEnv full (native batch)", "paper-testbed", n, vector(n), n_per_call=n)
        measure(
            "CoELVectorEnv full: env overhead (serve stubbed)",
            "paper-testbed",
            n,
            vector(n, stub=True),
            n_per_call=n,
            note=stub_note,
        )
    for space in ("edit", "full"):
        measure(f"CoEL-v0 {space}", "deepseek-scale", 1, single(space, "deepseek-scale", pool=4), t_s=max(trial_s, 2.0))
    measure(
        "CoEL-v0 edit: env overhead (serve stubbed)",
        "deepseek-scale",
        1,
        single("edit", "deepseek-scale", stub=True, pool=4),
        note=stub_note,
    )

    cart_rate = rows[0]["median_steps_per_s"]
    for r in rows:
        r["step_time_vs_cartpole"] = cart_rate / r["median_steps_per_s"] * r["num_envs"] / r["num_envs"]
    targets = {
        "paper-testbed single >= 10k steps/s": rows[1]["median_steps_per_s"] >= 1e4,
        "paper-testbed single step time <= 25x CartPole": rows[1]["step_time_vs_cartpole"] <= 25,
        "native vector (64 envs) >= 100k env-steps/s": next(
            r for r in rows if r["name"].startswith("CoELVectorEnv full (native")
        )["median_steps_per_s"]
        >= 1e5,
        "deepseek-scale single >= 1k steps/s": max(
            r["median_steps_per_s"] for r in rows if r["scenario"] == "deepseek-scale" and "overhead" not in r["name"]
        )
        >= 1e3,
    }
    meta = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "trial_s": trial_s,
        "trials": trials,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "baseline": args.baseline,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "env.json", {"meta": meta, "rows": rows, "targets_met": targets})
    lines = [
        "# CoEL-v0 step rate (random actions, medians)",
        "",
        f"{meta['time']}, Python {meta['python']}, {meta['cpus']} CPUs, 1-min load average "
        f"{meta['load_avg_1m']:.2f} (other jobs share this machine), {trials} trials x {trial_s} s.",
        "",
        "| benchmark | scenario | envs | median env-steps/s | step time vs CartPole | baseline median | "
        "speedup vs baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = r.get("baseline_median_steps_per_s")
        extra = f"{base:,.0f} | {r['median_steps_per_s'] / base:.2f}x" if base else "- | -"
        lines.append(
            f"| {r['name']} | {r['scenario']} | {r['num_envs']} | {r['median_steps_per_s']:,.0f} | "
            f"{r['step_time_vs_cartpole']:.1f}x | {extra} |"
        )
    lines += ["", "Targets (issue 14):", ""] + [f"- {k}: {'met' if v else 'NOT met'}" for k, v in targets.items()]
    lines += [
        "",
        "`env overhead` rows replace the surrogate's serve with a replayed result: they measure the "
        "environment's own cost (decode, repair, dynamics, faults, perception, observation, reward), not "
        "a CoEL step rate.",
    ]
    atomic_write_text(RESULTS / "env.md", "\n".join(lines) + "\n")
    print("\n".join(lines[-8:]))


if __name__ == "__main__":
    main()
