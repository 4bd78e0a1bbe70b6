"""Every baseline yields valid plans on every shipped scenario; the Policy interface works inside CoEL-v0."""

import gymnasium as gym
import numpy as np
import pytest

from agents.baselines import HEURISTICS, make_policy
from agents.baselines.greedy import popularity_bits
from agents.baselines.oracle import score_plans
from coel_env import SurrogateBackend, list_scenarios, make_scenario
from coel_env.errors import ConfigError

SCENARIOS = {}


def scenario(name):
    if name not in SCENARIOS:
        sc = make_scenario(name, seed=0)
        SCENARIOS[name] = (sc, sc.initial_state(np.random.default_rng(1)))
    return SCENARIOS[name]


@pytest.mark.parametrize("name", list_scenarios())
def test_every_baseline_plans_validly(name):
    sc, state = scenario(name)
    c = sc.cluster
    kw = {"oracle": dict(search_iters=2, batch=4, time_limit=2.0, milp_max_binaries=0)}
    for pname in (*HEURISTICS, "oracle"):
        pol = make_policy(pname, seed=0, **kw.get(pname, {}))
        pol.reset(c, seed=0, scenario=sc)
        d = pol.decide(state, c, None)
        assert d.update
        assert d.plan.problems(c) == [], (pname, d.plan.problems(c)[:2])
        assert d.plan.problems(c, state.memory_avail) == [], pname
        assert (d.plan.replica_count >= 1).all()


def test_plans_avoid_failed_servers_and_static_keeps_its_plan():
    sc, state = scenario("paper-testbed")
    c = sc.cluster
    st = state.copy()
    st.server_up[2] = False
    for pname in HEURISTICS:
        pol = make_policy(pname, seed=0)
        pol.reset(c, seed=0, scenario=sc)
        plan = pol.decide(st, c, None).plan
        assert not np.isin(plan.device[plan.valid], np.flatnonzero(c.dev_server == 2)).any(), pname
    pol = make_policy("static_linear")
    first = pol.decide(state, c, None).plan
    again = pol.decide(state, c, first)
    assert not again.update and again.plan is first
    broken = pol.decide(st, c, first)  # server 2 failed: the static plan is re-made without it
    assert broken.update


def test_static_layouts_and_bits():
    sc, state = scenario("paper-2server-1gpu")
    c = sc.cluster
    lin = make_policy("static_linear").plan(state, c)
    rr = make_policy("static_round_robin").plan(state, c)
    assert lin.device[0, :, 0].tolist() == [0] * 30 + [1] * 30
    assert rr.device[0, :, 0].tolist() == [0, 1] * 30
    assert set(lin.bits[lin.valid].tolist()) == {16}  # 12.45 GB per 4090D fits at 16-bit
    sc1, st1 = scenario("paper-1server-2gpu")
    p = make_policy("static_linear").plan(st1, sc1.cluster)
    assert (p.tier[p.valid] == 0).all() and set(p.bits[p.valid].tolist()) == {16}


def test_popularity_bits_follow_popularity_and_fit():
    rng = np.random.default_rng(0)
    pop = rng.random((4, 16))
    eb = np.zeros(17)
    eb[[4, 8, 16]] = [1.0, 2.0, 4.0]
    bits = popularity_bits(pop, 200.0, eb)
    assert eb[bits].sum() <= 200.0
    order = np.argsort(-pop, axis=None)
    assert (np.diff(bits.reshape(-1)[order]) <= 0).all()  # hotter experts never get fewer bits
    assert set(np.unique(bits).tolist()) == {8, 16}


def test_popularity_aware_beats_static_on_the_testbed():
    sc, state = scenario("paper-testbed")
    c = sc.cluster
    be = SurrogateBackend(c)
    plans = {n: make_policy(n, seed=0).plan(state, c) for n in ("static_linear", "greedy_popularity", "eplb")}
    s = dict(zip(plans, score_plans(be, list(plans.values()), state, 0.005)))
    assert s["greedy_popularity"] < s["static_linear"] and s["eplb"] < s["static_linear"]


def test_policy_acts_inside_coel_v0_and_registry_errors():
    env = gym.make("CoEL-v0", scenario="tiny", max_epochs=3)
    obs, _ = env.reset(seed=0)
    pol = make_policy("coel", seed=0)
    pol.reset(env.unwrapped.cluster, seed=0, scenario=env.unwrapped.scenario)
    for _ in range(2):
        a = pol.act(obs, env)
        assert env.action_space.contains(a)
        obs, r, _term, _trunc, info = env.step(a)
        assert np.isfinite(r) and not info["repaired"]
    env.close()
    with pytest.raises(ConfigError, match="allowed"):
        make_policy("nope")
    with pytest.raises(ConfigError, match="layout"):
        make_policy("static", layout="diagonal")


# ---- constructor arguments: one line naming the policy, the argument and what is allowed ------------------------
NAN = float("nan")
BAD_POLICY_ARGS = [
    ("oracle", {"time_limit": NAN}, "policy oracle: time_limit: nan given; must be a finite number in (0, 1000000]"),
    ("oracle", {"time_limit": -1}, "policy oracle: time_limit: -1 given; must be a finite number in (0, 1000000]"),
    ("oracle", {"time_limit": 0}, "policy oracle: time_limit: 0 given; must be a finite number in (0, 1000000]"),
    (
        "oracle",
        {"time_limit": "abc"},
        "policy oracle: time_limit: 'abc' given; must be a finite number in (0, 1000000]",
    ),
    (
        "oracle",
        {"time_limit": 10**400},
        "policy oracle: time_limit: an integer of ~400 digits given; must be a finite number in (0, 1000000]",
    ),
    ("oracle", {"search_iters": -1}, "policy oracle: search_iters: -1 given; must be an integer in [0, 10000000]"),
    ("oracle", {"search_iters": 1.5}, "policy oracle: search_iters: 1.5 given; must be an integer in [0, 10000000]"),
    ("oracle", {"search_iters": True}, "policy oracle: search_iters: True given; must be an integer in [0, 10000000]"),
    ("oracle", {"batch": 0}, "policy oracle: batch: 0 given; must be an integer in [1, 4096]"),
    ("oracle", {"max_quality_loss": 2}, "policy oracle: max_quality_loss: 2 given; must be a finite number in [0, 1]"),
    ("oracle", {"period": 0}, "policy oracle: period: 0 given; must be an integer >= 1"),
    (
        "oracle",
        {"bogus": 1},
        "policy oracle: unknown argument 'bogus'; allowed: seed, max_quality_loss, milp_max_binaries, time_limit, "
        "search_iters, batch, period",
    ),
    ("random", {"seed": -1}, "policy random: seed: -1 given; must be an integer >= 0 or null"),
    ("random", {"update_prob": 1.5}, "policy random: update_prob: 1.5 given; must be a finite number in [0, 1]"),
    ("random", {"max_prune": 0.95}, "policy random: max_prune: 0.95 given; must be a finite number in [0, 0.9]"),
    ("greedy_popularity", {"period": 0}, "policy greedy_popularity: period: 0 given; must be an integer >= 1"),
    ("greedy_popularity", {"fill": 0}, "policy greedy_popularity: fill: 0 given; must be a finite number in (0, 1]"),
    ("eplb", {"redundancy": float("inf")}, "policy eplb: redundancy: inf given; must be a finite number in [0, 8]"),
    ("coel", {"ema": NAN}, "policy coel: ema: nan given; must be a finite number in [0, 1]"),
    ("coel", {"fuse": "yes"}, "policy coel: fuse: 'yes' given; must be a boolean"),
    ("static", {"layout": 3}, "policy static: layout: 3 given; must be a string"),
]


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    BAD_POLICY_ARGS,
    ids=[f"{n}-{next(iter(k))}-{i}" for i, (n, k, _) in enumerate(BAD_POLICY_ARGS)],
)
def test_make_policy_refuses_bad_arguments_in_one_line(name, kwargs, expected):
    with pytest.raises(ConfigError) as exc:
        make_policy(name, **kwargs)
    assert str(exc.value) == expected


def test_policy_arguments_are_checked_however_the_policy_is_built(tiny, tiny_state):
    from agents.baselines import OraclePolicy
    from agents.baselines.oracle import optimize, solve_milp

    with pytest.raises(ConfigError, match=r"^policy oracle: time_limit: nan given"):
        OraclePolicy(time_limit=NAN)  # the constructor itself, not only make_policy
    for fn in (solve_milp, optimize):  # HiGHS never sees a NaN or negative limit (it would not return)
        for bad in (NAN, -1.0):
            with pytest.raises(ConfigError, match=r"^oracle: time_limit: .* must be a finite number in \(0, "):
                fn(tiny.cluster, tiny_state, time_limit=bad)
    ok = make_policy("oracle", seed=np.int64(3), time_limit=5, search_iters=np.int64(2))  # numpy scalars, int secs
    assert ok.kw["time_limit"] == 5.0 and isinstance(ok.kw["time_limit"], float) and ok.kw["search_iters"] == 2
    assert make_policy("static_round_robin", seed=None).layout == "round_robin"
    with pytest.raises(ConfigError, match=r"^policy static_linear: bad arguments"):
        make_policy("static_linear", layout="round_robin")  # the registry name fixes the layout
