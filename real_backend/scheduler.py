"""The real servers' step scheduler: which tokens of which sequences one step processes (issue 19).

The same parameters and semantics as the surrogate's continuous batching (`coel_env/backend/physics.py`
`prefill_in_steps`; the scenario's `workload.max_batch`, `max_num_batched_tokens`, `chunked_prefill`), vLLM
V1-style. Each step has a budget of `max_num_batched_tokens` tokens (`None`: unlimited, the servers' behaviour before
the budget existed):
1. every running sequence that decodes takes 1 token, in admission order;
2. running sequences still in prefill continue with a chunk of their remaining prompt, as far as the budget left
   allows, in admission order (chunked prefill on; off, a running sequence never is in prefill, see 3.);
3. queued sequences (arrived, first come first served) are admitted while a slot is free (at most `max_batch`
   running) and some budget is left: chunked prefill on, each takes a chunk of min(prompt, budget left) tokens;
   off, a prompt is scheduled only whole and only if it fits the budget left — except that a prompt longer than the
   whole budget (it could never fit) runs whole as the step's only prefill (beside the decodes, which took their
   tokens first; otherwise it would starve). A queued prompt that is not scheduled stops the admissions of that
   step (no later, shorter prompt overtakes it), so the head of the queue is never starved either.
A sequence produces its first output token only in the step that processes the last chunk of its prompt; earlier
chunks only extend its KV cache. With an unlimited budget every admitted prompt runs whole in its first step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class StepTokens(NamedTuple):
    """One step's schedule: tokens per running sequence (0: it sits this step out; 1: a decode or a 1-token chunk)
    and tokens per newly admitted sequence (the first len(admitted) of the queue, admitted in that order)."""

    running: list[int]
    admitted: list[int]


def schedule_step(
    remaining: Sequence[int],
    queued: Sequence[int],
    free_slots: int,
    budget: int | None = None,
    chunked: bool = True,
) -> StepTokens:
    """The tokens each sequence processes this step (see the module docstring for the rule).

    `remaining`: the running sequences in admission order, each its prompt tokens still to prefill (0: it decodes);
    `queued`: the prompt lengths of the sequences waiting that have arrived, first come first served;
    `free_slots`: how many may be admitted (max_batch minus the running); `budget`: max_num_batched_tokens
    (None: unlimited); `chunked`: chunked prefill."""
    if budget is not None and budget < 1:
        raise ValueError(f"schedule_step: token budget {budget} must be >= 1")
    left = float("inf") if budget is None else int(budget)
    running = [0] * len(remaining)
    for i, r in enumerate(remaining):  # 1. decodes first
        if r == 0 and left >= 1:
            running[i], left = 1, left - 1
    prefills = 0  # prefill chunks scheduled so far this step
    for i, r in enumerate(remaining):  # 2. prefills under way continue
        if r > 0:
            n = _chunk(r, left, chunked, prefills, budget)
            running[i], left, prefills = n, left - n, prefills + (n > 0)
    admitted: list[int] = []
    for r in queued[: max(free_slots, 0)]:  # 3. admissions
        n = _chunk(r, left, chunked, prefills, budget)
        if n == 0:
            break
        admitted.append(n)
        left, prefills = left - n, prefills + 1
    return StepTokens(running, admitted)


def _chunk(r: int, left: float, chunked: bool, prefills: int, budget: int | None) -> int:
    """Tokens of a prompt with `r` tokens to go this step, with `left` of the budget left and `prefills` prefill
    chunks already scheduled."""
    if chunked:
        return int(min(r, left)) if left >= 1 else 0
    if r <= left:
        return r
    if budget is not None and r > budget and prefills == 0:  # could never fit: alone among the step's prefills
        return r
    return 0
