"""EPLB: hand-worked cases (hierarchical and global), map consistency, balance, and the CoEL adapter."""

import numpy as np
import pytest

from agents.baselines.eplb import balanced_packing, rebalance_experts, replicate_experts, virtual_gpus
from coel_env.errors import ConfigError


def check_maps(phy2log, log2phy, logcnt, num_replicas):
    L, E = logcnt.shape
    assert phy2log.shape == (L, num_replicas)
    assert (logcnt.sum(-1) == num_replicas).all()
    for l in range(L):
        assert np.array_equal(np.bincount(phy2log[l], minlength=E), logcnt[l])
        slots = log2phy[l][log2phy[l] >= 0]
        assert sorted(slots.tolist()) == list(range(num_replicas))  # every physical slot exactly once
        for e in range(E):
            mine = log2phy[l, e][log2phy[l, e] >= 0]
            assert len(mine) == logcnt[l, e]
            assert (phy2log[l, mine] == e).all()


def test_reference_example_hierarchical():
    # The example of DeepSeek's EPLB README: 2 layers, 12 experts in 4 groups, 16 replicas, 2 nodes, 8 GPUs.
    w = np.array(
        [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86], [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
    )
    phy2log, log2phy, logcnt = rebalance_experts(w, 16, 4, 2, 8)
    assert phy2log.tolist() == [
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
    ]
    check_maps(phy2log, log2phy, logcnt, 16)
    # hierarchical: node 0 (GPUs 0-3, slots 0-7) holds whole groups of 3 experts
    for l in range(2):
        groups0 = set((phy2log[l, :8] // 3).tolist())
        groups1 = set((phy2log[l, 8:] // 3).tolist())
        assert len(groups0) == 2 and len(groups1) == 2 and not groups0 & groups1


def test_hand_worked_global_replicas_not_multiple_of_experts():
    # 4 experts -> 6 replicas (not a multiple of 4) on 2 GPUs of 3 slots.
    # Replication: 6 -> (3,3) -> expert 0 again (tie broken to the lowest index): counts [3,1,1,1],
    # physical loads [2,3,2,1,2,2]; packing heaviest first into the lightest open GPU gives 6 | 6.
    w = np.array([[6.0, 3.0, 2.0, 1.0]])
    phy2log, log2phy, logcnt = rebalance_experts(w, 6, 1, 1, 2)
    assert logcnt.tolist() == [[3, 1, 1, 1]]
    assert phy2log.tolist() == [[1, 0, 3, 0, 2, 0]]
    check_maps(phy2log, log2phy, logcnt, 6)
    gpu_load = (w[0][phy2log[0]] / logcnt[0][phy2log[0]]).reshape(2, 3).sum(-1)
    assert gpu_load.tolist() == [6.0, 6.0]
    # groups that do not divide among nodes fall back to the global policy: same answer
    p2, _, c2 = rebalance_experts(w, 6, 2, 3, 2)
    assert np.array_equal(p2, phy2log) and np.array_equal(c2, logcnt)


def test_building_blocks():
    pack, rank = balanced_packing(np.array([[5.0, 4.0, 3.0, 2.0]]), 2)
    assert pack.tolist() == [[0, 1, 1, 0]] and rank.tolist() == [[0, 0, 1, 1]]
    phy2log, rank, cnt = replicate_experts(np.array([[10.0, 1.0]]), 4)
    assert phy2log.tolist() == [[0, 1, 0, 0]] and rank.tolist() == [[0, 0, 1, 2]] and cnt.tolist() == [[3, 1]]
    with pytest.raises(ConfigError, match="num_replicas"):
        rebalance_experts(np.ones((1, 4)), 3, 1, 1, 1)
    with pytest.raises(ConfigError, match="num_gpus"):
        rebalance_experts(np.ones((1, 4)), 6, 1, 1, 4)


def test_balance_beats_round_robin_on_skewed_load():
    rng = np.random.default_rng(0)
    L, E, G, per = 6, 64, 8, 10  # 80 slots: 16 redundant experts
    w = rng.permutation(E)[None].repeat(L, 0)
    w = (1.0 / (1 + w)) ** 1.2 * 1000
    phy2log, log2phy, logcnt = rebalance_experts(w, G * per, 4, 2, G)
    check_maps(phy2log, log2phy, logcnt, G * per)
    load = np.take_along_axis(w / logcnt, phy2log, -1).reshape(L, G, per).sum(-1)
    assert np.allclose(load.sum(-1), w.sum(-1))  # load conserved
    rr = np.stack([np.bincount(np.arange(E) % G, weights=w[l], minlength=G) for l in range(L)])
    eplb_imb = (load.max(-1) / load.mean(-1)).mean()
    assert eplb_imb < 1.15 < (rr.max(-1) / rr.mean(-1)).mean()


def test_virtual_gpus_split_slots_evenly():
    m, n = virtual_gpus(np.array([40, 20, 20]), 80)
    assert m * n.sum() == 80 and (n * m <= np.array([40, 20, 20])).all()
    m, n = virtual_gpus(np.array([7, 5]), 10)
    assert m * n.sum() <= 10 and m * n.sum() >= 8
