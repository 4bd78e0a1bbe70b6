"""Evaluate one deployment plan on the surrogate and print its metrics as JSON.

python -m experiments.evaluate_plan scenario=metro-8 plan=uniform
python -m experiments.evaluate_plan scenario=paper-testbed plan=path/to/manifest.json
python -m experiments.evaluate_plan scenario=paper-testbed hardware=h100     # a profile of conf/hardware
"""

from __future__ import annotations

import json
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from coel_env.backend.surrogate import SurrogateBackend
from coel_env.errors import CoELError
from coel_env.specs import HardwareProfile
from coel_env.specs.scenario import scenario_from_dict
from coel_env.world.state import Scenario
from experiments.cli_checks import error_line, optional_seconds, require_int
from experiments.plan_io import hardware_args, hardware_from_cfg, initial_state, resolve_plan


def scenario_from_cfg(cfg: DictConfig, seed: int, hardware: HardwareProfile | str | None = None) -> Scenario:
    """The Scenario selected in the `scenario` config group (named after the chosen option)."""
    data = OmegaConf.to_container(cfg.scenario, resolve=True)
    choice = HydraConfig.get().runtime.choices.get("scenario") if HydraConfig.initialized() else None
    data.setdefault("name", choice or "custom")
    return Scenario(scenario_from_dict(data, f"scenario {data['name']}"), seed=seed, hardware=hardware)


def evaluate(cfg: DictConfig) -> dict:
    seed = require_int(cfg.seed, "seed", 0)
    window = optional_seconds(cfg.window_s, "window_s")
    scenario = scenario_from_cfg(cfg, seed, hardware_from_cfg(cfg))
    plan = resolve_plan(str(cfg.plan), scenario).validate(scenario.cluster)
    window = window or scenario.spec.dynamics.epoch_s
    metrics = SurrogateBackend(scenario.cluster).serve(plan, initial_state(scenario, seed), window)
    return {
        "scenario": scenario.name,
        "plan": str(cfg.plan),
        "seed": seed,
        "backend": "surrogate",
        "hardware": scenario.cluster.hw.name,
        "metrics": metrics.to_dict(),
        "devices": scenario.cluster.device_names,
        "servers": scenario.cluster.server_names,
        "links": [list(e) for e in scenario.cluster.link_ends],
    }


def fail(exc: CoELError) -> None:
    print(error_line(exc), file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base=None, config_path="../conf", config_name="evaluate_plan")
def run(cfg: DictConfig) -> None:
    try:
        result = evaluate(cfg)
    except CoELError as exc:
        fail(exc)
    print(json.dumps(result, indent=1))


def main() -> None:
    try:
        sys.argv[1:] = hardware_args(sys.argv[1:])
    except CoELError as exc:
        fail(exc)
    run()


if __name__ == "__main__":
    main()
