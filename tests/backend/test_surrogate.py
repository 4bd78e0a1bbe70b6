"""SurrogateBackend physics: hand-computed costs, monotonicity, batching, determinism, migration, failures, energy.

Hand-computed cases use a one-MoE-layer model with Qwen1.5-MoE's widths (a hidden state is 4096 bytes, an expert
17.3 MB at 16 bits) and a negligible arrival rate, so queueing and link contention vanish (their factors are
1 + O(1e-6)) and the numbers follow from the transfer model alone: a token routed to a remote expert sends its
hidden state there and back (2 * hidden_bytes / goodput) and pays the round-trip latency (2 * (one-way route
latency + per-message software latency)) whenever the destination is used in that step.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from coel_env import Backend, DeploymentPlan, SurrogateBackend, make_scenario
from coel_env.specs import load_hardware_profile

HYP = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
HW = load_hardware_profile("default")
HIDDEN = 2 * 2048 + HW.row_header_bytes / 2  # one-way bytes of a row: a bf16 hidden state, half its one (top-1) slot
E16 = 3 * 2048 * 1408 * 2  # bytes of one 16-bit expert
GBE = 1e9 / 8 * HW.link_efficiency  # 1 GbE goodput, bytes/s (117.5 MB/s)
ALPHA = HW.transfer_latency_s
LATENCY_KEYS = ("ttft_mean_s", "ttft_p95_s", "tpot_mean_s", "tpot_p95_s", "e2e_mean_s", "e2e_p95_s")
TINY_RATE = 1e-6  # requests/s: no queueing, no link contention


@pytest.fixture
def hand(make_spec, one_layer_model):
    """`hand(pop, input_len=128, output_len=64)` -> (scenario, state) of the hand-computed 2-server setup."""
    return lambda pop, **kw: _hand_scenario(make_spec, one_layer_model, pop, **kw)


def _hand_scenario(make_spec, model: dict, pop: list[float], input_len: int = 128, output_len: int = 64, **over):
    """Server `a` (2x RTX 4090D) serves all requests; server `b` (1x RTX 4090D) only hosts experts."""
    spec = make_spec(
        model=dict(model, num_experts=len(pop)),
        max_replicas=2,
        servers=[
            dict(name="a", gpus=["rtx4090d", "rtx4090d"], cpu="i9-14900kf", cpu_ram_gb=64),
            dict(name="b", gpus=["rtx4090d"], cpu="i9-14900kf", cpu_ram_gb=64),
        ],
        workload=dict(
            arrival_rate=[TINY_RATE, 0.0], input_len=dict(mean=input_len), output_len=dict(mean=output_len), max_batch=8
        ),
        **over,
    )
    sc = make_scenario(spec, seed=0)
    state = sc.initial_state(np.random.default_rng(0))
    state.popularity = np.zeros_like(state.popularity)
    state.popularity[:, 0, :] = pop
    return sc, state


def _plan(cluster, devices, bits=16, tiers=0) -> DeploymentPlan:
    plan = DeploymentPlan.for_cluster(cluster)
    plan.device[0, :, 0] = devices
    plan.bits[0, :, 0] = bits
    plan.tier[0, :, 0] = tiers
    return plan


# ---- hand-computed transfer costs ---------------------------------------------------------------------------------
def test_one_remote_expert_costs_the_transfer_formula(hand):
    """Expert 1 (used by 30% of tokens) moves from a's second GPU to server b over 1 GbE."""
    sc, state = hand([0.7, 0.3])
    c = sc.cluster
    assert c.pair_latency[0, 1] == pytest.approx(0.2e-3)  # star: 0.1 ms to the switch and 0.1 ms on
    local = _plan(c, [0, 1])  # a/gpu0, a/gpu1: the two experts run in parallel on a's GPUs
    remote = _plan(c, [0, 2])  # expert 1 on b/gpu0 (same GPU model: same compute time)
    mb = SurrogateBackend(c).serve_batch([local, remote], state, 60.0)
    p, lat = 0.3, c.pair_latency[0, 1] + ALPHA
    # decode, batch 1: a token uses expert 1 with probability p
    d_tpot = 2 * p * HIDDEN / GBE + 2 * lat * p
    assert mb["tpot_mean_s"][1] - mb["tpot_mean_s"][0] == pytest.approx(d_tpot, rel=1e-5)
    # prefill of 128 tokens: 128 p hidden states each way; the destination is used unless no token goes there
    d_ttft = 2 * 128 * p * HIDDEN / GBE + 2 * lat * (1 - (1 - p) ** 128)
    assert mb["ttft_mean_s"][1] - mb["ttft_mean_s"][0] == pytest.approx(d_ttft, rel=1e-5)
    # e2e of a 128-in / 64-out request = ttft + 63 tpot
    assert mb["e2e_mean_s"][1] - mb["e2e_mean_s"][0] == pytest.approx(d_ttft + 63 * d_tpot, rel=1e-5)
    # bytes on each of the two star links, both directions summed (as the real backend counts them): (prefill +
    # decode tokens) x p x hidden there and back, per request; the prefill yields the first of the 64 tokens, so 63
    # decode steps route a token each (as the real backend's requests do)
    np.testing.assert_allclose(mb["link_bytes"][0], 0.0)
    np.testing.assert_allclose(mb["link_bytes"][1], 2 * TINY_RATE * 60 * (128 + 63) * p * HIDDEN, rtol=1e-9)
    np.testing.assert_array_equal(mb["quality_loss"], 0.0)


def test_2048_tokens_over_1gbe_take_72ms_per_crossing(hand):
    """DESIGN: over 1 GbE (~117 MB/s) 2048 tokens take ~72 ms per crossing; a remote expert costs two."""
    sc, state = hand([0.0, 1.0], input_len=2048)
    c = sc.cluster
    mb = SurrogateBackend(c).serve_batch([_plan(c, [0, 1]), _plan(c, [0, 2])], state, 60.0)
    crossing = 2048 * HIDDEN / GBE
    assert crossing == pytest.approx(0.0714, abs=0.001)
    d_ttft = mb["ttft_mean_s"][1] - mb["ttft_mean_s"][0]
    assert d_ttft == pytest.approx(2 * crossing + 2 * (0.2e-3 + ALPHA), rel=1e-5)


def test_pruning_and_fusion_scale_bytes_and_cost_quality_by_hand(hand):
    sc, state = hand([0.7, 0.3])
    c = sc.cluster
    base = _plan(c, [0, 2])
    pruned = base.copy()
    pruned.prune[0] = 0.625  # exact in float32
    fused = pruned.copy()
    fused.fuse[0] = True
    mb = SurrogateBackend(c).serve_batch([base, pruned, fused], state, 60.0)
    q = HW.quality
    # fusion merges rows of one expert within a message, so a token is fused only if another of the step's tokens
    # for that expert survives pruning too: in the 128-token prefill with probability 1 - (1 - 0.3 * 0.375)^127,
    # never in a batch-1 decode step
    partner = 1 - (1 - 0.3 * 0.375) ** 127
    sent = np.array([128 + 63, 0.375 * (128 + 63), 0.375 * (128 * (1 - q.fusion_fraction * partner) + 63)])
    np.testing.assert_allclose(
        mb["link_bytes"][:, 1], 2 * TINY_RATE * 60 * 0.3 * HIDDEN * sent, rtol=1e-9
    )  # there and back
    # quality: the crossing token mass (0.3 of 1 layer x top-1) times the per-link compression loss
    loss = q.prune_linear * 0.625 + q.prune_quadratic * (0.625 - q.prune_knee) ** 2
    np.testing.assert_allclose(
        mb["quality_loss"], [0.0, 0.3 * loss, 0.3 * (loss + q.fusion_loss * q.fusion_fraction)], rtol=1e-9, atol=1e-15
    )
    # pruning: fewer bytes on the wire and fewer tokens to compute remotely; fusion shortens the prefill only (a
    # batch-1 decode step has nothing to fuse)
    assert mb["tpot_mean_s"][2] <= mb["tpot_mean_s"][1] < mb["tpot_mean_s"][0]
    assert mb["ttft_mean_s"][2] < mb["ttft_mean_s"][1] < mb["ttft_mean_s"][0]


def test_quality_loss_by_hand(testbed, testbed_state):
    c = testbed.cluster
    m = c.model
    plan = DeploymentPlan.uniform(c)
    be = SurrogateBackend(c)
    for bits in (16, 8, 4):
        plan.bits[plan.valid] = bits
        assert be.serve(plan, testbed_state, 60.0).quality_loss == pytest.approx(HW.quality.loss_per_bits[bits])
    # one expert at 4 bits: its popularity share of the routed token mass, averaged over the servers' requests
    plan.bits[plan.valid] = 16
    plan.bits[3, 17, 0] = 4
    share = testbed_state.popularity[:, 3, 17] / (m.num_moe_layers * m.top_k)
    rate = testbed_state.arrival_rate
    want = (rate * share).sum() / rate.sum() * HW.quality.loss_per_bits[4]
    assert be.serve(plan, testbed_state, 60.0).quality_loss == pytest.approx(want, rel=1e-9)


def test_batch1_decode_never_beats_the_memory_roofline():
    """Batch-1 decode reads all active weights once per token: at least bytes / vendor bandwidth."""
    spec = dict(
        name="qwen-one-gpu",
        model="qwen1.5-moe-a2.7b",
        max_replicas=1,
        servers=[dict(name="a", gpus=["rtx4090d"], cpu="i9-14900kf", cpu_ram_gb=64)],
        workload=dict(arrival_rate=TINY_RATE, max_batch=1, input_len=dict(mean=128), output_len=dict(mean=128)),
    )
    sc = make_scenario(spec)
    state = sc.initial_state(np.random.default_rng(0))
    m = sc.spec.model
    be = SurrogateBackend(sc.cluster)
    plan = DeploymentPlan.for_cluster(sc.cluster)
    plan.device[..., 0] = 0
    for bits in (16, 8, 4):
        plan.bits[..., 0] = bits
        tpot = be.serve(plan, state, 60.0).tpot_mean_s
        active = m.non_expert_bytes(16) + m.num_moe_layers * m.top_k * m.expert_bytes(bits)
        roofline = active / 1008e9
        assert tpot >= roofline
        if bits == 16:
            assert roofline == pytest.approx(5.3e-3, rel=0.02)  # DESIGN: 5.4 GB on a 4090D ~ 5.3 ms/token
            assert tpot <= 2.0 * roofline


# ---- migration by hand --------------------------------------------------------------------------------------------
@pytest.fixture
def mig(hand):
    sc, state = hand([0.5, 0.5])
    return sc.cluster, state, SurrogateBackend(sc.cluster)


def test_peer_copy_of_a_16bit_expert_over_1gbe(mig):
    c, state, be = mig
    old = _plan(c, [0, 1])
    new = old.copy()
    new.device[0, 0, 1], new.bits[0, 0, 1] = 2, 16  # a second copy of expert 0 on server b
    r = be.migration(old, new, state)
    assert (r.bytes_total, r.bytes_peer, r.bytes_local, r.bytes_cloud) == (E16, E16, 0, 0)
    assert (r.replicas_added, r.replicas_removed) == (1, 0)
    assert r.time_s == pytest.approx(E16 / GBE + 0.2e-3)
    assert r.time_s == pytest.approx(0.148, abs=0.002)  # DESIGN: a 16-bit expert over 1 GbE ~ 148 ms
    np.testing.assert_allclose(r.link_bytes, [E16, E16])  # both star links carry it once


def test_precision_upgrade_without_a_peer_comes_from_the_cloud(mig):
    c, state, be = mig
    old = _plan(c, [0, 1], bits=4)
    new = old.copy()
    new.bits[0, 0, 0] = 16  # 4 -> 16 bits in place: a low-bit copy cannot be upgraded locally
    r = be.migration(old, new, state)
    assert (r.bytes_cloud, r.bytes_peer, r.bytes_local) == (E16, 0, 0)
    assert (r.replicas_added, r.replicas_removed) == (1, 1)
    assert r.time_s == pytest.approx(E16 / (HW.cloud_bandwidth_gbps * 1e9 / 8) + HW.cloud_latency_s)
    np.testing.assert_allclose(r.link_bytes, 0.0)


def test_upgrade_copies_from_a_peer_holding_higher_precision(mig):
    c, state, be = mig
    old = _plan(c, [0, 1], bits=8)
    old.device[0, 0, 1], old.bits[0, 0, 1] = 2, 16  # server b holds a 16-bit copy
    new = old.copy()
    new.bits[0, 0, 0] = 16
    r = be.migration(old, new, state)
    assert (r.bytes_peer, r.bytes_cloud) == (E16, 0)
    state_b_down = state.copy()
    state_b_down.server_up[1] = False  # a failed server is no source: back to the cloud
    r = be.migration(old, new, state_b_down)
    assert (r.bytes_peer, r.bytes_cloud) == (0, E16)


def test_local_moves_cross_pcie_only(mig):
    c, state, be = mig
    old = _plan(c, [0, 1])
    new = old.copy()
    new.tier[0, 0, 0] = 1  # GPU -> host RAM of the same server at 16 bits
    new.bits[0, 1, 0] = 8  # 16 -> 8 bits in place: quantized from the local copy
    r = be.migration(old, new, state)
    e8 = c.model.expert_bytes(8)
    assert (r.bytes_local, r.bytes_peer, r.bytes_cloud) == (E16 + e8, 0, 0)
    assert c.pcie_bw[0] == 25e9  # the server default: PCIe 4.0 x16, per direction
    assert r.time_s == pytest.approx((E16 + e8) / (25e9 * HW.pcie_efficiency))
    np.testing.assert_allclose(r.link_bytes, 0.0)


def test_nothing_to_move_costs_nothing(mig):
    c, state, be = mig
    plan = _plan(c, [0, 2])
    r = be.migration(plan, plan.copy(), state)
    assert (r.bytes_total, r.time_s, r.replicas_added, r.replicas_removed) == (0, 0, 0, 0)
    dropped = plan.copy()
    dropped.device[0, 0, 1], dropped.bits[0, 0, 1] = 2, 16
    assert be.migration(dropped, plan, state).replicas_removed == 1
    assert be.migration(dropped, plan, state).bytes_total == 0


def test_backend_protocol_reset_then_apply(mig):
    c, state, be = mig
    assert isinstance(be, Backend)
    plan = _plan(c, [0, 1])
    be.reset(plan, state)
    moved = plan.copy()
    moved.device[0, 1, 0] = 2
    r = be.apply(moved, state)
    assert r.bytes_peer == E16 and r.replicas_added == 1 and r.replicas_removed == 1
    assert be.apply(moved, state).bytes_total == 0  # already there
    plan.device[0, 0, 0] = 2  # the backend kept its own copy of the installed plan
    assert be.apply(moved, state).bytes_total == 0


def test_nearest_peer_is_the_source(make_spec, one_layer_model):
    spec = make_spec(model=one_layer_model, num_servers=3, max_replicas=3)
    spec["topology"] = dict(
        kind="explicit",
        links=[
            dict(a="s0", b="s1", bandwidth_gbps=1, latency_ms=1.0),
            dict(a="s1", b="s2", bandwidth_gbps=1, latency_ms=1.0),
            dict(a="s0", b="s2", bandwidth_gbps=10, latency_ms=5.0),
        ],
    )
    sc = make_scenario(spec)
    c, state = sc.cluster, sc.initial_state(np.random.default_rng(0))
    old = _plan(c, [0, 2])  # expert 0 on s0, expert 1 on s2
    old.device[0, 0, 1], old.bits[0, 0, 1] = 2, 16  # expert 0 also on s2
    new = old.copy()
    new.device[0, 0, 2], new.bits[0, 0, 2] = 1, 16  # a third copy on s1: s0 and s2 are both 1 ms away
    r = SurrogateBackend(c).migration(old, new, state)
    assert r.bytes_peer == E16
    assert r.link_bytes.sum() == pytest.approx(E16)  # one hop, not the 2-hop or the 5 ms link


# ---- failures -----------------------------------------------------------------------------------------------------
def test_failed_servers_replicas_are_not_used(hand):
    sc, state = hand([0.7, 0.3])
    c = sc.cluster
    plan = _plan(c, [0, 2])  # expert 1: on b's GPU ...
    plan.device[0, 1, 1], plan.tier[0, 1, 1], plan.bits[0, 1, 1] = 1, 2, 16  # ... and on a's SSD
    be = SurrogateBackend(c)
    up = be.serve(plan, state, 60.0)
    assert up.link_bytes.sum() > 0  # b's GPU beats a's SSD
    down_state = state.copy()
    down_state.server_up[1] = False
    down = SurrogateBackend(c).serve(plan, down_state, 60.0)
    np.testing.assert_array_equal(down.link_bytes, 0.0)  # nothing goes to the failed server
    assert down.dropped_frac == 0.0  # a's SSD copy still serves everything
    assert down.tpot_mean_s > up.tpot_mean_s
    only_b = _plan(c, [0, 2])
    lost = SurrogateBackend(c).serve(only_b, down_state, 60.0)
    # the only replica of an expert used by 30% of tokens is gone: a request routing 191 tokens almost surely needs it
    assert lost.dropped_frac == pytest.approx(1 - math.exp(-(128 + 63) * 0.3), abs=1e-9)


def test_a_failed_server_drops_its_own_requests(testbed, testbed_state):
    c = testbed.cluster
    plan = DeploymentPlan.uniform(c)
    plan.device[..., 1] = (plan.device[..., 0] + 2) % c.num_devices  # every expert on two servers
    plan.bits[..., 1] = plan.bits[..., 0]
    state = testbed_state.copy()
    state.server_up[2] = False
    m = SurrogateBackend(c).serve(plan, state, 60.0)
    rate = state.arrival_rate
    assert m.dropped_frac == pytest.approx(rate[2] / rate.sum())
    assert m.requests == pytest.approx(rate.sum() * 60.0)
    assert m.device_util[3] == 0.0


# ---- energy -------------------------------------------------------------------------------------------------------
def test_idle_energy_by_hand(tiny, tiny_state):
    c = tiny.cluster
    idle = tiny_state.copy()
    idle.arrival_rate[:] = 0.0
    plan = DeploymentPlan.uniform(c)
    m = SurrogateBackend(c).serve(plan, idle, 10.0)
    assert m.energy_j == pytest.approx(10.0 * (3 * 5 + 3 * 5))  # 3 cpu-small "GPUs" + 3 cpu-small CPUs at 5 W idle
    idle.server_up[1] = False
    assert SurrogateBackend(c).serve(plan, idle, 10.0).energy_j == pytest.approx(10.0 * 20)


@HYP
@given(seed=st.integers(0, 1000), load=st.floats(0.01, 30.0), window=st.floats(1.0, 120.0))
def test_energy_between_idle_and_max_power(testbed, seed, load, window):
    c = testbed.cluster
    rng = np.random.default_rng(seed)
    state = testbed.initial_state(rng)
    state.arrival_rate = state.arrival_rate * load
    state.server_up = rng.random(3) < 0.8
    state.server_up[0] = True
    plan = _random_plan(c, rng)
    m = SurrogateBackend(c).serve(plan, state, window)
    dev_up, srv_up = state.server_up[c.dev_server], state.server_up
    lo = (c.dev_p_idle * dev_up).sum() + (c.cpu_p_idle * srv_up).sum()
    hi = (c.dev_p_max * dev_up).sum() + (c.cpu_p_max * srv_up).sum()
    assert lo * window * (1 - 1e-12) <= m.energy_j <= hi * window * (1 + 1e-12)
    assert ((m.device_util >= 0) & (m.device_util <= 1)).all()
    assert (m.device_util[~dev_up] == 0).all()


# ---- monotonicity -------------------------------------------------------------------------------------------------
def _random_plan(c, rng, max_replicas=None, tiers=(0, 1, 2), bits=(16, 8, 4)) -> DeploymentPlan:
    """Every expert gets 1..R replicas on distinct random devices (memory is not checked by serve)."""
    plan = DeploymentPlan.for_cluster(c)
    L, E, R = plan.device.shape
    R = min(R, max_replicas or R, c.num_devices)
    devices = np.argsort(rng.random((L, E, c.num_devices)), axis=-1)[..., :R]  # distinct per expert
    used = np.arange(R) < rng.integers(1, R + 1, size=(L, E, 1))
    plan.device[..., :R] = np.where(used, devices, -1)
    plan.tier[..., :R] = np.where(used, rng.choice(tiers, size=(L, E, R)), 0)
    plan.bits[..., :R] = np.where(used, rng.choice(bits, size=(L, E, R)), 0)
    return plan


def _never_lower(before: np.ndarray, after: np.ndarray, rtol: float = 1e-9) -> bool:
    return bool(np.all(after >= before * (1 - rtol) - 1e-15))


SCENARIOS = ("tiny", "paper-testbed", "moe2-heterogeneous", "metro-8")


@pytest.fixture(scope="module")
def scenarios():
    return {n: make_scenario(n, seed=0) for n in SCENARIOS}


def _bandwidth_case(sc, seed: int, lo: float, gain: float, max_replicas: int | None):
    c = sc.cluster
    rng = np.random.default_rng(seed)
    plan = _random_plan(c, rng, max_replicas=max_replicas)
    slow = sc.initial_state(rng)
    slow.link_factor[:] = lo * rng.uniform(0.5, 1.0, size=c.num_links)
    fast = slow.copy()
    fast.link_factor = slow.link_factor * gain  # every link at least as fast
    mb = SurrogateBackend(c).serve_batch([plan, plan], [slow, fast], 60.0)
    for k in (*LATENCY_KEYS, "dropped_frac", "late_frac"):
        assert mb[k][1] <= mb[k][0] * (1 + 1e-9) + 1e-15, (k, mb[k])
    assert mb["tokens_per_s"][1] >= mb["tokens_per_s"][0] * (1 - 1e-9)


@HYP
@given(name=st.sampled_from(SCENARIOS), seed=st.integers(0, 1000), lo=st.floats(0.05, 1.0), gain=st.floats(1.0, 5.0))
def test_more_link_bandwidth_is_never_slower_one_replica(scenarios, name, seed, lo, gain):
    """One replica per expert (any device, tier, bits): faster links can only shorten transfers."""
    _bandwidth_case(scenarios[name], seed, lo, gain, max_replicas=1)


@HYP
@given(name=st.sampled_from(SCENARIOS), seed=st.integers(0, 1000), lo=st.floats(0.05, 1.0), gain=st.floats(1.0, 5.0))
@example(name="tiny", seed=9, lo=1.0, gain=2.0)
def test_more_link_bandwidth_is_never_slower(scenarios, name, seed, lo, gain):
    """Replicated experts: whichever replica the router picks, faster links must not make serving slower."""
    _bandwidth_case(scenarios[name], seed, lo, gain, max_replicas=None)


def test_topology_bandwidth_sweep_is_monotone(make_spec):
    e2e = []
    for gbps in (0.1, 0.3, 1.0, 3.0, 10.0, 100.0):
        sc = make_scenario(
            make_spec(num_servers=3, bandwidth_gbps=gbps, model="qwen1.5-moe-a2.7b", arrival_rate=0.2), seed=0
        )
        state = sc.initial_state(np.random.default_rng(0))
        plan = DeploymentPlan.uniform(sc.cluster)
        m = SurrogateBackend(sc.cluster).serve(plan, state, 60.0)
        e2e.append([getattr(m, k) for k in LATENCY_KEYS])
    e2e = np.array(e2e)
    assert (np.diff(e2e, axis=0) <= 1e-12).all()
    assert e2e[0, 2] > 2 * e2e[-1, 2]  # 0.1 Gb/s is much slower than 100 Gb/s for a 3-way split


@HYP
@given(name=st.sampled_from(SCENARIOS), seed=st.integers(0, 1000), frac=st.floats(0.05, 1.0))
def test_fewer_bits_never_use_more_memory_or_improve_quality(scenarios, name, seed, frac):
    """One replica per expert (so the replica choice cannot change): lower some experts' bits."""
    sc = scenarios[name]
    c = sc.cluster
    rng = np.random.default_rng(seed)
    state = sc.initial_state(rng)
    plan = _random_plan(c, rng, max_replicas=1)
    lower = plan.copy()
    pick = plan.valid & (rng.random(plan.bits.shape) < frac) & (plan.bits > 4)
    lower.bits[pick] //= 2
    mb = SurrogateBackend(c).serve_batch([plan, lower], state, 60.0)
    for k in ("gpu_mem_bytes", "cpu_mem_bytes", "ssd_bytes"):
        assert (mb[k][1] <= mb[k][0]).all()
    assert mb["quality_loss"][1] >= mb["quality_loss"][0] * (1 - 1e-12)
    if pick.any():
        assert mb["quality_loss"][1] > mb["quality_loss"][0]


def test_uniform_bit_width_sweep(testbed, testbed_state):
    c = testbed.cluster
    plans = []
    for bits in (16, 8, 4):
        p = DeploymentPlan.uniform(c)
        p.bits[p.valid] = bits
        plans.append(p)
    mb = SurrogateBackend(c).serve_batch(plans, testbed_state, 60.0)
    assert (np.diff(mb["quality_loss"]) > 0).all()
    assert (np.diff(mb["gpu_mem_bytes"].sum(-1)) < 0).all()


def _ssd_case(sc, seed: int, load: float):
    c = sc.cluster
    rng = np.random.default_rng(seed)
    state = sc.initial_state(rng)
    state.arrival_rate = state.arrival_rate * load
    plan = DeploymentPlan.uniform(c)
    L, E, _ = plan.device.shape
    l, e = int(rng.integers(L)), int(rng.integers(E))
    on_ssd = plan.copy()
    on_ssd.tier[l, e, 0] = 2
    mb = SurrogateBackend(c).serve_batch([plan, on_ssd], state, 60.0)
    return mb, (l, e)


@HYP
@given(name=st.sampled_from(SCENARIOS), seed=st.integers(0, 1000))
def test_moving_an_expert_to_ssd_never_lowers_latency_unloaded(scenarios, name, seed):
    """At negligible load (no queueing): the same expert read from SSD can never make a step faster."""
    mb, where = _ssd_case(scenarios[name], seed, load=1e-4)
    for k in LATENCY_KEYS:
        assert _never_lower(mb[k][0], mb[k][1]), (name, where, k, mb[k][0], mb[k][1])


@HYP
@given(name=st.sampled_from(SCENARIOS), seed=st.integers(0, 1000))
def test_moving_an_expert_to_ssd_never_lowers_latency_loaded(scenarios, name, seed):
    """At the scenario's own load: moving work to the SSD path must not lower queueing delay either."""
    mb, where = _ssd_case(scenarios[name], seed, load=1.0)
    for k in LATENCY_KEYS:
        assert _never_lower(mb[k][0], mb[k][1]), (name, where, k, mb[k][0], mb[k][1])
    assert mb["dropped_frac"][1] >= mb["dropped_frac"][0] - 1e-12


NEAR_SCENARIOS = ("tiny", "paper-testbed", "moe2-heterogeneous", "metro-8")


def _near_users_case(sc, seed: int, load: float, only_that_server: bool):
    c = sc.cluster
    rng = np.random.default_rng(seed)
    state = sc.initial_state(rng)
    s = int(rng.integers(c.num_servers))
    state.arrival_rate = state.arrival_rate * load
    if only_that_server:
        state.arrival_rate = np.where(np.arange(c.num_servers) == s, state.arrival_rate, 0.0)
    plan = DeploymentPlan.uniform(c)
    g = c.first_gpu[s]
    add = (c.dev_server[plan.device[..., 0]] != s) & (rng.random(plan.device.shape[:2]) < rng.uniform(0.05, 1.0))
    more = plan.copy()
    more.device[..., 1] = np.where(add, g, -1)
    more.bits[..., 1] = np.where(add, plan.bits[..., 0], 0)
    mb = SurrogateBackend(c).serve_batch([plan, more], state, 60.0)
    for k in ("tpot_mean_s", "ttft_mean_s", "e2e_mean_s", "e2e_p95_s"):
        assert mb[k][1] <= mb[k][0] * (1 + 1e-9) + 1e-15, (c.server_names[s], int(add.sum()), k, mb[k])
    assert mb["dropped_frac"][1] <= mb["dropped_frac"][0] + 1e-12


@HYP
@given(name=st.sampled_from(NEAR_SCENARIOS), seed=st.integers(0, 1000))
def test_more_replicas_near_users_never_slower_unloaded(scenarios, name, seed):
    """Only server s has requests, at negligible load: extra replicas on s's own GPU can only help s."""
    _near_users_case(scenarios[name], seed, load=1e-3, only_that_server=True)


@HYP
@given(name=st.sampled_from(NEAR_SCENARIOS), seed=st.integers(0, 1000))
def test_more_replicas_near_users_never_slower(scenarios, name, seed):
    """Server s's requests at the scenario's own load (queueing included): a replica added next to its users must
    not make serving slower — s's router may always ignore it. (With every server loaded this does not hold for a
    cross-server percentile: another server may start using the replica and slow a third one's GPU a little.)"""
    _near_users_case(scenarios[name], seed, load=1.0, only_that_server=True)


# ---- batching and determinism ------------------------------------------------------------------------------------
def _assert_same(a, b):
    for k, v in a.to_dict().items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(b.to_dict()[k]), err_msg=k)


def _assert_equal_to_rounding(a, b):
    """Equal but for float rounding: fastmath kernels may sum in another order when the arrays are laid out
    differently (a batch of N plans against one plan), seen as 1 ulp on a percentile now and then."""
    for k, v in a.to_dict().items():
        np.testing.assert_allclose(np.asarray(v), np.asarray(b.to_dict()[k]), rtol=1e-12, atol=0, err_msg=k)


@pytest.mark.parametrize("name", ["tiny", "metro-8"])
def test_serve_batch_equals_serving_one_by_one(scenarios, name):
    sc = scenarios[name]
    c = sc.cluster
    rng = np.random.default_rng(1)
    plans = [_random_plan(c, rng) for _ in range(5)]
    for p in plans:
        p.prune[:] = rng.uniform(0, 0.9, size=c.num_pairs)
        p.fuse[:] = rng.random(c.num_pairs) < 0.5
    states = [sc.initial_state(np.random.default_rng(i)) for i in range(5)]
    for s in states[1:]:
        sc.advance(s, rng)
    shared = SurrogateBackend(c).serve_batch(plans, states[0], 60.0)
    per_state = SurrogateBackend(c).serve_batch(plans, states, 60.0)
    assert len(shared) == len(per_state) == 5
    for n, (p, s) in enumerate(zip(plans, states)):
        _assert_equal_to_rounding(shared.item(n), SurrogateBackend(c).serve(p, states[0], 60.0))
        _assert_equal_to_rounding(per_state.item(n), SurrogateBackend(c).serve(p, s, 60.0))


def test_same_inputs_identical_outputs_and_inputs_untouched(tiny, tiny_state):
    c = tiny.cluster
    plan = _random_plan(c, np.random.default_rng(3))
    plan_before, state_before = plan.copy(), tiny_state.copy()
    be = SurrogateBackend(c)
    a = be.serve(plan, tiny_state, 30.0)
    b = be.serve(plan, tiny_state, 30.0)
    other = SurrogateBackend(make_scenario("tiny", seed=0).cluster).serve(
        plan, tiny.initial_state(np.random.default_rng(0)), 30.0
    )
    _assert_same(a, b)
    _assert_same(a, other)
    assert plan == plan_before
    for k in ("server_up", "compute_avail", "arrival_rate", "popularity", "link_factor"):
        np.testing.assert_array_equal(getattr(tiny_state, k), getattr(state_before, k))


def test_serving_sees_in_place_state_changes(testbed, testbed_state):
    """A backend must not serve a stale cache after the state it saw was edited in place (same epoch) and
    touched."""
    c = testbed.cluster
    plan = DeploymentPlan.uniform(c)
    plan.device[..., 1] = (plan.device[..., 0] + 2) % c.num_devices  # every expert on two servers
    plan.bits[..., 1] = plan.bits[..., 0]
    be = SurrogateBackend(c)
    before = be.serve(plan, testbed_state, 60.0)
    testbed_state.server_up[2] = False
    testbed_state.arrival_rate[0] *= 10
    testbed_state.link_factor[:] = 0.5
    testbed_state.compute_avail[:] = 0.5
    testbed_state.touch()  # the contract for in-place writes (ClusterState.version)
    fresh = SurrogateBackend(c).serve(plan, testbed_state, 60.0)
    assert fresh.dropped_frac > 0 and fresh.requests != before.requests
    _assert_same(be.serve(plan, testbed_state, 60.0), fresh)


def test_window_scales_totals_only(tiny, tiny_state):
    c = tiny.cluster
    plan = DeploymentPlan.uniform(c)
    be = SurrogateBackend(c)
    a, b = be.serve(plan, tiny_state, 10.0), be.serve(plan, tiny_state, 40.0)
    assert b.energy_j == pytest.approx(4 * a.energy_j) and b.requests == pytest.approx(4 * a.requests)
    np.testing.assert_allclose(b.link_bytes, 4 * a.link_bytes)
    for k in (*LATENCY_KEYS, "tokens_per_s", "quality_loss", "dropped_frac"):
        assert getattr(a, k) == getattr(b, k), k
