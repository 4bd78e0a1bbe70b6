"""Named reward spaces on batched metric fields (arrays [N]), the step's penalties, and `StepScorer`: the one place
that turns a StepRecord into reward and penalty.

Spaces and their ranges (penalties included):

| space | value | range |
| --- | --- | --- |
| `latency` | -(e2e / SLO) x served - max(drop_cost, e2e / SLO) x dropped fraction - penalty | (-inf, 0] |
| `slo` | SLO attainment (dropped requests count as late) x max(0, 1 - penalty) | [0, 1] |
| `throughput_per_watt` | generated tokens per joule x max(0, 1 - penalty) | [0, inf) |
| `score` | the official benchmark's epoch utility (coel_env.benchmark.score) x max(0, 1 - penalty) | [0, 1] |
| `composite` | weighted sum (Composite) - penalty | (-inf, inf) |

Signed spaces subtract the penalty; bounded ones (`RATIO_SPACES`) are scaled by `1 - penalty` (at least 0), so a
penalty still costs and the documented range holds. In both kinds a dropped request never costs less than serving
it at the window's mean latency.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from coel_env.env.record import StepRecord
from coel_env.errors import ConfigError
from coel_env.specs import BudgetSpec

COMPOSITE_DEFAULTS = {
    "latency": 1.0,
    "throughput": 0.5,
    "quality": 10.0,
    "energy": 0.1,
    "migration": 0.5,
    "dropped": 1.0,
}


def demand_tokens_per_s(workload, arrival_rates, num_servers: int, out_mean: float) -> float:
    """Generated tokens/s the workload asks for: its arrival rates times the mean output, or, for a closed loop
    (`workload.concurrency` clients per server), what the clients ask for when each request takes the SLO."""
    if workload.concurrency:
        return float(workload.concurrency * num_servers) * out_mean / workload.slo_s
    return float(sum(arrival_rates)) * out_mean


@dataclass
class RewardContext:
    window_s: float
    slo_s: float
    demand_tokens_per_s: float  # nominal generated tokens/s the workload asks for (`demand_tokens_per_s`)
    power_max_w: float  # every device and CPU at full power
    drop_cost: float = 2.0


def latency(f: dict, mig_s: np.ndarray, ctx: RewardContext) -> np.ndarray:
    """-(mean e2e latency / SLO) over served requests, with dropped requests costing `drop_cost` each, and never
    less than a served request's e2e / SLO (dropping is never cheaper than serving slowly)."""
    d = f["dropped_frac"]
    lat = f["e2e_mean_s"] / ctx.slo_s
    return -lat * (1 - d) - np.maximum(ctx.drop_cost, lat) * d


def slo(f: dict, mig_s: np.ndarray, ctx: RewardContext) -> np.ndarray:
    """Fraction of requests served within the SLO (dropped ones count as late), in [0, 1]."""
    return np.clip(1.0 - np.maximum(f["late_frac"], f["dropped_frac"]), 0.0, 1.0)


def score(f: dict, mig_s: np.ndarray, ctx: RewardContext) -> np.ndarray:
    """The official benchmark's per-epoch utility (SLO attainment and p95 latency; 0 over the quality budget)."""
    from coel_env.benchmark.score import epoch_utility

    return epoch_utility(f, ctx.slo_s)


def throughput_per_watt(f: dict, mig_s: np.ndarray, ctx: RewardContext) -> np.ndarray:
    """Generated tokens per joule."""
    return f["tokens_per_s"] * ctx.window_s / np.maximum(f["energy_j"], 1e-9)


class Composite:
    """Weighted sum: -latency/SLO + throughput/demand - quality loss - energy/(max power) - migration time/window
    - max(dropped weight, latency weight x e2e/SLO) x dropped fraction (weights by name, defaults in
    COMPOSITE_DEFAULTS)."""

    def __init__(self, weights: dict | None = None):
        weights = dict(weights or {})
        unknown = set(weights) - set(COMPOSITE_DEFAULTS)
        if unknown:
            raise ConfigError(
                f"reward_weights: unknown key '{sorted(unknown)[0]}'; allowed: {', '.join(COMPOSITE_DEFAULTS)}"
            )
        self.w = {**COMPOSITE_DEFAULTS, **weights}

    def __call__(self, f: dict, mig_s: np.ndarray, ctx: RewardContext) -> np.ndarray:
        w = self.w
        d = f["dropped_frac"]
        lat = w["latency"] * f["e2e_mean_s"] / ctx.slo_s
        return (
            -lat * (1 - d)
            + w["throughput"] * f["tokens_per_s"] / max(ctx.demand_tokens_per_s, 1e-9)
            - w["quality"] * f["quality_loss"]
            - w["energy"] * f["energy_j"] / (ctx.window_s * max(ctx.power_max_w, 1e-9))
            - w["migration"] * np.minimum(mig_s / ctx.window_s, 1.0)
            - np.maximum(w["dropped"], lat) * d
        )


REWARD_FUNCTIONS = {"latency": latency, "slo": slo, "throughput_per_watt": throughput_per_watt, "score": score}
REWARD_SPACES = (*REWARD_FUNCTIONS, "composite")
RATIO_SPACES = ("slo", "throughput_per_watt", "score")  # bounded below by 0: penalties scale, never subtract
for _name in RATIO_SPACES:
    REWARD_FUNCTIONS[_name].scaled_penalty = True  # type: ignore[attr-defined]


def make_reward(name: str, weights: dict | None = None):
    if name == "composite":
        return Composite(weights)
    if weights:
        raise ConfigError(f"reward_weights: only used with reward_space='composite', not '{name}'")
    if name not in REWARD_FUNCTIONS:
        raise ConfigError(f"reward_space: unknown name '{name}'; allowed: {', '.join(REWARD_SPACES)}")
    return REWARD_FUNCTIONS[name]


RewardFn = Callable[[dict, np.ndarray, RewardContext], np.ndarray]


@dataclass(frozen=True)
class PenaltyWeights:
    """Penalty weights (CoELCore's keyword arguments of the same meaning)."""

    repair: float = 0.1  # per step whose action needed fixing (repair, invalid edit or clipping)
    unit: float = 1.0  # x repaired replicas / (MoE layers x experts)
    invalid: float = 0.02  # per invalid edit
    hello: float = 0.0  # per kbit of Hello messages
    budget: float = 1.0  # x budget excess (mode 'penalty'), or once when a budget ends the episode ('terminate')


class StepScorer:
    """Reward and penalty of a step, from its StepRecord:

    penalty = repair * [repaired] + unit * repaired replicas / (L * E) + invalid * invalid edits
              + hello * Hello bits / 1000 + budget * (excess, or [excess > 0] in mode 'terminate')
    excess  = max(energy_j / energy budget - 1, 0) + max(e2e_p95_s / latency budget - 1, 0)  (set budgets only)
    reward  = reward_fn(served metrics, migration time, ctx) - penalty                 (signed spaces)
            = reward_fn(served metrics, migration time, ctx) * max(0, 1 - penalty)   (RATIO_SPACES)
    """

    def __init__(
        self, reward_fn: RewardFn, ctx: RewardContext, weights: PenaltyWeights, budgets: BudgetSpec, total_replicas: int
    ):
        self.reward_fn, self.ctx, self.weights, self.budgets = reward_fn, ctx, weights, budgets
        self.total_replicas = total_replicas
        self.ratio = bool(getattr(reward_fn, "scaled_penalty", False))  # a bounded space: penalties scale it

    def penalty(self, rec: StepRecord) -> np.ndarray:
        """[N] repair, invalid-edit and Hello penalties (budgets excluded); a term of weight 0 adds exactly 0."""
        w = self.weights
        out = float(w.repair) * rec.repaired
        if w.unit:
            out = out + w.unit * rec.repaired_replicas / self.total_replicas
        if w.invalid:
            out = out + w.invalid * rec.invalid_edits
        if w.hello:
            out = out + w.hello * rec.hello_bits / 1000.0
        return out

    def budget_excess(self, served: dict) -> np.ndarray:
        """[N] summed relative excess over the set energy / latency budgets (0 within them)."""
        b = self.budgets
        over = np.zeros(len(served["energy_j"]))
        if b.energy_j is not None:
            over += np.maximum(served["energy_j"] / b.energy_j - 1.0, 0.0)
        if b.latency_s is not None:
            over += np.maximum(served["e2e_p95_s"] / b.latency_s - 1.0, 0.0)
        return over

    def score(self, rec: StepRecord) -> None:
        """Set rec.budget_excess, rec.terminated, rec.penalty and rec.reward."""
        penalty = self.penalty(rec)
        over = self.budget_excess(rec.served)
        if self.budgets.mode == "terminate":
            terminated = over > 0
            penalty = penalty + self.weights.budget * terminated
        else:
            terminated = np.zeros(len(over), dtype=bool)
            if self.budgets.energy_j is not None or self.budgets.latency_s is not None:  # else the excess is 0
                penalty = penalty + self.weights.budget * over
        rec.budget_excess, rec.terminated, rec.penalty = over, terminated, penalty
        value = self.reward_fn(rec.served, rec.migration_time_s, self.ctx)
        if self.ratio:
            rec.reward = value * np.maximum(1.0 - penalty, 0.0)
        else:
            rec.reward = value - penalty
