"""The oracle: MILP + search on small instances is at least as good as every heuristic under the surrogate."""

import itertools

import numpy as np
import pytest
from conftest import ONE_LAYER_MODEL, scenario_dict

from agents.baselines import HEURISTICS, make_policy
from agents.baselines.oracle import PlanSearch, optimize, score_plans, solve_milp
from coel_env import DeploymentPlan, SurrogateBackend, make_scenario
from coel_env.specs.scenario import SCENARIO_DIR


def small_paper_2server(layers: int = 2) -> dict:
    import yaml

    d = yaml.safe_load((SCENARIO_DIR / "paper-2server-1gpu.yaml").read_text())
    d.update(name="paper-2server-1gpu-small", model={"preset": "qwen1.5-moe-a2.7b", "num_layers": layers})
    return d


@pytest.mark.parametrize("spec", ["tiny", small_paper_2server()], ids=["tiny", "paper-2server-1gpu-2layers"])
def test_oracle_beats_every_heuristic(spec):
    sc = make_scenario(spec, seed=0)
    c = sc.cluster
    state = sc.initial_state(np.random.default_rng(0))
    be = SurrogateBackend(c)
    heur = []
    for name in HEURISTICS:
        pol = make_policy(name, seed=0)
        pol.reset(c, seed=0, scenario=sc)
        heur.append(pol.plan(state, c))
    h = score_plans(be, heur, state, 0.005)
    res = optimize(c, state, max_quality_loss=0.005, time_limit=8.0, search_iters=40, batch=32, backend=be)
    assert res.method in ("milp", "milp+search", "search")
    assert res.plan.problems(c, state.memory_avail) == []
    assert res.objective == pytest.approx(float(score_plans(be, [res.plan], state, 0.005)[0]))
    assert res.objective <= h.min() + 1e-12, dict(zip(HEURISTICS, h))
    assert res.num_binaries > 0 and res.solve_time_s > 0 and res.milp_status
    assert np.isnan(res.milp_gap) or 0.0 <= res.milp_gap <= 1.0


def test_milp_proves_optimality_and_oracle_matches_brute_force():
    d = scenario_dict(num_servers=2, model=ONE_LAYER_MODEL, max_replicas=1, arrival_rate=0.05)
    sc = make_scenario(d, seed=0)
    c = sc.cluster
    state = sc.initial_state(np.random.default_rng(0))
    be = SurrogateBackend(c)
    milp = solve_milp(c, state, time_limit=10.0, backend=be)
    assert milp.milp_gap <= 1e-4 and "success" in milp.milp_status.lower()
    opts = [(dv, t, b) for dv in range(c.num_devices) for t in range(3) for b in (16, 8, 4)]
    plans = []
    for o1, o2 in itertools.product(opts, opts):
        p = DeploymentPlan.for_cluster(c)
        (p.device[0, 0, 0], p.tier[0, 0, 0], p.bits[0, 0, 0]), (p.device[0, 1, 0], p.tier[0, 1, 0], p.bits[0, 1, 0]) = (
            o1,
            o2,
        )
        plans.append(p)
    best = float(score_plans(be, plans, state, 0.005).min())
    res = optimize(c, state, time_limit=5.0, search_iters=60, batch=32, backend=be)
    assert res.objective <= best + 1e-12  # search may also compress tokens, which the enumeration does not


def test_search_improves_a_bad_start_and_keeps_plans_valid():
    sc = make_scenario("paper-testbed", seed=0)
    c = sc.cluster
    state = sc.initial_state(np.random.default_rng(0))
    start = make_policy("static_linear").plan(state, c)
    search = PlanSearch(c, state, max_quality_loss=0.005, seed=0)
    plan, obj, hist = search.run(start, iters=30, batch=32)
    s0 = float(score_plans(search.be, [start], state, 0.005)[0])
    assert obj < 0.9 * s0 and hist == sorted(hist, reverse=True)
    assert plan.problems(c, state.memory_avail) == []
