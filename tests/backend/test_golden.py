"""Golden outputs: the surrogate's metrics and migration reports on fixed plans and states, and CoEL-v0
trajectories under fixed seeds, recorded in `tests/data/golden.json`. A refactor keeps them; a physics change
regenerates them on purpose and says so in its commit:

    .venv/bin/python tests/backend/test_golden.py --write
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).parents[1] / "data" / "golden.json"
SCENARIOS = ("tiny", "paper-testbed", "metro-8", "moe2-heterogeneous")
ACTION_SPACES = ("full", "edit", "threshold")
STEPS = 4
RTOL = 1e-6


def _summary(d: dict) -> dict:
    """Scalars as they are; arrays as (sum, sum of squares, length) so the file stays small."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (list, np.ndarray)):
            a = np.asarray(v, dtype=np.float64)
            out[k] = [float(a.sum()), float((a**2).sum()), int(a.size)]
        elif isinstance(v, (bool, np.bool_)):
            out[k] = bool(v)
        elif isinstance(v, (int, float, np.integer, np.floating)):
            out[k] = float(v)
    return out


def _plans(cluster) -> dict:
    from coel_env import DeploymentPlan

    uni = DeploymentPlan.uniform(cluster)
    low = uni.copy()
    low.bits[low.device >= 0] = 4
    rep = uni.copy()
    rep.device[..., 1] = (rep.device[..., 0] + 1) % cluster.num_devices
    rep.tier[..., 1], rep.bits[..., 1] = 0, rep.bits[..., 0]
    comp = uni.copy()
    comp.prune[:], comp.fuse[:] = 0.4, True
    cpu = uni.copy()
    cpu.tier[::2, ::3, 0] = 1  # every third expert of every other layer in CPU RAM
    return {"uniform": uni, "all4bit": low, "replicated": rep, "compressed": comp, "cpu_tier": cpu}


def surrogate_cases() -> dict:
    from coel_env import SurrogateBackend, make_scenario

    out = {}
    for name in SCENARIOS:
        sc = make_scenario(name, seed=0)
        state = sc.initial_state(np.random.default_rng(0))
        plans = _plans(sc.cluster)
        for pname, plan in plans.items():
            backend = SurrogateBackend(sc.cluster)
            backend.reset(plans["uniform"], state)
            mig = backend.apply(plan, state)
            m = backend.serve(plan, state, window_s=30.0)
            out[f"{name}/{pname}"] = {"metrics": _summary(m.to_dict()), "migration": _summary(mig.to_dict())}
    return out


def env_cases() -> dict:
    import gymnasium as gym

    import coel_env  # noqa: F401  (registers CoEL-v0)

    out = {}
    for scenario in ("tiny", "paper-testbed"):
        for space in ACTION_SPACES:
            env = gym.make("CoEL-v0", scenario=scenario, action_space=space, reward_space="composite")
            env.reset(seed=7)
            env.action_space.seed(7)
            rows = []
            for _ in range(STEPS):
                _, r, term, trunc, info = env.step(env.action_space.sample())
                rows.append(
                    {
                        "reward": float(r),
                        "penalty": float(info["penalty"]),
                        "repaired": bool(info["repaired"]),
                        "e2e_p95_s": info["metrics"]["e2e_p95_s"],
                        "tokens_per_s": info["metrics"]["tokens_per_s"],
                        "migration_bytes": info["migration"]["bytes_total"],
                        "hello_bits": info["hello_bits"],
                    }
                )
                if term or trunc:
                    break
            env.close()
            out[f"{scenario}/{space}"] = rows
    venv = gym.make_vec(
        "CoEL-v0", num_envs=3, vectorization_mode="vector_entry_point", scenario="tiny", action_space="edit"
    )
    venv.reset(seed=11)
    venv.action_space.seed(11)
    rewards = [venv.step(venv.action_space.sample())[1].tolist() for _ in range(STEPS)]
    venv.close()
    out["vector/tiny/edit"] = rewards
    return out


def compute() -> dict:
    return {"surrogate": surrogate_cases(), "env": env_cases()}


def _assert_close(got, want, where: str) -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for k in want:
            _assert_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, bool):
        assert got == want, where
    else:
        assert got == pytest.approx(want, rel=RTOL, abs=1e-12), where


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def test_surrogate_metrics_and_migration_match_golden(golden):
    _assert_close(surrogate_cases(), golden["surrogate"], "surrogate")


def test_env_trajectories_match_golden(golden):
    _assert_close(env_cases(), golden["env"], "env")


if __name__ == "__main__":
    if "--write" not in sys.argv:
        raise SystemExit("usage: python tests/backend/test_golden.py --write   (regenerates tests/data/golden.json)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from coel_env.atomic import atomic_write_json

    atomic_write_json(GOLDEN, compute())
    print(f"wrote {GOLDEN}")
