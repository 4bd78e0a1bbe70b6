"""StepRecord, the one info derivation, the migration-disruption model, step scoring and named random streams."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from coel_env import make_scenario
from coel_env.env import CoELEnv
from coel_env.env.disruption import MigrationDisruption
from coel_env.env.record import INFO_KEYS, StepRecord, env_info, info_values, vector_info
from coel_env.env.vector import CoELVectorEnv
from coel_env.plan.repair import REPAIR_KINDS
from coel_env.rng import Layout, draw
from coel_env.specs import load_scenario_spec
from coel_env.world.state import StateBatch


def scenario(name: str, budgets: dict | None = None, **dynamics) -> dict:
    data = load_scenario_spec(name).model_dump()
    data["dynamics"].update(dynamics)
    if budgets:
        data["budgets"] = budgets
    return data


def moved(env) -> np.ndarray:
    """An action that moves one replica (so the step migrates)."""
    plan = env.plan
    plan.device[0, 0, 0] = (plan.device[0, 0, 0] + 1) % env.cluster.num_devices
    return env.action_codec.encode(plan)


# ---- the record ------------------------------------------------------------------------------------------------
def test_record_fields_are_batched_and_typed():
    env = CoELEnv(scenario="tiny", action_space="full")
    env.reset(seed=0)
    env.step(moved(env))
    rec = env.core.last_record
    assert isinstance(rec, StepRecord) and rec.num_envs == 1
    for f in dataclasses.fields(rec):
        v = getattr(rec, f.name)
        if isinstance(v, dict):
            assert all(np.asarray(a).shape[:1] == (1,) for a in v.values()), f.name
        elif v is not None:
            assert v.shape[:1] == (1,), f.name
    assert rec.repair_counts.shape == (1, len(REPAIR_KINDS)) and rec.fault_counts.shape == (1, len(REPAIR_KINDS))
    assert rec.update.dtype == bool and rec.changed[0] and rec.migration["time_s"][0] > 0
    assert rec.migration_time_s[0] == rec.migration["time_s"][0] + (
        0.0 if rec.restore_migration is None else rec.restore_migration["time_s"][0]
    )
    assert rec.epoch[0] == 1 and rec.servers_up[0] == env.state.server_up.sum()


def test_measured_and_served_follow_the_disruption_model():
    env = CoELEnv(scenario="tiny", action_space="full")
    env.reset(seed=0)
    _, _, _, _, info = env.step(moved(env))
    rec = env.core.last_record
    m, s = rec.measured, rec.served
    assert s is not m and info["metrics"]["e2e_mean_s"] == s["e2e_mean_s"][0] > m["e2e_mean_s"][0]
    want = MigrationDisruption(env.core.window, env.core.ctx.slo_s, 0.5)(m, rec.migration_time_s)
    for k in m:
        np.testing.assert_array_equal(s[k], want[k], err_msg=k)
    for k in ("energy_j", "quality_loss", "dropped_frac", "link_bytes"):  # untouched fields: shared, not copied
        assert s[k] is m[k]
    _, _, _, _, info = env.step(np.r_[env.action_codec.encode(env.plan)[:-1], 0])  # keep: no migration
    rec = env.core.last_record
    if rec.migration_time_s[0] == 0:
        assert rec.served is rec.measured


def test_disruption_formula_on_numbers():
    m = {
        "e2e_mean_s": np.array([1.0, 1.0, 1.0]),
        "ttft_mean_s": np.array([0.5, 0.5, 0.5]),
        "e2e_p95_s": np.array([2.0, 2.0, 2.0]),
        "ttft_p95_s": np.array([1.0, 1.0, 1.0]),
        "tokens_per_s": np.array([100.0, 100.0, 100.0]),
        "late_frac": np.array([0.2, 0.2, 0.2]),
        "energy_j": np.array([5.0, 5.0, 5.0]),
    }
    before = {k: v.copy() for k, v in m.items()}
    t = np.array([0.0, 1.0, 60.0])  # none, 1/30 of the window (below the p95 threshold), longer than the window
    s = MigrationDisruption(window_s=30.0, slo_s=5.0, slowdown=0.5)(m, t)
    for k in m:
        np.testing.assert_array_equal(m[k], before[k])  # measured untouched
    f, w = np.array([0.0, 1 / 30, 1.0]), np.array([0.0, 0.5, 15.0])
    np.testing.assert_allclose(s["e2e_mean_s"], 1.0 + f * w)
    np.testing.assert_allclose(s["ttft_mean_s"], 0.5 + f * w)
    np.testing.assert_allclose(s["e2e_p95_s"], [2.0, 2.0, 17.0])
    np.testing.assert_allclose(s["ttft_p95_s"], [1.0, 1.0, 16.0])
    np.testing.assert_allclose(s["tokens_per_s"], 100.0 * (1 - 0.5 * f))
    np.testing.assert_allclose(s["late_frac"], 0.2 + 0.8 * f * np.minimum(w / 5.0, 1.0))
    assert s["energy_j"] is m["energy_j"]
    assert MigrationDisruption(30.0, 5.0)(m, np.zeros(3)) is m


@pytest.mark.parametrize("mode", ["penalty", "terminate"])
def test_scorer_is_the_penalty_formula(mode):
    budgets = {"energy_j": 1.0, "latency_s": 0.01, "mode": mode}
    env = CoELEnv(
        scenario=scenario("tiny", budgets), action_space="edit", hello_cost_per_kbit=0.3, reward_space="composite"
    )
    env.reset(seed=1)
    env.action_space.seed(1)
    core = env.core
    for _ in range(3):
        _, r, term, _, info = env.step(env.action_space.sample())
        rec = core.last_record
        w, c = core.scorer.weights, env.cluster
        excess = max(rec.served["energy_j"][0] / 1.0 - 1, 0) + max(rec.served["e2e_p95_s"][0] / 0.01 - 1, 0)
        base = (
            w.repair * info["repaired"]
            + w.unit * rec.repair_counts[0, :-1].sum() / (c.model.num_moe_layers * c.model.num_experts)
            + w.invalid * rec.invalid_edits[0]
            + w.hello * info["hello_bits"] / 1000
        )
        budget = w.budget * (excess > 0) if mode == "terminate" else w.budget * excess
        assert info["budget_excess"] == pytest.approx(excess) and info["penalty"] == pytest.approx(base + budget)
        assert term == (mode == "terminate" and excess > 0)
        assert r == pytest.approx(core.reward_fn(rec.served, rec.migration_time_s, core.ctx)[0] - info["penalty"])
        if term:
            break
    assert core.penalties == dataclasses.asdict(w) and core.penalties["hello"] == 0.3


# ---- one info derivation ---------------------------------------------------------------------------------------
def _same(a, b) -> bool:
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def test_single_info_is_the_batched_info_row():
    venv = CoELVectorEnv(3, scenario=scenario("tiny", failure_rate=0.3, recovery_rate=0.3), action_space="edit")
    venv.reset(seed=4)
    venv.action_space.seed(4)
    for _ in range(3):
        _, _, _, _, infos = venv.step(venv.action_space.sample())
        rec = venv.core.last_record
        batch = info_values(rec)
        assert tuple(batch) == INFO_KEYS
        for i in range(3):
            one = env_info(rec, i)
            assert tuple(one) == INFO_KEYS
            for k in INFO_KEYS:
                b = batch[k]
                row = {n: b[n][i].item() for n in b} if isinstance(b, dict) else b[i]
                row = row.item() if isinstance(row, np.generic) else row
                assert _same(one[k], row), k
        for k in INFO_KEYS:
            assert infos["_" + k].all()


def test_single_and_vector_envs_show_the_same_info():
    """Env i of CoELVectorEnv seeded `seed` == CoELEnv seeded `seed + i`, every info key (autoresets included)."""
    N, seed, kw = 3, 9, dict(scenario="tiny", action_space="edit", max_epochs=3)
    venv = CoELVectorEnv(N, **kw)
    envs = [CoELEnv(**kw, info_action_mask=False) for _ in range(N)]
    venv.reset(seed=seed)
    for i, e in enumerate(envs):
        e.reset(seed=seed + i)
    venv.action_space.seed(2)
    done = np.zeros(N, dtype=bool)
    for _ in range(7):
        acts = venv.action_space.sample()
        _, _, term, trunc, infos = venv.step(acts)
        for i, e in enumerate(envs):
            if done[i]:  # NEXT_STEP autoreset: this row was reset, not stepped
                assert not infos["_metrics"][i] and infos["epoch"][i] == 0
                e.reset(seed=None)
                continue
            _, _, _, _, info = e.step(acts[i])
            assert list(info) == list(INFO_KEYS)
            for k in INFO_KEYS:
                assert infos["_" + k][i], k
                v = infos[k]
                if isinstance(v, dict):
                    assert {n: float(v[n][i]) for n in v if not n.startswith("_")} == info[k], k
                else:
                    assert v[i] == info[k], k
        done = term | trunc


def test_vector_info_masks_and_reset_rows():
    env = CoELEnv(scenario="tiny")
    env.reset(seed=0)
    env.step(env.action_space.sample())
    rec = env.core.last_record
    out = vector_info(
        rec, np.array([True]), {"hello_bits": np.array([7]), "epoch": np.array([0]), "servers_up": np.array([2])}
    )
    assert out["hello_bits"][0] == 7 and out["epoch"][0] == 0 and out["servers_up"][0] == 2
    assert out["_hello_bits"][0] and out["_epoch"][0] and not out["_metrics"][0] and not out["metrics"]["_e2e_p95_s"][0]


# ---- named random streams --------------------------------------------------------------------------------------
def test_layout_views_match_flat_offsets():
    lay = Layout({"a": (2, 3), "b": 4, "empty": 0, "c": 1}, "normal")
    assert lay.size == 11 and lay.names == ("a", "b", "empty", "c")
    flat = np.random.default_rng(5).standard_normal(11)
    z = lay.draw(np.random.default_rng(5))
    np.testing.assert_array_equal(z["a"], flat[:6].reshape(2, 3))
    np.testing.assert_array_equal(z["b"], flat[6:10])
    assert z["empty"].shape == (0,)
    np.testing.assert_array_equal(z["c"], flat[10:])
    u = draw(np.random.default_rng(5), {"x": 3, "y": (2,)}, "uniform", lead=(2,))
    flat_u = np.random.default_rng(5).random((2, 5))
    np.testing.assert_array_equal(u["x"], flat_u[:, :3])
    np.testing.assert_array_equal(u["y"], flat_u[:, 3:])


def test_layout_views_share_the_buffer():
    lay = Layout({"a": (2, 2), "b": 3}, "uniform")
    buf = np.zeros((4, lay.size))
    v = lay.views(buf)
    lay.draw_into(np.random.default_rng(1), buf[2])
    np.testing.assert_array_equal(buf[2], np.random.default_rng(1).random(7))
    np.testing.assert_array_equal(v["a"][2], buf[2, :4].reshape(2, 2))
    np.testing.assert_array_equal(v["b"][2], buf[2, 4:])
    assert all(np.shares_memory(x, buf) for x in v.values())
    with pytest.raises(ValueError):
        lay.views(np.zeros((4, 6)))


def test_appending_a_block_leaves_the_others_unchanged():
    lay = Layout({"a": (3, 2), "b": 5}, "normal")
    old = lay.draw(np.random.default_rng(2))
    new = lay.extend({"c": 4}).draw(np.random.default_rng(2))
    assert list(new) == ["a", "b", "c"] and new["c"].shape == (4,)
    for k in old:
        np.testing.assert_array_equal(old[k], new[k])
    with pytest.raises(ValueError):
        lay.extend({"a": 1})


def test_dynamics_streams_are_the_old_offsets():
    """The named blocks hold exactly the numbers the old offset slicing read."""
    sc = make_scenario("paper-testbed")
    c = sc.cluster
    S, D, K, M = c.num_servers, c.num_devices, c.num_links, sc.routing.num_domains
    extra = Layout({"popularity": (c.model.num_moe_layers, c.model.num_experts), "rate": S})
    sb = StateBatch(sc, 2, extra=extra)
    sb.draw([None, np.random.default_rng(3)])
    rng = np.random.default_rng(3)
    z, u = rng.standard_normal(S * M + S + 2 * D + extra.size), rng.random(S + 2 * K + 2 * S + 1)
    n, v = sb.normals, sb.uniforms
    np.testing.assert_array_equal(n["domain"][1], z[: S * M].reshape(S, M))
    o = S * M
    np.testing.assert_array_equal(n["arrival"][1], z[o : o + S])
    o += S
    np.testing.assert_array_equal(n["compute"][1], z[o : o + D])
    np.testing.assert_array_equal(n["memory"][1], z[o + D : o + 2 * D])
    ze = z[o + 2 * D :]
    np.testing.assert_array_equal(sb.extra["rate"][1], ze[-S:])  # perception: rate = the last S
    np.testing.assert_array_equal(sb.extra["popularity"][1].ravel(), ze[:-S])
    np.testing.assert_array_equal(v["switch"][1], u[:S])
    np.testing.assert_array_equal(v["link_change"][1], u[S : S + K])
    np.testing.assert_array_equal(v["link_value"][1], u[S + K : S + 2 * K])
    o = S + 2 * K
    np.testing.assert_array_equal(v["fail"][1], u[o : o + S])
    np.testing.assert_array_equal(v["join"][1], u[o + S : o + 2 * S])
    assert v["keep_one"][1, 0] == u[-1]
    assert not sb.z[0].any() and not sb.u[0].any()  # a row without a generator draws nothing


def test_perception_layout_is_the_env_extra_block():
    env = CoELEnv(scenario="tiny")
    core = env.core
    assert core.states.normal_layout.shapes["extra"] == (core.perception.normals.size,)
    assert core.perception.num_normals == core.perception.normals.size
    assert list(core.states.normal_layout.names)[-1] == "extra"  # later dynamics streams go after it
