"""An SB3 logger that writes progress.csv and forwards every scalar to the active W&B run (`agents.tracking`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from stable_baselines3.common.logger import CSVOutputFormat, HumanOutputFormat, KVWriter, Logger


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
        formats.append(HumanOutputFormat(sys.stdout))
    if run is not None:
        formats.append(WandbOutputFormat(run))
    return Logger(str(out), formats)
