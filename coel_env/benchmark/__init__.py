"""The CoEL-Gym benchmark: the official score (`score.py`), train / validation / test instances (`instances.py`)
and the statistics the leaderboard reports (`stats.py`)."""

from coel_env.benchmark.instances import SPLITS, Instance, check_train_seeds, instances
from coel_env.benchmark.score import (
    QUALITY_BUDGET,
    REFERENCE_ONE,
    REFERENCE_ZERO,
    SCORE_VERSION,
    epoch_feasible,
    epoch_utility,
    normalize,
)

__all__ = [
    "QUALITY_BUDGET",
    "REFERENCE_ONE",
    "REFERENCE_ZERO",
    "SCORE_VERSION",
    "SPLITS",
    "Instance",
    "check_train_seeds",
    "epoch_feasible",
    "epoch_utility",
    "instances",
    "normalize",
]
