"""DeploymentPlan: validation messages, memory accounting by hand, manifest round-trip and tampering."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coel_env import DeploymentPlan, PlanError, make_scenario
from coel_env.plan.deployment import MAX_PRUNE, gpu_capacity
from coel_env.world.cluster import GB

HYP = settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def qwen1():
    """One RTX 4090D server holding Qwen1.5-MoE-A2.7B (which does not fit it at 16 bits)."""
    spec = dict(
        name="qwen-one-gpu",
        model="qwen1.5-moe-a2.7b",
        max_replicas=2,
        servers=[dict(name="solo", gpus=["rtx4090d"], cpu="i9-14900kf", cpu_ram_gb=64, ssd_gb=512)],
    )
    return make_scenario(spec).cluster


def _plan_error(plan, cluster, memory_avail=None) -> str:
    with pytest.raises(PlanError) as exc:
        plan.validate(cluster, memory_avail)
    msg = str(exc.value)
    assert msg.startswith("plan: ") and "\n" not in msg
    return msg


# ---- validation -----------------------------------------------------------------------------------------------
def test_uniform_plan_is_valid_and_complete(tiny):
    c = tiny.cluster
    plan = DeploymentPlan.uniform(c)
    assert plan.validate(c) is plan
    assert (plan.replica_count == 1).all()
    # contiguous blocks: every GPU holds the same number of experts (4 layers x 8 experts over 3 GPUs: 10/11)
    counts = np.bincount(plan.device[..., 0].ravel(), minlength=c.num_devices)
    assert counts.sum() == 32 and counts.max() - counts.min() <= 1


def test_uniform_falls_back_to_fewer_bits_when_16_does_not_fit(qwen1):
    c = qwen1
    plan = DeploymentPlan.uniform(c)
    # capacity: 24 GB * 0.9 - 3.72 GB non-expert = 17.9 GB; 1440 experts * 17.3 MB = 24.9 GB (too big), at 8 bits 12.5
    assert c.gpu_expert_capacity[0] == pytest.approx(24e9 * 0.9 - c.model.non_expert_bytes(16))
    assert set(np.unique(plan.bits[plan.valid])) == {8}
    plan.validate(c)
    plan.bits[plan.valid] = 16
    msg = _plan_error(plan, c)
    assert "solo/gpu0 GPU tier holds 24.91 GB of experts; capacity 17.88 GB" in msg


def test_missing_replica(tiny):
    c = tiny.cluster
    plan = DeploymentPlan.uniform(c)
    plan.device[2, 5] = -1
    plan.device[3, 1] = -1
    msg = _plan_error(plan, c)
    assert "layer 2 expert 5 has no replica (2 experts without one)" in msg


@pytest.mark.parametrize(
    ("field", "value", "expect"),
    [
        ("bits", 5, "layer 1 expert 3 has bits=5; allowed: 16, 8, 4"),
        ("bits", 0, "bits=0; allowed: 16, 8, 4"),
        ("tier", 3, "tier 3 unknown; allowed: 0 (gpu), 1 (cpu), 2 (ssd)"),
        ("tier", -1, "tier -1 unknown"),
        ("device", 7, "device index 7 out of range; allowed 0..2"),
    ],
)
def test_bad_replica_values(tiny, field, value, expect):
    c = tiny.cluster
    plan = DeploymentPlan.uniform(c)
    getattr(plan, field)[1, 3, 0] = value
    assert expect in _plan_error(plan, c)


def test_duplicate_replica_on_one_device(tiny):
    c = tiny.cluster
    plan = DeploymentPlan.uniform(c)
    plan.device[0, 4, 1] = plan.device[0, 4, 0]
    plan.tier[0, 4, 1] = 1
    plan.bits[0, 4, 1] = 8
    dev = c.device_names[plan.device[0, 4, 0]]
    assert f"layer 0 expert 4 has two replicas on {dev}" in _plan_error(plan, c)


def test_bad_prune_and_shapes(tiny):
    c = tiny.cluster
    plan = DeploymentPlan.uniform(c)
    plan.prune[1] = 0.95
    assert f"prune ratios must lie in [0, {MAX_PRUNE}]" in _plan_error(plan, c)
    plan.prune[1] = np.nan
    assert "prune ratios" in _plan_error(plan, c)
    short = DeploymentPlan.empty(3, 8, 2, c.num_pairs)
    assert "expected (4, 8, 2)" in _plan_error(short, c)
    links = DeploymentPlan.empty(4, 8, 2, 1)
    assert "compression arrays have 1 links; expected 3" in _plan_error(links, c)


def test_problems_lists_every_overfull_tier(qwen1):
    c = qwen1
    plan = DeploymentPlan.for_cluster(c)
    plan.device[..., 0] = 0
    plan.bits[..., 0] = 16
    plan.tier[..., 0] = 1  # all 24.9 GB in CPU RAM: 64 GB - 8 GB reserve = 56 GB: fits
    assert plan.problems(c) == []
    plan.device[..., 1] = 0  # a second copy of everything on the SSD: 24.9 GB of 512 GB fits,
    plan.tier[..., 1] = 2
    plan.bits[..., 1] = 16
    plan.tier[:12, :, 1] = 0  # but half of them on the GPU duplicates (GPU, CPU) pairs on one device
    assert "two replicas on solo/gpu0" in _plan_error(plan, c)


# ---- memory accounting ----------------------------------------------------------------------------------------
def test_memory_usage_by_hand(testbed):
    c = testbed.cluster
    m = c.model
    plan = DeploymentPlan.for_cluster(c)
    plan.device[..., 0] = 0  # everything on server1/gpu0 ...
    plan.bits[..., 0] = 4
    plan.device[0, :10, 1] = 2  # ... 10 experts of layer 0 also on server2/gpu0 in CPU RAM at 8 bits
    plan.tier[0, :10, 1] = 1
    plan.bits[0, :10, 1] = 8
    plan.device[5, 7, 1] = 3  # one on server3's SSD at 16 bits
    plan.tier[5, 7, 1] = 2
    plan.bits[5, 7, 1] = 16
    gpu, cpu, ssd = plan.memory_usage(c)
    e4, e8, e16 = m.expert_bytes(4), m.expert_bytes(8), m.expert_bytes(16)
    np.testing.assert_array_equal(gpu, [24 * 60 * e4, 0, 0, 0])
    np.testing.assert_array_equal(cpu, [0, 10 * e8, 0])
    np.testing.assert_array_equal(ssd, [0, 0, e16])
    assert 24 * 60 * e4 == 24 * 60 * (4_325_376 + 2 * 67_584)


def test_gpu_capacity_follows_free_memory(testbed):
    c = testbed.cluster
    ne = c.model.non_expert_bytes(16)
    full = gpu_capacity(c, np.ones(c.num_devices))
    np.testing.assert_allclose(full, c.gpu_expert_capacity)
    # server1 splits the non-expert weights over its two GPUs
    np.testing.assert_allclose(c.non_expert_bytes_per_gpu, [ne / 2, ne / 2, ne, ne])
    half = gpu_capacity(c, np.full(c.num_devices, 0.5))
    np.testing.assert_allclose(half, 24 * GB * (0.5 - 0.1) - c.non_expert_bytes_per_gpu)
    plan = DeploymentPlan.uniform(c)
    plan.validate(c)  # fits with all memory free ...
    msg = _plan_error(plan, c, np.full(c.num_devices, 0.3))  # ... not when 70% is taken by others
    assert "GPU tier holds" in msg and "(+3 more)" in msg


@HYP
@given(data=st.data())
def test_fewer_bits_never_use_more_memory(tiny, data):
    c = tiny.cluster
    L, E, R = 4, 8, 2
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    plan = DeploymentPlan.for_cluster(c)
    plan.device[..., 0] = rng.integers(0, c.num_devices, size=(L, E))
    plan.device[..., 1] = np.where(rng.random((L, E)) < 0.5, (plan.device[..., 0] + 1) % c.num_devices, -1)
    plan.tier[:] = rng.integers(0, 3, size=(L, E, R))
    plan.bits[:] = rng.choice([16, 8, 4], size=(L, E, R))
    lower = plan.copy()
    drop = rng.random((L, E, R)) < 0.5
    lower.bits[:] = np.where(drop & (plan.bits > 4), plan.bits // 2, plan.bits)
    for before, after in zip(plan.memory_usage(c), lower.memory_usage(c)):
        assert (after <= before).all()
    assert (
        sum(x.sum() for x in lower.memory_usage(c)) < sum(x.sum() for x in plan.memory_usage(c))
        or not (drop & (plan.bits > 4) & plan.valid).any()
    )


# ---- manifests ------------------------------------------------------------------------------------------------
def _rich_plan(c) -> DeploymentPlan:
    plan = DeploymentPlan.uniform(c)
    plan.device[1, 2, 1] = (plan.device[1, 2, 0] + 1) % c.num_devices
    plan.tier[1, 2, 1] = 2
    plan.bits[1, 2, 1] = 4
    plan.tier[3, 7, 0] = 1
    plan.bits[3, 7, 0] = 8
    plan.prune[:] = [0.0, 0.25, 0.9]
    plan.fuse[:] = [True, False, True]
    return plan


def test_manifest_json_round_trip_is_exact(tiny, tmp_path):
    c = tiny.cluster
    plan = _rich_plan(c)
    path = plan.save_manifest(tmp_path / "plan.json", c)
    data = json.loads(path.read_text())
    assert data["format"] == "coel-deployment-manifest" and data["scenario"] == "tiny"
    assert data["devices"] == ["s0/gpu0", "s1/gpu0", "s2/gpu0"]
    entry = next(x for x in data["experts"] if (x["layer"], x["expert"]) == (1, 2))
    assert entry["replicas"][1] == {"device": c.device_names[plan.device[1, 2, 1]], "tier": "ssd", "bits": 4}
    back = DeploymentPlan.load_manifest(path, c)
    assert back == plan
    for f in ("device", "tier", "bits", "prune", "fuse"):
        assert getattr(back, f).dtype == getattr(plan, f).dtype
    assert back.to_manifest(c) == plan.to_manifest(c)


@HYP
@given(
    prune=st.lists(st.floats(0.0, float(np.float32(MAX_PRUNE)), width=32), min_size=3, max_size=3),
    fuse=st.lists(st.booleans(), min_size=3, max_size=3),
)
def test_manifest_round_trip_keeps_any_compression(tiny, prune, fuse):
    c = tiny.cluster
    plan = DeploymentPlan.uniform(c)
    plan.prune[:] = prune
    plan.fuse[:] = fuse
    back = DeploymentPlan.from_manifest(json.loads(json.dumps(plan.to_manifest(c))), c)
    np.testing.assert_array_equal(back.prune, plan.prune)
    assert back == plan


def _tamper(c, edit):
    data = json.loads(json.dumps(_rich_plan(c).to_manifest(c)))
    edit(data)
    return data


@pytest.mark.parametrize(
    ("edit", "expect"),
    [
        (lambda d: d.update(format="something-else"), "'format' must be 'coel-deployment-manifest'"),
        (lambda d: d.update(version=2), "version 2 unsupported; allowed: 1"),
        (lambda d: d.update(model="mixtral-8x7b"), "model 'mixtral-8x7b' does not match the scenario's 'tiny-moe'"),
        (
            lambda d: d["experts"][0]["replicas"][0].update(device="s9/gpu0"),
            "unknown device 's9/gpu0'; allowed: s0/gpu0",
        ),
        (lambda d: d["experts"][0]["replicas"][0].update(tier="nvme"), "unknown tier 'nvme'; allowed: gpu, cpu, ssd"),
        (lambda d: d["experts"][0]["replicas"][0].update(bits=3), "layer 0 expert 0 has bits=3; allowed: 16, 8, 4"),
        (lambda d: d["experts"][0]["replicas"][0].update(bits=300), "bits=300; allowed: 16, 8, 4"),
        (lambda d: d["experts"][0]["replicas"][0].pop("tier"), "malformed entry (KeyError"),
        (lambda d: d["experts"][0].update(layer=9), "layer 9 expert 0 out of range; layers 0..3, experts 0..7"),
        (lambda d: d["experts"][0].update(layer="zero"), "malformed entry (ValueError"),
        (lambda d: d["experts"].pop(5), "layer 0 expert 5 has no replica"),
        (lambda d: d["experts"].append(d["experts"][0]), "layer 0 expert 0 is listed twice"),
        (lambda d: d["experts"][0].update(replicas=d["experts"][0]["replicas"] * 3), "has 3 replicas; max_replicas=2"),
        (lambda d: d["experts"][0].update(replicas=d["experts"][0]["replicas"] * 2), "has two replicas on"),
        (lambda d: d.update(experts=7), "malformed entry (TypeError"),
        (lambda d: d.pop("experts"), "malformed entry (KeyError"),
        (lambda d: d["links"][0].update(servers=["s0", "s7"]), "unknown link"),
        (lambda d: d["links"][0].update(prune_ratio=2.0), "prune ratios must lie in [0, 0.9]"),
        (lambda d: d["links"][0].update(prune_ratio="high"), "malformed entry (ValueError"),
    ],
)
def test_tampered_manifest_gives_one_line_plan_error(tiny, edit, expect):
    c = tiny.cluster
    data = _tamper(c, edit)
    with pytest.raises(PlanError) as exc:
        DeploymentPlan.from_manifest(data, c)
    msg = str(exc.value)
    assert expect in msg, msg
    assert "\n" not in msg and exc.value.__cause__ is None


def test_manifest_over_capacity_is_rejected(qwen1, tmp_path):
    plan = DeploymentPlan.uniform(qwen1)
    data = plan.to_manifest(qwen1)
    for item in data["experts"]:
        item["replicas"][0]["bits"] = 16
    path = tmp_path / "big.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=r"GPU tier holds 24\.91 GB of experts; capacity 17\.88 GB"):
        DeploymentPlan.load_manifest(path, qwen1)


def test_manifest_file_errors(tiny, tmp_path):
    c = tiny.cluster
    with pytest.raises(PlanError, match="no file"):
        DeploymentPlan.load_manifest(tmp_path / "none.json", c)
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "coel-deployment-manifest", ')
    with pytest.raises(PlanError, match="is not valid JSON"):
        DeploymentPlan.load_manifest(bad, c)
    with pytest.raises(PlanError, match="'format' must be"):
        DeploymentPlan.from_manifest(["not", "a", "dict"], c)


def test_copy_is_deep_and_equality_is_by_value(tiny):
    plan = DeploymentPlan.uniform(tiny.cluster)
    other = plan.copy()
    assert other == plan
    other.bits[0, 0, 0] = 8
    other.prune[0] = 0.1
    assert other != plan and plan.bits[0, 0, 0] == 16 and plan.prune[0] == 0
