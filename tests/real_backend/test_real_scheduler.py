"""The real servers' step scheduler (real_backend/scheduler.py): a per-step token budget (max_num_batched_tokens),
decodes first, prefill chunks under way, then admissions; chunked prefill on or off. Hand-derived schedules, the
surrogate's step count of a chunked prefill, and a served window on the tiny real backend: chunking changes the steps,
not the tokens (nor the rows and bytes on the links)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from coel_env import DeploymentPlan, Scenario
from coel_env.backend.physics import prefill_in_steps
from coel_env.backend.wire import (
    SLOT_BYTES,
    STAMP_BYTES,
    dispatch_bytes,
    reply_row_bytes,
    request_row_bytes,
    row_round_trip_bytes,
)
from real_backend import make_real_backend
from real_backend.scheduler import StepTokens, schedule_step


# ---- the rule, by hand ----------------------------------------------------------------------------------------
def test_unlimited_budget_runs_every_admitted_prompt_whole():
    """No budget (callers from before it): what the servers always did."""
    assert schedule_step([0, 0], [5, 70], free_slots=2) == StepTokens([1, 1], [5, 70])


def test_decodes_take_their_token_before_a_prefill_chunk():
    # decode, a prefill with 10 to go, decode; budget 8: the decodes take 2, the prefill a chunk of 6, nothing left
    assert schedule_step([0, 10, 0], [3], free_slots=1, budget=8) == StepTokens([1, 6, 1], [])


def test_prefills_under_way_continue_in_admission_order():
    assert schedule_step([5, 9], [4], free_slots=2, budget=8) == StepTokens([5, 3], [])
    # one decode, two prefills: the later one sits the step out once the budget is spent
    assert schedule_step([0, 6, 6], [], free_slots=0, budget=7) == StepTokens([1, 6, 0], [])
    assert schedule_step([0, 6, 6], [], free_slots=0, budget=8) == StepTokens([1, 6, 1], [])


def test_admissions_take_chunks_of_what_budget_remains():
    assert schedule_step([0], [10, 3], free_slots=2, budget=8) == StepTokens([1], [7])  # no budget: no 2nd slot
    assert schedule_step([0], [3, 10], free_slots=2, budget=8) == StepTokens([1], [3, 4])
    assert schedule_step([], [3, 10], free_slots=2, budget=8) == StepTokens([], [3, 5])


def test_admissions_are_limited_by_free_slots():
    assert schedule_step([0, 0], [1, 1, 1], free_slots=1, budget=100) == StepTokens([1, 1], [1])
    assert schedule_step([0, 0], [1, 1, 1], free_slots=0, budget=100) == StepTokens([1, 1], [])


def test_without_chunked_prefill_a_prompt_runs_whole_if_it_fits():
    # 2 decodes leave 6: the 5-token prompt fits, then 1 is left and the 2-token prompt waits
    assert schedule_step([0, 0], [5, 2], free_slots=2, budget=8, chunked=False) == StepTokens([1, 1], [5])
    # the head of the queue (7 tokens, at most the budget) does not fit the 6 left: it waits, and the 1-token
    # prompt behind it does not overtake it (first come first served; the head runs once the batch shrinks)
    assert schedule_step([0, 0], [7, 1], free_slots=2, budget=8, chunked=False) == StepTokens([1, 1], [])
    assert schedule_step([0], [7, 1], free_slots=2, budget=8, chunked=False) == StepTokens([1], [7])


def test_without_chunked_prefill_a_prompt_longer_than_the_budget_runs_alone():
    """It could never fit: it runs whole as the step's only prefill (beside the decodes), else it would starve."""
    assert schedule_step([0, 0], [20, 1], free_slots=2, budget=8, chunked=False) == StepTokens([1, 1], [20])
    assert schedule_step([], [3, 20], free_slots=2, budget=8, chunked=False) == StepTokens([], [3])  # next step
    assert schedule_step([0], [20], free_slots=1, budget=8, chunked=False) == StepTokens([1], [20])


def test_budget_must_be_positive():
    with pytest.raises(ValueError, match="budget 0"):
        schedule_step([0], [], free_slots=0, budget=0)


@pytest.mark.parametrize(("prompt", "decodes", "budget"), [(20, 3, 8), (16, 0, 8), (1, 5, 8), (33, 7, 8), (5, 1, 2)])
def test_chunked_prefill_takes_the_surrogates_number_of_steps(prompt, decodes, budget):
    """One description for both backends: a prompt beside B decodes rides in ceil(I / max(budget - B, 1)) steps
    (physics.prefill_in_steps with ttft_iso 0 and tpot 1 counts them)."""
    remaining, steps = None, 0
    while remaining != 0:
        if remaining is None:
            got = schedule_step([0] * decodes, [prompt], free_slots=1, budget=budget)
            remaining = prompt - got.admitted[0]
        else:
            got = schedule_step([0] * decodes + [remaining], [], free_slots=0, budget=budget)
            remaining -= got.running[-1]
        assert got.running[:decodes] == [1] * decodes  # the decodes ride along every step
        steps += 1
    assert steps == prefill_in_steps(0.0, 1.0, prompt, budget, decodes, True) == math.ceil(prompt / (budget - decodes))


# ---- a served window ------------------------------------------------------------------------------------------
def _with_budget(backend, monkeypatch, budget: int, chunked: bool) -> None:
    spec = backend.cluster.spec
    wl = spec.workload.model_copy(update={"max_num_batched_tokens": budget, "chunked_prefill": chunked})
    monkeypatch.setattr(backend.cluster, "spec", spec.model_copy(update={"workload": wl}))


@pytest.mark.slow
def test_chunked_prefill_serves_the_same_tokens_in_more_steps(monkeypatch):
    """Requests sent at once, prompts of 16..48 tokens: a budget of 8 tokens a step (chunked, or whole prompts that
    run alone) serves the tokens and prompt logits of an unlimited budget, in the steps the scheduler gives (a first
    token only with a prompt's last chunk); the rows on each link are the same and its bytes those of the wire
    format (the 8-byte stamps follow the messages, which chunking splits across steps)."""
    sc = Scenario("tiny", seed=0)
    state = sc.initial_state(np.random.default_rng(0))
    plan = DeploymentPlan.uniform(sc.cluster)
    backend = make_real_backend(sc.cluster, seed=0, timeout_s=60, max_requests_per_server=2)
    runs = {}
    try:
        backend.reset(plan, state)
        requests, _, _ = backend.workload(plan, state, 10.0)
        for q in (q for r in requests for q in r):
            q["arrival"] = 0.0  # at once: prefill chunks share steps with decodes
        for budget, chunked in ((2048, True), (8, True), (8, False)):
            _with_budget(backend, monkeypatch, budget, chunked)
            m = backend.serve_requests(plan, state, requests, 10.0)
            runs[budget, chunked] = (m, dict(backend.last_details))
    finally:
        backend.close()
    reqs = [q for r in requests for q in r]
    assert sum(len(r) >= 2 for r in requests) >= 2 and all(len(q["prompt"]) > 8 for q in reqs)
    d0 = runs[2048, True][1]  # (its tokens equal the reference's: test_real_dist)
    for key, (m, d) in runs.items():
        assert m.dropped_frac == 0.0 and d["served"] == len(reqs), key
        assert d["tokens"] == d0["tokens"], key
        assert d["prompt_logits"].keys() == {q["rid"] for q in reqs}, key
        for q in reqs:  # every chunk's logits, in order (chunked attention and GEMMs round apart a little)
            lg, lg0 = torch.as_tensor(d["prompt_logits"][q["rid"]]), torch.as_tensor(d0["prompt_logits"][q["rid"]])
            assert lg.shape == (len(q["prompt"]), sc.cluster.model.vocab_size), key
            torch.testing.assert_close(lg, lg0, atol=1e-4, rtol=1e-4)
        for key2 in ("rows_to", "tokens_to"):
            assert d[key2] == d0[key2], (key, key2)
        rows, msgs = np.array(d["rows_to"], dtype=np.int64), np.array(d["msgs_to"], dtype=np.int64)
        dm, k, act = sc.cluster.model.d_model, sc.cluster.model.top_k, d["wire"]["activation_bytes"]
        req, rep = request_row_bytes(dm, act, SLOT_BYTES, k), reply_row_bytes(dm, act)
        sent = np.array(d["bytes_to"], dtype=np.int64)
        np.testing.assert_array_equal(sent, rows * req + rows.T * rep + STAMP_BYTES * (msgs + msgs.T))
        pair = dispatch_bytes(rows, msgs, row_round_trip_bytes(dm, act, SLOT_BYTES, k))
        np.testing.assert_array_equal(m.link_bytes, sc.cluster.pair_to_links(pair))
        assert sum(d["fast_steps"]) > 0, key  # the batched decode steps still run once every sequence decodes
    for s, server in enumerate(requests):
        if not server:
            continue
        prompts, outs = [len(q["prompt"]) for q in server], [q["max_new"] for q in server]
        assert d0["steps"][s] == max(outs)  # unlimited: every prompt whole in the first step, then the decodes
        for budget, chunked in ((8, True), (8, False)):
            assert runs[budget, chunked][1]["steps"][s] == _steps(prompts, outs, budget, chunked), (s, chunked)
        tokens = sum(prompts) + sum(outs) - len(server)  # every token a step processes
        assert runs[8, True][1]["steps"][s] >= math.ceil(tokens / 8) and runs[8, True][1]["steps"][s] > max(outs)
        if len(server) == 1:  # by hand: ceil(I / 8) chunks, the last one with the first token, then the decodes
            assert runs[8, True][1]["steps"][s] == math.ceil(prompts[0] / 8) + outs[0] - 1
            assert runs[8, False][1]["steps"][s] == outs[0]  # the whole prompt alone in one step
        else:  # chunked off: one whole prompt a step (each is longer than the budget), beside the decodes
            assert runs[8, False][1]["steps"][s] == max(i + n for i, n in enumerate(outs))


def _steps(prompts: list[int], outs: list[int], budget: int, chunked: bool, max_batch: int = 8) -> int:
    """The steps a server takes for requests sent at once, by the scheduler alone (no model)."""
    todo, left = list(prompts), list(outs)  # prompt tokens to go; output tokens to go
    active: list[int] = []
    queue = list(range(len(prompts)))
    steps = 0
    while active or queue:
        got = schedule_step(
            [todo[i] for i in active], [prompts[i] for i in queue], max_batch - len(active), budget, chunked
        )
        new, queue = queue[: len(got.admitted)], queue[len(got.admitted) :]
        for i, n in zip(active + new, got.running + got.admitted):
            if todo[i]:
                todo[i] -= n
                left[i] -= todo[i] == 0  # the last chunk gives the first token
            else:
                left[i] -= n
        active = [i for i in active + new if left[i] > 0]
        steps += 1
    return steps
