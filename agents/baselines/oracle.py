"""`oracle`: an exact MILP for small static instances and a batched annealing search for big ones.

MILP (scipy.optimize.milp / HiGHS). Binary `x[l, e, o]` places a replica of expert (l, e) at option o = (GPU d,
tier, bits); continuous `r[s, l, e, o]` routes server s's tokens of (l, e) to that replica. Per server and layer,
the decode and prefill step takes the slowest unit's expert work (`T >= sum of replica costs on a unit`, units =
GPUs and host CPUs) plus the hidden-state bytes sent over links plus the largest round-trip latency to a server
used (`w >= min(1, sum of use probabilities)`, linearised with one binary). The objective is the request-rate
weighted expected latency ttft + (output-1) * tpot; constraints: every expert has 1..max_replicas replicas, no two
on one device, memory per GPU / host RAM / SSD, and the expected quality loss <= `max_quality_loss`. Replica costs
are the surrogate's own (`replica_costs`: `physics.expert_time` of the state's unit table, as `physics.route_pass`
charges a replica; utilisation as `physics.unit_utilization`), so the MILP is exact for the surrogate at zero
load; queueing, link contention and per-token replica choice are what it leaves out, and the annealing polish
(scored by the surrogate itself) closes that gap.

Search. Simulated annealing over plans: each iteration draws `batch` single-move neighbours (move / swap / re-bit /
re-tier / add or drop a replica / token compression), scores them all with one `SurrogateBackend.serve_arrays`
call, and takes the best under a Metropolis rule; the best plan seen wins.

Both minimise `objective(metrics)` = mean end-to-end latency + SLO x dropped fraction + a steep penalty on quality
loss above the budget.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import numba
import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, milp

from agents.baselines.common import FRACTION, SEED, Arg, checked_args
from agents.policy import Policy
from coel_env.backend.physics import (
    COMPUTE_S,
    CPU_PATH,
    FIXED_S,
    GPU_PATH,
    N_BITS,
    N_TIERS,
    READ_S,
    expert_time,
    per_request,
    table_row,
    transfer_s_per_token,
)
from coel_env.backend.surrogate import MetricsBatch, SurrogateBackend
from coel_env.plan.deployment import MAX_PRUNE, DeploymentPlan, gpu_capacity
from coel_env.specs import BIT_WIDTHS
from coel_env.specs.bounds import MAX_SECONDS
from coel_env.specs.model import BITS_INDEX
from coel_env.world.cluster import Cluster
from coel_env.world.state import ClusterState

QUALITY_PENALTY = 1e3  # seconds of objective per unit of quality loss above the budget
MAX_ITERS = 10**7  # annealing iterations
MAX_BATCH = 4096  # neighbours scored per iteration (one surrogate call)
MAX_BINARIES = 10**7  # HiGHS gets no instance above this many binaries
PATHS = (GPU_PATH, CPU_PATH)  # unit-table column groups a replica may run on
TIME_LIMIT = Arg(float, 0, MAX_SECONDS, open_low=True)  # HiGHS hangs on NaN and on a negative limit


def objective(m: MetricsBatch | dict, slo_s: float, max_quality_loss: float) -> np.ndarray:
    """[N] what the oracle minimises (lower is better), from surrogate metrics."""
    q = np.asarray(m["quality_loss"])
    return (
        np.asarray(m["e2e_mean_s"])
        + slo_s * np.asarray(m["dropped_frac"])
        + QUALITY_PENALTY * np.maximum(q - max_quality_loss, 0.0)
    )


def score_plans(
    backend: SurrogateBackend, plans: list[DeploymentPlan], state: ClusterState, max_quality_loss: float
) -> np.ndarray:
    c = backend.cluster
    m = backend.serve_batch(plans, state, c.spec.dynamics.epoch_s)
    return objective(m, c.spec.workload.slo_s, max_quality_loss)


@dataclass
class OracleResult:
    plan: DeploymentPlan | None  # None only when the MILP found no solution in its time limit
    objective: float  # under the surrogate
    method: str  # "milp", "milp+search", "search"
    solve_time_s: float
    milp_objective: float = float("nan")  # the MILP's own (linear model) optimum, seconds per request
    milp_bound: float = float("nan")
    milp_gap: float = float("nan")  # HiGHS relative optimality gap at termination (0 = proven optimal)
    milp_status: str = ""
    num_binaries: int = 0
    history: list[float] = field(default_factory=list)


# ---- MILP ----------------------------------------------------------------------------------------------------
class _Rows:
    """Accumulates sparse constraint rows lo <= A x <= hi."""

    def __init__(self):
        self.r, self.c, self.v, self.lo, self.hi = [], [], [], [], []
        self.n = 0

    def add(self, cols, vals, lo: float, hi: float) -> None:
        cols = np.atleast_1d(np.asarray(cols, dtype=np.int64))
        self.r.append(np.full(len(cols), self.n))
        self.c.append(cols)
        self.v.append(np.broadcast_to(np.asarray(vals, dtype=np.float64), cols.shape))
        self.lo.append(lo)
        self.hi.append(hi)
        self.n += 1

    def add_block(self, rows, cols, vals, lo, hi) -> None:
        """Many rows at once: `rows` are local row ids 0..k-1 (k = len(lo))."""
        rows = np.asarray(rows, dtype=np.int64)
        self.r.append(rows + self.n)
        self.c.append(np.asarray(cols, dtype=np.int64))
        self.v.append(np.asarray(vals, dtype=np.float64))
        lo, hi = np.atleast_1d(lo), np.atleast_1d(hi)
        self.lo.extend(lo.tolist())
        self.hi.extend(hi.tolist())
        self.n += len(lo)

    def constraint(self, nvars: int) -> LinearConstraint:
        A = sp.csr_matrix(
            (np.concatenate(self.v), (np.concatenate(self.r), np.concatenate(self.c))), shape=(self.n, nvars)
        )
        return LinearConstraint(A, np.array(self.lo), np.array(self.hi))


@functools.cache
def _expert_time() -> np.ufunc:
    """`physics.expert_time` as a numpy ufunc (compiled on first use, not cached: numba keys its cache on the
    file of the function it compiles)."""
    return numba.vectorize(["float64(float64, float64, float64, float64, float64)"])(expert_time.py_func)


def replica_costs(backend: SurrogateBackend, state: ClusterState, opt_d, opt_t, opt_b):
    """Per (server, layer, expert, option): decode/prefill cost (s) on the cheaper path, the unit that runs it,
    link seconds (hidden states there and back, uncompressed) and use probabilities: what `physics.route_pass`
    charges a replica before load, i.e. `expert_time` of the state's unit table (`table_row`; the CPU path is
    inf where the surrogate has none) and `transfer_s_per_token`."""
    be, c = backend, backend.cluster
    sa = be._state_arrays([state])
    u_dec, a_dec, u_pre, a_pre = (sa[k][0][..., None] for k in ("u_dec", "a_dec", "u_pre", "a_pre"))
    tab = sa["table"][0][table_row.py_func(opt_d, opt_t, BITS_INDEX[opt_b])]  # [O, UNIT_COLUMNS]
    sd = c.dev_server[opt_d]

    def cost(u, a):
        gpu, cpu = (_expert_time()(u, a, tab[:, p + READ_S], tab[:, p + COMPUTE_S], tab[:, p + FIXED_S]) for p in PATHS)
        use_cpu = cpu < gpu
        return np.where(use_cpu, cpu, gpu), np.where(use_cpu, c.num_devices + sd, opt_d)

    per_token = transfer_s_per_token.py_func(be.params.wire_bytes, 1.0, sa["pair_bw"][0][:, sd])  # [S, O]: 0 own
    per_token = per_token[:, None, None, :]
    cd, ud_unit = cost(u_dec, a_dec)
    cp, up_unit = cost(u_pre, a_pre)
    return cd, ud_unit, cp, up_unit, a_dec * per_token, a_pre * per_token, u_dec[..., 0], u_pre[..., 0]


def solve_milp(
    cluster: Cluster,
    state: ClusterState,
    max_quality_loss: float = 0.005,
    time_limit: float = 30.0,
    mip_rel_gap: float = 1e-4,
    tiers: tuple[int, ...] = (0, 1, 2),
    max_util: float = 0.8,
    latency_binaries: bool = True,
    backend: SurrogateBackend | None = None,
) -> OracleResult:
    """Exact MILP of the static instance `state` (see module docstring); returns the plan and HiGHS's gap."""
    time_limit = TIME_LIMIT.check("oracle: time_limit", time_limit)
    mip_rel_gap = Arg(float, 0, 1).check("oracle: mip_rel_gap", mip_rel_gap)
    t0 = time.perf_counter()
    be = backend or SurrogateBackend(cluster)
    c = cluster
    m = c.model
    L, E, R = m.num_moe_layers, m.num_experts, c.spec.max_replicas
    S, D = c.num_servers, c.num_devices
    live = np.flatnonzero(state.device_up)
    opts = np.array([(d, t, b) for d in live for t in tiers for b in BIT_WIDTHS])
    opt_d, opt_t, opt_b = opts[:, 0], opts[:, 1], opts[:, 2]
    O = len(opts)
    cd, unit_d, cp, unit_p, link_d, link_p, u_dec, u_pre = replica_costs(be, state, opt_d, opt_t, opt_b)
    rate = state.arrival_rate * state.server_up
    srv = np.flatnonzero(rate > 0)
    rho = rate[srv] / rate[srv].sum()
    Sa = len(srv)
    out_m = be.out_mean
    # variable layout
    nx = L * E * O
    nr = Sa * L * E * O
    off_r = nx
    off_T = off_r + nr  # T_dec, T_pre per (active server, layer)
    off_lat = off_T + 2 * Sa * L  # LAT_dec, LAT_pre
    n_w = Sa * L * S
    off_w = off_lat + 2 * Sa * L  # w_dec, w_pre per (server, layer, destination)
    off_z = off_w + 2 * n_w  # binaries z_dec, z_pre
    off_b = off_z + 2 * n_w  # binaries: bit-width of each expert
    nvar = off_b + L * E * len(BIT_WIDTHS)
    cost = np.zeros(nvar)
    integrality = np.zeros(nvar)
    integrality[:nx] = 1
    integrality[off_z:] = 1
    ub = np.full(nvar, np.inf)
    ub[:off_T] = 1.0
    ub[off_w:] = 1.0
    if not latency_binaries:  # w >= max_e u_e r_e only (a lower bound of the latency term; much faster)
        ub[off_z:off_b] = 0.0
    rows = _Rows()
    xid = np.arange(nx).reshape(L, E, O)
    rid = off_r + np.arange(nr).reshape(Sa, L, E, O)
    Tid = off_T + np.arange(2 * Sa * L).reshape(2, Sa, L)
    LATid = off_lat + np.arange(2 * Sa * L).reshape(2, Sa, L)
    wid = off_w + np.arange(2 * n_w).reshape(2, Sa, L, S)
    zid = off_z + np.arange(2 * n_w).reshape(2, Sa, L, S)
    steps = np.array([out_m - 1.0, 1.0])  # decode steps per request, prefill once
    for k in range(2):
        cost[Tid[k]] = rho[:, None] * steps[k]
        cost[LATid[k]] = rho[:, None] * steps[k]
    links = (link_d[srv], link_p[srv])
    cost[rid] = rho[:, None, None, None] * (steps[0] * links[0] + steps[1] * links[1])
    # 1..R replicas per expert, at most one per device
    le = np.arange(L * E)
    rows.add_block(np.repeat(le, O), xid.reshape(-1), np.ones(nx), np.ones(L * E), np.full(L * E, R))
    dev_rows = (le[:, None] * len(live) + np.searchsorted(live, opt_d)[None, :]).reshape(-1)
    rows.add_block(dev_rows, xid.reshape(-1), np.ones(nx), np.zeros(L * E * len(live)), np.ones(L * E * len(live)))
    # routing: sum_o r = 1 and r <= x
    sle = np.arange(Sa * L * E)
    rows.add_block(np.repeat(sle, O), rid.reshape(-1), np.ones(nr), np.ones(Sa * L * E), np.ones(Sa * L * E))
    xr = np.broadcast_to(xid, (Sa, L, E, O)).reshape(-1)
    rr = np.arange(nr)
    rows.add_block(
        np.concatenate([rr, rr]),
        np.concatenate([rid.reshape(-1), xr]),
        np.concatenate([np.ones(nr), -np.ones(nr)]),
        np.full(nr, -np.inf),
        np.zeros(nr),
    )
    # unit loads: sum of costs routed to unit u - T <= 0, per (server, layer, unit), decode and prefill
    U = D + S
    for k, (cst, unit) in enumerate(((cd, unit_d), (cp, unit_p))):
        cst, unit = cst[srv], unit[srv]  # [Sa, L, E, O]
        row = (np.arange(Sa)[:, None, None, None] * L + np.arange(L)[None, :, None, None]) * U + unit
        tl = np.arange(Sa * L)
        rows.add_block(
            np.concatenate([row.reshape(-1), (tl[:, None] * U + np.arange(U)).reshape(-1)]),
            np.concatenate([rid.reshape(-1), np.repeat(Tid[k].reshape(-1), U)]),
            np.concatenate([cst.reshape(-1), -np.ones(Sa * L * U)]),
            np.full(Sa * L * U, -np.inf),
            np.zeros(Sa * L * U),
        )
    # latency: w >= min(1, sum of use probabilities of experts routed to s2); LAT >= round-trip latency * w
    lat2 = be.topology.lat2
    sd = c.dev_server[opt_d]
    for k, use in enumerate((u_dec, u_pre)):
        use = use[srv]  # [Sa, L, E]
        K = use.sum(-1)  # [Sa, L]
        for i, s in enumerate(srv):
            for s2 in range(S):
                if s2 == s:
                    ub[wid[k, i, :, s2]] = 0.0
                    ub[zid[k, i, :, s2]] = 0.0
                    continue
                on = np.flatnonzero(sd == s2)
                if not len(on):
                    continue
                for l in range(L):
                    cols = rid[i, l][:, on].reshape(-1)
                    vals = np.repeat(use[i, l], len(on))
                    if latency_binaries:
                        rows.add(
                            np.concatenate([cols, [zid[k, i, l, s2], wid[k, i, l, s2]]]),
                            np.concatenate([vals, [-K[i, l], -1.0]]),
                            -np.inf,
                            0.0,
                        )
                    n = len(cols)  # valid cuts: w >= u_e r_e for every single remote replica
                    rows.add_block(
                        np.concatenate([np.arange(n), np.arange(n)]),
                        np.concatenate([cols, np.full(n, wid[k, i, l, s2])]),
                        np.concatenate([vals, -np.ones(n)]),
                        np.full(n, -np.inf),
                        np.zeros(n),
                    )
                    rows.add([zid[k, i, l, s2], wid[k, i, l, s2]], [1.0, -1.0], -np.inf, 0.0)
                    rows.add([wid[k, i, l, s2], LATid[k, i, l]], [lat2[s, s2], -1.0], -np.inf, 0.0)
    # utilisation: every unit (GPU, host CPU) busy at most `max_util` of the time: the surrogate's rho
    # (`physics.unit_utilization`: lam * `per_request` of the busy seconds, the non-expert part on own GPUs)
    sa = be._state_arrays([state])
    lam, B = sa["lam"][0], sa["batch"][0]
    busy_cols, busy_rows, busy_vals = [], [], []
    for i, s in enumerate(srv):
        coef_d = lam[s] * per_request.py_func(0.0, cd[s], out_m, B[s])  # per_request is linear in both parts
        coef_p = lam[s] * per_request.py_func(cp[s], 0.0, out_m, B[s])
        busy_cols += [rid[i].reshape(-1), rid[i].reshape(-1)]
        busy_rows += [unit_d[s].reshape(-1), unit_p[s].reshape(-1)]
        busy_vals += [coef_d.reshape(-1), coef_p.reshape(-1)]
    ne_busy = np.zeros(U)
    ne_busy[:D] = (lam * per_request.py_func(sa["ne_pre"][0], sa["ne_dec"][0], out_m, B))[c.dev_server]
    rows.add_block(
        np.concatenate(busy_rows),
        np.concatenate(busy_cols),
        np.concatenate(busy_vals),
        np.full(U, -np.inf),
        np.maximum(max_util - ne_busy, 0.0),
    )
    # memory
    w = be.ebytes[opt_b]
    cap_gpu = np.where(state.device_up, gpu_capacity(c, state.memory_avail), 0.0)
    for d in live:
        sel = np.flatnonzero((opt_d == d) & (opt_t == 0))
        rows.add(xid[:, :, sel].reshape(-1), np.tile(w[sel], L * E), -np.inf, float(cap_gpu[d]))
    for t, cap in ((1, c.cpu_expert_capacity), (2, c.ssd_bytes)):
        for s in range(S):
            sel = np.flatnonzero((sd == s) & (opt_t == t))
            if len(sel):
                rows.add(xid[:, :, sel].reshape(-1), np.tile(w[sel], L * E), -np.inf, float(cap[s]))
    # one bit-width per expert (all replicas alike), so quality does not depend on which replica serves
    nb = len(BIT_WIDTHS)
    bid = off_b + np.arange(L * E * nb).reshape(L, E, nb)
    rows.add_block(np.repeat(le, nb), bid.reshape(-1), np.ones(L * E * nb), np.ones(L * E), np.ones(L * E))
    b_of = BITS_INDEX[opt_b]
    rows.add_block(
        np.concatenate([np.arange(nx), np.arange(nx)]),
        np.concatenate([xid.reshape(-1), bid[:, :, b_of].reshape(-1)]),
        np.concatenate([np.ones(nx), -np.ones(nx)]),
        np.full(nx, -np.inf),
        np.zeros(nx),
    )
    # quality budget: rate-weighted mean of p * loss(bits) / (L * top_k)
    qb = np.array([be.qloss[b] for b in BIT_WIDTHS])
    qcoef = np.einsum("s,sle,b->leb", rho, state.popularity[srv], qb) / (L * m.top_k)
    rows.add(bid.reshape(-1), qcoef.reshape(-1), -np.inf, max_quality_loss)
    res = milp(
        cost,
        constraints=rows.constraint(nvar),
        integrality=integrality,
        bounds=Bounds(np.zeros(nvar), ub),
        options=dict(time_limit=time_limit, mip_rel_gap=mip_rel_gap, disp=False),
    )
    if res.x is None:  # no incumbent within the time limit: report it, the caller falls back to search
        return OracleResult(
            plan=None,
            objective=float("inf"),
            method="milp",
            solve_time_s=time.perf_counter() - t0,
            milp_status=str(res.message),
            num_binaries=int(integrality.sum()),
        )
    x = res.x[:nx].reshape(L, E, O) > 0.5
    plan = DeploymentPlan.for_cluster(c)
    for l in range(L):
        for e in range(E):
            for r, o in enumerate(np.flatnonzero(x[l, e])[:R]):
                plan.device[l, e, r], plan.tier[l, e, r], plan.bits[l, e, r] = opt_d[o], opt_t[o], opt_b[o]
    obj = float(score_plans(be, [plan], state, max_quality_loss)[0])
    return OracleResult(
        plan=plan,
        objective=obj,
        method="milp",
        solve_time_s=time.perf_counter() - t0,
        milp_objective=float(res.fun),
        milp_bound=float(getattr(res, "mip_dual_bound", np.nan)),
        milp_gap=float(getattr(res, "mip_gap", np.nan)),
        milp_status=str(res.message),
        num_binaries=int(integrality.sum()),
    )


# ---- search --------------------------------------------------------------------------------------------------
class PlanSearch:
    """Batched simulated annealing over DeploymentPlans, scored by the surrogate."""

    def __init__(
        self,
        cluster: Cluster,
        state: ClusterState,
        backend: SurrogateBackend | None = None,
        max_quality_loss: float = 0.005,
        seed: int = 0,
    ):
        self.c, self.state = cluster, state
        self.be = backend or SurrogateBackend(cluster)
        self.q_max = max_quality_loss
        self.rng = np.random.default_rng(seed)
        self.live = np.flatnonzero(state.device_up)
        self.cap_gpu = np.where(state.device_up, gpu_capacity(cluster, state.memory_avail), 0.0)
        self.cap_cpu = np.where(state.server_up, cluster.cpu_expert_capacity, 0.0)
        self.cap_ssd = np.where(state.server_up, cluster.ssd_bytes.astype(np.float64), 0.0)
        w = state.arrival_rate * state.server_up
        pop = np.einsum("s,sle->le", w / max(w.sum(), 1e-30), state.popularity)
        self.pick_p = np.sqrt(pop.reshape(-1)) / np.sqrt(pop.reshape(-1)).sum()

    def score(self, dev, tier, bits, prune, fuse) -> np.ndarray:
        c = self.c
        m = self.be.serve_arrays(dev, tier, bits, prune, fuse.astype(bool), self.state, c.spec.dynamics.epoch_s)
        obj = objective(m, c.spec.workload.slo_s, self.q_max)
        over = (
            (m["gpu_mem_bytes"] > self.cap_gpu * (1 + 1e-9)).any(-1)
            | (m["cpu_mem_bytes"] > self.cap_cpu * (1 + 1e-9)).any(-1)
            | (m["ssd_bytes"] > self.cap_ssd).any(-1)
        )
        return np.where(over, np.inf, obj)

    def _neighbour(self, dev, tier, bits, prune, fuse) -> None:
        """Apply one random move in place (arrays of one plan)."""
        rng, L, E, _R = self.rng, *dev.shape
        kind = rng.integers(8)
        if kind == 7 and len(prune):
            p = rng.integers(len(prune))
            if rng.random() < 0.5:
                prune[p] = float(np.clip(prune[p] + rng.choice([-0.1, 0.1]), 0.0, MAX_PRUNE))
            else:
                fuse[p] = not fuse[p]
            return
        l, e = divmod(int(rng.choice(L * E, p=self.pick_p)), E)
        reps = np.flatnonzero(dev[l, e] >= 0)
        r = int(rng.choice(reps))
        if kind == 0:  # move a replica to another device
            d = int(rng.choice(self.live))
            if not (dev[l, e] == d).any():
                dev[l, e, r] = d
        elif kind == 1:  # swap devices with another expert of the layer
            e2 = int(rng.integers(E))
            r2 = int(rng.choice(np.flatnonzero(dev[l, e2] >= 0)))
            a, b = dev[l, e, r], dev[l, e2, r2]
            if e2 != e and not (dev[l, e] == b).any() and not (dev[l, e2] == a).any():
                dev[l, e, r], dev[l, e2, r2] = b, a
                tier[l, e, r], tier[l, e2, r2] = tier[l, e2, r2], tier[l, e, r]
                bits[l, e, r], bits[l, e2, r2] = bits[l, e2, r2], bits[l, e, r]
        elif kind in (2, 3):  # precision up / down
            order = sorted(BIT_WIDTHS)
            i = order.index(int(bits[l, e, r])) + (1 if kind == 2 else -1)
            bits[l, e, r] = order[min(max(i, 0), len(order) - 1)]
        elif kind == 4:  # tier
            tier[l, e, r] = int(rng.integers(3))
        elif kind == 5:  # add a replica on a device that lacks one
            empty = np.flatnonzero(dev[l, e] < 0)
            d = int(rng.choice(self.live))
            if len(empty) and not (dev[l, e] == d).any():
                k = int(empty[0])
                dev[l, e, k], tier[l, e, k], bits[l, e, k] = d, 0, bits[l, e, r]
        elif kind == 6 and len(reps) > 1:  # drop a replica
            dev[l, e, r], tier[l, e, r], bits[l, e, r] = -1, 0, 0

    def run(
        self,
        start: DeploymentPlan,
        iters: int = 300,
        batch: int = 64,
        t0: float = 0.02,
        time_limit: float | None = None,
    ) -> tuple[DeploymentPlan, float, list[float]]:
        """Anneal from `start`; returns (best plan, its objective, best-so-far per iteration)."""
        cur = [
            start.device.copy(),
            start.tier.copy(),
            start.bits.copy(),
            start.prune.astype(np.float64),
            start.fuse.copy(),
        ]
        cur_s = float(self.score(*[a[None] for a in cur])[0])
        best, best_s = [a.copy() for a in cur], cur_s
        hist = []
        t_start = time.perf_counter()
        for it in range(iters):
            cand = [np.repeat(a[None], batch, 0) for a in cur]
            for n in range(batch):
                for _ in range(1 + int(self.rng.integers(2))):
                    self._neighbour(*[a[n] for a in cand])
            s = self.score(*cand)
            n = int(np.argmin(s))
            temp = t0 * max(cur_s, 1e-9) * (1 - it / iters)
            if s[n] < cur_s or (np.isfinite(s[n]) and self.rng.random() < np.exp(-(s[n] - cur_s) / max(temp, 1e-12))):
                cur, cur_s = [a[n].copy() for a in cand], float(s[n])
                if cur_s < best_s:
                    best, best_s = [a.copy() for a in cur], cur_s
            hist.append(best_s)
            if time_limit is not None and time.perf_counter() - t_start > time_limit:
                break
        plan = DeploymentPlan(best[0], best[1], best[2], best[3].astype(np.float32), best[4].astype(bool))
        return plan, best_s, hist


# ---- the policy ----------------------------------------------------------------------------------------------
def optimize(
    cluster: Cluster,
    state: ClusterState,
    max_quality_loss: float = 0.005,
    milp_max_binaries: int = 20000,
    time_limit: float = 30.0,
    search_iters: int = 300,
    batch: int = 64,
    seed: int = 0,
    start: DeploymentPlan | None = None,
    backend: SurrogateBackend | None = None,
) -> OracleResult:
    """MILP (+ annealing polish) when the instance is small enough, annealing from `start` (or the greedy
    heuristic) otherwise."""
    time_limit = TIME_LIMIT.check("oracle: time_limit", time_limit)
    be = backend or SurrogateBackend(cluster)
    m = cluster.model
    n_bin = m.num_moe_layers * m.num_experts * int(state.device_up.sum()) * N_TIERS * N_BITS
    t0 = time.perf_counter()
    if start is None:
        from agents.baselines.greedy import GreedyPopularityPolicy

        start = GreedyPopularityPolicy().plan(state, cluster)
    if n_bin <= milp_max_binaries:
        res = solve_milp(cluster, state, max_quality_loss, time_limit, backend=be)
        if search_iters:  # polish the better of the MILP plan and the heuristic start under the surrogate
            s0 = float(score_plans(be, [start], state, max_quality_loss)[0])
            init = res.plan if res.plan is not None and res.objective <= s0 else start
            plan, obj, hist = PlanSearch(cluster, state, be, max_quality_loss, seed).run(init, search_iters, batch)
            if obj < res.objective:
                res.method = "milp+search" if res.plan is not None else "search"
                res.plan, res.objective = plan, obj
            res.history = hist
        res.solve_time_s = time.perf_counter() - t0
        return res
    search = PlanSearch(cluster, state, be, max_quality_loss, seed)
    plan, obj, hist = search.run(start, search_iters, batch, time_limit=time_limit)
    return OracleResult(plan=plan, objective=obj, method="search", solve_time_s=time.perf_counter() - t0, history=hist)


class OraclePolicy(Policy):
    """Plans with `optimize` on the perceived state; re-plans every `period` epochs or when the plan breaks."""

    name = "oracle"

    @checked_args(
        seed=SEED,
        max_quality_loss=FRACTION,
        milp_max_binaries=Arg(int, 0, MAX_BINARIES),
        time_limit=TIME_LIMIT,
        search_iters=Arg(int, 0, MAX_ITERS),
        batch=Arg(int, 1, MAX_BATCH),
        period=Arg(int, 1),
    )
    def __init__(
        self,
        seed: int | None = None,
        max_quality_loss: float = 0.005,
        milp_max_binaries: int = 20000,
        time_limit: float = 30.0,
        search_iters: int = 300,
        batch: int = 64,
        period: int = 10**9,
    ):
        super().__init__(seed)
        self.kw = dict(
            max_quality_loss=max_quality_loss,
            milp_max_binaries=milp_max_binaries,
            time_limit=time_limit,
            search_iters=search_iters,
            batch=batch,
        )
        self.period = period
        self.seed = seed or 0
        self.last: OracleResult | None = None
        self._backend: SurrogateBackend | None = None

    def should_update(self, view, cluster, current) -> bool:
        return super().should_update(view, cluster, current) or (self.epoch > 0 and self.epoch % self.period == 0)

    def plan(self, view: ClusterState, cluster: Cluster) -> DeploymentPlan:
        if self._backend is None or self._backend.cluster is not cluster:
            self._backend = SurrogateBackend(cluster)
        self.last = optimize(cluster, view, seed=self.seed + self.epoch, backend=self._backend, **self.kw)
        return self.last.plan
