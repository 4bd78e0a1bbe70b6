"""Per-destination dispatch: the wire format's row count, and the surrogate's expectation of it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import scenario_dict

from coel_env import DeploymentPlan, Scenario
from coel_env.backend.surrogate import SurrogateBackend
from coel_env.backend.wire import STAMP_BYTES, destination_rows, dispatch_bytes, row_round_trip_bytes


def test_destination_rows_counts_a_token_once_per_server():
    target = np.array([0, 1, 1, 2, 2, 2])  # expert -> server computing it for server 0's tokens
    idx = np.array([[1, 2], [0, 1], [3, 0], [0, 0], [4, 5]])  # 5 tokens, top-2
    # token 0: both experts on server 1 -> one row; token 1: one on 0 (local), one on 1; token 4: two on 2
    np.testing.assert_array_equal(destination_rows(target, idx, me=0, num_servers=3), [0, 2, 2])
    target[5] = -1  # no live holder: token 4's expert 5 goes nowhere, its expert 4 still to server 2
    np.testing.assert_array_equal(destination_rows(target, idx, me=0, num_servers=3), [0, 2, 2])
    target[4] = -1
    np.testing.assert_array_equal(destination_rows(target, idx, me=0, num_servers=3), [0, 2, 1])
    rt = row_round_trip_bytes(d_model=2048, activation_bytes=2, row_header_bytes=8, top_k=4)
    assert rt == 2 * 2048 * 2 + 4 * 8
    np.testing.assert_array_equal(dispatch_bytes(np.array([0, 2]), np.array([0, 1]), rt), [0, 2 * rt + 2 * STAMP_BYTES])


@pytest.mark.parametrize("share", [1 / 3, 1 / 2])
def test_independent_choice_estimate_of_rows_is_close_to_topk_routing(share):
    """E[rows] = T (1 - prod_e (1 - p_e)) over the experts at a destination assumes independent choices; top-k
    without replacement makes choices negatively correlated. Measured on Zipf top-4 of 60 (Qwen1.5-MoE's shape)."""
    rng = np.random.default_rng(0)
    E, k, T = 60, 4, 40_000
    w = np.arange(1, E + 1, dtype=float) ** -1.0
    gumbel = -np.log(-np.log(rng.uniform(size=(T, E))))
    idx = np.argpartition(-(np.log(w) + gumbel), k - 1, axis=1)[:, :k]
    p = np.bincount(idx.ravel(), minlength=E) / T  # the inclusion probabilities the surrogate is given
    target = np.zeros(E, dtype=int)
    remote = rng.permutation(E)[: int(share * E)]
    target[remote] = 1
    rows = destination_rows(target, idx, me=0, num_servers=2)[1]
    expected = T * (1 - np.prod(1 - p[remote]))
    per_expert = T * p[remote].sum()  # the old row-per-token-expert count
    assert rows < per_expert * 0.95  # tokens with two experts there cross once
    assert expected == pytest.approx(rows, rel=0.06)


def _two_server_plan(sc: Scenario, remote: list[int]) -> DeploymentPlan:
    """Every expert on both servers' GPUs (4-bit, to fit) except `remote` (per layer), held by server 1 only."""
    c = sc.cluster
    plan = DeploymentPlan.for_cluster(c)
    gpus = [np.flatnonzero(c.dev_server == s)[0] for s in range(c.num_servers)]
    plan.device[:, :, 0] = gpus[0]
    plan.device[:, :, 1] = gpus[1]
    plan.device[:, remote, 0] = -1
    plan.tier[:] = 0
    plan.bits[:] = 4
    plan.validate(c)
    return plan


def test_surrogate_link_bytes_follow_per_destination_rows():
    """Server 0's tokens cross only for the `remote` experts: link bytes scale with sum over layers of
    1 - prod_e (1 - p_e), not with sum_e p_e."""
    sc = Scenario(scenario_dict(num_servers=2, model="qwen1.5-moe-a2.7b", arrival_rate=0.05), seed=0)
    state = sc.initial_state(np.random.default_rng(0))
    be = SurrogateBackend(sc.cluster)
    pop = be._state_arrays([state])["pop"][0, 0]  # [L, E] server 0's inclusion probabilities
    one, two = [0], [0, 1]
    b1 = be.serve(_two_server_plan(sc, one), state, 10.0).link_bytes.sum()
    b2 = be.serve(_two_server_plan(sc, two), state, 10.0).link_bytes.sum()
    q1 = pop[:, one].sum()
    q2 = (1 - np.prod(1 - pop[:, two], axis=1)).sum()
    assert b1 > 0 and b2 / b1 == pytest.approx(q2 / q1, rel=1e-6)
    assert b2 / b1 < pop[:, two].sum() / q1  # less than a row per token-expert
