"""End-to-end calibration windows on the real backend.

One RealBackend per scenario serves its training plans (the overhead regression) and its held-out plans (the
fidelity report), each under every load (`workloads.py`). Rows are appended to a JSONL file as they come, so a
killed run keeps what it measured; `read_rows` reads it back for a refit elsewhere. A wall-clock budget skips the
windows that would overrun it, with a running estimate of the time still to come printed after every window.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from coel_env.errors import CoELError
from coel_env.plan.deployment import DeploymentPlan
from coel_env.specs.hardware import HardwareProfile
from coel_env.specs.scenario import WorkloadSpec, scenario_from_dict
from coel_env.world.state import ClusterState
from experiments.calib import fidelity as fid
from experiments.calib.workloads import Load

ROLES = ("train", "heldout")
INSTALLS = ("reset", "apply")
MAX_FAILURES = 2  # server failures (crash, hang, out of memory) after which a scenario's other windows are left out


@dataclass
class PlanJob:
    """A plan to serve under every load of its role; `repeat`: serve each window twice (noise floor)."""

    role: str
    name: str
    plan: DeploymentPlan
    repeat: bool = False


@dataclass
class ScenarioJob:
    """One scenario's windows: its spec dict, plans and the loads of each role."""

    name: str
    spec: dict
    plans: list[PlanJob]
    loads: dict[str, list[Load]]

    def windows(self) -> list[tuple[PlanJob, Load]]:
        return [(p, load) for p in self.plans for load in self.loads[p.role]]

    @cached_property
    def workload(self) -> WorkloadSpec:
        return scenario_from_dict(dict(self.spec), self.name).workload


@dataclass
class Priors:
    """Seconds assumed until measured: per lock-step step of a plan all 16-bit in GPU memory (`step_s`, the real
    backend's grouped fast path) or of a mixed one (`mixed_step_s`: CPU/SSD fetches, 8/4-bit experts), per plan
    install, per backend start (+ warm-up)."""

    step_s: float
    mixed_step_s: float
    install_s: float
    start_s: float


def plan_class(plan: DeploymentPlan) -> str:
    """'gpu16' when every replica is 16-bit in GPU memory, else 'mixed' (the estimate's two step costs)."""
    placed = plan.device >= 0
    return "gpu16" if bool(np.all(plan.tier[placed] == 0) and np.all(plan.bits[placed] == 16)) else "mixed"


@dataclass
class Budget:
    """The windows' wall-clock budget (deadline: a time.perf_counter() value, None: no limit) and what the running
    estimate has learned: seconds per expected step for each (scenario, load), seconds per install and start."""

    deadline: float | None
    priors: Priors
    step_s: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)
    install_s: list[float] = field(default_factory=list)
    start_s: list[float] = field(default_factory=list)

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.perf_counter()

    def per_step(self, scenario: str, load: str, kind: str) -> float:
        seen = self.step_s.get((scenario, load, kind))
        if seen:
            return float(np.mean(seen))
        return self.priors.step_s if kind == "gpu16" else self.priors.mixed_step_s

    def per_install(self) -> float:
        return float(np.mean(self.install_s)) if self.install_s else self.priors.install_s

    def per_start(self) -> float:
        return float(np.mean(self.start_s)) if self.start_s else self.priors.start_s

    def window(self, scenario: str, load: Load, kind: str, out_len: float, max_batch: int, repeat: bool) -> float:
        """Estimated seconds of one window of a `kind` plan (plan_class; twice for a repeated one)."""
        steps = expected_steps(np.multiply(load.rates, load.window_s), out_len, max_batch, load.name)
        return steps * self.per_step(scenario, load.name, kind) * (2 if repeat else 1)

    def observe(self, scenario: str, load: str, kind: str, steps: float, seconds: float) -> None:
        if steps > 0:
            self.step_s.setdefault((scenario, load, kind), []).append(seconds / steps)


def expected_steps(requests: np.ndarray, out_len: float, max_batch: int, load: str) -> float:
    """Lock-step steps to serve `requests` per server of `out_len` tokens: one after another under a light load
    (requests rarely overlap), else every server's requests `max_batch` at a time, all servers stepping together
    (+30% for the batch's ramp-up and drain)."""
    per_request = out_len + 1.0  # a prefill step, then a step per further token
    if load == "light":
        return float(np.sum(requests) * per_request)
    return float(np.max(requests) * per_request / max(max_batch, 1) * 1.3) if len(requests) else 0.0


class RowLog:
    """A calibration run's records, one JSON object a line, flushed as written: `meta` (the pre-fit profile, the
    command), `scenario` (spec and loads), `row` (one measured window), `skipped` (a window left out)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = self.path.open("w")

    def write(self, kind: str, **record) -> None:
        self.f.write(json.dumps({"kind": kind, **record}, default=_plain) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _plain(o):
    return o.tolist() if hasattr(o, "tolist") else float(o)


def read_rows(path: Path) -> dict:
    """A RowLog file back: {"meta": ..., "scenarios": {name: record}, "rows": [...], "skipped": [...]}; a truncated
    last line (a killed run) is ignored."""
    out = {"meta": None, "scenarios": {}, "rows": [], "skipped": []}
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        kind = rec.pop("kind", None)
        if kind == "meta":
            out["meta"] = rec
        elif kind == "scenario":
            out["scenarios"][rec["name"]] = rec
        elif kind in ("row", "skipped"):
            out["rows" if kind == "row" else "skipped"].append(rec)
    return out


def plan_fields(plan: DeploymentPlan) -> dict:
    return {
        "device": plan.device.tolist(),
        "tier": plan.tier.tolist(),
        "bits": plan.bits.tolist(),
        "prune": plan.prune.tolist(),
        "fuse": plan.fuse.tolist(),
    }


@dataclass
class Campaign:
    """Runs ScenarioJobs on the real backend and writes their rows (see the module docstring)."""

    profile: HardwareProfile
    device: str
    seed: int
    threads: int
    install: str
    budget: Budget
    rows: RowLog
    log: Callable[[str], None]
    done: int = 0
    total: int = 0

    def run(self, jobs: list[ScenarioJob]) -> list[dict]:
        self.total = sum(len(j.windows()) for j in jobs)
        est = sum(self.to_go(j, j.windows()) for j in jobs)
        self.log(f"windows: {self.total} on {len(jobs)} scenarios, estimated {est:.0f} s")
        out = []
        for i, job in enumerate(jobs):
            # each scenario left gets the budget left in proportion to its estimate (unused time carries over)
            ests = [self.to_go(j, j.windows()) for j in jobs[i:]]
            left = self.budget.left()
            share = left if math.isinf(left) else left * ests[0] / max(sum(ests), 1e-9)
            out += self.scenario(job, jobs[i + 1 :], time.perf_counter() + share)
        return out

    def window_estimate(self, job: ScenarioJob, plan: PlanJob, load: Load) -> float:
        wl = job.workload
        kind = plan_class(plan.plan)
        return self.budget.window(job.name, load, kind, float(wl.output_len.mean), int(wl.max_batch), plan.repeat)

    def to_go(self, job: ScenarioJob, windows: list[tuple[PlanJob, Load]], started: bool = False) -> float:
        """Estimated seconds of `windows` of `job` (+ the installs of their plans, + a start unless `started`)."""
        est = sum(self.window_estimate(job, p, ld) for p, ld in windows)
        est += self.budget.per_install() * len({id(p) for p, _ in windows})
        return est + (0.0 if started or not windows else self.budget.per_start())

    def fits(self, seconds: float, until: float) -> bool:
        return seconds <= min(until - time.perf_counter(), self.budget.left())

    def scenario(self, job: ScenarioJob, later: list[ScenarioJob], until: float) -> list[dict]:
        """Every window of one scenario that fits before `until` and the budget, on one RealBackend."""
        from real_backend import RealBackend, ServerError

        sc = fid.with_profile(job.spec, self.profile, self.seed)
        state = sc.initial_state(np.random.default_rng(self.seed))
        rows: list[dict] = []
        rb, installed, install_s, failures = None, None, 0.0, 0
        t_start = time.perf_counter()
        windows = job.windows()
        try:
            for k, (pj, ld) in enumerate(windows):
                if failures >= MAX_FAILURES:
                    self.skip(job, pj, ld, f"{failures} server failures in this scenario")
                    continue
                est = self.window_estimate(job, pj, ld)
                est += 0.0 if installed is pj else self.budget.per_install()
                est += 0.0 if rb is not None else self.budget.per_start()
                if not self.fits(est, until):
                    self.skip(job, pj, ld, f"budget: needs ~{est:.0f} s")
                    continue
                if rb is None:
                    rb = RealBackend(
                        sc.cluster,
                        seed=self.seed,
                        timeout_s=120,
                        threads=self.threads,
                        device=self.device,
                        gen_device=self.device,
                        warmup=False,  # install_plan warms each plan at its job's lengths
                    )
                try:
                    if installed is not pj:
                        install_s, installed = self.install_plan(rb, pj.plan, state, job), pj
                    rows.append(self.window(rb, job, pj, ld, state, install_s))
                except ServerError as exc:  # the servers are stopped; the next install starts fresh ones
                    installed, failures = None, failures + 1
                    self.skip(job, pj, ld, f"error: {str(exc).splitlines()[0][:200]}")
                    continue
                except CoELError as exc:  # a plan the scenario refuses (nothing was installed): skip its windows
                    self.skip(job, pj, ld, f"plan refused: {str(exc).splitlines()[0][:200]}")
                    continue
                install_s = 0.0
                rest = self.to_go(job, windows[k + 1 :], started=True) + sum(self.to_go(j, j.windows()) for j in later)
                self.log(
                    f"    window {self.done}/{self.total}; ~{rest:.0f} s to go (est.), "
                    f"{self.budget.left():.0f} s of the budget left"
                )
        finally:
            if rb is not None:
                rb.close()
        self.log(f"  {job.name}: {len(rows)} windows in {time.perf_counter() - t_start:.0f} s")
        return rows

    def install_plan(self, rb, plan: DeploymentPlan, state: ClusterState, job: ScenarioJob) -> float:
        """Install `plan` (reset: from the checkpoint store; apply: a migration from the current plan; the first
        install starts the servers), then warm it up unmeasured (`warm_requests` at the workload's max_batch: the
        first steps after an install re-stack the grouped experts and capture CUDA graphs per batch size). Returns
        the install's seconds (0 for the first: a start)."""
        from real_backend.warmup import warm_requests

        t0 = time.perf_counter()
        first = not rb.alive
        if self.install == "reset" or first:
            rb.reset(plan, state)
        else:
            rb.apply(plan, state)
        n_in = max(int(job.workload.input_len.mean), 1)
        warm = warm_requests(rb, state, n_in, np.random.default_rng(self.seed), batch=int(job.workload.max_batch))
        rb.serve_requests(plan, state, warm, 1.0)
        dt = time.perf_counter() - t0
        if not first:
            self.budget.install_s.append(dt)
            return dt
        self.budget.start_s.append(dt)
        self.log(f"  {job.name}: servers up and warm in {dt:.1f} s")
        return 0.0

    def window(self, rb, job: ScenarioJob, pj: PlanJob, load: Load, state: ClusterState, install_s: float) -> dict:
        """Serve one window; its row (also written to the RowLog)."""
        elem_bytes = 2 if self.device == "cuda" else 4
        t0 = time.perf_counter()
        rb.concurrency = load.concurrency  # closed-loop clients per server (0: Poisson arrivals)
        try:
            row = fid.measure_real(rb, pj.plan, load.state(state), load.window_s, elem_bytes, repeat=pj.repeat)
        finally:
            rb.concurrency = None
        wall = time.perf_counter() - t0
        row.update(scenario=job.name, load=load.name, role=pj.role, plan=pj.name, wall_s=wall, install_s=install_s)
        row.update(plan_fields(pj.plan))
        self.rows.write("row", **row)
        counts = np.array([len(r) for r in rb.last_requests], dtype=np.float64)
        out_len = float(np.mean(row["workload"]["out_len"])) if row["workload"]["out_len"] else 0.0
        steps = expected_steps(counts, out_len, int(job.workload.max_batch), load.name) * (2 if pj.repeat else 1)
        self.budget.observe(job.name, load.name, plan_class(pj.plan), steps, wall)
        self.done += 1
        r = row["real"]
        self.log(
            f"  {job.name} {pj.role} {pj.name}/{load.name}: {row['served']} req, ttft {r['ttft_mean_s'] * 1e3:.1f} ms, "
            f"tpot {r['tpot_mean_s'] * 1e3:.1f} ms, {r['tokens_per_s']:.1f} tok/s, batch "
            f"{max(row['mean_batch'], default=0):.1f} ({wall:.1f} s"
            + (f" + install {install_s:.1f} s)" if install_s else ")")
        )
        return row

    def skip(self, job: ScenarioJob, pj: PlanJob, load: Load, why: str) -> None:
        self.done += 1
        self.rows.write("skipped", scenario=job.name, role=pj.role, plan=pj.name, load=load.name, reason=why)
        self.log(f"  {job.name} {pj.role} {pj.name}/{load.name}: skipped ({why})")
