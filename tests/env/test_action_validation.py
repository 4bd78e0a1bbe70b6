"""Action validation: every action space refuses malformed actions with a one-line ActionError before anything
changes (the env stays usable and its plan unchanged); Box spaces clip finite out-of-range values as a counted
repair. Covers CoELEnv, the core's codec decode, the natively batched vector env and the knobs wrapper."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.knobs import KnobsWrapper
from coel_env import make_scenario
from coel_env.env import CoELEnv
from coel_env.env.vector import CoELVectorEnv
from coel_env.errors import ActionError, CoELError, PlanError
from coel_env.plan.deployment import DeploymentPlan

SPACES = ("full", "edit", "threshold")
_ENVS: dict = {}


def get_env(action_space: str) -> CoELEnv:
    if action_space not in _ENVS:
        _ENVS[action_space] = CoELEnv(scenario="tiny", action_space=action_space, max_epochs=500)
    return _ENVS[action_space]


def plan_arrays(env) -> tuple:
    p = env.unwrapped.plan
    return p.device, p.tier, p.bits, p.prune, p.fuse


def same_plan(a: tuple, b: tuple) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def valid_action(env, seed: int = 0):
    env.action_space.seed(seed)
    return env.action_space.sample()


def assert_refused(env, action, *fragments: str) -> str:
    """`action` raises a one-line ActionError naming the space; nothing changed; a valid step then works."""
    u = env.unwrapped
    before, epoch = plan_arrays(env), int(u.core.states.epoch[0])
    with pytest.raises(ActionError) as exc:
        env.step(action)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(("action (", "actions (")), msg
    for f in fragments:
        assert f in msg, (f, msg)
    assert same_plan(before, plan_arrays(env)) and int(u.core.states.epoch[0]) == epoch
    obs, r, *_ = env.step(valid_action(env))
    assert np.isfinite(r) and env.observation_space.contains(obs)
    return msg


def bad_actions(env) -> dict:
    """Malformed actions every space refuses."""
    A = env.action_space.shape[0]
    good = valid_action(env)
    out = {
        "short": good[:3],
        "long": np.r_[good, good[:1]],
        "empty": good[:0],
        "2d": good[None],
        "scalar": good[0],
        "string": "full",
        "none": None,
        "object": np.array([object()] * A, dtype=object),
        "ragged": [[1, 2], [3]],
        "complex": good.astype(np.complex128),
        "str_array": np.array(["a"] * A),
    }
    if env.unwrapped.action_codec.name == "threshold":
        for name, v in [("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf)]:
            a = good.copy()
            a[A // 2] = v
            out[name] = a
        out["bool"] = np.ones(A, dtype=bool)
    else:
        out["float"] = good.astype(np.float64)
        out["float_nan"] = np.full(A, np.nan)
        out["negative"] = np.r_[good[:-1], -1]
        out["negative_first"] = np.r_[-1, good[1:]]
        out["too_large"] = np.r_[good[:-1], 2]
        out["huge"] = np.r_[np.int64(2**40), good[1:]]
        out["uint_huge"] = np.r_[good[:-1], 7].astype(np.uint64)
    return out


@pytest.mark.parametrize("action_space", SPACES)
def test_malformed_actions_are_refused_and_the_env_stays_usable(action_space):
    env = get_env(action_space)
    env.reset(seed=1)
    expected = str(env.action_space.shape)
    for name, action in bad_actions(env).items():
        msg = assert_refused(env, action, f"({action_space})", expected)
        assert ("given; expected" in msg) or (" out of range " in msg) or (" is not finite; " in msg), (name, msg)


@pytest.mark.parametrize("action_space", SPACES)
def test_a_refused_action_leaves_no_trace(action_space):
    """reset, bad, good == reset, good: the refused action drew no randomness and changed nothing."""
    env = get_env(action_space)
    ref = CoELEnv(scenario="tiny", action_space=action_space, max_epochs=500)
    good = [valid_action(env, s) for s in range(3)]
    env.reset(seed=4)
    ref.reset(seed=4)
    for a in good:
        with pytest.raises(ActionError):
            env.step(np.r_[a, a])
        o1, r1, *_, i1 = env.step(a)
        o2, r2, *_, i2 = ref.step(a)
        assert r1 == r2 and all(np.array_equal(o1[k], o2[k]) for k in o1)
        assert i1["repair_reasons"] == i2["repair_reasons"]


def test_messages_name_the_space_shape_and_range():
    full, edit, thr = get_env("full"), get_env("edit"), get_env("threshold")
    for env in (full, edit, thr):
        env.reset(seed=0)
    A = thr.action_space.shape[0]
    msg = assert_refused(thr, np.zeros(3, dtype=np.float32))
    assert msg == f"action (threshold): shape (3,) given; expected ({A},) float32 in [-1, 1]"
    a = np.zeros(A, dtype=np.float32)
    a[2] = np.nan
    assert assert_refused(thr, a).startswith("action (threshold): a[2] = nan is not finite; expected")
    nvec = edit.action_space.nvec
    bad = np.zeros(len(nvec), dtype=np.int64)
    bad[1] = nvec[1]
    msg = assert_refused(edit, bad)
    assert msg.startswith(f"action (edit): a[1] = {nvec[1]} out of range [0, {nvec[1]}); expected ({len(nvec)},) ")
    msg = assert_refused(full, full.action_codec.encode(full.plan).astype(np.float32))
    assert msg.startswith("action (full): dtype float32 given; expected")


def test_edit_indices_never_wrap_or_raise_index_error():
    env = get_env("edit")
    env.reset(seed=2)
    nvec = env.action_space.nvec
    F = env.action_codec.FIELDS
    for field in range(1, F):  # layer, expert, slot, device, ... of the first edit
        for v in (-1, -int(nvec[field]) - 1, int(nvec[field]), 10**6):
            a = np.zeros(len(nvec), dtype=np.int64)
            a[0], a[field], a[-1] = 2, v, 1  # replicate, committed
            assert_refused(env, a, f"a[{field}] = {v} out of range")


def test_full_refuses_out_of_range_instead_of_keeping():
    env = get_env("full")
    env.reset(seed=3)
    keep = np.r_[env.action_codec.encode(env.plan)[:-1], 0]
    D = env.unwrapped.cluster.num_devices
    for j, v in [(0, D + 1), (1, 3), (2, -1), (len(keep) - 1, 2), (len(keep) - 2, 5)]:
        a = keep.copy()
        a[j] = v
        assert_refused(env, a, f"a[{j}] = {v} out of range")


def test_threshold_wrong_length_keeps_the_compression_arrays():
    """Regression: a wrong-length threshold action once rewrote the plan's prune arrays for good."""
    env = get_env("threshold")
    obs, _ = env.reset(seed=5)
    A = env.action_space.shape[0]
    for n in (1, A - 1, A + 1, A + 7):
        assert_refused(env, np.ones(n, dtype=np.float32))
    assert env.plan.prune.shape == (env.cluster.num_pairs,)
    obs, *_ = env.step(np.ones(A, dtype=np.float32))
    assert env.observation_space.contains(obs)


def test_threshold_clips_finite_out_of_range_values_as_a_counted_repair():
    env = get_env("threshold")
    ref = CoELEnv(scenario="tiny", action_space="threshold", max_epochs=500)
    A = env.action_space.shape[0]
    pen = env.unwrapped.core.penalties["repair"]
    rng = np.random.default_rng(0)
    env.reset(seed=6)
    ref.reset(seed=6)
    for scale in (3.0, 1e30):
        x = (rng.uniform(-1, 1, A) * scale).astype(np.float64)
        x[0] = 1.5  # surely outside
        obs, r, *_, info = env.step(x)
        _, r2, *_, info2 = ref.step(np.clip(x, -1, 1))
        assert env.observation_space.contains(obs) and same_plan(plan_arrays(env), plan_arrays(ref))
        assert info["repaired"] and info["repair_reasons"][0] == "action_clipped"
        assert info["repair_reasons"][1:] == info2["repair_reasons"]
        extra = 0.0 if info2["repaired"] else pen
        assert info["penalty"] == pytest.approx(info2["penalty"] + extra)
        assert r == pytest.approx(r2 - extra)
    obs, *_, info = env.step(np.zeros(A, dtype=np.int64))  # integers inside the bounds are fine
    assert "action_clipped" not in info["repair_reasons"]


@pytest.mark.parametrize("action_space", SPACES)
def test_codec_decode_validates_too(action_space):
    env = get_env(action_space)
    env.reset(seed=0)
    codec = env.action_codec
    with pytest.raises(ActionError, match=rf"^action \({action_space}\): shape \(2,\) given"):
        codec.decode(np.zeros(2, dtype=np.int64), env.plan, env.state)
    plan, info = codec.decode(valid_action(env), env.plan, env.state)
    assert plan.problems(env.cluster) == [] or info["repaired"]


@pytest.mark.parametrize("action_space", SPACES)
def test_vector_env_validates_the_batch_and_names_the_env(action_space):
    venv = CoELVectorEnv(num_envs=3, scenario="tiny", action_space=action_space)
    venv.reset(seed=0)
    venv.action_space.seed(0)
    good = venv.action_space.sample()
    A = venv.single_action_space.shape[0]
    discrete = action_space != "threshold"

    def refused(actions, *fragments):
        before = tuple(a.copy() for a in (venv.core.plans.dev, venv.core.plans.prune))
        epoch = venv.core.states.epoch.copy()
        with pytest.raises(ActionError) as exc:
            venv.step(actions)
        msg = str(exc.value)
        assert "\n" not in msg and all(f in msg for f in fragments), msg
        assert np.array_equal(before[0], venv.core.plans.dev) and np.array_equal(before[1], venv.core.plans.prune)
        assert np.array_equal(epoch, venv.core.states.epoch)
        obs, r, *_ = venv.step(venv.action_space.sample())
        assert venv.observation_space.contains(obs) and np.isfinite(r).all()

    refused(good[:2], f"actions ({action_space}): shape (2, {A}) given; expected (3, {A})")
    refused(good[0], "shape")
    refused(good[:, :-1], "shape")
    bad = good.copy()
    if discrete:
        bad[1, 4] = -1
        refused(bad, f"action ({action_space}) of env 1: a[4] = -1 out of range")
        bad = good.copy()
        bad[2, -1] = 2
        refused(bad, f"of env 2: a[{A - 1}] = 2 out of range")
        refused(good.astype(np.float64), "dtype float64 given")
    else:
        bad[2, 3] = np.inf
        refused(bad, "action (threshold) of env 2: a[3] = inf is not finite")
        bad = good.copy()
        bad[1, 0] = 7.0
        *_, infos = venv.step(bad)
        reasons = infos["repair_reasons"]
        assert "action_clipped" in reasons[1] and "action_clipped" not in reasons[0] + reasons[2]
        assert infos["repaired"][1]


def test_knobs_wrapper_validates_its_box():
    env = KnobsWrapper(CoELEnv(scenario="tiny", action_space="threshold", max_epochs=50), base="greedy_popularity")
    env.reset(seed=0)
    K = env.action_space.shape[0]
    good = np.zeros(K, dtype=np.float32)
    for bad in (
        np.zeros(K + 1, dtype=np.float32),
        np.zeros((1, K)),
        np.full(K, np.nan),
        np.r_[good[:-1], np.inf],
        np.zeros(K, dtype=bool),
        "x",
        None,
    ):
        before = plan_arrays(env)
        with pytest.raises(ActionError, match=rf"^action \(knobs\): .*expected \({K},\) float32 in \[-1, 1\]$"):
            env.step(bad)
        assert same_plan(before, plan_arrays(env))
        obs, r, *_ = env.step(good)
        assert env.observation_space.contains(obs) and np.isfinite(r)
    _, _, *_, info = env.step(np.full(K, 0.2, dtype=np.float32))
    assert "action_clipped" not in info["repair_reasons"]
    obs, r, *_, info = env.step(np.full(K, 5.0))
    assert info["repaired"] and info["repair_reasons"][0] == "action_clipped"
    assert info["penalty"] >= env.unwrapped.core.penalties["repair"] and env.observation_space.contains(obs)


def test_step_plan_refuses_a_plan_for_another_cluster():
    env = get_env("full")
    env.reset(seed=0)
    other = DeploymentPlan.uniform(make_scenario("paper-testbed", seed=0).cluster)
    bad_prune = env.plan.copy()
    bad_prune.prune = np.zeros(bad_prune.prune.size + 1, dtype=np.float32)
    bad_tier = env.plan.copy()
    bad_tier.tier = bad_tier.tier[:, :, :1]
    for plan, frag in [(other, "device"), (bad_prune, "prune"), (bad_tier, "tier")]:
        before = plan_arrays(env)
        with pytest.raises(PlanError) as exc:
            env.step_plan(plan)
        msg = str(exc.value)
        assert msg.startswith("plan: ") and frag in msg and "'tiny'" in msg and "\n" not in msg, msg
        assert same_plan(before, plan_arrays(env))
    with pytest.raises(PlanError, match="DeploymentPlan is required"):
        env.step_plan({"device": []})
    obs, *_ = env.step_plan(env.plan)
    assert env.observation_space.contains(obs)


_SHAPES = st.sampled_from(["ok", "short", "long", "2d", "scalar"])
_DTYPES = st.sampled_from([np.int64, np.int32, np.uint8, np.float32, np.float64, bool])
_VALUES = st.one_of(
    st.integers(-3, 12),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0, 1, -1, 2**31 - 1]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(action_space=st.sampled_from(SPACES), shape=_SHAPES, dtype=_DTYPES, into_range=st.booleans(), data=st.data())
def test_random_arrays_never_corrupt_the_env(action_space, shape, dtype, into_range, data):
    """Either refused (CoELError, plan unchanged) or accepted with a valid plan and an in-space observation; for the
    MultiDiscrete spaces an integer array is accepted exactly when `space.contains` holds."""
    env = get_env(action_space)
    if not env.unwrapped._has_reset or int(env.unwrapped.core.states.epoch[0]) > 400:
        env.reset(seed=0)
    A = env.action_space.shape[0]
    n = {"ok": A, "short": A - 1, "long": A + 1, "2d": A, "scalar": 1}[shape]
    vals = data.draw(st.lists(_VALUES, min_size=n, max_size=n))
    with np.errstate(all="ignore"):
        a = np.array(vals, dtype=np.float64)
        if np.dtype(dtype).kind == "f":
            a = a.astype(dtype)
        else:  # integer-to-integer casts wrap (no undefined float-to-int casts)
            a = np.nan_to_num(a).clip(-1e9, 1e9).astype(np.int64)
            if into_range and n == A and action_space != "threshold":
                a = np.abs(a) % env.action_space.nvec
            a = a.astype(dtype)
    a = a[None] if shape == "2d" else (a[0] if shape == "scalar" else a)
    before = plan_arrays(env)
    discrete_ints = action_space != "threshold" and a.dtype.kind in "biu"
    try:
        obs, r, *_ = env.step(a)
        assert not discrete_ints or env.action_space.contains(a)
    except CoELError:
        assert same_plan(before, plan_arrays(env))
        assert not (discrete_ints and env.action_space.contains(a))
        obs, r, *_ = env.step(valid_action(env))
    assert env.observation_space.contains(obs) and np.isfinite(r)
    plan = env.plan
    assert plan.problems(env.cluster, env.state.memory_avail) == []


# ---- objects numpy cannot (or should not) read as an array --------------------------------------------------------
class _ArrayRaises:
    """An object whose `__array__` fails (a lazy tensor of another library, a broken wrapper)."""

    def __array__(self, *args, **kwargs):
        raise RuntimeError("boom\nsecond line")


@pytest.mark.parametrize("action_space", SPACES)
def test_unreadable_and_masked_actions_are_refused_in_one_line(action_space):
    torch = pytest.importorskip("torch")
    env = get_env(action_space)
    env.reset(seed=0)
    good = valid_action(env)
    grad = torch.tensor(good.astype(np.float32), requires_grad=True)  # np.asarray raises RuntimeError on it
    assert_refused(env, grad, "Tensor that cannot be read as an array given", "detach()")
    assert_refused(env, _ArrayRaises(), "_ArrayRaises that cannot be read as an array given (boom)")
    masked = np.ma.masked_array(good, mask=np.ones(good.shape, dtype=bool))  # np.asarray would drop the mask
    assert_refused(env, masked, "a masked array given")
    _, r, *_ = env.step(torch.as_tensor(good))  # a plain tensor is an array like any other
    assert np.isfinite(r)


def test_vector_env_refuses_a_tensor_that_requires_grad():
    torch = pytest.importorskip("torch")
    venv = CoELVectorEnv(num_envs=3, scenario="tiny", action_space="threshold")
    venv.reset(seed=0)
    good = venv.action_space.sample()
    before, epoch = venv.core.plans.dev.copy(), venv.core.states.epoch.copy()
    with pytest.raises(ActionError) as exc:
        venv.step(torch.tensor(good, requires_grad=True))
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("actions (threshold): Tensor that cannot be read as an array"), msg
    assert np.array_equal(before, venv.core.plans.dev) and np.array_equal(epoch, venv.core.states.epoch)
    _, r, *_ = venv.step(torch.tensor(good, requires_grad=True).detach())
    assert np.isfinite(r).all()
    venv.close()


def test_the_full_mask_cache_is_bounded_by_bytes(monkeypatch):
    import coel_env.env.actions as actions

    env = get_env("full")
    env.reset(seed=0)
    codec = env.unwrapped.action_codec
    size = int(codec.nvec.sum())
    monkeypatch.setattr(actions, "MAX_ACTION_ENTRIES", size)  # room for 4 masks of this size
    codec._mask_cache.clear()
    S = env.unwrapped.cluster.num_servers
    rows = [np.array([(i >> s) & 1 for s in range(S)], dtype=bool) for i in range(2**S)]
    for row in rows:
        m = codec.mask_for(row)
        assert len(codec._mask_cache) <= 4 and m.shape == (size,) and not m.flags.writeable
    assert np.array_equal(codec.masks(np.stack(rows[:2]))[1], codec.mask_for(rows[1]))
    codec._mask_cache.clear()
