"""The surrogate's speed paths (issue 14) give what the two-call formulation they replaced gave (to 1e-12): the
primary-replica check inside the serve kernel vs a second serve of the primary replicas and the rule in numpy."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from coel_env import SurrogateBackend, make_scenario
from coel_env.backend.metrics import SCALAR_METRICS
from coel_env.env import CoELEnv

PRIMARY_CHECK = ("tpot_mean_s", "ttft_mean_s", "e2e_mean_s", "e2e_p95_s", "ttft_p95_s", "tpot_p95_s", "dropped_frac")


def _two_call_reference(be: SurrogateBackend, dev, tier, bits, prune, fuse, state, window):
    """The serve as the backend did it before (Python): serve, then where some expert had a replica choice serve the
    primary replicas again and keep them where the full plan is worse on a latency metric and saves no requests."""
    raw = copy.copy(be)
    raw.params = be.params._replace(prefer_primary=False)
    raw._cache_key = raw._cache = None
    fields = raw.serve_arrays(dev, tier, bits, prune, fuse, state, window).fields
    # the kernel's choice flag (out.choice): an expert some server uses with two or more live replicas
    sa = raw._state_arrays([state])
    up = sa["up"][0][be.cluster.dev_server]
    live = (dev >= 0) & up[np.clip(dev, 0, None)]
    pop_any = (sa["pop"][0] > 0).any(0)  # an expert some server uses
    redo = ((live.sum(-1) >= 2) & pop_any[None]).reshape(dev.shape[0], -1).any(1)
    prim = raw.serve_arrays(*(np.ascontiguousarray(a[..., :1]) for a in (dev, tier, bits)), prune, fuse, state, window)
    prim = prim.fields
    worse = np.zeros_like(redo)
    for key in PRIMARY_CHECK:
        worse |= fields[key] > prim[key] * (1 + 1e-12) + 1e-15
    use = redo & worse & (fields["dropped_frac"] >= prim["dropped_frac"] - 1e-12)
    for key in (*SCALAR_METRICS, "link_bytes", "device_util"):
        fields[key][use] = prim[key][use]
    return fields, use


@pytest.mark.parametrize("scenario", ["paper-testbed", "metro-8"])
def test_primary_check_in_the_kernel_matches_the_two_call_reference(scenario):
    env = CoELEnv(scenario=scenario, action_space="full", info_action_mask=False)
    env.reset(seed=1)
    env.action_space.seed(1)
    be = env.core.backend
    used = 0
    for _ in range(6):
        env.step(env.action_space.sample())
        state = env.state
        pb = env.core.plans
        rng = np.random.default_rng(used)
        dev = np.repeat(pb.dev, 4, axis=0)
        dev[1:, ..., 1:] = np.where(rng.random(dev[1:, ..., 1:].shape) < 0.3, -1, dev[1:, ..., 1:])
        tier, bits = np.repeat(pb.tier, 4, axis=0), np.repeat(pb.bits, 4, axis=0)
        empty = dev < 0
        tier[empty], bits[empty] = 0, 0
        prune, fuse = np.repeat(pb.prune, 4, axis=0), np.repeat(pb.fuse, 4, axis=0)
        got = SurrogateBackend(be.cluster).serve_arrays(dev, tier, bits, prune, fuse, state, 30.0).fields
        want, use = _two_call_reference(SurrogateBackend(be.cluster), dev, tier, bits, prune, fuse, state, 30.0)
        used += int(use.sum())
        for k in want:  # the same formulas; fastmath may contract them differently at the two call sites (1 ulp)
            np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=0, err_msg=k)
    assert used > 0  # the primary replicas replaced some plan's metrics


def test_single_replica_plans_skip_the_primary_check():
    sc = make_scenario("paper-testbed", seed=0)
    state = sc.initial_state(np.random.default_rng(0))
    from coel_env import DeploymentPlan

    plan = DeploymentPlan.uniform(sc.cluster)
    be = SurrogateBackend(sc.cluster)
    raw = SurrogateBackend(sc.cluster)
    raw.params = raw.params._replace(prefer_primary=False)
    a, b = be.serve(plan, state, 30.0).to_dict(), raw.serve(plan, state, 30.0).to_dict()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
