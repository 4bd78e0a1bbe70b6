"""Where one CoEL-v0 step's serve goes: median microseconds of its pieces on the plan and state of a stepped env
(random actions of one action space), each piece called on its own from Python (numba dispatch included).

Usage: PYTHONPATH=. python benchmarks/serve_breakdown.py [--space full] [--scenario paper-testbed] [--steps 40]
Pieces: the whole `serve_batch` of a new state (its full evaluation, as every env step's),
`_state_arrays` of a new state, its `activation_stats`, the
serve's Python and dispatch overhead (a batch of 0 plans), one `route_pass` of the plan and of its primary replicas
only (what `prefer_primary` serves again), `finish`; plus the plan's share of experts with >= 2 live replicas.
"""

from __future__ import annotations

import argparse

import numpy as np

import coel_env.env
from benchmarks.serve_speed_pair import median_s
from coel_env.backend import physics as ph


def plan_arrays(pb, primary: bool = False) -> ph.Plans:
    """Plans of the env's (one) plan, or of its primary replicas only (slot 0)."""
    r = slice(0, 1) if primary else slice(None)
    dev, tier, bits = (np.ascontiguousarray(a[..., r]) for a in (pb.dev, pb.tier, pb.bits))
    return ph.Plans(dev, tier, bits, np.asarray(pb.prune, dtype=np.float64), pb.fuse, np.zeros(1, np.int64))


def pass_us(plans: ph.Plans, st, be, repeats: int) -> float:
    """Median microseconds of one unloaded `route_pass` of `plans`."""
    pairs, so, grouped = ph.serve_setup(plans, st, be.topology, be.params)
    U = be.cluster.num_devices + be.cluster.num_servers
    infl, todo = np.ones((1, U)), np.ones(1, dtype=np.bool_)
    none = (np.zeros((0, 0, 0), np.bool_), np.zeros((0, 0, 0, 0)), np.zeros(0, np.int64))
    return 1e6 * median_s(
        lambda: ph.route_pass(plans, pairs, st, be.topology, be.params, infl, todo, grouped, so, *none), repeats
    )


def breakdown(space: str, scenario: str, steps: int, repeats: int = 100) -> dict[str, float]:
    env = coel_env.env.CoELEnv(scenario=scenario, action_space=space, info_action_mask=False)
    env.reset(seed=0)
    env.action_space.seed(0)
    for _ in range(steps):
        env.step(env.action_space.sample())
    core, be = env.core, env.core.backend
    pb, states = core.plans, core.states
    sa = be._state_arrays(states)
    st = sa["states"]

    def forget() -> None:  # the next serve sees a new state: full evaluation, as in an env step
        be._cache_key = be._cache = None

    def fresh_state() -> None:
        forget()
        be._state_arrays(states)

    pop, batch = states.popularity, st.batch
    act = [np.empty(pop.shape) for _ in range(4)]
    empty = [a[:0] for a in (pb.dev, pb.tier, pb.bits, pb.prune, pb.fuse)]
    plans = plan_arrays(pb)
    pairs, so, _ = ph.serve_setup(plans, st, be.topology, be.params)
    N, S, D = 1, be.cluster.num_servers, be.cluster.num_devices
    out = ph.Outputs(
        np.empty((N, ph.N_SCALARS)),
        np.empty((N, be.cluster.num_links)),
        np.empty((N, D)),
        np.zeros((N, D)),
        np.zeros((N, S)),
        np.zeros((N, S)),
        np.zeros(N, dtype=np.bool_),
    )
    grid, rho = np.zeros((N, S, be.params.batch_grid.shape[0])), np.zeros((N, D + S))
    consts = (be.topology, be.params)
    live = ((pb.dev >= 0) & np.take(states.server_up[0], be.cluster.dev_server[np.maximum(pb.dev, 0)])).sum(-1)
    us = {
        "serve_batch of a new state (an env step's)": 1e6 * median_s(lambda: (forget(), core._serve()), repeats),
        "_state_arrays (new state)": 1e6 * median_s(fresh_state, repeats),
        "  of which activation_stats": 1e6
        * median_s(lambda: ph.activation_stats(pop, batch, np.full_like(batch, be.in_mean), *act), repeats),
        "serve overhead (0 plans)": 1e6 * median_s(lambda: be.serve_arrays(*empty, states, core.window), repeats),
        "route_pass, the plan": pass_us(plans, st, be, repeats),
        "route_pass, primary replicas": pass_us(plan_arrays(pb, primary=True), st, be, repeats),
        "finish": 1e6 * median_s(lambda: ph.finish(plans, pairs.keep, so, st, *consts, 60.0, rho, grid, out), repeats),
    }
    us["experts with >= 2 live replicas (%)"] = 100.0 * float(np.mean(live >= 2))
    return us


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--space", default="full")
    ap.add_argument("--scenario", default="paper-testbed")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    for name, v in breakdown(args.space, args.scenario, args.steps).items():
        print(f"| {name} | {v:,.0f} |")


if __name__ == "__main__":
    main()
