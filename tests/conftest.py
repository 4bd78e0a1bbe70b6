"""Shared fixtures of the core tests: small scenarios built from dicts, seeded generators, ready states."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest

os.environ.setdefault("WANDB_MODE", "offline")

from coel_env import Scenario, make_scenario

# A one-MoE-layer model with Qwen1.5-MoE's widths: hidden state 4096 bytes, expert 17.3 MB at 16 bits.
ONE_LAYER_MODEL = dict(
    name="one-layer",
    num_layers=1,
    num_experts=2,
    top_k=1,
    d_model=2048,
    d_ff_expert=1408,
    num_heads=16,
    num_kv_heads=16,
    head_dim=128,
    vocab_size=1000,
)


def scenario_dict(
    num_servers: int = 2,
    gpus: tuple[str, ...] = ("rtx4090d",),
    model: str | dict = "tiny-moe",
    bandwidth_gbps: float = 1.0,
    latency_ms: float = 0.2,
    arrival_rate: float | list[float] = 0.2,
    max_replicas: int = 2,
    **overrides,
) -> dict:
    """A valid scenario as a plain dict (what a YAML file or a Hydra node holds); `overrides` replace fields."""
    spec = dict(
        name="test",
        model=copy.deepcopy(model),
        servers=[dict(name=f"s{i}", gpus=list(gpus), cpu="i9-14900kf", cpu_ram_gb=64) for i in range(num_servers)],
        topology=dict(kind="star", bandwidth_gbps=bandwidth_gbps, latency_ms=latency_ms),
        workload=dict(arrival_rate=arrival_rate, input_len=dict(mean=128), output_len=dict(mean=64), max_batch=8),
        routing=dict(num_domains=2),
        dynamics=dict(resource_noise=0.0, arrival_burstiness=0.0),
        max_replicas=max_replicas,
    )
    spec.update(copy.deepcopy(overrides))
    return spec


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still exists (orphan checks of the real backend's servers)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def make_spec():
    """Factory of scenario dicts: `make_spec(num_servers=3, bandwidth_gbps=10, ...)`."""
    return scenario_dict


@pytest.fixture
def one_layer_model() -> dict:
    """ONE_LAYER_MODEL as a fresh dict (Qwen1.5-MoE widths, one MoE layer, 2 experts, top-1)."""
    return dict(ONE_LAYER_MODEL)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture(scope="session")
def tiny() -> Scenario:
    """The shipped `tiny` scenario (3 servers, tiny-moe), seed 0."""
    return make_scenario("tiny", seed=0)


@pytest.fixture(scope="session")
def testbed() -> Scenario:
    """The seed paper's testbed (3 servers, 4 GPUs, Qwen1.5-MoE-A2.7B), seed 0."""
    return make_scenario("paper-testbed", seed=0)


@pytest.fixture
def tiny_state(tiny):
    return tiny.initial_state(np.random.default_rng(0))


@pytest.fixture
def testbed_state(testbed):
    return testbed.initial_state(np.random.default_rng(0))
