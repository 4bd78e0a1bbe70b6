"""CoEL-v0 physics with concrete numbers: updates/migration, repair, faults, perception, masks, budgets."""

from __future__ import annotations

import numpy as np
import pytest

from coel_env.env import CoELEnv
from coel_env.specs import load_scenario_spec

MB16 = 17_301_504  # one Qwen1.5-MoE expert at 16 bits: 3 * 2048 * 1408 * 2 bytes


def scenario(name: str, **dynamics) -> dict:
    data = load_scenario_spec(name).model_dump()
    data["dynamics"].update(dynamics)
    return data


def keep(env) -> np.ndarray:
    return np.r_[env.action_codec.encode(env.plan)[:-1], 0]


@pytest.fixture(scope="module")
def paper():
    return CoELEnv(scenario=scenario("paper-testbed", resource_noise=0.0, arrival_burstiness=0.0), perception="ideal")


def test_keep_and_reencode_cost_nothing(paper):
    paper.reset(seed=0)
    plan = paper.plan
    _, _, _, _, info = paper.step(keep(paper))
    assert paper.plan == plan and not info["update"] and info["migration"]["bytes_total"] == 0
    _, _, _, _, info = paper.step(paper.action_codec.encode(plan))  # apply the same plan: nothing moves
    assert info["update"] and not info["plan_changed"] and info["migration"]["time_s"] == 0
    assert not info["repaired"] and info["penalty"] == 0


def test_move_replica_from_peer(paper):
    paper.reset(seed=0)
    c = paper.cluster
    assert c.expert_bytes_by_bits[16] == MB16
    plan = paper.plan
    assert plan.device[0, 0, 0] == 0 and plan.bits[0, 0, 0] == 16  # server1/gpu0
    plan.device[0, 0, 0] = 3  # -> server3/gpu0, over the 1 GbE star
    _, _, _, _, info = paper.step_plan(plan)
    m = info["migration"]
    assert m["bytes_peer"] == MB16 and m["bytes_cloud"] == 0 and m["replicas_added"] == 1
    assert m["replicas_removed"] == 1
    bw = 1e9 / 8 * c.hw.link_efficiency
    assert m["time_s"] == pytest.approx(MB16 / bw + c.pair_latency[0, 2], rel=1e-9)
    assert paper.plan.device[0, 0, 0] == 3


def test_precision_upgrade_comes_from_the_cloud(paper):
    paper.reset(seed=0)
    hw = paper.cluster.hw
    plan = paper.plan
    plan.bits[0, 0, 0] = 8
    _, _, _, _, info = paper.step_plan(plan)  # downgrade: local requantization of the 16-bit copy
    assert info["migration"]["bytes_local"] == paper.cluster.expert_bytes_by_bits[8]
    plan.bits[0, 0, 0] = 16
    _, _, _, _, info = paper.step_plan(plan)  # no peer holds >= 16 bits any more
    m = info["migration"]
    assert m["bytes_cloud"] == MB16
    assert m["time_s"] == pytest.approx(MB16 / (hw.cloud_bandwidth_gbps * 1e9 / 8) + hw.cloud_latency_s)
    assert info["migration_time_s"] == m["time_s"]
    keep_info = paper.step(keep(paper))[4]
    # service degraded while migrating: the mean e2e latency grows by f * t / 2
    f = m["time_s"] / paper.scenario.spec.dynamics.epoch_s
    assert info["metrics"]["e2e_mean_s"] - keep_info["metrics"]["e2e_mean_s"] == pytest.approx(
        f * m["time_s"] / 2, rel=0.05
    )


def test_repair_downgrades_least_popular_first(paper):
    paper.reset(seed=0)
    c = paper.cluster
    plan = paper.plan
    plan.device[..., 0] = 0  # every expert at 16 bits on server1/gpu0: 24.9 GB > its capacity
    plan.bits[..., 0] = 16
    _, _r, _, _, info = paper.step_plan(plan)
    new = paper.plan
    assert info["repaired"] and info["repair_reasons"] == ["bits_downgraded"]
    assert new.problems(c) == [] and (new.device[..., 0] == 0).all()
    gpu, _, _ = new.memory_usage(c)
    assert gpu[0] <= c.gpu_expert_capacity[0] and gpu[0] > 0.95 * c.gpu_expert_capacity[0]
    downgraded = new.bits[..., 0] == 8
    n_down = int(downgraded.sum())
    need = 1440 * MB16 - c.gpu_expert_capacity[0]
    assert n_down == int(np.ceil(need / (MB16 - c.expert_bytes_by_bits[8])))
    pop = paper.core.perception.pop[0]
    assert pop[downgraded].max() <= pop[~downgraded].min() + 1e-12
    assert info["penalty"] == pytest.approx(0.1 + n_down / 1440)


def test_full_action_repairs_duplicates_and_empty_first_slot():
    env = CoELEnv(scenario="tiny", perception="ideal")
    env.reset(seed=0)
    a = env.action_codec.encode(env.plan)
    D = env.cluster.num_devices
    a[0:3] = [1, 0, 0]  # (0, 0) slot 0 on device 1
    a[3:6] = [1, 0, 0]  # slot 1 on device 1 too: duplicate
    a[6:9] = [D, 0, 0]  # (0, 1) slot 0 empty, slot 1 too: missing -> keeps its current replica
    _, _, _, _, info = env.step(a)
    assert info["repair_reasons"] == ["duplicate", "missing_expert"]
    p = env.plan
    assert list(p.device[0, 0]) == [1, -1] and p.device[0, 1, 0] == 0 and p.problems(env.cluster) == []


def test_fault_restores_every_orphan_from_the_cloud():
    env = CoELEnv(
        scenario=scenario("tiny", failure_rate=1.0, recovery_rate=0.0, resource_noise=0.0), perception="ideal"
    )
    env.reset(seed=0)
    before = env.plan
    _, r, term, _trunc, info = env.step(keep(env))
    up = env.state.server_up
    assert up.sum() == 1 and info["servers_up"] == 1 and np.isfinite(r) and not term
    survivor = int(np.flatnonzero(up)[0])
    lost = int((before.device >= 0).sum() - (before.device == survivor).sum())
    assert info["replicas_lost"] == lost and info["restored_experts"] == lost
    after = env.plan
    assert after.problems(env.cluster, env.state.memory_avail) == []
    assert set(np.unique(after.device[after.device >= 0])) == {survivor}
    m = info["restore_migration"]
    assert m["bytes_cloud"] == lost * env.cluster.expert_bytes_by_bits[16] and m["bytes_peer"] == 0
    assert info["migration"]["bytes_total"] == 0  # the agent kept its plan
    assert info["dropped_requests"] >= 0.0
    # requests arriving at failed servers are dropped and counted
    st = env.state
    at_failed = (st.arrival_rate * ~st.server_up).sum() / st.arrival_rate.sum()
    assert at_failed > 0 and info["metrics"]["dropped_frac"] >= at_failed - 1e-9
    assert info["dropped_requests"] == pytest.approx(info["metrics"]["dropped_frac"] * info["metrics"]["requests"])


def test_hello_heartbeat_staleness_and_quantization():
    env = CoELEnv(scenario="tiny", hello={"threshold": 1.0, "max_age": 3})
    env.reset(seed=0)
    bits = [env.step(keep(env))[4]["hello_bits"] for _ in range(6)]
    up_all = env.state.server_up.all()
    assert bits[:3] == [0, 0, 288] or not up_all  # 3 servers x (64 header + 4 fields x 8 bits) every 3rd epoch
    perc = env.core.perception
    assert np.allclose(perc.last * 255, np.round(perc.last * 255))  # 8-bit quantized
    st = env.perceived_state()
    assert not np.array_equal(st.compute_avail, env.state.compute_avail)  # stale between Hellos
    assert st.popularity.shape == env.state.popularity.shape
    assert np.allclose(st.domain_mix, 1 / st.domain_mix.shape[-1])


def test_ideal_perception_is_ground_truth():
    env = CoELEnv(scenario="tiny", perception="ideal")
    env.reset(seed=0)
    info = env.step(keep(env))[4]
    st = env.perceived_state()
    assert info["hello_bits"] == 0
    assert np.array_equal(st.compute_avail, env.state.compute_avail)
    assert np.array_equal(st.popularity, env.state.popularity)


def test_observed_popularity_is_sampled_not_truth():
    env = CoELEnv(scenario="paper-testbed")
    obs, _ = env.reset(seed=0)
    st = env.state
    w = st.arrival_rate * st.server_up
    truth = (w[:, None, None] * st.popularity).sum(0) / w.sum()
    seen = obs["popularity"].reshape(truth.shape)
    err = np.abs(seen - truth)
    assert 0 < err.mean() < 0.01 and not np.allclose(seen, truth)
    assert np.allclose(seen.sum(1), 4, atol=0.3)  # top-4: inclusion probabilities sum to k per layer


def test_action_masks_follow_live_servers():
    env = CoELEnv(scenario="paper-testbed")
    env.reset(seed=0)
    m = env.action_masks()
    D = 4
    assert m.shape == (1440 * 2 * (D + 1 + 3 + 3) + 3 * 7 + 2,)
    block = m[: 2 * 11].reshape(2, 11)
    assert block[0, :D].all() and not block[0, D] and block[1, D]  # slot 0 never empty; slot 1 may be
    env.core.states.server_up[0, 1] = False  # server2 (device 2) fails
    m = env.action_masks()
    assert list(m[: D + 1]) == [True, True, False, True, False]
    edit = CoELEnv(scenario="tiny", action_space="edit")
    edit.reset(seed=0)
    em = edit.action_masks()
    assert not em[3]  # drop: no expert has two replicas yet
    assert em.shape == (int(edit.action_space.nvec.sum()),)


def test_edit_space_edits_and_commits():
    env = CoELEnv(scenario="tiny", action_space="edit", num_edits=2, perception="ideal")
    env.reset(seed=0)
    noop = np.zeros(10, dtype=np.int64)
    rep = np.array([2, 1, 3, 0, 2, 0, 1, 0, 0, 0])  # replicate layer 1 expert 3 on device 2, GPU, 8 bits
    _, _, _, _, info = env.step(np.r_[rep, noop, 1])
    p = env.plan
    assert list(p.device[1, 3]) == [1, 2] and p.bits[1, 3, 1] == 8 and info["migration"]["replicas_added"] == 1
    drop_last = np.array([3, 0, 0, 0, 0, 0, 0, 0, 0, 0])  # expert (0, 0) has one replica: refused
    _, _, _, _, info = env.step(np.r_[drop_last, noop, 1])
    assert info["repaired"] and info["repair_reasons"] == ["invalid_edit"] and env.plan.device[0, 0, 0] >= 0
    assert env.action_masks()[3]  # now some expert has two replicas: drop allowed
    _, _, _, _, info = env.step(np.r_[rep, noop, 0])  # not committed: nothing changes
    assert env.plan == p and info["migration"]["bytes_total"] == 0


def test_threshold_space_replicates_popular_experts():
    env = CoELEnv(scenario="paper-testbed", action_space="threshold", perception="ideal")
    env.reset(seed=0)
    L = 24
    a = -np.ones(3 * L + 3 + 1, dtype=np.float32)
    a[0 : 3 * L : 3] = 0.0  # replicate the top half
    a[1 : 3 * L : 3] = 1.0  # everything on GPU
    a[-1] = 1.0
    env.step(a)
    p = env.plan
    assert ((p.device >= 0).sum(-1) == 2).sum() == L * 30 and (p.tier[p.device >= 0] == 0).all()
    assert p.problems(env.cluster) == []


def test_budget_termination():
    data = scenario("tiny")
    data["budgets"] = {"latency_s": 1e-3, "mode": "terminate"}
    env = CoELEnv(scenario=data)
    env.reset(seed=0)
    _, _r, term, trunc, info = env.step(keep(env))
    assert term and not trunc and info["budget_excess"] > 0 and info["penalty"] >= 1.0
    data["budgets"]["mode"] = "penalty"
    env = CoELEnv(scenario=data)
    env.reset(seed=0)
    _, _, term, _, info = env.step(keep(env))
    assert not term and info["penalty"] == pytest.approx(info["budget_excess"])


def test_truncation_at_max_epochs():
    env = CoELEnv(scenario="tiny", max_epochs=3)
    env.reset(seed=0)
    flags = [env.step(keep(env))[3] for _ in range(3)]
    assert flags == [False, False, True]
