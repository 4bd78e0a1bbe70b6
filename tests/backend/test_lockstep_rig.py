"""The calibration rig's serving, formula by formula (hand-derived): closed loops of equal-length requests run in
synchronized rounds, and servers sharing one GPU pay hand-offs in lock-step decode steps."""

from __future__ import annotations

import numpy as np
import pytest

from coel_env import SurrogateBackend
from coel_env.backend import physics as ph
from coel_env.specs import HardwareProfile
from coel_env.world.state import Scenario
from experiments.calib.fidelity import scenario_variants


def _params(**kw) -> ph.Params:
    sc = Scenario(dict(scenario_variants()["tiny"]), seed=0, hardware=HardwareProfile(serving="lockstep"))
    return SurrogateBackend(sc.cluster).params._replace(**kw)


def _one_server(params: ph.Params, expert_s: float, fixed_s: float, ttft_iso: float, prefill_var: float) -> dict:
    """`continuous_batching` of one server whose decode step is expert_s + fixed_s at every batch."""
    G = params.batch_grid.size
    out = {k: np.zeros(1) for k in ("tpot", "ttft", "wait", "batch", "drop", "served")}
    ph.continuous_batching(
        np.full((1, G), expert_s),
        np.zeros((1, G)),
        np.array([np.inf]),
        np.array([1.0]),
        np.array([True]),
        np.zeros(1),
        np.ones(1),
        np.array([fixed_s]),
        np.array([ttft_iso]),
        np.array([0.5 * ttft_iso]),
        np.array([prefill_var]),
        params,
        float(params.in_q.mean()),
        float(params.out_q.mean()),
        out["tpot"],
        out["ttft"],
        out["wait"],
        out["batch"],
        out["drop"],
        out["served"],
    )
    return {k: float(v[0]) for k, v in out.items()}


def test_a_closed_loop_of_equal_lengths_runs_in_rounds():
    """C = max_batch = 4 clients, every request 32 in / 10 out, a 256-token budget: a round is one batched
    prefill step (ttft_iso + 3 * prefill_var) and 9 decode steps at batch 4; no prefill stretches a decode step."""
    Q = 5
    p = _params(in_q=np.full(Q, 32.0), out_q=np.full(Q, 10.0), concurrency=4.0, max_seqs=4.0, chunk_tokens=256.0)
    assert ph.synchronized_rounds(p, 4.0)
    r = _one_server(p, expert_s=0.004, fixed_s=0.010, ttft_iso=0.040, prefill_var=0.008)
    ttft = 0.040 + 3 * 0.008
    step = 0.014
    assert r["batch"] == 4.0
    assert r["ttft"] == pytest.approx(ttft, rel=1e-12)
    assert r["tpot"] == pytest.approx(step, rel=1e-12)
    assert r["served"] == pytest.approx(4.0 / (ttft + 9 * step), rel=1e-12)
    assert r["wait"] == 0.0


def test_prompts_over_one_steps_token_budget_leave_the_rounds():
    """8 clients x 32-token prompts fit a 256-token step (rounds); 9 do not: the scheduler admits them over two
    steps, so they drift into the steady state."""
    p = _params(in_q=np.full(5, 32.0), out_q=np.full(5, 10.0), concurrency=9.0, chunk_tokens=256.0)
    assert ph.synchronized_rounds(p, 8.0)
    assert not ph.synchronized_rounds(p, 9.0)


def test_requests_of_varied_lengths_interleave_prefills_with_decodes():
    """The same closed loop with varied output lengths is the steady state: prefills share the decode steps."""
    p = _params(in_q=np.full(5, 32.0), out_q=np.array([4.0, 8.0, 10.0, 12.0, 16.0]), concurrency=4.0, max_seqs=4.0)
    assert not ph.synchronized_rounds(p, 4.0)
    r = _one_server(p, expert_s=0.004, fixed_s=0.010, ttft_iso=0.040, prefill_var=0.008)
    assert r["tpot"] > 0.014 * 1.01


def test_an_open_loop_never_runs_in_rounds():
    p = _params(in_q=np.full(5, 32.0), out_q=np.full(5, 10.0), concurrency=0.0)
    assert not ph.synchronized_rounds(p, 1.0)


def _lockstep(lam, up, handoff: float) -> tuple[np.ndarray, np.ndarray]:
    S, U = 3, 6
    tpot = np.full(S, 0.02)
    ttft = np.full(S, 0.05)
    z = np.zeros(S)
    ph.lockstep_steps(
        np.zeros((S, U, 2)), np.asarray(lam, float), z, z, z, z, 0.0, 0.0, 10.0, np.asarray(up), handoff, tpot, ttft
    )
    return tpot, ttft


def test_shared_gpu_handoffs_per_other_live_server_and_its_requests():
    """Decode steps gain h per hand-off: 1 per other live server, + its chance a of having requests in flight;
    a down server hands off nothing, and prefill steps are unchanged (their per-layer cost is the prefill's)."""
    h = 0.001
    lam = [0.5, 0.0, 0.0]
    base_d, base_p = _lockstep(lam, [True, True, True], 0.0)
    tpot, ttft = _lockstep(lam, [True, True, True], h)
    a0 = ph.busy_probability(0.5, ph.request_latency(0.05, 0.02, 10.0))
    assert tpot[0] - base_d[0] == pytest.approx(2 * h, rel=1e-9)  # servers 1 and 2: live, idle
    assert tpot[1] - base_d[1] == pytest.approx((1 + a0 + 1) * h, rel=1e-9)  # server 0 busy with chance a0
    np.testing.assert_array_equal(ttft, base_p)
    tpot_down, _ = _lockstep(lam, [True, True, False], h)
    assert tpot_down[0] - base_d[0] == pytest.approx(h, rel=1e-9)


def test_no_handoff_by_default():
    """Profiles other than the one-GPU rig's: nothing changes (the default is 0)."""
    assert HardwareProfile().shared_gpu_handoff_s == 0.0
