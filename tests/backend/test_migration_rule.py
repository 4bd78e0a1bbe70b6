"""One migration source rule (`physics.migration_source`) for both backends: a new replica copies from a local copy
with >= its bits, else the nearest live peer with >= its bits, else the cloud; ties go to the lexicographic minimum
of (latency key, tier, -bits, device). The surrogate's migration cost and the real backend's move list (no server
processes needed: `RealBackend.migration_moves` reads only the cluster) must pick the same source."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ONE_LAYER_MODEL, scenario_dict

from coel_env import DeploymentPlan, SurrogateBackend, make_scenario
from coel_env.backend.physics import migration_source
from real_backend import RealBackend

GPU, CPU, SSD = 0, 1, 2


@pytest.fixture(scope="module")
def star3():
    """Three 1-GPU servers on a star (every server pair equally far), a one-layer model with 2 experts, 3 slots."""
    sc = make_scenario(scenario_dict(model=dict(ONE_LAYER_MODEL), num_servers=3, max_replicas=3), seed=0)
    state = sc.initial_state(np.random.default_rng(0))
    return sc.cluster, state, RealBackend(sc.cluster)


def _plan(cluster, replicas: list[tuple[int, int, int]]) -> DeploymentPlan:
    """Expert 0 held by `replicas` [(device, tier, bits)] in slot order; expert 1 on device 0 (16-bit GPU)."""
    plan = DeploymentPlan.for_cluster(cluster)
    plan.device[0, 1, 0], plan.tier[0, 1, 0], plan.bits[0, 1, 0] = 0, GPU, 16
    for r, (d, t, b) in enumerate(replicas):
        plan.device[0, 0, r], plan.tier[0, 0, r], plan.bits[0, 0, r] = d, t, b
    return plan


def _implied(cluster, moves: list[dict]) -> dict:
    """What the real backend's moves cost in the surrogate's terms: bytes by source kind, bytes per link."""
    ebytes = cluster.expert_bytes_by_bits
    out = {"bytes_local": 0.0, "bytes_peer": 0.0, "bytes_cloud": 0.0}
    pair = np.zeros((cluster.num_servers, cluster.num_servers))
    for m in moves:
        w = ebytes[m["bits"]]
        out[f"bytes_{m['kind']}"] += w
        if m["kind"] == "peer":
            pair[m["src"], m["dst"]] += w
    out["link_bytes"] = cluster.pair_to_links(pair)
    return out


def _assert_same_source(cluster, state, real, old, new, server_up=None) -> list[dict]:
    up = state.server_up if server_up is None else server_up
    st = state.copy()
    st.server_up = np.asarray(up, dtype=bool).copy()
    sur = SurrogateBackend(cluster).migration(old, new, st.touch())
    moves, _removes, added, removed = real.migration_moves(old, new, st.server_up)
    want = _implied(cluster, moves)
    for k in ("bytes_local", "bytes_peer", "bytes_cloud"):
        assert getattr(sur, k) == pytest.approx(want[k]), k
    np.testing.assert_allclose(sur.link_bytes, want["link_bytes"])
    assert (sur.replicas_added, sur.replicas_removed) == (added, removed)
    return moves


def _link(cluster, server: int) -> int:
    """The star link of `server` (to the switch)."""
    name = cluster.server_names[server]
    return next(k for k, ends in enumerate(cluster.link_ends) if name in ends)


# (old replicas of expert 0 in slot order, the new copy on device 0 = server 0, the source device by the rule)
TIES = {
    # equal-latency peers s1 and s2: the GPU copy beats the host-RAM one listed first
    "tier": ([(1, CPU, 16), (2, GPU, 16)], (0, GPU, 16), 2),
    # same tier: the 16-bit copy beats the 8-bit one listed first (both can make an 8-bit copy)
    "bits": ([(1, GPU, 8), (2, GPU, 16)], (0, GPU, 8), 2),
    # same tier and bits: the lower device wins, whatever the slot order
    "device": ([(2, GPU, 16), (1, GPU, 16)], (0, GPU, 16), 1),
    # latency first: a local copy on SSD beats a GPU copy on a peer
    "local": ([(2, GPU, 16), (0, SSD, 16)], (0, GPU, 16), 0),
}


@pytest.mark.parametrize("case", list(TIES))
def test_equal_latency_ties_pick_the_same_source_in_both_backends(star3, case):
    c, state, real = star3
    held, (d, t, b), want_dev = TIES[case]
    old = _plan(c, held)
    new = old.copy()
    slot = len(held)
    new.device[0, 0, slot], new.tier[0, 0, slot], new.bits[0, 0, slot] = d, t, b
    moves = _assert_same_source(c, state, real, old, new)
    # (b) by hand: one move into server 0, from the device the rule names
    assert len(moves) == 1 and moves[0]["src_dev"] == want_dev
    want_src = int(c.dev_server[want_dev])
    assert moves[0]["kind"] == ("local" if want_src == 0 else "peer")
    sur = SurrogateBackend(c).migration(old, new, state)
    w = c.expert_bytes_by_bits[b]
    link = np.zeros(c.num_links)
    if want_src != 0:
        link[_link(c, 0)] = link[_link(c, want_src)] = w  # the copy crosses the source's and server 0's star links
        assert (sur.bytes_peer, sur.bytes_local) == (w, 0.0)
    else:
        assert (sur.bytes_peer, sur.bytes_local) == (0.0, w)
    np.testing.assert_allclose(sur.link_bytes, link)


def test_migration_source_by_hand(star3):
    c, _state, _real = star3
    dev = np.array([1, 2, -1], dtype=np.int16)
    tier = np.array([CPU, GPU, GPU], dtype=np.int8)
    bits = np.array([16, 8, 0], dtype=np.int8)
    up = np.ones(c.num_servers, dtype=bool)
    args = (c.dev_server, up, c.pair_latency)
    assert migration_source(dev, tier, bits, 8, 0, *args) == 1  # both peers qualify: the GPU tier wins
    assert migration_source(dev, tier, bits, 16, 0, *args) == 0  # only slot 0 has 16 bits
    assert migration_source(dev, tier, bits, 16, 1, *args) == 0  # a local copy
    down = up.copy()
    down[1] = False
    assert migration_source(dev, tier, bits, 16, 0, c.dev_server, down, c.pair_latency) == -1  # cloud
    assert migration_source(dev, tier, bits, 8, 0, c.dev_server, down, c.pair_latency) == 1


@pytest.mark.parametrize("topology", ["star", "mesh", "explicit"])
def test_random_plan_changes_cost_the_same_in_both_backends(topology):
    """Random old/new plans (ties everywhere: few servers, equal latencies) and failed servers."""
    spec = scenario_dict(model=dict(ONE_LAYER_MODEL, num_experts=6), num_servers=4, max_replicas=3)
    if topology == "mesh":
        spec["topology"] = dict(kind="mesh", bandwidth_gbps=1.0, latency_ms=0.5)
    elif topology == "explicit":
        links = [("s0", "s1", 1.0), ("s1", "s2", 1.0), ("s2", "s3", 1.0), ("s0", "s3", 2.0), ("s0", "s2", 2.0)]
        spec["topology"] = dict(
            kind="explicit", links=[dict(a=a, b=b, bandwidth_gbps=1, latency_ms=lat) for a, b, lat in links]
        )
    sc = make_scenario(spec, seed=0)
    c, state = sc.cluster, sc.initial_state(np.random.default_rng(0))
    real = RealBackend(c)
    rng = np.random.default_rng(3)
    L, E, R = DeploymentPlan.for_cluster(c).device.shape

    def random_plan() -> DeploymentPlan:
        p = DeploymentPlan.for_cluster(c)
        for l in range(L):
            for e in range(E):
                k = int(rng.integers(1, R + 1))
                for r, d in enumerate(rng.choice(c.num_devices, k, replace=False)):
                    p.device[l, e, r], p.tier[l, e, r], p.bits[l, e, r] = d, rng.integers(3), rng.choice([16, 8, 4])
        return p

    for _ in range(20):
        up = rng.random(c.num_servers) < 0.8
        _assert_same_source(c, state, real, random_plan(), random_plan(), up)
