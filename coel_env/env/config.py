"""Build CoEL-v0 from the Hydra config group `conf/env/` (or any mapping of CoELEnv keyword arguments)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def env_kwargs(cfg: Any) -> dict:
    """A DictConfig/dict of the `env` group -> CoELEnv keyword arguments (None values dropped)."""
    from omegaconf import DictConfig, OmegaConf

    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    return {k: v for k, v in data.items() if v is not None}


def make_env_from_config(cfg: Any, **overrides) -> gym.Env:
    """`gymnasium.make("CoEL-v0", **cfg)` for an `env` config node."""
    import coel_env  # noqa: F401  (registers CoEL-v0)

    return gym.make("CoEL-v0", **{**env_kwargs(cfg), **overrides})


def compose_env_config(name: str = "default", overrides: list[str] | None = None):
    """Compose `conf/env/<name>.yaml` with Hydra (for scripts and tests outside @hydra.main)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR / "env"), version_base="1.3"):
        return compose(config_name=name, overrides=overrides or [])
