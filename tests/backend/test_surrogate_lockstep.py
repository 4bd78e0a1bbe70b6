"""Surrogate features that mirror the real backend: lock-step serving, servers sharing host cores, the local-first
dispatcher's replica rule, and replaying a realized workload (lengths, arrivals, routed experts)."""

from __future__ import annotations

import numpy as np
import pytest

from coel_env import DeploymentPlan, SurrogateBackend
from coel_env.specs import HardwareProfile
from coel_env.world.state import Scenario
from experiments.calib.fidelity import realized_workload, replay, scenario_variants
from real_backend.dist import dispatch_targets

LATENCY = ("ttft_mean_s", "tpot_mean_s", "e2e_mean_s")


def _serve(hw: HardwareProfile, rates, plan_fn=None, scenario: str = "tiny"):
    sc = Scenario(dict(scenario_variants()[scenario]), seed=0, hardware=hw)
    state = sc.initial_state(np.random.default_rng(0))
    state.arrival_rate = np.asarray(rates, dtype=np.float64)
    state.touch()
    plan = DeploymentPlan.uniform(sc.cluster) if plan_fn is None else plan_fn(sc.cluster)
    return SurrogateBackend(sc.cluster).serve(plan, state, 10.0)


def test_lockstep_with_one_active_server_equals_continuous_batching():
    """The real backend batches continuously too: with one server active nothing couples its steps."""
    one = [0.5, 0.0, 0.0]
    cont = _serve(HardwareProfile(serving="continuous"), one)
    lock = _serve(HardwareProfile(serving="lockstep"), one)
    for k in (*LATENCY, "tokens_per_s"):
        assert getattr(lock, k) == pytest.approx(getattr(cont, k), rel=1e-12)


def test_lockstep_couples_busy_servers():
    """Server 0 is busy; servers 1, 2 are light. In lock-step they wait for server 0's steps (and share units):
    every latency is at least the one of continuous batching on its own, and strictly more once the others are
    active."""
    rates = [3.0, 0.3, 0.3]
    cont = _serve(HardwareProfile(serving="continuous"), rates)
    lock = _serve(HardwareProfile(serving="lockstep"), rates)
    for k in LATENCY:
        assert getattr(lock, k) >= getattr(cont, k) * (1 - 1e-12)
    assert lock.tpot_mean_s > cont.tpot_mean_s * 1.001


def test_lockstep_slots_are_max_batch_whatever_the_plan_leaves_for_kv():
    """The real backend holds max_batch sequences' KV whatever the plan places: with no KV reserve a saturating
    closed loop still runs max_batch sequences at once under lockstep, and drops nothing."""
    hw = HardwareProfile(serving="lockstep", kv_reserve_frac=0.0)
    sc = Scenario(dict(scenario_variants()["tiny"]), seed=0, hardware=hw)
    state = sc.initial_state(np.random.default_rng(0))
    plan = DeploymentPlan.uniform(sc.cluster)
    sur = SurrogateBackend(sc.cluster)
    B = sc.spec.workload.max_batch
    closed = sur.with_concurrency(B).serve(plan, state, 10.0)
    one = sur.with_concurrency(1).serve(plan, state, 10.0)
    assert closed.dropped_frac == 0.0 and one.dropped_frac == 0.0
    assert closed.tokens_per_s > 1.5 * one.tokens_per_s  # B sequences share each step
    with pytest.raises(ValueError, match="with_concurrency"):
        sur.with_concurrency(-1)


@pytest.mark.parametrize("exponent", [1.0, 2.5])
def test_oversubscribed_host_cores_stretch_every_step(exponent):
    """3 live server processes on 2 cores: steps take (3/2) ** exponent longer; on 4 cores nothing changes."""
    rates = [1e-4, 1e-4, 1e-4]  # no queueing: latency is proportional to the step time
    base = _serve(HardwareProfile(), rates)
    two = _serve(HardwareProfile(host_cores=2, oversubscription_exponent=exponent), rates)
    four = _serve(HardwareProfile(host_cores=4, oversubscription_exponent=exponent), rates)
    for k in LATENCY:
        assert getattr(two, k) == pytest.approx(getattr(base, k) * 1.5**exponent, rel=1e-4)
        assert getattr(four, k) == pytest.approx(getattr(base, k), rel=1e-12)


def test_local_first_remote_replica_rule_matches_the_real_dispatcher():
    """An expert held by servers 0 and 1 (not by 2): server 2's tokens go where the real dispatcher sends them —
    the lowest-latency holder, ties to the lowest index — so only links 0 and 2 carry its bytes."""

    def plan_fn(c):
        plan = DeploymentPlan.uniform(c)
        plan.device[..., 0], plan.device[..., 1] = 0, 1
        plan.tier[..., 1], plan.bits[..., 1] = 0, plan.bits[..., 0]
        return plan

    hw = HardwareProfile(routing="local_first")
    m = _serve(hw, [0.0, 0.0, 0.5], plan_fn)
    sc = Scenario(dict(scenario_variants()["tiny"]), seed=0, hardware=hw)
    holders = [[{0, 1} for _ in range(sc.cluster.model.num_experts)] for _ in range(sc.cluster.model.num_layers)]
    assert (dispatch_targets(holders, 2, np.ones(3, bool), sc.cluster.pair_latency) == 0).all()
    assert m.link_bytes[0] > 0 and m.link_bytes[2] > 0 and m.link_bytes[1] == 0.0
    np.testing.assert_allclose(m.link_bytes[0], m.link_bytes[2])  # star: the same bytes on both hops


def test_with_lengths_equals_a_scenario_of_those_fixed_lengths():
    spec = dict(scenario_variants()["tiny"])
    fixed = dict(
        spec,
        workload={
            **spec["workload"],
            "input_len": {"dist": "fixed", "mean": 20},
            "output_len": {"dist": "fixed", "mean": 9},
        },
    )
    hw = HardwareProfile(serving="lockstep")
    a = Scenario(spec, seed=0, hardware=hw)
    b = Scenario(fixed, seed=0, hardware=hw)
    state = a.initial_state(np.random.default_rng(0))
    plan = DeploymentPlan.uniform(a.cluster)
    got = SurrogateBackend(a.cluster).with_lengths(np.full(5, 20), np.full(5, 9)).serve(plan, state, 10.0)
    want = SurrogateBackend(b.cluster).serve(plan, state, 10.0)
    for k in (*LATENCY, "tokens_per_s", "energy_j"):
        assert getattr(got, k) == pytest.approx(getattr(want, k), rel=1e-12)
    np.testing.assert_allclose(got.link_bytes, want.link_bytes, rtol=1e-12)
    with pytest.raises(ValueError, match="with_lengths"):
        SurrogateBackend(a.cluster).with_lengths(np.array([1, 2]), np.array([3]))


def test_realized_workload_replays_arrivals_lengths_and_routed_experts():
    sc = Scenario("tiny", seed=0)
    c, rng = sc.cluster, np.random.default_rng(3)
    L, E, k = c.model.num_moe_layers, c.model.num_experts, c.model.top_k
    reqs = [[], [], []]
    for s, n in ((0, 3), (2, 1)):
        for _ in range(n):
            n_in, n_out = int(rng.integers(4, 9)), int(rng.integers(2, 6))
            routes = np.stack(
                [np.stack([rng.choice(E, k, replace=False) for _ in range(L)]) for _ in range(n_in + n_out - 1)]
            )
            reqs[s].append({"prompt": np.zeros(n_in, int), "max_new": n_out, "routes": routes})
    w = realized_workload(reqs, 2.0, E)
    assert w["rate"] == [1.5, 0.0, 0.5]
    assert w["popularity"][1] is None
    pop0 = np.array(w["popularity"][0])
    np.testing.assert_allclose(pop0.sum(axis=1), k)  # inclusion probabilities: top_k per layer
    assert len(w["in_len"]) == len(w["out_len"]) == 4
    state = sc.initial_state(np.random.default_rng(0))
    plan = DeploymentPlan.uniform(c)
    m = replay(SurrogateBackend(c), plan, state, w, 2.0)
    assert m.requests == pytest.approx(4.0) and m.ttft_mean_s > 0


def test_emulated_latency_hides_the_software_cost_of_a_message():
    """One remote expert, no queueing: a round trip costs 2 (latency + α) on a real link, 2 max(latency, α) when
    the latency is emulated by the application (it overlaps the software cost)."""

    def plan_fn(c):
        plan = DeploymentPlan.uniform(c)
        plan.device[...] = -1
        plan.device[..., 0] = 1  # every expert on server 1; requests at server 0
        return plan

    rates = [1e-4, 0.0, 0.0]
    alpha = 3e-3  # above tiny's 0.4 ms one-way route latency
    real_link = _serve(HardwareProfile(transfer_latency_s=alpha), rates, plan_fn)
    emulated = _serve(HardwareProfile(transfer_latency_s=alpha, emulated_latency=True), rates, plan_fn)
    free = _serve(HardwareProfile(transfer_latency_s=0.0), rates, plan_fn)
    sc = Scenario(dict(scenario_variants()["tiny"]), seed=0)
    lat = sc.cluster.pair_latency[0, 1]
    # a layer's step waits for the round trip when some expert on server 1 is used (experts used independently)
    pop = sc.initial_state(np.random.default_rng(0)).popularity[0]  # [L, E]
    used = (1 - np.prod(1 - pop, axis=1)).sum()
    assert real_link.tpot_mean_s - free.tpot_mean_s == pytest.approx(used * 2 * alpha, rel=1e-6)
    assert emulated.tpot_mean_s - free.tpot_mean_s == pytest.approx(used * 2 * (alpha - lat), rel=1e-6)


def test_prefill_layer_overhead_costs_prefill_steps_only():
    """An eager prefill step pays prefill_layer_overhead_s per layer instead of layer_overhead_s (no queueing: TTFT
    moves by layers x the difference, TPOT not at all); None keeps layer_overhead_s."""
    rates = [1e-4, 1e-4, 1e-4]
    same = _serve(HardwareProfile(layer_overhead_s=1e-4), rates)
    unset = _serve(HardwareProfile(layer_overhead_s=1e-4, prefill_layer_overhead_s=1e-4), rates)
    eager = _serve(HardwareProfile(layer_overhead_s=1e-4, prefill_layer_overhead_s=5e-4), rates)
    layers = Scenario(dict(scenario_variants()["tiny"]), seed=0).cluster.model.num_layers
    assert unset.ttft_mean_s == same.ttft_mean_s and unset.tpot_mean_s == same.tpot_mean_s
    assert eager.ttft_mean_s - same.ttft_mean_s == pytest.approx(layers * 4e-4, rel=1e-6)
    assert eager.tpot_mean_s == pytest.approx(same.tpot_mean_s, rel=1e-12)


def test_ungrouped_layer_overhead_counts_layers_on_the_per_expert_path():
    """Layers where some GPU holds an expert off the grouped path (8-bit with grouped_expert_bits [16], or off
    the GPU tier) pay ungrouped_layer_overhead_s per step: TTFT and TPOT move by that many times it (no
    queueing), and an all-16-bit-GPU plan pays nothing."""
    from coel_env.backend.physics import Plans, ungrouped_layer_counts

    def mixed(c):
        plan = DeploymentPlan.uniform(c)
        plan.bits[plan.device >= 0] = 16
        plan.bits[1, 0, 0] = 8
        plan.tier[3, 2, 0] = 1  # CPU tier
        plan.bits[3, 4, 0] = 8  # the same layer again: still one layer
        return plan

    rates = [1e-4, 1e-4, 1e-4]
    hw = dict(grouped_expert_bits=[16], serving="independent")
    base = _serve(HardwareProfile(**hw), rates, mixed)
    paid = _serve(HardwareProfile(**hw, ungrouped_layer_overhead_s=1e-3), rates, mixed)
    for k in ("ttft_mean_s", "tpot_mean_s"):
        assert getattr(paid, k) - getattr(base, k) == pytest.approx(2 * 1e-3, rel=1e-6)
    sc = Scenario(dict(scenario_variants()["tiny"]), seed=0)
    plan = mixed(sc.cluster)
    fast = plan.copy()
    fast.bits[fast.device >= 0], fast.tier[...] = 16, 0
    stack = lambda name: np.stack([getattr(plan, name), getattr(fast, name)])  # noqa: E731
    plans = Plans(stack("device"), stack("tier"), stack("bits"), stack("prune"), stack("fuse"), np.zeros(2, np.int64))
    grouped = np.isin(np.arange(17), [16])
    out = np.zeros(2)
    ungrouped_layer_counts(plans, grouped, out)
    assert out.tolist() == [2.0, 0.0]
