"""Named reward spaces, computed on batched metric fields (arrays [N])."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coel_env.errors import ConfigError

COMPOSITE_DEFAULTS = {"latency": 1.0, "throughput": 0.5, "quality": 10.0, "energy": 0.1, "migration": 0.5,
                      "dropped": 1.0}


@dataclass
class RewardContext:
    window_s: float
    slo_s: float
    demand_tokens_per_s: float  # nominal generated tokens/s the workload asks for
    power_max_w: float  # every device and CPU at full power
    drop_cost: float = 2.0


def latency(f: dict, mig_s: np.ndarray, ctx: RewardContext) -> np.ndarray:
    """-(mean e2e latency / SLO) over served requests, with dropped requests costing `drop_cost` each."""
    d = f["dropped_frac"]
    return -(f["e2e_mean_s"] / ctx.slo_s) * (1 - d) - ctx.drop_cost * d


def slo(f: dict, mig_s: np.ndarray, ctx: RewardContext) -> np.ndarray:
    """Fraction of requests served within the SLO (dropped ones count as late)."""
    return 1.0 - f["late_frac"]


def throughput_per_watt(f: dict, mig_s: np.ndarray, ctx: RewardContext) -> np.ndarray:
    """Generated tokens per joule."""
    return f["tokens_per_s"] * ctx.window_s / np.maximum(f["energy_j"], 1e-9)


class Composite:
    """Weighted sum: -latency/SLO + throughput/demand - quality loss - energy/(max power) - migration time/window
    - dropped fraction (weights by name, defaults in COMPOSITE_DEFAULTS)."""

    def __init__(self, weights: dict | None = None):
        weights = dict(weights or {})
        unknown = set(weights) - set(COMPOSITE_DEFAULTS)
        if unknown:
            raise ConfigError(f"reward_weights: unknown key '{sorted(unknown)[0]}'; allowed: "
                              f"{', '.join(COMPOSITE_DEFAULTS)}")
        self.w = {**COMPOSITE_DEFAULTS, **weights}

    def __call__(self, f: dict, mig_s: np.ndarray, ctx: RewardContext) -> np.ndarray:
        w = self.w
        d = f["dropped_frac"]
        return (-w["latency"] * (f["e2e_mean_s"] / ctx.slo_s) * (1 - d)
                + w["throughput"] * f["tokens_per_s"] / max(ctx.demand_tokens_per_s, 1e-9)
                - w["quality"] * f["quality_loss"]
                - w["energy"] * f["energy_j"] / (ctx.window_s * max(ctx.power_max_w, 1e-9))
                - w["migration"] * np.minimum(mig_s / ctx.window_s, 1.0)
                - w["dropped"] * d)


REWARD_SPACES = ("latency", "slo", "throughput_per_watt", "composite")


def make_reward(name: str, weights: dict | None = None):
    if name == "composite":
        return Composite(weights)
    if weights:
        raise ConfigError(f"reward_weights: only used with reward_space='composite', not '{name}'")
    fns = {"latency": latency, "slo": slo, "throughput_per_watt": throughput_per_watt}
    if name not in fns:
        raise ConfigError(f"reward_space: unknown name '{name}'; allowed: {', '.join(REWARD_SPACES)}")
    return fns[name]
