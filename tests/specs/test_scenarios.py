"""Every shipped scenario loads and serves; bad scenario files give one clear line, never a traceback."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from coel_env import ConfigError, DeploymentPlan, SurrogateBackend, list_scenarios, load_scenario_spec, make_scenario
from coel_env.backend.metrics import SCALAR_METRICS
from coel_env.specs.scenario import SCENARIO_DIR
from coel_env.world.cluster import build_cluster

SHIPPED = (
    "deepseek-scale",
    "metro-8",
    "moe2-heterogeneous",
    "paper-1server-2gpu",
    "paper-2server-1gpu",
    "paper-3server-1gpu",
    "paper-testbed",
    "tiny",
)
SCALARS = SCALAR_METRICS


def test_registry_lists_the_shipped_scenarios():
    assert set(SHIPPED) <= set(list_scenarios())
    assert list_scenarios() == sorted(list_scenarios())


@pytest.mark.parametrize("name", list_scenarios())
def test_shipped_scenario_loads_and_serves(name):
    sc = make_scenario(name, seed=0)
    spec, c = sc.spec, sc.cluster
    assert spec.name == name
    assert c.num_servers == len(spec.servers) and c.num_devices == sum(len(s.gpus) for s in spec.servers)
    assert c.num_pairs == c.num_servers * (c.num_servers - 1) // 2
    state = sc.initial_state(np.random.default_rng(0))
    m = spec.model
    np.testing.assert_allclose(state.popularity.sum(-1), m.top_k, rtol=1e-9)
    assert state.popularity.shape == (c.num_servers, m.num_moe_layers, m.num_experts)
    plan = DeploymentPlan.uniform(c)
    assert plan.problems(c) == []
    window = spec.dynamics.epoch_s
    metrics = SurrogateBackend(c).serve(plan, state, window)
    for field in SCALARS:
        v = getattr(metrics, field)
        assert math.isfinite(v) and v >= 0, (field, v)
    assert metrics.requests == pytest.approx(sum(spec.arrival_rates) * window)
    assert metrics.window_s == window
    assert metrics.tokens_per_s > 0
    assert 0 <= metrics.dropped_frac <= metrics.late_frac <= 1
    assert metrics.ttft_mean_s < metrics.e2e_mean_s
    assert metrics.tpot_mean_s > 0
    assert metrics.quality_loss == pytest.approx(0.0 if (plan.bits[plan.valid] == 16).all() else metrics.quality_loss)
    gpu, cpu, ssd = plan.memory_usage(c)
    np.testing.assert_allclose(metrics.gpu_mem_bytes, gpu)
    np.testing.assert_allclose(metrics.cpu_mem_bytes, cpu)
    np.testing.assert_allclose(metrics.ssd_bytes, ssd)
    assert np.all(np.isfinite(metrics.link_bytes)) and np.all(metrics.link_bytes >= 0)
    assert np.all((metrics.device_util >= 0) & (metrics.device_util <= 1))


@pytest.mark.parametrize("name", SHIPPED)
def test_yaml_path_and_name_give_the_same_spec(name):
    assert load_scenario_spec(SCENARIO_DIR / f"{name}.yaml") == load_scenario_spec(name)
    spec = load_scenario_spec(name)
    assert load_scenario_spec(spec.model_dump()) == spec  # a dict round-trip (e.g. a Hydra node)


def test_hydra_compose_of_the_scenario_group():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(SCENARIO_DIR.parent.resolve()), version_base=None):
        for name in ("tiny", "metro-8"):
            cfg = compose(overrides=[f"+scenario={name}"])
            node = OmegaConf.to_container(cfg.scenario, resolve=True)
            assert load_scenario_spec({"name": name, **node}) == load_scenario_spec(name)
        cfg = compose(overrides=["+scenario=tiny", "scenario.max_replicas=3", "scenario.topology.bandwidth_gbps=10"])
        spec = load_scenario_spec({"name": "tiny", **OmegaConf.to_container(cfg.scenario)})
        assert spec.max_replicas == 3 and spec.topology.bandwidth_gbps == 10


# ---- bad scenarios: one line naming the field and what is allowed -------------------------------------------
def _config_error(arg) -> str:
    with pytest.raises(ConfigError) as exc:
        make_scenario(arg)
    msg = str(exc.value)
    assert msg.strip() and "\n" not in msg, msg
    assert "Traceback" not in msg and "For further information" not in msg, msg
    err = exc.value
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), "chained traceback"
    return msg


def test_unknown_scenario_name_lists_allowed():
    msg = _config_error("paper-testbad")
    assert "unknown name 'paper-testbad'" in msg
    assert all(n in msg for n in SHIPPED)


def _write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_bad_yaml_file(tmp_path):
    msg = _config_error(_write(tmp_path, "model: tiny-moe\nservers: [{name: a, gpus: [rtx4090d]\n"))
    assert "bad.yaml" in msg and "not valid YAML" in msg


@pytest.mark.parametrize("text", ["", "- just\n- a list\n", "42\n"])
def test_yaml_that_is_not_a_mapping(tmp_path, text):
    assert "expected a mapping" in _config_error(_write(tmp_path, text))


def test_missing_file(tmp_path):
    assert "no file" in _config_error(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("edit", "must_contain"),
    [
        # unknown fields name the field and the allowed ones
        (lambda d: d.update(colour="red"), ["colour", "unknown field", "allowed", "servers", "topology"]),
        (lambda d: d["workload"].update(burst=3), ["workload.burst", "unknown field", "arrival_rate", "max_batch"]),
        (lambda d: d["servers"][0].update(fans=2), ["servers.0.fans", "unknown field", "cpu_ram_gb"]),
        # wrong types / values name the field and the allowed type or values
        (lambda d: d["workload"].update(max_batch="many"), ["workload.max_batch", "integer"]),
        (lambda d: d["topology"].update(kind="ring"), ["topology.kind", "'star', 'mesh' or 'explicit'"]),
        (lambda d: d["servers"][0].update(cpu_ram_gb=-4), ["servers.0.cpu_ram_gb", "greater than 0"]),
        (lambda d: d.update(max_replicas=0), ["max_replicas", "greater than or equal to 1"]),
        (lambda d: d["workload"].update(arrival_rate=-0.5), ["workload.arrival_rate", ">= 0"]),
        (
            lambda d: d["workload"].update(arrival_rate=[0.1, 0.2, 0.3]),
            ["workload.arrival_rate", "3 values", "2 servers"],
        ),
        (lambda d: d["dynamics"].update(link_change_range=[0.9, 0.2]), ["dynamics.link_change_range", "low <= high"]),
        (lambda d: d["routing"].update(affinity=2), ["routing.affinity", "less than or equal to 1"]),
        # unknown presets list the allowed ones
        (lambda d: d["servers"][0].update(gpus=["rtx9090"]), ["servers.0.gpus", "rtx9090", "allowed", "rtx4090d"]),
        (lambda d: d.update(model="gpt-moe"), ["model", "gpt-moe", "allowed", "qwen1.5-moe-a2.7b"]),
        (lambda d: d.update(model={"preset": "tiny-moe", "top_k": 99}), ["model", "top_k (99)", "num_experts (8)"]),
        # structure
        (lambda d: d["servers"].append(dict(d["servers"][0])), ["server names must be unique"]),
        (lambda d: d.update(servers=[]), ["servers", "at least 1"]),
        (lambda d: d.pop("model"), ["model", "Field required"]),
    ],
)
def test_bad_scenario_fields_give_one_line(make_spec, tmp_path, edit, must_contain):
    data = make_spec()
    edit(data)
    for arg in (data, _write(tmp_path, yaml.safe_dump(data))):  # as a dict and as a YAML file
        msg = _config_error(arg)
        for part in must_contain:
            assert part in msg, (part, msg)


def test_link_to_unknown_server(make_spec):
    data = make_spec(num_servers=3)
    data["topology"] = dict(
        kind="explicit", links=[dict(a="s0", b="s1", bandwidth_gbps=1), dict(a="s1", b="s9", bandwidth_gbps=1)]
    )
    msg = _config_error(data)
    assert "topology.links[1]" in msg and "unknown server 's9'" in msg
    assert "allowed: s0, s1, s2" in msg


def test_disconnected_topology(make_spec):
    data = make_spec(num_servers=3)
    data["topology"] = dict(kind="explicit", links=[dict(a="s0", b="s1", bandwidth_gbps=1)])
    msg = _config_error(data)
    assert "not all connected" in msg


def test_failed_load_builds_nothing(make_spec):
    """A bad spec raises before any cluster exists; a good one is frozen (no half-edited objects later)."""
    good = load_scenario_spec(make_spec())
    with pytest.raises(Exception, match="frozen"):
        good.max_replicas = 5
    bad = make_spec()
    bad["servers"][1]["gpus"] = ["nope"]
    with pytest.raises(ConfigError):
        build_cluster(load_scenario_spec(bad))


# ---- topologies compile to the right links and routes -------------------------------------------------------
def test_star_topology_routes_through_the_switch(make_spec):
    c = build_cluster(load_scenario_spec(make_spec(num_servers=3, bandwidth_gbps=10, latency_ms=0.4)))
    assert c.num_links == 3 and c.num_pairs == 3
    np.testing.assert_allclose(c.link_bw, 10e9 / 8)
    # each pair crosses two switch links; the one-way latency is the topology's latency
    np.testing.assert_array_equal(c.pair_links.sum(1), 2)
    np.testing.assert_allclose(c.pair_latency[~np.eye(3, dtype=bool)], 0.4e-3)


def test_explicit_topology_takes_the_lowest_latency_path(make_spec):
    data = make_spec(num_servers=3)
    data["topology"] = dict(
        kind="explicit",
        links=[
            dict(a="s0", b="s1", bandwidth_gbps=1, latency_ms=1.0),
            dict(a="s1", b="s2", bandwidth_gbps=1, latency_ms=1.0),
            dict(a="s0", b="s2", bandwidth_gbps=0.1, latency_ms=5.0),
        ],
    )
    c = build_cluster(load_scenario_spec(data))
    assert c.pair_latency[0, 2] == pytest.approx(2e-3)  # via s1, not the 5 ms direct link
    assert c.pair_links[c.pair_index[0, 2]].sum() == 2
