"""The speed paths (issue 14) compute exactly what the straightforward formulations they replaced computed."""

from __future__ import annotations

import numpy as np
import pytest

from coel_env.env.actions import BITS, PRUNE_LEVELS, EditCodec
from coel_env.plan.batch import PlanBatch
from coel_env.plan.deployment import DeploymentPlan
from coel_env.world.state import Scenario


def _edits_reference(codec: EditCodec, a: np.ndarray, current: PlanBatch):
    """The vectorized numpy decode EditCodec used before its numba kernel (edits applied in order, all envs at once)."""
    N = a.shape[0]
    pb = current.copy()
    dev, tier, bits = pb.dev, pb.tier, pb.bits
    invalid = np.zeros(N, dtype=np.int64)
    rows = np.arange(N)
    for k in range(codec.K):
        op, l, e, r, d, t, b, p, lv, fu = (a[:, k * codec.FIELDS + j] for j in range(codec.FIELDS))
        slot_dev = dev[rows, l, e, r]
        occupied = slot_dev >= 0
        n_rep = (dev[rows, l, e] >= 0).sum(-1)
        on_dev = (dev[rows, l, e] == d[:, None]).any(-1)
        free = dev[rows, l, e] < 0
        has_free = free.any(-1)
        first_free = np.argmax(free, -1)
        ok = np.ones(N, dtype=bool)
        m = (op == 1) & occupied & ~on_dev
        dev[rows[m], l[m], e[m], r[m]] = d[m]
        ok &= ~((op == 1) & ~m)
        m = (op == 2) & has_free & ~on_dev
        ff = first_free[m]
        dev[rows[m], l[m], e[m], ff] = d[m]
        tier[rows[m], l[m], e[m], ff] = t[m]
        bits[rows[m], l[m], e[m], ff] = BITS[b[m]]
        ok &= ~((op == 2) & ~m)
        m = (op == 3) & occupied & (n_rep > 1)
        dev[rows[m], l[m], e[m], r[m]] = -1
        tier[rows[m], l[m], e[m], r[m]] = 0
        bits[rows[m], l[m], e[m], r[m]] = 0
        ok &= ~((op == 3) & ~m)
        m = (op == 4) & occupied
        tier[rows[m], l[m], e[m], r[m]] = t[m]
        ok &= ~((op == 4) & ~m)
        m = (op == 5) & occupied
        bits[rows[m], l[m], e[m], r[m]] = BITS[b[m]]
        ok &= ~((op == 5) & ~m)
        m = (op == 6) & (codec.P > 0)
        if codec.P:
            pb.prune[rows[m], p[m]] = PRUNE_LEVELS[lv[m]]
            pb.fuse[rows[m], p[m]] = fu[m] == 1
        ok &= ~((op == 6) & ~m)
        invalid += ~ok
    return pb, a[:, -1] == 1, invalid


@pytest.mark.parametrize("scenario", ["tiny", "paper-testbed"])
def test_edit_kernel_matches_the_vectorized_reference(scenario):
    c = Scenario(scenario, seed=0).cluster
    codec = EditCodec(c, num_edits=6)
    rng = np.random.default_rng(3)
    N = 16
    plans = [DeploymentPlan.uniform(c) for _ in range(N)]
    for i, p in enumerate(plans[1:], 1):  # some second replicas, so that drops and full slots happen
        if p.device.shape[-1] > 1:
            other = (p.device[..., 0] + i) % c.num_devices
            p.device[..., 1] = np.where(rng.random(p.device.shape[:-1]) < 0.5, other, -1)
            p.device[..., 1][p.device[..., 1] == p.device[..., 0]] = -1
            p.tier[..., 1] = 0
            p.bits[..., 1] = np.where(p.device[..., 1] >= 0, 8, 0)
    current = PlanBatch.from_plans(plans)
    codec.space.seed(5)
    for _ in range(20):
        a = np.stack([codec.space.sample() for _ in range(N)]).astype(np.int64)
        got = codec.decode_batch(a, current, None)
        want = _edits_reference(codec, a, current)
        for g, w in zip((got[0].dev, got[0].tier, got[0].bits, got[0].prune, got[0].fuse), want[0].__dict__.values()):
            np.testing.assert_array_equal(g, w)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[2], want[2])
        current = got[0]
