"""Routing generator and traces: inclusion probabilities, seeding, sampling, skew, npz round-trip, replay."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from coel_env import ConfigError, RoutingModel, RoutingTrace, make_scenario
from coel_env.specs import RoutingSpec, load_scenario_spec, model_preset
from coel_env.world.traces import inclusion_probs, record_trace

HYP = settings(max_examples=30, deadline=None, derandomize=True)


# ---- inclusion probabilities --------------------------------------------------------------------------------------
@HYP
@given(
    w=arrays(
        np.float64, st.tuples(st.integers(1, 3), st.integers(2, 64)), elements=st.floats(1e-6, 1e3, allow_nan=False)
    ),
    k_frac=st.floats(0.0, 1.0),
)
def test_inclusion_probs_sum_to_k_and_stay_at_most_one(w, k_frac):
    E = w.shape[-1]
    k = max(1, min(E, round(k_frac * E)))
    p = inclusion_probs(w, k)
    np.testing.assert_allclose(p.sum(-1), k, atol=1e-7)
    assert (p <= 1.0 + 1e-12).all() and (p >= 0).all()
    # order-preserving: a heavier expert is never less likely to be chosen
    for row_w, row_p in zip(w, p):
        order = np.argsort(row_w, kind="stable")
        assert (np.diff(row_p[order]) >= -1e-9).all()


def test_inclusion_probs_by_hand():
    np.testing.assert_allclose(inclusion_probs(np.array([1.0, 1.0, 2.0]), 1), [0.25, 0.25, 0.5])
    # k * w would be [0.4, 0.4, 1.2, ...]: the heavy one is capped at 1 and the deficit spread proportionally
    np.testing.assert_allclose(inclusion_probs(np.array([1.0, 1.0, 3.0]), 2), [0.5, 0.5, 1.0], atol=1e-9)
    np.testing.assert_allclose(inclusion_probs(np.ones(8), 8), np.ones(8))


# ---- the generator -------------------------------------------------------------------------------------------------
def test_same_seed_same_model_and_samples():
    m, spec = model_preset("qwen1.5-moe-a2.7b"), RoutingSpec()
    a, b = RoutingModel.generate(m, spec, 7), RoutingModel.generate(m, spec, 7)
    np.testing.assert_array_equal(a.domain_popularity, b.domain_popularity)
    np.testing.assert_array_equal(a.affinity, b.affinity)
    mix = np.array([0.1, 0.2, 0.3, 0.4])
    ra = a.sample(mix, 64, np.random.default_rng(3))
    rb = b.sample(mix, 64, np.random.default_rng(3))
    np.testing.assert_array_equal(ra, rb)
    c = RoutingModel.generate(m, spec, 8)
    assert not np.array_equal(a.domain_popularity, c.domain_popularity)
    assert not np.array_equal(ra, a.sample(mix, 64, np.random.default_rng(4)))


@pytest.mark.parametrize("name", ["tiny-moe", "qwen1.5-moe-a2.7b", "deepseek-v2-lite"])
def test_generated_shapes_and_marginals(name):
    m = model_preset(name)
    rm = RoutingModel.generate(m, RoutingSpec(num_domains=3), 0)
    L, E = m.num_moe_layers, m.num_experts
    assert rm.domain_popularity.shape == (3, L, E)
    assert rm.affinity.shape == (L - 1, E, E)
    np.testing.assert_allclose(rm.domain_popularity.sum(-1), m.top_k, rtol=1e-9)
    assert (rm.domain_popularity <= 1 + 1e-12).all() and (rm.domain_popularity > 0).all()
    np.testing.assert_allclose(rm.affinity.sum(-1), 1.0, rtol=1e-9)
    # a mixture of domains is a convex combination: still sums to top_k and stays <= 1
    mix = np.random.default_rng(0).dirichlet(np.ones(3), size=5)
    pop = rm.popularity(mix)
    assert pop.shape == (5, L, E)
    np.testing.assert_allclose(pop.sum(-1), m.top_k, rtol=1e-9)
    assert (pop <= 1 + 1e-12).all()


def test_sampled_routes_are_valid_top_k():
    m = model_preset("tiny-moe")
    rm = RoutingModel.generate(m, RoutingSpec(num_domains=2), 0)
    r = rm.sample(np.array([0.5, 0.5]), 500, np.random.default_rng(0))
    assert r.shape == (500, m.num_moe_layers, m.top_k) and r.dtype == np.int32
    assert r.min() >= 0 and r.max() < m.num_experts
    s = np.sort(r, axis=-1)
    assert (s[..., 1:] != s[..., :-1]).all()  # k distinct experts per token and layer


def _frequencies(routes: np.ndarray, E: int) -> np.ndarray:
    T, L, _ = routes.shape
    return np.stack([np.bincount(routes[:, l].ravel(), minlength=E) / T for l in range(L)])


def test_top1_samples_match_marginals_without_affinity():
    model = dict(preset="tiny-moe", top_k=1, name="tiny-top1")
    spec = load_scenario_spec(
        dict(
            name="t",
            model=model,
            routing=dict(num_domains=3, affinity=0.0),
            servers=[dict(name="a", gpus=["cpu-small"], cpu="cpu-small", cpu_ram_gb=8)],
        )
    )
    rm = RoutingModel.generate(spec.model, spec.routing, 0)
    mix = np.array([0.6, 0.3, 0.1])
    T = 40_000
    freq = _frequencies(rm.sample(mix, T, np.random.default_rng(1)), spec.model.num_experts)
    p = rm.popularity(mix)
    sigma = np.sqrt(p * (1 - p) / T)
    assert (np.abs(freq - p) < 5 * sigma + 1e-9).all()  # Gumbel-max is exact for top-1


def test_top_k_samples_approach_marginals_loosely_without_affinity():
    m = model_preset("tiny-moe")
    rm = RoutingModel.generate(m, RoutingSpec(num_domains=3, affinity=0.0), 0)
    mix = np.array([0.5, 0.3, 0.2])
    freq = _frequencies(rm.sample(mix, 20_000, np.random.default_rng(1)), m.num_experts)
    p = rm.popularity(mix)
    assert np.abs(freq - p).max() < 0.05
    assert np.corrcoef(freq.ravel(), p.ravel())[0, 1] > 0.95
    np.testing.assert_allclose(freq.sum(-1), m.top_k)


def test_affinity_makes_consecutive_layers_dependent():
    m = model_preset("tiny-moe")
    mix = np.array([1.0, 0.0])

    def mutual_information(affinity: float) -> float:
        rm = RoutingModel.generate(m, RoutingSpec(num_domains=2, affinity=affinity, affinity_concentration=0.1), 0)
        r = rm.sample(mix, 20_000, np.random.default_rng(0))
        joint = np.zeros((8, 8))
        np.add.at(joint, (r[:, 0, 0], r[:, 1, 0]), 1.0)
        joint /= joint.sum()
        pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
        nz = joint > 0
        return float((joint[nz] * np.log(joint[nz] / (pa @ pb)[nz])).sum())

    assert mutual_information(0.9) > 3 * mutual_information(0.0) + 0.02


# ---- skew: max/mean expert load in plausible ranges (DESIGN: 1.2-1.5 coarse, 1.5-3 in hot fine-grained layers) -------
def _load_ratio(pop: np.ndarray, top_k: int) -> np.ndarray:
    """max/mean inclusion probability per layer (mean = top_k / E)."""
    return pop.max(-1) / (top_k / pop.shape[-1])


@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen1.5-moe-a2.7b", "olmoe-1b-7b", "qwen3-30b-a3b"])
def test_default_routing_skew_is_plausible(name):
    m = model_preset(name)
    coarse = m.num_experts <= 16
    for seed in range(3):
        rm = RoutingModel.generate(m, RoutingSpec(), seed)
        ratio = _load_ratio(rm.domain_popularity, m.top_k)  # [M, L]
        assert ratio.min() > 1.05  # never perfectly uniform
        median, hot = np.median(ratio), ratio.max()
        if coarse:
            assert 1.1 <= median <= 1.6 and hot <= 2.0, (seed, median, hot)
        else:
            assert 1.3 <= median <= 3.0 and hot <= 4.0, (seed, median, hot)
        assert (rm.domain_popularity < 0.999).all(), "an expert used by every token (routing collapse)"


@pytest.mark.parametrize("name", ["paper-testbed", "moe2-heterogeneous", "metro-8", "deepseek-scale"])
def test_shipped_scenarios_routing_skew_is_plausible(name):
    sc = make_scenario(name, seed=0)
    state = sc.initial_state(np.random.default_rng(0))
    m = sc.spec.model
    ratio = _load_ratio(state.popularity, m.top_k)  # [S, L] as the surrogate sees it
    assert 1.3 <= np.median(ratio) <= 3.0, np.median(ratio)
    assert ratio.max() <= 4.0, ratio.max()


# ---- traces: npz round-trip (never pickle) and replay ------------------------------------------------------------
@pytest.fixture
def small_trace(tiny) -> RoutingTrace:
    mix = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    return record_trace(tiny.routing, mix, tokens_per_epoch=400, epochs=3, seed=5)


def test_record_trace_is_seeded(tiny, small_trace):
    mix = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    again = record_trace(tiny.routing, mix, tokens_per_epoch=400, epochs=3, seed=5)
    np.testing.assert_array_equal(again.experts, small_trace.experts)
    assert small_trace.experts.shape == (3 * 3 * 400, 4, 2)
    assert small_trace.num_epochs == 3
    np.testing.assert_array_equal(np.bincount(small_trace.server), [1200, 1200, 1200])


def test_trace_npz_round_trip(tmp_path, small_trace):
    path = tmp_path / "trace.npz"
    small_trace.save(path)
    back = RoutingTrace.load(path)
    for f in ("experts", "server", "epoch"):
        np.testing.assert_array_equal(getattr(back, f), getattr(small_trace, f))
        assert getattr(back, f).dtype == getattr(small_trace, f).dtype
    with np.load(path, allow_pickle=False) as z:  # plain arrays, nothing pickled
        assert sorted(z.files) == ["epoch", "experts", "server"]
        assert all(z[k].dtype != object for k in z.files)


def test_trace_load_refuses_pickles_and_bad_files(tmp_path):
    obj = tmp_path / "obj.npz"
    np.savez(obj, experts=np.array([{"evil": 1}], dtype=object), server=np.zeros(1), epoch=np.zeros(1))
    pkl = tmp_path / "pickle.npz"
    pkl.write_bytes(b"\x80\x04\x95\x00")
    npy = tmp_path / "single.npy"
    np.save(npy, np.zeros(3))
    keys = tmp_path / "keys.npz"
    np.savez(keys, routes=np.zeros((2, 2, 2)))
    mismatched = tmp_path / "mismatch.npz"
    np.savez(
        mismatched, experts=np.zeros((10, 2, 2), np.int32), server=np.zeros(10, np.int32), epoch=np.zeros(5, np.int32)
    )
    flat = tmp_path / "flat.npz"
    np.savez(flat, experts=np.zeros((10, 2), np.int32), server=np.zeros(10, np.int32), epoch=np.zeros(10, np.int32))
    for path, expect in (
        (obj, "cannot read"),
        (pkl, "cannot read"),
        (npy, "cannot read"),
        (keys, "cannot read"),
        (tmp_path / "none.npz", "cannot read"),
        (mismatched, "arrays disagree"),
        (flat, "arrays disagree"),
    ):
        with pytest.raises(ConfigError, match=expect) as exc:
            RoutingTrace.load(path)
        assert "\n" not in str(exc.value) and exc.value.__cause__ is None


def test_trace_popularity_by_hand():
    experts = np.array([[[0, 1]], [[0, 2]], [[3, 0]], [[1, 2]]], dtype=np.int32)  # 4 tokens, 1 layer, top-2
    trace = RoutingTrace(experts, server=np.array([0, 0, 0, 1], np.int32), epoch=np.array([0, 0, 1, 1], np.int32))
    p0 = trace.popularity(0, num_servers=3, num_experts=4)
    np.testing.assert_allclose(p0[0, 0], [1.0, 0.5, 0.5, 0.0])
    np.testing.assert_allclose(p0[1, 0], [0.5] * 4)  # no tokens: uniform k / E
    np.testing.assert_allclose(p0[2, 0], [0.5] * 4)
    p1 = trace.popularity(1, 3, 4)
    np.testing.assert_allclose(p1[0, 0], [1.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(p1[1, 0], [0.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(trace.popularity(2, 3, 4), p0)  # epochs wrap around
    assert trace.num_epochs == 2


def test_replay_drives_the_state_popularity(tmp_path, small_trace):
    path = tmp_path / "trace.npz"
    small_trace.save(path)
    sc = make_scenario("tiny", seed=0, trace=str(path))
    rng = np.random.default_rng(0)
    state = sc.initial_state(rng)
    for epoch in range(4):
        assert state.epoch == epoch
        want = small_trace.popularity(epoch, 3, 8)
        np.testing.assert_array_equal(state.popularity, want)
        np.testing.assert_allclose(state.popularity.sum(-1), 2.0)
        sc.advance(state, rng)
    # server 0 replays domain 0 only: its popularity follows domain 0 of the generator (loosely)
    p_dom0 = sc.routing.domain_popularity[0]
    assert np.abs(small_trace.popularity(0, 3, 8)[0] - p_dom0).max() < 0.2


def test_replay_rejects_a_trace_of_another_model(tmp_path, small_trace):
    bad = RoutingTrace(small_trace.experts[:, :2], small_trace.server, small_trace.epoch)
    with pytest.raises(ConfigError, match=r"trace: routes are \[T, 2, 2\]"):
        make_scenario("tiny", trace=bad)
    many = RoutingTrace(small_trace.experts, small_trace.server + 3, small_trace.epoch)
    with pytest.raises(ConfigError, match=r"server ids must lie in 0\.\.2"):
        make_scenario("tiny", trace=many)
