"""CoEL-Gym: learning how to deploy Mixture-of-Experts LLMs on edge networks."""

from coel_env.backend.contract import Backend, Metrics, MigrationReport
from coel_env.backend.surrogate import MetricsBatch, SurrogateBackend
from coel_env.errors import CoELError, ConfigError, PlanError
from coel_env.plan.deployment import DeploymentPlan
from coel_env.specs import list_scenarios, load_scenario_spec
from coel_env.world.cluster import TIERS, Cluster, build_cluster
from coel_env.world.state import ClusterState, Scenario, make_scenario
from coel_env.world.traces import RoutingModel, RoutingTrace

__version__ = "0.1.0"

__all__ = [
    "TIERS",
    "Backend",
    "Cluster",
    "ClusterState",
    "CoELError",
    "ConfigError",
    "DeploymentPlan",
    "Metrics",
    "MetricsBatch",
    "MigrationReport",
    "PlanError",
    "RoutingModel",
    "RoutingTrace",
    "Scenario",
    "SurrogateBackend",
    "build_cluster",
    "list_scenarios",
    "load_scenario_spec",
    "make_scenario",
]

import gymnasium as _gym

if "CoEL-v0" not in _gym.registry:
    _gym.register("CoEL-v0", entry_point="coel_env.env:CoELEnv", vector_entry_point="coel_env.env.vector:CoELVectorEnv")
