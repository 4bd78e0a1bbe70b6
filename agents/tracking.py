"""Experiment tracking: Weights & Biases runs (offline by default) and an SB3 logger that forwards to W&B."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stable_baselines3.common.logger import CSVOutputFormat, HumanOutputFormat, KVWriter, Logger

WANDB_MODES = ("offline", "online", "disabled")


def init_wandb(logger_cfg: dict, out_dir: str | Path, config: dict, name: str, job_type: str = "train"):
    """Start a W&B run in `out_dir` (mode from the config unless WANDB_MODE is set in the environment)."""
    import wandb

    mode = os.environ.get("WANDB_MODE") or logger_cfg.get("mode", "offline")
    if mode not in WANDB_MODES:
        from coel_env.errors import ConfigError

        raise ConfigError(f"logger.mode: '{mode}' unknown; allowed: {', '.join(WANDB_MODES)}")
    return wandb.init(
        project=logger_cfg.get("project", "coel-gym"),
        entity=logger_cfg.get("entity"),
        group=logger_cfg.get("group"),
        tags=list(logger_cfg.get("tags") or []),
        name=name,
        job_type=job_type,
        dir=str(out_dir),
        mode=mode,
        config=config,
        reinit="finish_previous",
        settings=wandb.Settings(silent=True, console="off"),
    )


class WandbOutputFormat(KVWriter):
    """SB3 KVWriter that logs every scalar SB3 records (rollout/, train/, eval/ …) to the active W&B run."""

    def __init__(self, run):
        self.run = run

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
        scalars = {k: v for k, v in key_values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars and self.run is not None:
            self.run.log({**scalars, "global_step": step}, step=step)

    def close(self) -> None:
        pass


def make_sb3_logger(out_dir: str | Path, run=None, stdout: bool = False) -> Logger:
    """SB3 logger writing progress.csv in `out_dir` and forwarding to W&B."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    formats: list[KVWriter] = [CSVOutputFormat(str(out / "progress.csv"))]
    if stdout:
        formats.append(HumanOutputFormat(os.sys.stdout))
    if run is not None:
        formats.append(WandbOutputFormat(run))
    return Logger(str(out), formats)
