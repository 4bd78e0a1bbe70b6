"""Every spec number is finite and in its physical range, absurd sizes are refused before anything is allocated,
the CLIs refuse bad values in one line, `hardware=<profile>` works as documented, result files are atomic."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml

from coel_env import ConfigError, DeploymentPlan, SurrogateBackend, make_scenario
from coel_env.specs import (
    DEVICE_PRESETS,
    MODEL_PRESETS,
    bounds,
    device_preset,
    hardware_profile_names,
    list_scenarios,
    load_hardware_profile,
    load_scenario_spec,
    model_from_hf_config,
    model_preset,
    scenario_with_hardware,
)
from coel_env.specs.hardware import CONF_DIR
from coel_env.world.cluster import build_cluster

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}


def one_line_error(fn, *args) -> str:
    with pytest.raises(ConfigError) as exc:
        fn(*args)
    msg = str(exc.value)
    assert msg.strip() and "\n" not in msg, msg
    assert "For further information" not in msg and "Traceback" not in msg, msg
    return msg


def _set(data: dict, path: str, value) -> None:
    """data[a][b]... = value for path "a.b..." (integers index lists)."""
    *parents, last = path.split(".")
    for key in parents:
        data = data[int(key)] if key.isdigit() else data.setdefault(key, {})
    data[int(last) if last.isdigit() else last] = value


def _servers(n: int) -> list[dict]:
    return [dict(name=f"s{i}", gpus=["rtx4090d"], cpu="i9-14900kf", cpu_ram_gb=64) for i in range(n)]


def _links(*pairs) -> dict:
    return dict(kind="explicit", links=[dict(a=a, b=b, bandwidth_gbps=1) for a, b in pairs])


NAN, INF = float("nan"), float("inf")
BOOL = "True is a boolean (YAML reads on/off, yes/no, true/false as booleans); must be a number"
MODEL_KINDS = (
    f"must be a preset name ({', '.join(MODEL_PRESETS)}), a path to a Hugging Face config.json (or its checkpoint "
    "directory) or a mapping of fields"
)

# (field path, value, the message's tail): one case per rule
SCENARIO_RULES = [
    # sizes: refused in validation, with the allowed maximum
    ("model", {"preset": "tiny-moe", "num_layers": 10**7}, "model: num_layers: 10000000 must be <= 1024"),
    ("model", {"preset": "tiny-moe", "num_experts": 10**6}, "model: num_experts: 1000000 must be <= 4096"),
    ("model", {"preset": "tiny-moe", "d_model": 10**6}, "model: d_model: 1000000 must be <= 65536"),
    ("model", {"preset": "tiny-moe", "d_ff_expert": 10**8}, "model: d_ff_expert: 100000000 must be <= 1048576"),
    ("model", {"preset": "tiny-moe", "num_heads": 10**5}, "model: num_heads: 100000 must be <= 1024"),
    ("model", {"preset": "tiny-moe", "head_dim": 10**5}, "model: head_dim: 100000 must be <= 4096"),
    ("model", {"preset": "tiny-moe", "vocab_size": 10**9}, "model: vocab_size: 1000000000 must be <= 4194304"),
    (
        "model",
        {"preset": "tiny-moe", "num_layers": 64, "num_experts": 2048},
        "model: MoE layers (64) x num_experts^2 (2048^2) = 268435456 routing entries must be <= 67108864",
    ),
    (
        "model",
        {"preset": "tiny-moe", "attn_params_per_layer": 0},
        "attn_params_per_layer: Input should be greater than 0",
    ),
    ("servers", lambda: _servers(10**5), "servers: List should have at most 256 items after validation, not 100000"),
    (
        "servers.0.gpus",
        ["rtx4090d"] * 100,
        "servers.0.gpus: List should have at most 64 items after validation, not 100",
    ),
    ("max_replicas", 10**6, "max_replicas: 1000000 must be <= 8"),
    ("routing.num_domains", 10**6, "routing.num_domains: 1000000 must be <= 256"),
    ("workload.max_batch", 10**9, "workload.max_batch: 1000000000 must be <= 65536"),
    ("workload.max_num_batched_tokens", 10**9, "workload.max_num_batched_tokens: 1000000000 must be <= 1048576"),
    ("workload.kv_block_tokens", 0, "workload.kv_block_tokens: Input should be greater than or equal to 1"),
    ("workload.max_queue_wait_s", -1, "workload.max_queue_wait_s: Input should be greater than or equal to 0"),
    ("servers", lambda: _servers(100), None),  # with a mesh topology (below): too many route entries
    # devices and servers: positive, finite, idle power <= peak power
    (
        "servers.0.gpus",
        [{"preset": "rtx4090d", "power_idle_w": 500}],
        "servers.0.gpus: device: power_idle_w (500) must be <= power_max_w (425)",
    ),
    ("servers.0.gpus", [{"preset": "rtx4090d", "memory_gb": 0}], "memory_gb: Input should be greater than 0"),
    ("servers.0.gpus", [{"preset": "rtx4090d", "mem_bw_gbs": -1}], "mem_bw_gbs: Input should be greater than 0"),
    ("servers.0.gpus", [{"preset": "rtx4090d", "peak_tflops": 1e9}], "peak_tflops: 1000000000 must be <= 1000000"),
    ("servers.0.cpu", {"preset": "xeon-edge", "power_max_w": 0}, "power_max_w: Input should be greater than 0"),
    ("servers.0.cpu_ram_gb", -4, "servers.0.cpu_ram_gb: Input should be greater than 0"),
    ("servers.0.cpu_ram_gb", 1e300, "servers.0.cpu_ram_gb: 1e+300 must be <= 1000000"),
    ("servers.0.ssd_gb", -1, "servers.0.ssd_gb: Input should be greater than or equal to 0"),
    ("servers.0.ssd_bw_gbs", 0, "servers.0.ssd_bw_gbs: Input should be greater than 0"),
    ("servers.0.pcie_bw_gbs", 0, "servers.0.pcie_bw_gbs: Input should be greater than 0"),
    # topology: positive bandwidths, no negative latency, no self-loops or duplicate links
    ("topology.bandwidth_gbps", 0, "topology.bandwidth_gbps: Input should be greater than 0"),
    ("topology.latency_ms", -1, "topology.latency_ms: Input should be greater than or equal to 0"),
    ("topology", _links(("s0", "s0")), "topology.links[0]: a self-loop (s0 - s0); a link needs two ends"),
    (
        "topology",
        _links(("s0", "s1"), ("s1", "s0")),
        "topology.links[1]: s1 - s0 duplicates topology.links[0]; each pair of ends may have one link",
    ),
    (
        "topology",
        dict(kind="star", links=[dict(a="s0", b="s1", bandwidth_gbps=1)]),
        "topology.links: only used with kind 'explicit', not 'star'",
    ),
    (
        "topology",
        dict(kind="explicit", links=[dict(a="s0", b="s1", bandwidth_gbps=-1)]),
        "topology.links.0.bandwidth_gbps: Input should be greater than 0",
    ),
    # workload: lengths >= 1 token, spreads that keep lengths positive, rates in range
    (
        "workload.input_len",
        dict(dist="uniform", mean=100, spread=1.5),
        "workload.input_len: spread: 1.5 must be <= 1 for a uniform length (mean x (1 ± spread) would go negative)",
    ),
    (
        "workload.output_len",
        dict(dist="lognormal", mean=100, spread=5),
        "workload.output_len: spread: 5 must be <= 3 (the lognormal sigma)",
    ),
    ("workload.input_len", dict(mean=0), "workload.input_len.mean: Input should be greater than or equal to 1"),
    ("workload.output_len", dict(mean=-3), "workload.output_len.mean: Input should be greater than or equal to 1"),
    ("workload.output_len", dict(mean=1e9), "workload.output_len.mean: 1000000000 must be <= 1048576"),
    (
        "workload.input_len",
        dict(mean=64, spread=-0.1),
        "workload.input_len.spread: Input should be greater than or equal to 0",
    ),
    (
        "workload.arrival_rate",
        1e6,
        "workload.arrival_rate: must be finite, >= 0 and <= 10000 requests/s, got 1000000.0",
    ),
    ("workload.slo_s", 0, "workload.slo_s: Input should be greater than or equal to 0.001"),
    ("workload.slo_s", 1e-300, "workload.slo_s: Input should be greater than or equal to 0.001"),
    # routing and dynamics: probabilities in [0, 1], positive epochs, bounded skew and burstiness
    ("routing.domain_overlap", 2, "routing.domain_overlap: Input should be less than or equal to 1"),
    ("routing.zipf_alpha", 100, "routing.zipf_alpha: 100 must be <= 10"),
    ("routing.affinity_concentration", 0, "routing.affinity_concentration: Input should be greater than 0"),
    ("dynamics.epoch_s", 0, "dynamics.epoch_s: Input should be greater than 0"),
    ("dynamics.failure_rate", 1.5, "dynamics.failure_rate: Input should be less than or equal to 1"),
    ("dynamics.recovery_rate", -0.1, "dynamics.recovery_rate: Input should be greater than or equal to 0"),
    ("dynamics.link_change_rate", 2, "dynamics.link_change_rate: Input should be less than or equal to 1"),
    ("dynamics.arrival_burstiness", 10, "dynamics.arrival_burstiness: 10 must be <= 3"),
    ("budgets.latency_s", 0, "budgets.latency_s: Input should be greater than or equal to 0.001"),
    ("budgets.latency_s", 1e-300, "budgets.latency_s: Input should be greater than or equal to 0.001"),
    # energy budgets: rewards divide by them, so a denormal budget would give -inf rewards
    ("budgets.energy_j", 5e-324, "budgets.energy_j: Input should be greater than or equal to 1"),
    ("budgets.energy_j", 1e-300, "budgets.energy_j: Input should be greater than or equal to 1"),
    ("budgets.energy_j", 1e300, "budgets.energy_j: 1e+300 must be <= 1000000000000000"),
    ("budgets.energy_j", 10**400, "budgets.energy_j: Input should be a valid number"),
    # huge integers are capped (they would overflow float products downstream), and named briefly
    (
        "model",
        {"preset": "tiny-moe", "attn_params_per_layer": 10**400},
        "model: attn_params_per_layer: an integer of ~400 digits must be <= 4398046511104",
    ),
    (
        "model",
        {"preset": "tiny-moe", "attn_params_per_layer": 10**18},
        "model: attn_params_per_layer: 1e+18 must be <= 4398046511104",
    ),
    # booleans (YAML on/yes/true) are not numbers
    ("workload.max_batch", True, "workload.max_batch: " + BOOL),
    ("max_replicas", True, "max_replicas: " + BOOL),
    ("model", {"preset": "tiny-moe", "num_layers": True}, "model: num_layers: " + BOOL),
    ("workload.arrival_rate", True, "workload.arrival_rate: " + BOOL),
    ("workload.arrival_rate", [0.1, False, 0.2], "workload.arrival_rate: " + BOOL.replace("True", "False")),
    ("budgets.latency_s", True, "budgets.latency_s: " + BOOL),
    ("servers.0.cpu_ram_gb", True, "servers.0.cpu_ram_gb: " + BOOL),
    ("dynamics.link_change_range", [0.1, True], "dynamics.link_change_range.1: " + BOOL),
    (
        "workload.arrival_rate",
        {"a": 1},
        "workload.arrival_rate: {'a': 1} given; must be a number or a list of numbers (requests/s, one per server)",
    ),
    (
        "workload.arrival_rate",
        10**400,
        "workload.arrival_rate: must be finite, >= 0 and <= 10000 requests/s, got an integer of ~400 digits",
    ),
    # the model: a preset name, a config.json path or a mapping, nothing else
    ("model", None, "model: None given; " + MODEL_KINDS),
    ("model", 7, "model: 7 given; " + MODEL_KINDS),
    ("model", [1], "model: [1] given; " + MODEL_KINDS),
    # NaN and inf never pass
    ("servers.0.cpu_ram_gb", NAN, "servers.0.cpu_ram_gb: Input should be a finite number"),
    ("servers.0.gpus", [{"preset": "rtx4090d", "memory_gb": INF}], "memory_gb: Input should be a finite number"),
    ("topology.bandwidth_gbps", INF, "topology.bandwidth_gbps: Input should be a finite number"),
    ("topology.latency_ms", NAN, "topology.latency_ms: Input should be a finite number"),
    (
        "workload.arrival_rate",
        [0.1, NAN],
        "workload.arrival_rate: must be finite, >= 0 and <= 10000 requests/s, got [0.1, nan]",
    ),
    ("workload.input_len", dict(mean=INF), "workload.input_len.mean: Input should be a finite number"),
    ("dynamics.link_change_range", [0.1, NAN], "dynamics.link_change_range.1: Input should be a finite number"),
    ("dynamics.drift_rate", NAN, "dynamics.drift_rate: Input should be a finite number"),
    ("budgets.energy_j", INF, "budgets.energy_j: Input should be a finite number"),
]


@pytest.mark.parametrize(
    ("path", "value", "expected"), SCENARIO_RULES, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(SCENARIO_RULES)]
)
def test_scenario_rules_refuse_in_one_line(make_spec, path, value, expected):
    data = make_spec()
    _set(data, path, value() if callable(value) else copy.deepcopy(value))
    if expected is None:
        data["topology"] = dict(kind="mesh")
        expected = (
            "topology: 100 servers (mesh) give 4950 server pairs x 4950 links = 24502500 route entries; "
            "must be <= 16777216"
        )
    msg = one_line_error(load_scenario_spec, data)
    assert msg.startswith("scenario: ") and msg.endswith(expected), msg


HARDWARE_RULES = [
    ({"link_efficiency": 1.5}, "hardware: link_efficiency: Input should be less than or equal to 1"),
    ({"compute_efficiency": 0}, "hardware: compute_efficiency: Input should be greater than 0"),
    ({"prefetch_hit_rate": 2}, "hardware: prefetch_hit_rate: Input should be less than or equal to 1"),
    ({"kv_reserve_frac": 1}, "hardware: kv_reserve_frac: Input should be less than 1"),
    ({"gpu_memory_utilization": 0}, "hardware: gpu_memory_utilization: Input should be greater than 0"),
    ({"serving": "batchy"}, "hardware: serving: Input should be 'independent', 'lockstep' or 'continuous'"),
    ({"layer_overhead_s": -1}, "hardware: layer_overhead_s: Input should be greater than or equal to 0"),
    ({"prefill_layer_overhead_s": 2e6}, "hardware: prefill_layer_overhead_s: 2000000 must be <= 1000000"),
    ({"transfer_latency_s": 1e9}, "hardware: transfer_latency_s: 1000000000 must be <= 1000000"),
    ({"cloud_bandwidth_gbps": 0}, "hardware: cloud_bandwidth_gbps: Input should be greater than 0"),
    ({"pcie_bw_gbs": -2}, "hardware: pcie_bw_gbs: Input should be greater than 0"),
    (
        {"dequant_slowdown": {16: 1.0, 3: 2.0}},
        "hardware: dequant_slowdown: bit-widths [3] are not supported; allowed: 16, 8, 4",
    ),
    (
        {"dequant_slowdown": {16: 1.0, 8: 0.0}},
        "hardware: dequant_slowdown: {8: 0.0} must be time multipliers in (0, 10000]",
    ),
    (
        {"quality": {"loss_per_bits": {16: 0.0, 4: 2.0}}},
        "hardware: quality.loss_per_bits: {4: 2.0} must be fractions of accuracy lost, in [0, 1]",
    ),
    ({"quality": {"prune_knee": 0}}, "hardware: quality.prune_knee: Input should be greater than 0"),
    (
        {"device_overrides": {"h200": {"peak_tflops": -1}}},
        "hardware: device_overrides.h200.peak_tflops: Input should be greater than 0",
    ),
    ({"oversubscription_exponent": 100}, "hardware: oversubscription_exponent: 100 must be <= 10"),
    ({"link_efficiency": NAN}, "hardware: link_efficiency: Input should be a finite number"),
    ({"layer_overhead_s": INF}, "hardware: layer_overhead_s: Input should be a finite number"),
    ({"dequant_slowdown": {16: 1.0, 8: INF}}, "hardware: dequant_slowdown.8: Input should be a finite number"),
    (
        {"device_overrides": {"h200": {"mem_bw_gbs": NAN}}},
        "hardware: device_overrides.h200.mem_bw_gbs: Input should be a finite number",
    ),
    ({"grouped_expert_bits": [16, 12]}, "hardware: grouped_expert_bits.1: Input should be 16, 8 or 4"),
]


@pytest.mark.parametrize(("data", "expected"), HARDWARE_RULES, ids=[str(i) for i in range(len(HARDWARE_RULES))])
def test_hardware_rules_refuse_in_one_line(data, expected):
    assert one_line_error(load_hardware_profile, data) == expected


def test_nan_and_inf_in_yaml_files_are_refused(make_spec, tmp_path):
    data = make_spec()
    text = yaml.safe_dump(data).replace("bandwidth_gbps: 1.0", "bandwidth_gbps: .inf")
    assert ".inf" in text
    (tmp_path / "inf.yaml").write_text(text)
    msg = one_line_error(load_scenario_spec, tmp_path / "inf.yaml")
    assert msg == "scenario inf.yaml: topology.bandwidth_gbps: Input should be a finite number"
    data["servers"][1]["cpu_ram_gb"] = "nan"  # a string spelling of NaN as well
    (tmp_path / "nan.yaml").write_text(yaml.safe_dump(data))
    assert one_line_error(load_scenario_spec, tmp_path / "nan.yaml").endswith(
        "servers.1.cpu_ram_gb: Input should be a finite number"
    )
    (tmp_path / "hw.yaml").write_text("name: hw\nmemory_efficiency: .nan\n")
    assert (
        one_line_error(load_hardware_profile, tmp_path / "hw.yaml")
        == "hardware profile hw.yaml: memory_efficiency: Input should be a finite number"
    )


def test_yaml_booleans_are_not_numbers(make_spec, tmp_path):
    """YAML reads on/yes/true as booleans; pydantic alone would take them as 1."""
    text = yaml.safe_dump(make_spec()).replace("max_batch: 8", "max_batch: on")
    text = text.replace("max_replicas: 2", "max_replicas: yes")
    assert "max_batch: on" in text and "max_replicas: yes" in text
    (tmp_path / "yes.yaml").write_text(text)
    assert one_line_error(load_scenario_spec, tmp_path / "yes.yaml") == (
        f"scenario yes.yaml: workload.max_batch: {BOOL} (and 1 more error)"
    )
    (tmp_path / "hw.yaml").write_text("name: hw\nhost_cores: yes\n")
    msg = one_line_error(load_hardware_profile, tmp_path / "hw.yaml")
    assert msg == f"hardware profile hw.yaml: host_cores: {BOOL}"
    assert one_line_error(load_hardware_profile, {"link_efficiency": True}) == f"hardware: link_efficiency: {BOOL}"
    assert load_hardware_profile({"cpu_compute": True}).cpu_compute  # a boolean field still takes booleans


def test_files_that_are_not_utf8_are_refused_in_one_line(make_spec, tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"name: x\nmodel: \xff\xfe tiny\n")
    assert one_line_error(load_scenario_spec, tmp_path / "bin.yaml") == (
        "scenario bin.yaml: not UTF-8 text (byte 0xff at offset 15)"
    )
    (tmp_path / "hw.yaml").write_bytes(b"name: \xc3\x28\n")
    msg = one_line_error(load_hardware_profile, tmp_path / "hw.yaml")
    assert msg == f"hardware: {tmp_path / 'hw.yaml'}: not UTF-8 text (byte 0xc3 at offset 6)"


def test_a_huge_model_fails_in_validation_before_any_allocation(make_spec, monkeypatch):
    """10^7 layers: refused by the spec, never reaching the cluster or the routing generator."""
    import coel_env.world.state as state

    def forbidden(*args, **kwargs):
        raise AssertionError("built past validation")

    monkeypatch.setattr(state, "build_cluster", forbidden)
    monkeypatch.setattr(state.RoutingModel, "generate", forbidden)
    data = make_spec(model={"preset": "deepseek-v3", "num_layers": 10**7})
    tracemalloc.start()
    try:
        msg = one_line_error(make_scenario, data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert msg == "scenario: model: num_layers: 10000000 must be <= 1024"
    assert peak < 8 * 2**20, peak  # nothing sized by the layers was allocated


def test_a_huge_hf_config_is_refused(tmp_path):
    cfg = dict(
        model_type="mixtral",
        num_hidden_layers=10**7,
        num_local_experts=8,
        num_experts_per_tok=2,
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
    )
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    msg = one_line_error(model_from_hf_config, tmp_path)
    assert msg.endswith("num_layers: 10000000 must be <= 1024")


def _big_full_space(make_spec) -> dict:
    """8 servers x 64 GPUs and 64 MoE layers x 256 experts x 8 replicas: every spec cap passes (popularity,
    routing, route entries), but the `full` space's mask would be 64 x 256 x 8 x (512 + 7) = 68 million entries."""
    gpu = {"preset": "cpu-small", "memory_gb": 0.05}
    return make_spec(
        model={"preset": "tiny-moe", "num_layers": 64, "num_experts": 256},
        servers=[dict(name=f"s{i}", gpus=[gpu] * 64, cpu="cpu-small", cpu_ram_gb=16) for i in range(8)],
        max_replicas=8,
        routing={"num_domains": 1},
    )


def test_an_action_space_too_big_to_allocate_is_refused_when_built(make_spec):
    from coel_env.env import make_action_codec

    spec = load_scenario_spec(_big_full_space(make_spec))  # the scenario itself is fine
    cluster = build_cluster(spec)
    tracemalloc.start()
    try:
        msg = one_line_error(make_action_codec, "full", cluster)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert msg == (
        "action_space full: mask of MoE layers (64) x experts (256) x max_replicas (8) x (devices (512) + 7) + 7 x "
        f"server pairs (28) + 2 = 68026566 entries; must be <= {bounds.MAX_ACTION_ENTRIES}; use action_space 'edit' "
        "or 'threshold' for a cluster and model this big"
    )
    assert peak < 8 * 2**20, peak  # refused before the mask (or the nvec) was allocated
    assert make_action_codec("edit", cluster).space.shape == (41,)  # the compact spaces still work
    assert make_action_codec("threshold", cluster).space.shape == (3 * 64 + 28 + 1,)
    assert one_line_error(lambda: make_action_codec("edit", cluster, num_edits=10**7)).startswith(
        "action_space edit: mask of num_edits (10000000) x "
    )


def test_a_too_big_full_space_fails_in_the_env_in_one_line(make_spec):
    import gymnasium as gym

    import coel_env  # noqa: F401  (registers CoEL-v0)

    with pytest.raises(ConfigError) as exc:
        gym.make("CoEL-v0", scenario=_big_full_space(make_spec), action_space="full")
    assert "\n" not in str(exc.value) and str(exc.value).startswith("action_space full: mask of MoE layers (64)")


def test_caps_are_far_above_every_shipped_preset():
    v3 = model_preset("deepseek-v3")
    assert v3.num_layers * 8 <= bounds.MAX_LAYERS and v3.num_experts * 8 <= bounds.MAX_EXPERTS
    assert v3.num_moe_layers * v3.num_experts**2 * 8 <= bounds.MAX_ROUTING_ENTRIES
    big = load_scenario_spec("deepseek-scale")
    assert len(big.servers) * 4 <= bounds.MAX_SERVERS
    assert len(big.servers) * v3.num_moe_layers * v3.num_experts * 8 <= bounds.MAX_POPULARITY_ENTRIES
    c = build_cluster(big)  # the `full` action space of the biggest shipped scenario
    full_mask = v3.num_moe_layers * v3.num_experts * big.max_replicas * (c.num_devices + 7)
    assert full_mask * 16 <= bounds.MAX_ACTION_ENTRIES


@pytest.mark.parametrize("name", list_scenarios())
def test_every_shipped_scenario_still_loads_and_compiles(name):
    spec = load_scenario_spec(name)
    cluster = build_cluster(spec)
    assert cluster.num_servers == len(spec.servers)
    assert all(np.isfinite(getattr(cluster, a)).all() for a in ("dev_mem", "link_bw", "pair_latency", "ssd_bw"))


@pytest.mark.parametrize("name", hardware_profile_names())
def test_every_hardware_profile_still_loads(name):
    by_name = load_hardware_profile(name)
    assert by_name == load_hardware_profile(CONF_DIR / "hardware" / f"{name}.yaml")
    assert by_name.name == name


def test_every_model_and_device_preset_still_loads():
    assert {"default", "cpu-gloo", "h100", "h200"} <= set(hardware_profile_names())
    assert [model_preset(n).name for n in MODEL_PRESETS] == list(MODEL_PRESETS)
    for name in DEVICE_PRESETS:
        d = device_preset(name)
        assert 0 <= d.power_idle_w <= d.power_max_w


def test_scenario_with_hardware_replaces_the_profile_only(tmp_path):
    assert scenario_with_hardware("tiny", None) == "tiny"
    own = tmp_path / "mine.yaml"  # backend.hardware also takes a profile file
    own.write_text((CONF_DIR / "hardware" / "h200.yaml").read_text().replace("name: h200", "name: mine"))
    assert build_cluster(load_scenario_spec(scenario_with_hardware("tiny", str(own)))).hw.name == "mine"
    data = scenario_with_hardware("tiny", "h100")
    assert data["hardware"] == "h100"
    assert load_scenario_spec(data).model_copy(update={"hardware": "default"}) == load_scenario_spec("tiny")
    assert build_cluster(load_scenario_spec(data)).hw.name == "h100"
    assert one_line_error(scenario_with_hardware, "tiny", "h900").startswith("hardware: unknown profile 'h900'")


# ---- result files are atomic ----------------------------------------------------------------------------------
def test_result_writers_leave_no_partial_file(tmp_path, tiny):
    from experiments.results_io import write_csv

    good = write_csv(tmp_path / "rows.csv", [{"a": 1, "b": 2}])
    with pytest.raises(ValueError):  # the second row breaks the writer half-way
        write_csv(good, [{"a": 3, "b": 4}, {"a": 5, "zzz": 6}])
    assert good.read_text().splitlines() == ["a,b", "1,2"]  # the old file is intact
    path = DeploymentPlan.uniform(tiny.cluster).save_manifest(tmp_path / "plan.json", tiny.cluster)
    assert DeploymentPlan.load_manifest(path, tiny.cluster) == DeploymentPlan.uniform(tiny.cluster)
    from coel_env.world.traces import RoutingTrace

    RoutingTrace(np.zeros((2, 4, 2), np.int32), np.zeros(2, np.int64), np.zeros(2, np.int64)).save(tmp_path / "t")
    assert RoutingTrace.load(tmp_path / "t.npz").experts.shape == (2, 4, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "rows.csv", "t.npz"]  # no temp files left


# ---- the CLIs refuse bad values in one line, before writing anything ------------------------------------------
def run_module(module: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env={**ENV, **env}, capture_output=True, text=True, timeout=240
    )


CLI_CASES = [
    ("experiments.evaluate", "seeds=0", "error: seeds: 0 must be an integer >= 1"),
    ("experiments.evaluate", "seeds=abc", "error: seeds: 'abc' must be an integer >= 1"),
    ("experiments.evaluate", "seed_offset=1.5", "error: seed_offset: 1.5 must be an integer >= 0"),
    ("experiments.evaluate", "max_epochs=0", "error: max_epochs: 0 must be an integer >= 1"),
    (
        "experiments.evaluate",
        "backend.hardware=h900",
        "error: hardware: unknown profile 'h900'; allowed: " + ", ".join(hardware_profile_names()),
    ),
    ("experiments.evaluate_plan", "window_s=0", "error: window_s: 0 must be a finite number > 0"),
    ("experiments.evaluate_plan", "window_s=-5", "error: window_s: -5 must be a finite number > 0"),
    (
        "experiments.evaluate_plan",
        "window_s=1e308",
        "error: window_s: 1e+308 must be a finite number in (0, 1000000] seconds",
    ),
    (
        "experiments.evaluate",
        "policy_kwargs.oracle.time_limit=nan policies=[oracle]",
        "error: policy oracle: time_limit: nan given; must be a finite number in (0, 1000000]",
    ),
    (
        "experiments.evaluate",
        "+policy_kwargs.coel.bogus=1",
        "error: policy coel: unknown argument 'bogus'; allowed: seed, drift_threshold, ema, locality, "
        "compress_below_gbps, prune_ratio, fuse, fill, min_region_gbps, balance",
    ),
    ("experiments.evaluate_plan", "seed=1.5", "error: seed: 1.5 must be an integer >= 0"),
    (
        "experiments.evaluate_plan",
        "hardware=h900",
        "error: hardware: unknown profile 'h900'; allowed: " + ", ".join(hardware_profile_names()),
    ),
    ("experiments.reproduce_paper", "seed=1.5", "error: seed: 1.5 must be an integer >= 0"),
    (
        "experiments.reproduce_paper",
        "output_lens=[64,-5]",
        "error: output_lens[1]: -5 must be an integer in [1, 1048576]",
    ),
    ("experiments.reproduce_paper", "input_lens=[0]", "error: input_lens[0]: 0 must be an integer in [1, 1048576]"),
    (
        "experiments.reproduce_paper",
        "input_len_fixed=0",
        "error: input_len_fixed: 0 must be an integer in [1, 1048576]",
    ),
    ("experiments.compare", "heatmaps.epochs=0", "error: heatmaps.epochs: 0 must be an integer >= 1"),
    ("experiments.compare", "heatmaps.seed=1.5", "error: heatmaps.seed: 1.5 must be an integer >= 0"),
    ("experiments.main", "seeds=abc", "error: seeds: 'abc' must be an integer >= 1"),
    ("experiments.main", "eval_epochs=0", "error: eval_epochs: 0 must be an integer >= 1"),
]
RESULT_FILES = {
    "leaderboard.csv",
    "leaderboard.md",
    "episodes.csv",
    "fig4.csv",
    "results.json",
    "figures.png",
    "report.md",
    "summary.json",
    "train",
    "evaluate",
    "compare",
}


@pytest.mark.parametrize(("module", "arg", "expected"), CLI_CASES, ids=[f"{m[12:]}-{a}" for m, a, _ in CLI_CASES])
def test_clis_refuse_bad_values_in_one_line(tmp_path, module, arg, expected):
    out = tmp_path / "out"
    extra = ["logger=disabled"] if module in ("experiments.evaluate", "experiments.compare") else []
    proc = run_module(module, *arg.split(), f"hydra.run.dir={out}", *extra)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == expected
    assert "Traceback" not in proc.stderr
    assert not RESULT_FILES & {p.name for p in out.glob("*")}


# ---- the documented `hardware=<profile>` override -------------------------------------------------------------
def _tiny_metrics(hardware) -> dict:
    from experiments.plan_io import initial_state

    sc = make_scenario("tiny", seed=0, hardware=hardware)
    plan = DeploymentPlan.uniform(sc.cluster)
    return SurrogateBackend(sc.cluster).serve(plan, initial_state(sc, 0), sc.spec.dynamics.epoch_s).to_dict()


def test_evaluate_plan_takes_a_hardware_profile():
    proc = run_module("experiments.evaluate_plan", "scenario=tiny", "hardware=h100", "hardware.link_efficiency=0.5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["hardware"] == "h100"
    edited = load_hardware_profile("h100").model_copy(update={"link_efficiency": 0.5})
    assert out["metrics"]["e2e_mean_s"] == pytest.approx(_tiny_metrics(edited)["e2e_mean_s"])
    default = _tiny_metrics(None)["e2e_mean_s"]
    assert not math.isclose(out["metrics"]["e2e_mean_s"], default)
    proc = run_module("experiments.evaluate_plan", "scenario=tiny", "hardware=null")  # as the config used to read
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["hardware"] == "default" and out["metrics"]["e2e_mean_s"] == pytest.approx(default)


def test_reproduce_paper_takes_a_hardware_profile(tmp_path):
    from omegaconf import OmegaConf

    from experiments.reproduce_paper import measure

    proc = run_module(
        "experiments.reproduce_paper",
        "hardware=h100",
        "output_lens=[64]",
        "input_lens=[64]",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads((tmp_path / "results.json").read_text())["fig4"][0]
    cfg = {"seed": 0, "plan": "uniform", "load": "concurrent", "in_flight": 256, "max_num_seqs": 256, "engine": "vllm"}
    h100 = measure("paper-1server-2gpu", 128, 64, OmegaConf.create({**cfg, "hardware": "h100"}))
    default = measure("paper-1server-2gpu", 128, 64, OmegaConf.create({**cfg, "hardware": None}))
    assert row["single_server_tok_s"] == pytest.approx(h100["tok_s"])
    assert not math.isclose(h100["tok_s"], default["tok_s"])
    assert not list(tmp_path.glob(".*.tmp*"))  # atomic writes left no temp file


def test_evaluate_takes_a_backend_hardware_profile(tmp_path):
    proc = run_module(
        "experiments.evaluate",
        "scenarios=[tiny]",
        "policies=[static_linear]",
        "seeds=1",
        "max_epochs=1",
        "plots=false",
        "progress_bar=false",
        "logger=disabled",
        "backend.hardware=h100",
        f"hydra.run.dir={tmp_path}",
        WANDB_MODE="disabled",  # logger=disabled: no W&B run at all
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with (tmp_path / "leaderboard.csv").open() as f:
        config = json.loads(next(csv.DictReader(f))["config"])
    assert config["env"]["scenario"]["hardware"] == "h100" and config["scenario"] == "tiny"
