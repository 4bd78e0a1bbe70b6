"""Leaderboard (Hydra app): policies x scenarios x seeds on one backend.

    python -m experiments.evaluate scenarios=[paper-testbed,metro-8,moe2-heterogeneous] seeds=5
    python -m experiments.evaluate policies=[static_linear,eplb,coel] max_epochs=10 logger=disabled
    python -m experiments.evaluate scenarios=[paper-testbed] backend.hardware=h100   # another hardware profile

Every episode starts from reset(seed); plan-based policies step with `step_plan` (their own plan, no encoding
loss; the first decision always deploys), action policies with `step`. Writes to the Hydra output dir:
`leaderboard.csv` / `leaderboard.md` (mean ± 95% CI over episodes of the episode return, p95 latency, tokens/s,
quality loss, energy, migration bytes, SLO attainment, decision time; each row with the exact config that produced
it and its id), `episodes.csv` (one row per episode) and `leaderboard_<metric>.png`; logs the table to W&B
(offline unless WANDB_MODE / logger.mode say otherwise).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from agents.baselines import make_policy
from agents.deployed import DeployedAgent
from agents.rollout import mean_ci, run_episode
from coel_env.atomic import atomic_write_text
from coel_env.errors import ConfigError
from coel_env.specs import load_scenario_spec, scenario_with_hardware
from experiments.cli_checks import require_int, run_in_output_dir
from experiments.results_io import save_png, write_csv

log = logging.getLogger(__name__)

# (key, column title, scale for display)
METRICS: tuple[tuple[str, str, float], ...] = (
    ("return", "return", 1.0),
    ("e2e_p95_s", "p95 latency (s)", 1.0),
    ("tokens_per_s", "tokens/s", 1.0),
    ("quality_loss", "quality loss (%)", 100.0),
    ("energy_j", "energy (kJ/epoch)", 1e-3),
    ("migration_bytes", "migration (GB)", 1e-9),
    ("slo_attainment", "SLO attainment (%)", 100.0),
    ("decide_ms", "decision (ms)", 1.0),
)


def git_commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).parent,
            ).stdout.strip()
            or "unknown"
        )
    except OSError:
        return "unknown"


def predictor(env: gym.Env, cfg: DictConfig):
    """The surrogate, to predict every window next to the measurement, when evaluating on another backend."""
    if cfg.backend.name == "surrogate" or not cfg.get("predict_with_surrogate", True):
        return None
    from coel_env.backend.surrogate import SurrogateBackend

    return SurrogateBackend(env.unwrapped.cluster)


def env_kwargs(cfg: DictConfig, scenario: str) -> dict:
    """Keyword arguments of gymnasium.make("CoEL-v0"); `backend.hardware` replaces every scenario's own profile."""
    kw = {k: v for k, v in OmegaConf.to_container(cfg.env, resolve=True).items() if v is not None}
    backend = OmegaConf.to_container(cfg.backend, resolve=True)
    hardware = backend.pop("hardware", None)
    kw.update(
        scenario=scenario_with_hardware(scenario, hardware), max_epochs=int(cfg.max_epochs), backend=backend.pop("name")
    )
    if backend:
        kw["backend_kwargs"] = backend
    return kw


def check(cfg: DictConfig) -> None:
    """Refuse bad command-line values in one line, before any episode runs or any file is written."""
    require_int(cfg.seeds, "seeds", 1)
    require_int(cfg.seed_offset, "seed_offset", 0)
    require_int(cfg.max_epochs, "max_epochs", 1)
    for key in ("policies", "scenarios"):
        value = cfg.get(key)
        if isinstance(value, str) or not hasattr(value, "__len__") or not len(value):
            raise ConfigError(f"{key}: {value!r} must be a non-empty list, e.g. {key}=[a,b]")
    for scenario in cfg.scenarios:
        load_scenario_spec(str(scenario))
    scenario_with_hardware(str(cfg.scenarios[0]), cfg.backend.get("hardware"))
    check_policy_kwargs(cfg)


def check_policy_kwargs(cfg: DictConfig) -> None:
    """Build every listed baseline once with its `policy_kwargs`: an unknown argument or a value out of range fails
    here in one line (`policy oracle: time_limit: ...`), not after the grid's first episodes."""
    raw = cfg.get("policy_kwargs")
    pkw = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else raw
    if pkw is None:
        return
    if not isinstance(pkw, dict):
        raise ConfigError(
            f"policy_kwargs: {pkw!r} must be a mapping policy -> arguments, e.g. policy_kwargs.oracle.time_limit=5"
        )
    for name in cfg.policies:
        if Path(str(name)).is_dir():  # an exported agent takes no constructor arguments
            continue
        kw = pkw.get(name) or {}
        if not isinstance(kw, dict):
            raise ConfigError(f"policy_kwargs.{name}: {kw!r} must be a mapping of constructor arguments")
        if "seed" in kw:
            raise ConfigError(
                f"policy_kwargs.{name}.seed: not an argument here; episodes are seeded by seeds and seed_offset"
            )
        make_policy(str(name), seed=int(cfg.seed_offset), **kw)


def evaluate(cfg: DictConfig, out: Path) -> list[dict]:
    """Run the grid; return one summary row per (scenario, policy) and write every artifact into `out`."""
    from tqdm import tqdm

    import coel_env  # noqa: F401  (registers CoEL-v0)

    seeds = [int(cfg.seed_offset) + i for i in range(int(cfg.seeds))]
    pkw = OmegaConf.to_container(cfg.policy_kwargs, resolve=True) or {}
    commit = git_commit()
    rows, episodes = [], []
    bar = tqdm(total=len(cfg.scenarios) * len(cfg.policies) * len(seeds), desc="evaluate", disable=not cfg.progress_bar)
    for scenario in cfg.scenarios:
        kwargs = env_kwargs(cfg, scenario)
        base_env = gym.make("CoEL-v0", **kwargs)
        for name in cfg.policies:
            kw = dict(pkw.get(name, {}) or {})
            env, env_kw, agent = base_env, kwargs, None
            if Path(str(name)).is_dir():  # an exported deployment policy: its own action space, our scenario
                agent = DeployedAgent(name)
                # the leaderboard's env (reward, perception, scenario) with the agent's own action space
                shaping = ("action_space", "num_edits", "observation_space")
                env_kw = {**kwargs, **{k: agent.env_kwargs[k] for k in shaping if k in agent.env_kwargs}}
                env = gym.make("CoEL-v0", **env_kw)
                name = agent.name
            config = {
                "policy": name,
                "policy_kwargs": kw,
                "scenario": scenario,
                "seeds": seeds,
                "env": env_kw,
                "git": commit,
            }
            cid = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]
            eps = []
            pred = predictor(env, cfg)
            for seed in seeds:
                bar.set_postfix_str(f"{scenario}/{name}/seed{seed}")
                policy = agent if agent is not None else make_policy(name, seed=seed, **kw)
                t0 = time.perf_counter()
                ep = run_episode(env, policy, seed, predictor=pred)
                ep.update(scenario=scenario, policy=name, seed=seed, wall_s=time.perf_counter() - t0, config_id=cid)
                eps.append(ep)
                bar.update(1)
            row: dict[str, Any] = {
                "scenario": scenario,
                "policy": name,
                "episodes": len(eps),
                "epochs": int(np.mean([e["epochs"] for e in eps])),
                "repairs": float(np.mean([e["repairs"] for e in eps])),
            }
            for key, _, _ in METRICS:
                row[key], row[f"{key}_ci95"] = mean_ci([e[key] for e in eps])
            for key in (k for k in eps[0] if k.startswith("pred_")):  # the surrogate's prediction, same windows
                row[key], row[f"{key}_ci95"] = mean_ci([e[key] for e in eps])
            row.update(config_id=cid, config=json.dumps(config, sort_keys=True, default=str))
            if env is not base_env:
                env.close()
            rows.append(row)
            episodes += eps
            log.info("%s %s return %.3f ± %.3f", scenario, name, row["return"], row["return_ci95"])
        base_env.close()
    bar.close()
    write_csv(out / "leaderboard.csv", rows)
    write_csv(out / "episodes.csv", episodes)
    atomic_write_text(out / "leaderboard.md", markdown(rows, cfg))
    if cfg.plots:
        plot(rows, out)
    return rows


def _fmt(x: float, ci: float, scale: float) -> str:
    if not np.isfinite(x):
        return "n/a"
    x, ci = x * scale, ci * scale
    digits = max(0, min(4, 2 - int(np.floor(np.log10(abs(ci))))) if ci > 0 else 3) if abs(x) < 1e6 else 0
    return f"{x:.{digits}f} ± {ci:.{digits}f}"


def markdown(rows: list[dict], cfg: DictConfig) -> str:
    cols = [t for _, t, _ in METRICS]
    first, last = int(cfg.seed_offset), int(cfg.seed_offset) + int(cfg.seeds) - 1
    lines = [
        f"# CoEL-Gym leaderboard ({cfg.backend.name} backend)",
        "",
        f"{int(cfg.seeds)} episodes per cell (seeds {first}..{last}), "
        f"{int(cfg.max_epochs)} decision epochs each, reward space `{cfg.env.reward_space}`, perception "
        f"`{cfg.env.perception}`. Mean ± 95% CI over episodes; p95 latency, tokens/s, quality loss, energy and "
        "SLO attainment are per-epoch means, migration is the episode total. Sorted by return.",
        "",
    ]
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        lines += [
            f"## {scenario}",
            "",
            "| policy | " + " | ".join(cols) + " | config |",
            "|---" * (len(cols) + 2) + "|",
        ]
        for r in sorted((r for r in rows if r["scenario"] == scenario), key=lambda r: -r["return"]):
            cells = [_fmt(r[k], r[f"{k}_ci95"], s) for k, _, s in METRICS]
            lines.append(f"| {r['policy']} | " + " | ".join(cells) + f" | `{r['config_id']}` |")
        lines.append("")
    pred = [(k, t, sc) for k, t, sc in METRICS if f"pred_{k}" in rows[0]]
    if pred:
        lines += [
            "## Measured vs the surrogate's prediction (same plans, same windows)",
            "",
            "| scenario | policy | " + " | ".join(f"{t} measured | predicted" for _, t, _ in pred) + " |",
            "|---" * (2 + 2 * len(pred)) + "|",
        ]
        for r in rows:
            cells = [
                f"{_fmt(r[k], r[f'{k}_ci95'], sc)} | {_fmt(r[f'pred_{k}'], r[f'pred_{k}_ci95'], sc)}"
                for k, _, sc in pred
            ]
            lines.append(f"| {r['scenario']} | {r['policy']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Configs", "", "Each row's exact config (policy kwargs, env kwargs, seeds, git commit):", ""]
    for r in rows:
        lines.append(f"- `{r['config_id']}`: `{r['config']}`")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    paths = []
    for key, title, scale in METRICS[:3] + METRICS[6:7]:
        fig, axes = plt.subplots(1, len(scenarios), figsize=(4.5 * len(scenarios), 3.6), squeeze=False)
        for ax, sc in zip(axes[0], scenarios):
            sel = {r["policy"]: r for r in rows if r["scenario"] == sc}
            names = [p for p in policies if p in sel]
            ax.bar(
                range(len(names)),
                [sel[p][key] * scale for p in names],
                yerr=[sel[p][f"{key}_ci95"] * scale for p in names],
                color="tab:blue",
                capsize=3,
            )
            ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
            ax.set_title(sc, fontsize=10)
            ax.set_ylabel(title)
        fig.tight_layout()
        path = out / f"leaderboard_{key}.png"
        save_png(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def log_wandb(cfg: DictConfig, out: Path, rows: list[dict]) -> None:
    lg = cfg.logger
    mode = os.environ.get("WANDB_MODE", lg.get("mode", "offline"))
    if mode == "disabled":
        return
    import wandb

    run = wandb.init(
        mode=mode,
        project=lg.get("project", "coel-gym"),
        entity=lg.get("entity"),
        group=lg.get("group"),
        tags=[*list(lg.get("tags") or []), "evaluate"],
        dir=str(out),
        config=OmegaConf.to_container(cfg, resolve=True),
        job_type="evaluate",
    )
    cols = list(rows[0])
    run.log({"leaderboard": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])})
    for png in sorted(out.glob("leaderboard_*.png")):
        run.log({png.stem: wandb.Image(str(png))})
    run.finish()


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    def work(out: Path) -> list[dict]:
        check(cfg)
        return evaluate(cfg, out)

    rows, out = run_in_output_dir(work)
    log_wandb(cfg, out, rows)
    print((out / "leaderboard.md").read_text())
    print(f"wrote {out / 'leaderboard.csv'}")


if __name__ == "__main__":
    main()
