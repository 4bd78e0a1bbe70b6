"""Train an SB3 agent on CoEL-v0 (Hydra app): vector envs, periodic evaluation against the baselines,
checkpoints, resume, W&B logging (offline by default) and export of an SB3-free deployment policy.

    python -m experiments.train                                  # MaskablePPO on paper-testbed
    python -m experiments.train scenario=metro-8 agent=ppo experiment=smoke logger=disabled
    python -m experiments.train resume=outputs/train/.../checkpoints/ckpt_40000_steps.zip
    python -m experiments.train -m hydra/launcher=joblib seed=0,1,2
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from agents.sb3 import (
    ALGORITHMS,
    BaselineEvalCallback,
    load_vecnormalize,
    make_algorithm,
    make_training_env,
    observed_keys,
    save_vecnormalize,
)
from agents.tracking import init_wandb, make_sb3_logger
from coel_env.env.env import CoELEnv
from coel_env.errors import CoELError, ConfigError

log = logging.getLogger(__name__)


def env_kwargs(cfg: DictConfig) -> dict:
    """Keyword arguments of gymnasium.make("CoEL-v0") from the scenario, env and backend groups."""
    scenario = OmegaConf.to_container(cfg.scenario, resolve=True)
    scenario.setdefault("name", HydraConfig.get().runtime.choices.get("scenario", "custom"))
    kwargs = dict(OmegaConf.to_container(cfg.env, resolve=True))
    backend = OmegaConf.to_container(cfg.backend, resolve=True)
    kwargs.update(scenario=scenario, backend=backend.pop("name"))
    hardware = backend.pop("hardware", None)
    if hardware:
        scenario["hardware"] = hardware
    if backend and kwargs["backend"] != "surrogate":
        kwargs["backend_kwargs"] = backend
    return kwargs


def train(cfg: DictConfig, out: Path) -> dict:
    torch.set_num_threads(cfg.torch_threads)
    algo = cfg.agent.algo
    if algo not in ALGORITHMS:
        raise ConfigError(f"agent.algo: '{algo}' unknown; allowed: {', '.join(ALGORITHMS)}")
    kwargs = env_kwargs(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    run = init_wandb(OmegaConf.to_container(cfg.logger), out, config, name=f"{algo}-{kwargs['scenario']['name']}"
                     f"-s{cfg.seed}")
    obs_exclude = tuple(cfg.obs_exclude or ())
    venv = None
    try:
        venv = make_training_env(kwargs, cfg.n_envs, cfg.seed, cfg.vec_env, cfg.normalize_obs, cfg.knobs,
                                 obs_exclude)
        resumed = cfg.resume is not None
        model = make_algorithm(cfg.agent, venv, cfg.seed, resume=cfg.resume)
        if resumed:
            load_vecnormalize(venv, Path(cfg.resume).with_suffix(".vecnorm.npz"))
        model.set_logger(make_sb3_logger(out, run))
        ckpt_dir = out / "checkpoints"
        callback = BaselineEvalCallback(
            env_kwargs=kwargs, baselines=list(cfg.eval_baselines), episodes=cfg.eval_episodes, seed=cfg.seed + 10_000,
            eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every, checkpoint_dir=ckpt_dir, out_dir=out,
            run=run, knobs=cfg.knobs, obs_exclude=obs_exclude,
        )
        start = time.time()
        model.learn(cfg.total_timesteps, callback=callback, progress_bar=cfg.progress_bar,
                    reset_num_timesteps=not resumed)
        train_time = time.time() - start
        model.save(out / "model.zip")
        save_vecnormalize(venv, out / "model.vecnorm.npz")
        summary = {"algo": algo, "scenario": kwargs["scenario"]["name"], "seed": cfg.seed,
                   "timesteps": int(model.num_timesteps), "train_time_s": train_time,
                   "first_win_s": callback.first_win_s, "evaluations": callback.history}
        probe = CoELEnv(**kwargs)
        try:
            obs_keys = observed_keys(probe.observation_space, obs_exclude)
        finally:
            probe.close()
        env_spec = {"id": "CoEL-v0", "kwargs": kwargs, "knobs": cfg.knobs, "obs_keys": obs_keys}
        (out / "env_spec.json").write_text(json.dumps(env_spec, indent=1))
        if cfg.export:
            summary["policy_dir"] = str(out / "policy")
        (out / "train_summary.json").write_text(json.dumps(summary, indent=1, default=_json_default))
        if cfg.export:  # the summary is part of the policy's provenance
            from experiments.export import export_run

            export_run(out, model=model)
        return summary
    finally:
        if venv is not None:
            venv.close()
        if run is not None:
            run.finish()


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(type(x).__name__)


@hydra.main(version_base=None, config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = train(cfg, out)
    except CoELError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"trained {summary['algo']} for {summary['timesteps']} steps in {summary['train_time_s']:.0f} s; "
          f"outputs in {out}")


if __name__ == "__main__":
    main()
