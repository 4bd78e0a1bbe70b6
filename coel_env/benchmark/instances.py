"""Benchmark instances: disjoint train / validation / test seeds of a scenario family.

An instance of a scenario is a pair of seeds:

- `routing_seed`: the routing model (`Scenario(spec, seed=routing_seed)`, the env's `scenario_seed`): per-layer
  expert popularity of each domain and the inter-layer affinity;
- `seed`: `env.reset(seed=seed)`: the initial domain mixture and every epoch's dynamics (popularity drift, domain
  switches, bursty arrivals, resource noise, link changes) and, in dynamic scenarios, the failure/recovery schedule
  (all drawn from the one generator `reset` seeds; the state trajectory does not depend on the policy).

Each split owns a block of `SPLIT_SIZE` seeds for each of the two: split `s`, instance `i` has
`seed = base(s) + i` and `routing_seed = base(s) + ROUTING_OFFSET + i`. Training (`experiments.train`), knob tuning
(`agents.baselines.tuning`) and the training-time evaluation use `train` / `val`; the leaderboard
(`experiments.evaluate`) reports `test` only. `check_train_seeds` refuses training seeds inside the test block.
"""

from __future__ import annotations

from dataclasses import dataclass

from coel_env.errors import ConfigError

SPLIT_SIZE = 1_000_000
ROUTING_OFFSET = SPLIT_SIZE // 2  # routing seeds sit in the upper half of a split's block
SPLITS: dict[str, int] = {"train": 0, "val": SPLIT_SIZE, "test": 2 * SPLIT_SIZE}
MAX_INSTANCES = ROUTING_OFFSET


@dataclass(frozen=True)
class Instance:
    split: str
    index: int
    routing_seed: int  # the env's scenario_seed
    seed: int  # env.reset(seed=...)

    @property
    def label(self) -> str:
        return f"{self.split}{self.index}"


def instances(split: str, n: int, offset: int = 0) -> list[Instance]:
    """Instances `offset .. offset + n - 1` of a split."""
    if split not in SPLITS:
        raise ConfigError(f"split: unknown '{split}'; allowed: {', '.join(SPLITS)}")
    if n < 0 or offset < 0 or offset + n > MAX_INSTANCES:
        raise ConfigError(f"instances: {n} from {offset} must lie in 0..{MAX_INSTANCES}")
    base = SPLITS[split]
    return [Instance(split, i, base + ROUTING_OFFSET + i, base + i) for i in range(offset, offset + n)]


def split_of(seed: int) -> str:
    """The split whose block holds `seed` (a dynamics or routing seed); 'outside' beyond every block."""
    for name, base in SPLITS.items():
        if base <= seed < base + SPLIT_SIZE:
            return name
    return "outside"


def check_train_seeds(seeds, what: str = "seed") -> None:
    """ConfigError (one line) if a seed used for training or tuning lies in the test block."""
    for s in seeds:
        if split_of(int(s)) == "test":
            lo = SPLITS["test"]
            raise ConfigError(
                f"{what}: {s} is a test-instance seed ({lo}..{lo + SPLIT_SIZE - 1}); training never sees them"
            )
