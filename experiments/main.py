"""The main job (`make run`): train → evaluate against all baselines → export → comparison report.

Each stage is its own Hydra app run as a subprocess (so each keeps its config and logs) under one output root.
Their W&B runs (offline by default) share one group (`group`, default `<agent>-<scenario>-<time>`) with job types
train / evaluate / compare. The end prints the headline result (the comparison report's sentence), where
everything is, and the `wandb sync` command that uploads the three runs:

    python -m experiments.main                      # ~10 minutes on 2 cores
    python -m experiments.main experiment=smoke seeds=1 eval_epochs=5 policies=[static_linear,coel]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from agents.tracking import QUIET_ENV, artifact_name
from coel_env.atomic import atomic_write_json
from coel_env.errors import CoELError, ConfigError
from experiments.cli_checks import require_int


def stage(name: str, module: str, args: list[str], root: Path) -> float:
    """Run one stage (`python -m module args`) and fail with its last lines if it fails."""
    print(f"[{name}] python -m {module} {' '.join(args)}", flush=True)
    start = time.time()
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    for key, value in QUIET_ENV.items():  # no W&B banners in the stages' output (our own lines stay)
        env.setdefault(key, value)
    proc = subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise SystemExit(f"error: stage '{name}' failed (exit {proc.returncode}); its outputs are in {root / name}")
    return time.time() - start


def check(cfg: DictConfig) -> None:
    """Refuse bad command-line values in one line before the first stage starts (training takes minutes)."""
    require_int(cfg.seeds, "seeds", 1)
    require_int(cfg.eval_epochs, "eval_epochs", 1)
    for key in ("policies", "train_overrides", "eval_overrides"):
        value = cfg.get(key)
        if isinstance(value, str) or not hasattr(value, "__iter__"):
            raise ConfigError(f"{key}: {value!r} must be a list, e.g. {key}=[a,b]")
    if not cfg.policies:
        raise ConfigError("policies: must list at least one baseline to evaluate the agent against")


def run(cfg: DictConfig, root: Path) -> dict:
    train_dir, eval_dir, report_dir = root / "train", root / "evaluate", root / "compare"
    choice = HydraConfig.get().runtime.choices
    scenario = choice["scenario"]
    # one W&B group per `make run`: its train, evaluate and compare runs (job types) side by side
    group = str(cfg.group) if cfg.get("group") else artifact_name(choice["agent"], scenario, root.name)
    tracking = [f"logger.group={group}"]
    times = {}
    times["train"] = stage(
        "train",
        "experiments.train",
        [
            f"scenario={scenario}",
            f"experiment={choice['experiment']}",
            f"agent={choice['agent']}",
            "progress_bar=true",
            f"hydra.run.dir={train_dir}",
            *tracking,
            *cfg.train_overrides,
        ],
        root,
    )
    policies = [*cfg.policies, str(train_dir / "policy")]
    times["evaluate"] = stage(
        "evaluate",
        "experiments.evaluate",
        [
            f"scenarios=[{scenario}]",
            f"policies=[{','.join(policies)}]",
            f"seeds={cfg.seeds}",
            f"max_epochs={cfg.eval_epochs}",
            f"hydra.run.dir={eval_dir}",
            *tracking,
            *cfg.eval_overrides,
        ],
        root,
    )
    times["compare"] = stage(
        "compare",
        "experiments.compare",
        [
            f"runs=[{train_dir}]",
            f"leaderboard={eval_dir}",
            f"heatmaps.scenario={scenario}",
            f"hydra.run.dir={report_dir}",
            *tracking,
        ],
        root,
    )
    report = report_dir / "report.json"
    offline = [str(p) for d in (train_dir, eval_dir, report_dir) for p in sorted((d / "wandb").glob("offline-run-*"))]
    summary = {
        "root": str(root),
        "headline": json.loads(report.read_text()).get("headline", []) if report.is_file() else [],
        "wandb_group": group,
        "wandb_offline_runs": offline,
        "times_s": times,
        "model": str(train_dir / "model.zip"),
        "policy": str(train_dir / "policy"),
        "leaderboard": str(eval_dir / "leaderboard.md"),
        "report": str(report_dir / "report.md"),
        "report_html": str(report_dir / "report.html"),
    }
    atomic_write_json(root / "summary.json", summary)
    return summary


@hydra.main(version_base=None, config_path="../conf", config_name="main")
def main(cfg: DictConfig) -> None:
    root = Path(HydraConfig.get().runtime.output_dir).resolve()
    try:
        check(cfg)
    except CoELError as exc:
        raise SystemExit(f"error: {exc}") from None
    s = run(cfg, root)
    print(final_summary(s))


def final_summary(s: dict) -> str:
    """What `make run` prints last: the headline result, where everything is, how to upload the W&B runs."""
    lines = ["", "Done in {:.0f} s ({}).".format(sum(s["times_s"].values()), timing(s["times_s"]))]
    lines += [f"Result: {h}" for h in s["headline"]] or ["Result: see the report (no headline was written)."]
    lines.append(f"Everything is under {s['root']}:")
    lines += [f"  {key:12s} {s[key]}" for key in ("model", "policy", "leaderboard", "report", "report_html")]
    if s["wandb_offline_runs"]:
        lines.append(f"W&B: {len(s['wandb_offline_runs'])} offline runs in group {s['wandb_group']}; upload them with")
        lines.append("  wandb sync " + " ".join(s["wandb_offline_runs"]))
    return "\n".join(lines)


def timing(times: dict) -> str:
    return ", ".join(f"{k} {v:.0f} s" for k, v in times.items())


if __name__ == "__main__":
    main()
