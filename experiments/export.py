"""Export a training run as an SB3-free deployment policy (ONNX actor + JSON metadata + integrity list).

    python -m experiments.export run=outputs/train/paper-testbed/<time> [out=path/to/policy]

`experiments.train` calls the same function at the end of training; this CLI re-exports a run (or one of its
checkpoints: `checkpoint=ckpt_50000_steps`). Only CoEL-Gym checkpoints (agents.checkpoint: JSON + safetensors) are
read, so a crafted file cannot run code. `out` must be new, an empty folder or an earlier export (never the run
directory, a folder that contains it, another folder of files or a file): anything else is refused in one line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from agents.checkpoint import read_checkpoint
from agents.export import check_export_target, export_policy
from agents.sb3 import load_model
from coel_env.errors import ConfigError, read_json_object


def export_run(run: str | Path, out: str | Path | None = None, checkpoint: str | None = None) -> Path:
    """Write `<run>/policy` (or `out`) from the run's `model.zip` (or `checkpoints/<checkpoint>.zip`)."""
    if not isinstance(run, (str, os.PathLike)) or not str(run):
        raise ConfigError(f"run: {run!r} must be a training run directory")
    run = Path(run)
    if not (run / "env_spec.json").is_file():
        raise ConfigError(f"run: '{run}' has no env_spec.json (not a training run directory)")
    env_spec = read_json_object(run / "env_spec.json", "run")
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise ConfigError(f"out: {out!r} must be a directory path")
    target = Path(out) if out else run / "policy"
    real_run, real_target = run.resolve(), Path(os.path.abspath(target)).resolve()
    if real_target == real_run or real_target in real_run.parents:
        raise ConfigError(
            f"out: '{target}' is the run directory '{run}' or contains it; refusing to replace it "
            f"(the default is '{run / 'policy'}')"
        )
    check_export_target(target)  # before any work: a run, a folder of other files or a file is never replaced
    if checkpoint is not None and (not isinstance(checkpoint, str) or Path(checkpoint).name != checkpoint):
        raise ConfigError(f"checkpoint: {checkpoint!r} must be a checkpoint name in '{run / 'checkpoints'}'")
    path = (run / "checkpoints" / checkpoint if checkpoint else run / "model").with_suffix(".zip")
    if not (run / "train_summary.json").is_file():
        raise ConfigError(f"run: '{run}' has no train_summary.json (training did not finish)")
    summary = read_json_object(run / "train_summary.json", "run")
    ckpt = read_checkpoint(path, "checkpoint")
    if ckpt.algo != summary.get("algo"):
        raise ckpt.error(f"holds {ckpt.algo}, but train_summary.json names {summary.get('algo')!r}")
    model = load_model(ckpt)
    rms, clip = ckpt.obs_normalization() or (None, 10.0)
    extra = {"train": {**{k: summary.get(k) for k in ("algo", "scenario", "seed")}, "timesteps": ckpt.num_timesteps}}
    return export_policy(model, target, env_spec=env_spec, obs_rms=rms, clip_obs=clip, extra=extra)


def main(argv: list[str] | None = None) -> None:
    args = OmegaConf.from_cli(argv if argv is not None else sys.argv[1:])
    if "run" not in args:
        raise SystemExit("usage: python -m experiments.export run=<training run dir> [out=<dir>] [checkpoint=<name>]")
    try:
        path = export_run(args.run, args.get("out"), args.get("checkpoint"))
    except (ConfigError, OSError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"exported deployment policy to {path}")


if __name__ == "__main__":
    main()
