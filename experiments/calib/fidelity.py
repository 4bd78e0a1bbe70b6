"""Surrogate vs real backend on held-out plans: scenarios that fit the CPU/gloo setup, plan sets, measurement.

The surrogate is queried through its public API only. Each real window's realized workload (its Poisson arrivals,
request lengths and routed experts) is fed back to the surrogate as the state's arrival rates and popularity and as
the length quantiles, so the comparison tests the service model, not the sampling.
"""

from __future__ import annotations

import copy

import numpy as np
import yaml

from coel_env.backend.surrogate import SurrogateBackend
from coel_env.backend.wire import SLOT_BYTES, dispatch_bytes, row_round_trip_bytes
from coel_env.errors import ConfigError
from coel_env.plan.deployment import DeploymentPlan
from coel_env.specs.hardware import CONF_DIR
from coel_env.world.cluster import Cluster
from coel_env.world.state import ClusterState, Scenario

SCALARS = (
    "ttft_mean_s",
    "ttft_p95_s",
    "tpot_mean_s",
    "tpot_p95_s",
    "e2e_mean_s",
    "e2e_p95_s",
    "tokens_per_s",
    "quality_loss",
)
LATENCY = ("ttft_mean_s", "tpot_mean_s", "e2e_mean_s")
LATENCY_P95 = ("ttft_p95_s", "tpot_p95_s", "e2e_p95_s")


def scenario_variants(base: str = "tiny") -> dict[str, dict]:
    """`base` plus small variants that still run on CPU: a slow 100 Mb/s star, 2 servers on a mesh (the first two),
    a busy mix (twice the arrival rates)."""
    data = yaml.safe_load((CONF_DIR / "scenario" / f"{base}.yaml").read_text())
    data["name"] = base
    slow = copy.deepcopy(data)
    slow.update(name=f"{base}-slowlink", topology={"kind": "star", "bandwidth_gbps": 0.1, "latency_ms": 1.0})
    two = copy.deepcopy(data)
    two.update(
        name=f"{base}-2srv",
        servers=data["servers"][:2],
        topology={"kind": "mesh", "bandwidth_gbps": 1.0, "latency_ms": 0.5},
    )
    rate = data["workload"]["arrival_rate"]  # one rate per server, or one for all
    two["workload"] = {**data["workload"], "arrival_rate": rate[:2] if isinstance(rate, list) else rate}
    busy = copy.deepcopy(data)
    busy["name"] = f"{base}-busy"
    busy["workload"] = {**data["workload"], "arrival_rate": np.multiply(rate, 2.0).tolist()}
    return {d["name"]: d for d in (data, slow, two, busy)}


def merge_spec(spec: dict, overrides: dict) -> dict:
    """A deep copy of `spec` with `overrides` merged in (nested mappings key by key, anything else replaced)."""
    out = copy.deepcopy(spec)
    for k, v in overrides.items():
        out[k] = merge_spec(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def scenario_dicts(base: str, names: list[str], overrides: dict | None = None) -> dict[str, dict]:
    """Spec dicts of `names`: variants of `base` (`scenario_variants`) or shipped scenarios (conf/scenario), each with
    `overrides` merged in (`merge_spec`). An unknown name is a one-line ConfigError naming the allowed ones."""
    from coel_env.specs.scenario import list_scenarios

    variants = scenario_variants(base)
    unknown = [n for n in names if n not in variants and n not in list_scenarios()]
    if unknown:
        raise ConfigError(
            f"calibrate: scenarios {unknown} unknown; allowed: {', '.join(variants)} or a conf/scenario name "
            f"({', '.join(list_scenarios())})"
        )
    out = {}
    for n in names:
        data = variants.get(n) or yaml.safe_load((CONF_DIR / "scenario" / f"{n}.yaml").read_text())
        out[n] = {**merge_spec(data, overrides or {}), "name": n}
    return out


TIER_PROBS = (0.7, 0.2, 0.1)  # GPU, CPU, SSD: a random replica's tier


def random_plan(
    cluster: Cluster, rng: np.random.Generator, tries: int = 50, tier_probs: tuple[float, ...] = TIER_PROBS
) -> DeploymentPlan:
    """A random valid plan: 1..R replicas per expert on distinct devices, random tiers (`tier_probs`: GPU, CPU,
    SSD), bits, pruning and fusion per server pair."""
    for _ in range(tries):
        plan = DeploymentPlan.for_cluster(cluster)
        L, E, R = plan.device.shape
        D = cluster.num_devices
        for l in range(L):
            for e in range(E):
                k = int(rng.integers(1, min(R, D) + 1))
                for r, d in enumerate(rng.choice(D, k, replace=False)):
                    plan.device[l, e, r] = d
                    plan.tier[l, e, r] = rng.choice(3, p=list(tier_probs))
                    plan.bits[l, e, r] = rng.choice([16, 8, 4])
        plan.prune[:] = rng.choice([0.0, 0.0, 0.25, 0.5, 0.75], plan.prune.shape)
        plan.fuse[:] = rng.random(plan.fuse.shape) < 0.3
        if not plan.problems(cluster):
            return plan
    raise RuntimeError("random_plan: no valid plan found")


def baseline_plans(
    scenario: Scenario, state: ClusterState, names: tuple[str, ...], seed: int = 0
) -> dict[str, DeploymentPlan]:
    """Each named baseline's plan for `state` (agents.baselines.make_policy)."""
    from agents.baselines import make_policy

    out = {}
    for name in names:
        pol = make_policy(name, seed=seed) if name != "oracle" else make_policy(name)
        pol.reset(scenario.cluster, seed=seed, scenario=scenario)
        plan = pol.plan(state, scenario.cluster)
        if not plan.problems(scenario.cluster):
            out[name] = plan
    return out


def with_rates(state: ClusterState, rates) -> ClusterState:
    """A shallow copy of `state` with other arrival rates (e.g. the requests a real window actually drew)."""
    st = copy.copy(state)
    st.arrival_rate = np.asarray(rates, dtype=np.float64).copy()
    return st.touch()


def realized_workload(requests: list[list[dict]], window_s: float, num_experts: int, clients: int = 0) -> dict:
    """What a real window drew: each server's arrival rate and expert popularity (the share of its requests'
    tokens routed to each expert, per layer; None for a server without traced requests), the lengths and the
    closed loop's clients per server (`concurrency`, 0: open loop)."""
    pop = []
    for reqs in requests:
        routes = [r["routes"] for r in reqs if r.get("routes") is not None]
        if not routes:
            pop.append(None)
            continue
        tok = np.concatenate(routes).astype(np.int64)  # [T, L, k]
        pop.append(
            [(np.bincount(tok[:, l].ravel(), minlength=num_experts) / len(tok)).tolist() for l in range(tok.shape[1])]
        )
    flat = [r for rr in requests for r in rr]
    return {
        "rate": [len(r) / window_s for r in requests],
        "popularity": pop,
        "in_len": [len(r["prompt"]) for r in flat],
        "out_len": [int(r["max_new"]) for r in flat],
        "concurrency": int(clients),
    }


def replay(surrogate: SurrogateBackend, plan: DeploymentPlan, state: ClusterState, workload: dict, window_s: float):
    """The surrogate's Metrics for `plan` on a realized workload (`realized_workload`); a closed loop's link bytes are
    those of its realized request count."""
    st = with_rates(state, workload["rate"])
    st.popularity = state.popularity.copy()
    for s, pop in enumerate(workload["popularity"]):
        if pop is not None:
            st.popularity[s] = pop
    if workload["in_len"]:
        surrogate = surrogate.with_lengths(np.array(workload["in_len"]), np.array(workload["out_len"]))
    if not workload.get("concurrency"):
        return surrogate.serve(plan, st.touch(), window_s)
    m = surrogate.with_concurrency(int(workload["concurrency"])).serve(plan, st.touch(), window_s)
    if m.requests > 0:  # a closed loop's window serves its requests whatever the predicted rate: their bytes
        m.link_bytes = m.link_bytes * (sum(workload["rate"]) * window_s / m.requests)
    return m


def link_bytes_from_counts(cluster: Cluster, rows_to: np.ndarray, msgs_to: np.ndarray, elem_bytes: int) -> np.ndarray:
    """Exact bytes per physical link of the real dispatcher's wire format (`wire.py`), from its row and message
    counts: a request row carries the hidden state and top_k slots of `SLOT_BYTES`, its reply row the combined
    output, and every message an arrival stamp."""
    m = cluster.model
    row = row_round_trip_bytes(m.d_model, elem_bytes, SLOT_BYTES, m.top_k)
    return cluster.pair_to_links(dispatch_bytes(np.asarray(rows_to), np.asarray(msgs_to), row))


def measure_real(
    backend, plan: DeploymentPlan, state: ClusterState, window_s: float, elem_bytes: int, repeat: bool = False
) -> dict:
    """Serve `plan` (already installed) on the real backend for one window; the row's measured half: metrics,
    link bytes (measured and from the dispatcher's counts), memory per tier and the realized workload.
    `repeat`: serve the same requests a second time (`real_repeat`: the measurement's own run-to-run spread)."""
    real = backend.serve(plan, state, window_s)
    det = backend.last_details
    requests = backend.last_requests
    workload = realized_workload(requests, window_s, plan.device.shape[1], backend.closed_loop_clients())
    row = {
        "real": {k: float(getattr(real, k)) for k in SCALARS},
        "real_link_bytes": real.link_bytes.tolist(),
        "count_link_bytes": link_bytes_from_counts(
            backend.cluster, np.array(det["rows_to"]), np.array(det["msgs_to"]), elem_bytes
        ).tolist(),
        "real_mem": [float(real.gpu_mem_bytes.sum()), float(real.cpu_mem_bytes.sum()), float(real.ssd_bytes.sum())],
        "workload": workload,
        "rate": workload["rate"],
        "window_s": window_s,
        "served": det["served"],
        "kl": det["kl"],
        "steps": det["steps"],
        "mean_batch": mean_batch(requests, det["tokens"], det["steps"]),
    }
    if repeat:  # the same requests once more: how much the measurement itself moves (the noise floor)
        again = backend.serve_requests(plan, state, requests, window_s)
        row["real_repeat"] = {k: float(getattr(again, k)) for k in SCALARS}
    return row


def mean_batch(requests: list[list[dict]], tokens: dict, steps: list[int]) -> list[float]:
    """Each server's mean batch: the tokens it generated per step it computed (0 for a server without steps)."""
    made = [sum(len(tokens.get(q["rid"], ())) for q in reqs) for reqs in requests]
    return [m / n if n else 0.0 for m, n in zip(made, steps)]


def predict_row(surrogate: SurrogateBackend, plan: DeploymentPlan, state: ClusterState, row: dict) -> dict:
    """The row's predicted half: the surrogate's metrics, link bytes and memory per tier on its realized workload."""
    pred = replay(surrogate, plan, state, row["workload"], row["window_s"])
    return {
        "pred": {k: float(getattr(pred, k)) for k in SCALARS},
        "pred_link_bytes": pred.link_bytes.tolist(),
        "pred_mem": [float(pred.gpu_mem_bytes.sum()), float(pred.cpu_mem_bytes.sum()), float(pred.ssd_bytes.sum())],
    }


def measure(
    backend,
    surrogate: SurrogateBackend,
    plan: DeploymentPlan,
    state: ClusterState,
    window_s: float,
    elem_bytes: int,
    repeat: bool = False,
) -> dict:
    """Serve `plan` on the real backend, predict it with the surrogate on the realized workload; one row."""
    backend.apply(plan, state)
    row = measure_real(backend, plan, state, window_s, elem_bytes, repeat)
    return {**row, **predict_row(surrogate, plan, state, row)}


def with_profile(spec_dict: dict, profile, seed: int = 0) -> Scenario:
    return Scenario(dict(spec_dict), seed=seed, hardware=profile)


def warm_surrogate(names: list[str], hardware: str = "default") -> None:
    """Compile the surrogate's numba kernels (cached on disk) by serving and replaying the uniform plan once on each
    scenario `names`; a background job of a GPU run, so that the run itself finds them compiled."""
    for name in names:
        sc = Scenario(name, seed=0, hardware=hardware)
        state = sc.initial_state(np.random.default_rng(0))
        sur = SurrogateBackend(sc.cluster)
        plan = DeploymentPlan.uniform(sc.cluster)
        S = sc.cluster.num_servers
        wl = {"rate": [0.1] * S, "popularity": [None] * S, "in_len": [32, 64], "out_len": [8, 16]}
        replay(sur, plan, state, wl, 10.0)
        sur.serve(plan, state, 10.0)


if __name__ == "__main__":  # python -m experiments.calib.fidelity NAME...: warm_surrogate
    import sys

    warm_surrogate(sys.argv[1:] or ["tiny"])
