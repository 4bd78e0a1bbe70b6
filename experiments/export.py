"""Export a training run as an SB3-free deployment policy (ONNX actor + JSON metadata).

    python -m experiments.export run=outputs/train/paper-testbed/<time> [out=path/to/policy]

`experiments.train` calls the same function at the end of training; this CLI re-exports a run (or one of its
checkpoints: `checkpoint=ckpt_50000_steps`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from agents.export import export_policy
from agents.sb3 import ALGORITHMS, read_vecnormalize
from coel_env.errors import ConfigError


def export_run(run: str | Path, out: str | Path | None = None, checkpoint: str | None = None, model=None) -> Path:
    """Write `<run>/policy` (or `out`) from the run's model (or `checkpoints/<checkpoint>.zip`)."""
    run = Path(run)
    spec_path = run / "env_spec.json"
    if not spec_path.is_file():
        raise ConfigError(f"run: '{run}' has no env_spec.json (not a training run directory)")
    env_spec = json.loads(spec_path.read_text())
    stem = run / "checkpoints" / checkpoint if checkpoint else run / "model"
    if model is None:
        if not stem.with_suffix(".zip").is_file():
            raise ConfigError(f"checkpoint: no model at '{stem.with_suffix('.zip')}'")
        if not (run / "train_summary.json").is_file():
            raise ConfigError(f"run: '{run}' has no train_summary.json (training did not finish)")
        algo = json.loads((run / "train_summary.json").read_text()).get("algo")
        if algo not in ALGORITHMS:
            raise ConfigError(f"run: train_summary.json names algorithm {algo!r}; allowed: {', '.join(ALGORITHMS)}")
        model = ALGORITHMS[algo].load(stem.with_suffix(".zip"), device="cpu")  # our own checkpoint (SB3 format)
    rms, clip = read_vecnormalize(stem.with_suffix(".vecnorm.npz")) or (None, 10.0)
    extra = {}
    if (run / "train_summary.json").is_file():
        s = json.loads((run / "train_summary.json").read_text())
        extra["train"] = {k: s.get(k) for k in ("algo", "scenario", "seed", "timesteps")}
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
