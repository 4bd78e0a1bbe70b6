"""Train an SB3 agent on CoEL-v0 (Hydra app): vector envs, periodic evaluation against the baselines,
checkpoints, resume, W&B logging (offline by default) and export of an SB3-free deployment policy. Checkpoints and
`model.zip` are agents.checkpoint zips (JSON + safetensors): resuming never unpickles anything.

    python -m experiments.train                                  # PPO steering tuned CoEL's knobs on paper-testbed
    python -m experiments.train knobs=coel                       # ... around CoEL's default knobs
    python -m experiments.train scenario=metro-8 agent=ppo experiment=smoke logger=disabled
    python -m experiments.train resume=outputs/train/.../checkpoints/ckpt_40000_steps.zip
    python -m experiments.train -m hydra/launcher=joblib seed=0,1,2

Logs: on a terminal a progress bar; otherwise (a log file, a sweep) one status line every `status_every_s`
seconds — steps, fps, ETA, the latest evaluation. W&B (agents.tracking): job type `train`, group `logger.group` (a
sweep's own by default), the baselines' scores at every evaluation step next to the agent's plus one learning-curve
chart, the model and the policy as artifacts; the `wandb sync` line of the offline run is printed at the end. On a
cluster: `pip install -e '.[slurm]'`, then `-m hydra/launcher=submitit_slurm hydra.launcher.partition=<p> ...`.

Knobs (agents.knobs): `knobs: coel_tuned` first tunes CoEL on the training scenario's train instances with the
leaderboard's budget (conf/tuning; 9-92 s measured on paper-testbed, 2 shared cores) — or reads
`tuned=<tuned.json>` — writes `tuned.json` and trains around those knobs; the centre is saved in env_spec.json and
the exported policy.

Held-out instances (coel_env.benchmark.instances): env i trains on routing model `train` instance i mod
`train_instances` and first resets with seed `seed + i` (later resets continue that generator); the periodic
evaluation uses `val` instances. No seed of the `test` split (the leaderboard's) is ever used: a `seed` that would
reach it is refused.

`full` (every replica's device, tier and bits) is a planner-only action space: on paper-testbed it has 8,647
factored choices, whose joint log-probability (about -10,650) moves by +-100 after one gradient step, so PPO's
probability ratio overflows to inf and the update turns NaN (measured with MaskablePPO on a 16-step rollout: log
ratios from -126 to +23 after one minibatch step, NaN logits within the agent config's 5 epochs). Training with
`knobs: null` on it is refused; `edit`, `threshold` or the knobs wrapper train.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from stable_baselines3.common.callbacks import CallbackList

from agents.baselines import POLICIES
from agents.checkpoint import MAX_SEED, check_agent_config, read_checkpoint
from agents.knobs import check_knobs_name, resolve_knobs
from agents.sb3 import (
    ALGORITHMS,
    VEC_ENVS,
    BaselineEvalCallback,
    StatusLineCallback,
    agent_config,
    make_algorithm,
    make_training_env,
    observed_keys,
    save_model,
)
from agents.sb3_logger import make_sb3_logger
from agents.tracking import artifact_name, finish_wandb, init_wandb, log_artifact
from coel_env.atomic import atomic_write_json
from coel_env.benchmark.instances import check_train_seeds, instances
from coel_env.env.env import CoELEnv
from coel_env.errors import ConfigError, read_json_object
from coel_env.specs import scenario_with_hardware
from experiments.cli_checks import require_int, require_positive, run_in_output_dir

log = logging.getLogger(__name__)


def env_kwargs(cfg: DictConfig) -> dict:
    """Keyword arguments of gymnasium.make("CoEL-v0") from the scenario, env and backend groups."""
    scenario = OmegaConf.to_container(cfg.scenario, resolve=True)
    scenario.setdefault("name", HydraConfig.get().runtime.choices.get("scenario", "custom"))
    kwargs = dict(OmegaConf.to_container(cfg.env, resolve=True))
    backend = OmegaConf.to_container(cfg.backend, resolve=True)
    scenario = scenario_with_hardware(scenario, backend.pop("hardware", None))
    kwargs.update(scenario=scenario, backend=backend.pop("name"))
    if backend and kwargs["backend"] != "surrogate":
        kwargs["backend_kwargs"] = backend
    return kwargs


def check_cfg(cfg: DictConfig) -> None:
    """Refuse bad top-level values in one line, before any work starts or any file is written."""
    require_int(cfg.seed, "seed", 0)
    if cfg.seed > MAX_SEED:
        raise ConfigError(f"seed: {cfg.seed} must be an integer in [0, {MAX_SEED}]")
    for field in ("n_envs", "total_timesteps", "eval_episodes", "torch_threads", "train_instances"):
        require_int(cfg[field], field, 1)
    for field in ("checkpoint_every", "eval_every"):  # null turns them off
        if cfg[field] is not None and (
            isinstance(cfg[field], bool) or not isinstance(cfg[field], int) or cfg[field] <= 0
        ):
            raise ConfigError(f"{field}: {cfg[field]!r} must be an integer >= 1 (env steps), or null for off")
    require_positive(cfg.get("status_every_s", 30.0), "status_every_s")
    for field in ("normalize_obs", "export", "progress_bar"):
        if not isinstance(cfg[field], bool):
            raise ConfigError(f"{field}: {cfg[field]!r} must be true or false")
    if cfg.vec_env not in VEC_ENVS:
        raise ConfigError(f"vec_env: {cfg.vec_env!r} unknown; allowed: {', '.join(VEC_ENVS)}")
    if cfg.agent.algo not in ALGORITHMS:
        raise ConfigError(f"agent.algo: '{cfg.agent.algo}' unknown; allowed: {', '.join(ALGORITHMS)}")
    env = cfg.get("env") or {}
    if cfg.get("knobs") is None and env.get("action_space") == "full":
        raise ConfigError(
            f"env.action_space: 'full' is a planner-only space ({cfg.agent.algo} cannot train on it: one probability "
            "ratio over every replica's choices overflows); train with knobs=coel_tuned (the default), knobs=coel, "
            "env=edit or env=threshold"
        )
    check_agent_config(agent_config(cfg.agent), cfg.n_envs)  # the same whitelist and ranges a checkpoint gets
    baselines = cfg.eval_baselines
    if not OmegaConf.is_list(baselines) and not isinstance(baselines, list):
        raise ConfigError(
            f"eval_baselines: {baselines!r} must be a list of baseline names; allowed: {', '.join(POLICIES)}"
        )
    for name in baselines:
        if not isinstance(name, str) or name not in POLICIES:
            raise ConfigError(f"eval_baselines: unknown baseline {name!r}; allowed: {', '.join(POLICIES)}")
    check_train_seeds(range(cfg.seed, cfg.seed + cfg.n_envs), "seed")
    if cfg.resume is not None and not isinstance(cfg.resume, str):
        raise ConfigError(f"resume: {cfg.resume!r} must be the path of a checkpoint .zip, or null")
    check_knobs_cfg(cfg)


def check_knobs_cfg(cfg: DictConfig) -> None:
    """`knobs` (null or a knobs base), `tuned` (null or a file) and the `tuning` budget, in one line each."""
    if cfg.get("knobs") is not None:
        check_knobs_name(cfg.knobs)
    tuned = cfg.get("tuned")
    if tuned is not None and (not isinstance(tuned, str) or not Path(tuned).is_file()):
        raise ConfigError(f"tuned: {tuned!r} is not a file (a tuned.json of experiments.evaluate or experiments.train)")
    tuning = cfg.get("tuning") or {}
    for key, low in (("trials", 1), ("instances", 1), ("epochs", 1), ("seed", 0)):
        if key in tuning:
            require_int(tuning[key], f"tuning.{key}", low)


def training_knobs(cfg: DictConfig, kwargs: dict, out: Path):
    """The knobs value of the training envs (a tuned base gets its tuned centre: agents.knobs.resolve_knobs);
    the tuned knobs are written to out/tuned.json (experiments.evaluate reads it back with `tuned=`)."""
    cached = read_json_object(cfg.tuned, "tuned") if cfg.get("tuned") else None
    tuning = OmegaConf.to_container(cfg.tuning, resolve=True) if cfg.get("tuning") else {}
    knobs, table = resolve_knobs(cfg.get("knobs"), kwargs, tuning, cached)
    if table:
        atomic_write_json(out / "tuned.json", table)
    return knobs


def train(cfg: DictConfig, out: Path) -> dict:
    check_cfg(cfg)
    checkpoint = read_checkpoint(cfg.resume, "resume") if cfg.resume is not None else None  # never unpickles
    torch.set_num_threads(cfg.torch_threads)
    algo = cfg.agent.algo
    kwargs = env_kwargs(cfg)
    obs_exclude = tuple(cfg.obs_exclude or ())
    knobs = training_knobs(cfg, kwargs, out)
    venv = run = None
    try:
        routing = [i.routing_seed for i in instances("train", cfg.train_instances)]
        venv = make_training_env(
            kwargs, cfg.n_envs, cfg.seed, cfg.vec_env, cfg.normalize_obs, knobs, obs_exclude, scenario_seeds=routing
        )
        model = make_algorithm(cfg.agent, venv, cfg.seed, checkpoint=checkpoint)
        config = OmegaConf.to_container(cfg, resolve=True)
        run_name = f"{algo}-{kwargs['scenario']['name']}-s{cfg.seed}"
        logger_cfg = {**OmegaConf.to_container(cfg.logger), "group": wandb_group(cfg)}
        run = init_wandb(logger_cfg, out, config, run_name, job_type="train", step_metric="global_step")
        model.set_logger(make_sb3_logger(out, run))
        callback = BaselineEvalCallback(
            env_kwargs=kwargs,
            baselines=list(cfg.eval_baselines),
            episodes=cfg.eval_episodes,
            seed=cfg.seed + 10_000,
            eval_every=cfg.eval_every,
            checkpoint_every=cfg.checkpoint_every,
            checkpoint_dir=out / "checkpoints",
            out_dir=out,
            run=run,
            knobs=knobs,
            obs_exclude=obs_exclude,
            agent_cfg=cfg.agent,
            instances=[(i.routing_seed, i.seed) for i in instances("val", cfg.eval_episodes)],
        )
        callbacks = [callback]
        bar = cfg.progress_bar and sys.stdout.isatty()
        if cfg.progress_bar and not bar:  # a log file: a bar shows nothing for minutes, status lines instead
            latest = lambda: callback.history[-1] if callback.history else None  # noqa: E731
            callbacks.append(StatusLineCallback(cfg.total_timesteps, cfg.get("status_every_s", 30.0), latest))
            print(
                f"[train] {algo} on {kwargs['scenario']['name']}: {cfg.total_timesteps} steps, {cfg.n_envs} envs; "
                f"first the baselines ({', '.join(cfg.eval_baselines) or 'none'}) on {cfg.eval_episodes} "
                f"validation instances",
                flush=True,
            )
        start = time.time()
        model.learn(
            cfg.total_timesteps,
            callback=CallbackList(callbacks),
            progress_bar=bar,
            reset_num_timesteps=checkpoint is None,
        )
        train_time = time.time() - start
        save_model(model, out / "model.zip", cfg.agent, venv)
        summary = {
            "algo": algo,
            "scenario": kwargs["scenario"]["name"],
            "seed": cfg.seed,
            "timesteps": int(model.num_timesteps),
            "train_time_s": train_time,
            "first_win_s": callback.first_win_s,
            "reward_space": kwargs.get("reward_space"),
            "train_instances": [i.label for i in instances("train", cfg.train_instances)],
            "eval_instances": [i.label for i in instances("val", cfg.eval_episodes)],
            "evaluations": callback.history,
        }
        probe = CoELEnv(**kwargs)
        try:
            obs_keys = observed_keys(probe.observation_space, obs_exclude)
        finally:
            probe.close()
        atomic_write_json(
            out / "env_spec.json", {"id": "CoEL-v0", "kwargs": kwargs, "knobs": knobs, "obs_keys": obs_keys}
        )
        if cfg.export:
            summary["policy_dir"] = str(out / "policy")
        atomic_write_json(out / "train_summary.json", summary, default=_json_default)
        if cfg.export:  # from the model.zip just written; the summary is part of the policy's provenance
            from experiments.export import export_run

            export_run(out)
        log_run(run, out, summary, callback.history, run_name)
        return summary
    finally:
        if venv is not None:
            venv.close()
        finish_wandb(run)


def wandb_group(cfg: DictConfig) -> str | None:
    """The W&B group: `logger.group`, else one per sweep (`-m`: the sweep folder's name), else none."""
    if cfg.logger.get("group"):
        return str(cfg.logger.group)
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        return artifact_name("sweep", Path(hc.sweep.dir).name)
    return None


def log_run(run, out: Path, summary: dict, history: list[dict], name: str) -> None:
    """The run's headline numbers (W&B summary), its learning curve with the baselines as lines in one chart,
    and the model and the deployment policy as artifacts."""
    if run is None:
        return
    import wandb

    meta = {k: summary.get(k) for k in ("algo", "scenario", "seed", "timesteps", "reward_space")}
    if history:
        last = history[-1]
        run.summary.update(
            {
                "final/agent_score_raw": last["agent"]["score_raw"],
                "final/best_baseline_score_raw": last["best_baseline_score_raw"],
                "final/first_win_s": summary.get("first_win_s"),
            }
        )
        names = sorted(last["baselines"])
        xs = [int(h["timesteps"]) for h in history]
        ys = [[float(h["agent"]["score_raw"]) for h in history]]
        ys += [[float(h["baselines"][n]["score_raw"]) for h in history] for n in names]
        chart = wandb.plot.line_series(
            xs=xs,
            ys=ys,
            keys=["agent", *names],
            title="Learning curve: official raw score on validation instances (baselines: same instances)",
            xname="environment steps",
        )
        run.log({"eval/learning_curve": chart})
    log_artifact(
        run,
        f"model-{name}",
        "model",
        [out / "model.zip", out / "env_spec.json", out / "train_summary.json"],
        meta,
    )
    if (out / "policy").is_dir():
        log_artifact(run, f"policy-{name}", "policy", [out / "policy"], meta)


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(type(x).__name__)


@hydra.main(version_base=None, config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    # sb3-contrib's masks reach torch as read-only arrays: a one-time torch note, not actionable by our users
    warnings.filterwarnings("ignore", message=r"The given NumPy array is not writable", category=UserWarning)
    summary, out = run_in_output_dir(lambda out: train(cfg, out))
    print(
        f"trained {summary['algo']} for {summary['timesteps']} steps in {summary['train_time_s']:.0f} s; "
        f"outputs in {out}"
    )


if __name__ == "__main__":
    main()
