"""stable-baselines3 glue: algorithms by name, vector envs, building/restoring algorithms from our pickle-free
checkpoints (agents.checkpoint), and the callback that checkpoints and evaluates the agent against the baselines."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from omegaconf import DictConfig, OmegaConf
from sb3_contrib import MaskablePPO
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv, VecNormalize
from torch import nn

from agents.checkpoint import Checkpoint, check_agent_config, space_from_description, write_checkpoint
from agents.envs import make_env_from_spec, make_flat_env, observed_keys  # noqa: F401  (re-exported)
from agents.policy import ActionPolicy
from agents.rollout import run_episode, summarize
from coel_env.errors import ConfigError
from coel_env.mp_compat import standard_start_method

ALGORITHMS = {"PPO": PPO, "A2C": A2C, "MaskablePPO": MaskablePPO}
ACTIVATIONS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}  # policy_kwargs.activation_fn by name (agents.checkpoint.ACTIVATIONS)
VEC_ENVS = {"subproc": SubprocVecEnv, "dummy": DummyVecEnv}


def make_training_env(
    env_kwargs: dict,
    n_envs: int,
    seed: int,
    vec_env: str = "subproc",
    normalize_obs: bool = True,
    knobs: str | dict | None = None,
    obs_exclude: tuple[str, ...] = (),
    scenario_seeds: list[int] | None = None,
) -> VecEnv:
    """`n_envs` flat envs (env i reset first with seed + i); with `scenario_seeds`, env i gets routing model
    `scenario_seeds[i % len]` (train instances, coel_env.benchmark.instances) instead of `env_kwargs`' own."""
    if vec_env not in VEC_ENVS:
        raise ConfigError(f"vec_env: '{vec_env}' unknown; allowed: {', '.join(VEC_ENVS)}")
    cls = VEC_ENVS[vec_env] if n_envs > 1 else DummyVecEnv
    kwargs = {"start_method": "forkserver"} if cls is SubprocVecEnv else None
    if scenario_seeds:
        from stable_baselines3.common.monitor import Monitor

        def thunk(rank: int):
            kw = {**env_kwargs, "scenario_seed": int(scenario_seeds[rank % len(scenario_seeds)])}

            def init():
                env = make_flat_env(kw, knobs, tuple(obs_exclude))
                env.action_space.seed(seed + rank)
                return Monitor(env)

            return init

        with standard_start_method():  # a joblib (loky) sweep worker: children need a standard start method
            venv = cls([thunk(i) for i in range(n_envs)], **(kwargs or {}))
        venv.seed(seed)
    else:
        with standard_start_method():
            venv = make_vec_env(
                make_flat_env,
                n_envs=n_envs,
                seed=seed,
                vec_env_cls=cls,
                env_kwargs={"env_kwargs": env_kwargs, "knobs": knobs, "obs_exclude": tuple(obs_exclude)},
                vec_env_kwargs=kwargs,
            )
    if normalize_obs:
        venv = VecNormalize(venv, norm_obs=True, norm_reward=False, clip_obs=10.0)
    return venv


def agent_config(agent_cfg: DictConfig | dict) -> dict:
    """The agent group (algo, policy, policy_kwargs, kwargs) as plain JSON-able values."""
    cfg = OmegaConf.to_container(agent_cfg, resolve=True) if isinstance(agent_cfg, DictConfig) else dict(agent_cfg)
    return json.loads(json.dumps(cfg))


def make_algorithm(agent_cfg: DictConfig | dict, venv: VecEnv, seed: int, checkpoint: Checkpoint | None = None):
    """A fresh algorithm from the agent config, or (with `checkpoint`) one that continues the checkpoint: same
    algorithm, network and spaces required, weights, optimizer, step count and observation statistics restored."""
    cfg = agent_config(agent_cfg)
    if cfg.get("algo") not in ALGORITHMS:
        raise ConfigError(f"agent.algo: {cfg.get('algo')!r} unknown; allowed: {', '.join(ALGORITHMS)}")
    cls = ALGORITHMS[cfg["algo"]]
    policy = cfg.get("policy", "MlpPolicy")
    if policy not in cls.policy_aliases:
        raise ConfigError(f"agent.policy: {policy!r} unknown; allowed: {', '.join(cls.policy_aliases)}")
    check_agent_config(cfg, venv.num_envs)  # whitelisted kwargs in range, a rollout that fits in memory
    if checkpoint is not None:
        if checkpoint.algo != cfg["algo"]:
            raise checkpoint.error(f"was trained with {checkpoint.algo}, this run's agent.algo is {cfg['algo']}")
        saved = checkpoint.meta["agent"]
        for key in ("policy", "policy_kwargs"):
            if saved.get(key) != cfg.get(key):
                raise checkpoint.error(f"has {key} {saved.get(key)!r}, this run's agent.{key} is {cfg.get(key)!r}")
        checkpoint.check_spaces(venv.observation_space, venv.action_space)
    policy_kwargs = dict(cfg.get("policy_kwargs") or {})
    if "activation_fn" in policy_kwargs:
        policy_kwargs["activation_fn"] = ACTIVATIONS[policy_kwargs["activation_fn"]]
    model = cls(
        policy,
        venv,
        seed=seed,
        device="cpu",
        verbose=0,
        policy_kwargs=policy_kwargs or None,
        **(cfg.get("kwargs") or {}),
    )
    if checkpoint is not None:
        checkpoint.restore(model, venv)
    return model


class _SpacesEnv(gym.Env):
    """An env that only has spaces: enough to rebuild an algorithm around a checkpoint's weights."""

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space):
        self.observation_space, self.action_space = observation_space, action_space


def load_model(checkpoint: Checkpoint):
    """The algorithm a checkpoint holds, rebuilt from its own agent config (for export and evaluation; no env)."""
    if checkpoint.algo not in ALGORITHMS:
        raise checkpoint.error(f"names algorithm {checkpoint.algo!r}; allowed: {', '.join(ALGORITHMS)}")
    obs = space_from_description(checkpoint.meta["observation_space"])
    act = space_from_description(checkpoint.meta["action_space"])
    venv = DummyVecEnv([lambda: _SpacesEnv(obs, act)] * checkpoint.meta["n_envs"])  # the training rollout size
    try:
        model = make_algorithm(checkpoint.meta["agent"], venv, seed=checkpoint.meta.get("seed") or 0)
    except ConfigError:
        raise
    except (TypeError, ValueError, AssertionError) as exc:  # kwargs SB3 refuses
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise checkpoint.error(f"has an agent config the algorithm refuses: {first}") from None
    checkpoint.restore(model)  # observation statistics: checkpoint.obs_normalization()
    return model


def save_model(model, path: Path, agent_cfg: DictConfig | dict, venv: VecEnv | None = None) -> Path:
    """Write `model` with its agent config and `venv`'s observation statistics as a CoEL-Gym checkpoint."""
    return write_checkpoint(path, model, agent_config(agent_cfg), venv if isinstance(venv, VecNormalize) else None)


class ModelPolicy(ActionPolicy):
    """A (training) SB3 model as a Policy: deterministic actions on normalised observations, masks for
    MaskablePPO. The env it acts in must be the flat training env (FlattenObservation, knobs wrapper if any)."""

    def __init__(self, model, venv: VecEnv):
        masked = isinstance(model, MaskablePPO)

        def predict(obs: Any, env: gym.Env | None = None) -> Any:
            o = venv.normalize_obs(obs) if isinstance(venv, VecNormalize) else obs
            if masked and env is not None:
                return model.predict(o, deterministic=True, action_masks=env.unwrapped.action_masks())[0]
            return model.predict(o, deterministic=True)[0]

        super().__init__(predict, name=type(model).__name__)

    def act(self, obs: Any, env: Any) -> Any:
        return self.predict(obs, env)


class BaselineEvalCallback(BaseCallback):
    """Every `checkpoint_every` env steps: a checkpoint (agents.checkpoint); every `eval_every`: evaluate the
    deterministic agent and (once, cached) the baselines on the same instances, log eval/* (with `eval/timesteps`;
    the baselines' scores at every evaluation step, so they plot as lines next to the agent's)
    and record when the agent first beats them all on the official raw score (None turns either off; a final
    evaluation always runs). `instances`: (routing seed, reset seed) pairs, validation instances by default
    (coel_env.benchmark.instances 'val'); without them, `episodes` resets from `seed` on env_kwargs' routing model."""

    def __init__(
        self,
        env_kwargs: dict,
        baselines: list[str],
        episodes: int,
        seed: int,
        eval_every: int | None,
        checkpoint_every: int | None,
        checkpoint_dir: Path,
        out_dir: Path,
        run=None,
        knobs: str | dict | None = None,
        obs_exclude: tuple[str, ...] = (),
        *,
        agent_cfg: DictConfig | dict,
        instances: list[tuple[int, int]] | None = None,
    ):
        super().__init__()
        self.instances = list(instances) if instances else None
        self.agent_cfg = agent_cfg
        self.env_kwargs, self.baselines, self.episodes, self.seed = env_kwargs, baselines, episodes, seed
        self.knobs, self.obs_exclude = knobs, tuple(obs_exclude)
        self.eval_every, self.checkpoint_every = eval_every, checkpoint_every
        self.checkpoint_dir, self.out_dir, self.run = Path(checkpoint_dir), Path(out_dir), run
        self.history: list[dict] = []
        self.baseline_scores: dict[str, dict] = {}
        self.first_win_s: float | None = None
        self._next_eval = self._next_ckpt = 0
        self._start = 0.0
        self._envs: dict[int, gym.Env] = {}

    def _pairs(self) -> list[tuple[int | None, int]]:
        if self.instances:
            return [(int(r), int(s)) for r, s in self.instances[: self.episodes]]
        return [(None, self.seed + i) for i in range(self.episodes)]

    def _env_for(self, routing_seed: int | None) -> gym.Env:
        if routing_seed not in self._envs:
            kw = self.env_kwargs if routing_seed is None else {**self.env_kwargs, "scenario_seed": routing_seed}
            self._envs[routing_seed] = make_flat_env(kw, self.knobs, self.obs_exclude)
        return self._envs[routing_seed]

    def _run(self, make) -> dict:
        from coel_env.benchmark.stats import mean, stratified_bootstrap_ci

        eps = [run_episode(self._env_for(r), make(s), seed=s) for r, s in self._pairs()]
        out = summarize(eps)
        _, out["score_raw_lo"], out["score_raw_hi"] = stratified_bootstrap_ci(
            [e["score_raw"] for e in eps], statistic=mean, reps=500
        )
        return out

    def _on_training_start(self) -> None:
        self._start = time.time()
        steps = self.num_timesteps  # > 0 when resuming: the next multiples after the restored count
        self._next_eval = (steps // self.eval_every + 1) * self.eval_every if self.eval_every else 0
        self._next_ckpt = (steps // self.checkpoint_every + 1) * self.checkpoint_every if self.checkpoint_every else 0
        for name in self.baselines:  # once (same instances every time), logged with every evaluation
            self.baseline_scores[name] = self.evaluate_baseline(name)

    def evaluate_baseline(self, name: str) -> dict:
        from agents.baselines import make_policy

        return self._run(lambda s: make_policy(name, seed=s))

    def evaluate_agent(self) -> dict:
        policy = ModelPolicy(self.model, self.training_env)
        return self._run(lambda s: policy)

    def _on_step(self) -> bool:
        steps = self.num_timesteps
        if self.checkpoint_every and steps >= self._next_ckpt:
            self._next_ckpt += self.checkpoint_every
            save_model(self.model, self.checkpoint_dir / f"ckpt_{steps}_steps.zip", self.agent_cfg, self.training_env)
        if self.eval_every and steps >= self._next_eval:
            self._next_eval += self.eval_every
            self._evaluate(steps)
        return True

    def _on_training_end(self) -> None:
        if not self.history or self.history[-1]["timesteps"] != self.num_timesteps:
            self._evaluate(self.num_timesteps)
        for env in self._envs.values():
            env.close()
        self._envs.clear()

    def _evaluate(self, steps: int) -> None:
        agent = self.evaluate_agent()
        elapsed = time.time() - self._start
        best = max((s["return"] for s in self.baseline_scores.values()), default=-np.inf)
        best_score = max((s["score_raw"] for s in self.baseline_scores.values()), default=-np.inf)
        if self.first_win_s is None and agent["score_raw"] > best_score:
            self.first_win_s = elapsed
        row = {
            "timesteps": steps,
            "wall_s": elapsed,
            "agent": agent,
            "best_baseline_return": best,
            "best_baseline_score_raw": best_score,
            "baselines": {
                n: {k: b[k] for k in ("return", "score_raw", "score_raw_lo", "score_raw_hi")}
                for n, b in self.baseline_scores.items()
            },
        }
        self.history.append(row)
        self.logger.record("eval/timesteps", steps)  # evaluation rows carry their own x (learning curves)
        for key in ("return", "score_raw", "score_raw_lo", "score_raw_hi", "e2e_p95_s", "quality_loss"):
            self.logger.record(f"eval/agent_{key}", agent[key])
        for key in ("tokens_per_s", "slo_attainment", "migration_bytes", "infeasible"):
            self.logger.record(f"eval/agent_{key}", agent[key])
        self.logger.record("eval/best_baseline_return", best)
        self.logger.record("eval/best_baseline_score_raw", best_score)
        for name, b in self.baseline_scores.items():  # at every evaluation step: lines next to the agent's
            for k in ("return", "score_raw", "score_raw_lo", "score_raw_hi"):
                self.logger.record(f"eval/{name}_{k}", b[k])
        self.logger.dump(steps)


class StatusLineCallback(BaseCallback):
    """One status line every `every_s` seconds (and at the end) — steps, fps, elapsed, ETA and the latest
    evaluation — for logs where a progress bar shows nothing (stdout not a TTY). `latest` returns the newest
    evaluation row of BaselineEvalCallback (its `history`), or None."""

    def __init__(self, total_timesteps: int, every_s: float = 30.0, latest=None, out=None):
        super().__init__()
        self.total, self.every_s, self.latest, self.out = int(total_timesteps), float(every_s), latest, out
        self._start = self._last = 0.0
        self._start_steps = 0
        self.lines: list[str] = []

    def _on_training_start(self) -> None:
        self._start = self._last = time.time()
        self._start_steps = self.num_timesteps

    def _on_step(self) -> bool:
        now = time.time()
        if now - self._last >= self.every_s:
            self._last = now
            self.emit(now)
        return True

    def _on_training_end(self) -> None:
        self.emit(time.time())

    def line(self, now: float) -> str:
        steps, elapsed = self.num_timesteps, max(now - self._start, 1e-9)
        fps = (steps - self._start_steps) / elapsed
        target = self._start_steps + self.total  # SB3 adds `total_timesteps` to a resumed count
        eta = (target - steps) / fps if fps > 0 and steps < target else 0.0
        text = (
            f"[train] {steps}/{target} steps ({100 * min(steps / max(target, 1), 1):.0f}%) | {fps:.0f} fps | "
            f"{elapsed:.0f} s elapsed, ETA {eta:.0f} s"
        )
        row = self.latest() if self.latest is not None else None
        if row:
            text += (
                f" | eval @ {row['timesteps']}: agent score {row['agent']['score_raw']:.4f}, best baseline "
                f"{row['best_baseline_score_raw']:.4f}"
            )
        return text

    def emit(self, now: float) -> None:
        import sys

        text = self.line(now)
        self.lines.append(text)
        print(text, file=self.out or sys.stdout, flush=True)
