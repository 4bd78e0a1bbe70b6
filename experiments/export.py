"""Export a training run as an SB3-free deployment policy (ONNX actor + JSON metadata + integrity list).

    python -m experiments.export run=outputs/train/paper-testbed/<time> [out=path/to/policy]

`experiments.train` calls the same function at the end of training; this CLI re-exports a run (or one of its
checkpoints: `checkpoint=ckpt_50000_steps`). Only CoEL-Gym checkpoints (agents.checkpoint: JSON + safetensors) are
read, so a crafted file cannot run code.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from agents.checkpoint import read_checkpoint
from agents.export import export_policy
from agents.sb3 import load_model
from coel_env.errors import ConfigError, read_json_object


def export_run(run: str | Path, out: str | Path | None = None, checkpoint: str | None = None) -> Path:
    """Write `<run>/policy` (or `out`) from the run's `model.zip` (or `checkpoints/<checkpoint>.zip`)."""
    run = Path(run)
    if not (run / "env_spec.json").is_file():
        raise ConfigError(f"run: '{run}' has no env_spec.json (not a training run directory)")
    env_spec = read_json_object(run / "env_spec.json", "run")
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
    return export_policy(model, Path(out) if out else run / "policy", env_spec=env_spec, obs_rms=rms, clip_obs=clip,
                         extra=extra)


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
