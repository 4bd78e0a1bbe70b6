"""RealBackend: the Backend protocol on a real MoE model spread over one process per edge server.

    backend = RealBackend(Scenario("tiny").cluster)          # 3 gloo processes on CPU
    backend.reset(plan, state); report = backend.apply(new_plan, state); metrics = backend.serve(new_plan, state, 10)

What is measured: migration wall time and bytes (real copies, requantization, shaped link transfers), per-request
TTFT/TPOT/e2e from measured step times, tokens/s, bytes per link, expert memory per tier, quality (KL / top-1
agreement of the prompt logits against the 16-bit single-process model, when the model is small enough to keep a
reference in the parent). Energy is the cluster's power model applied to the measured busy fraction.
Failures never hang the driver and are never hidden (every `ServerError` names the server, and every process is
stopped before it is raised; the next `reset`/`apply`/`serve` then starts fresh ones, from the checkpoint store):
- a server that raises, crashes or hangs during a command: the error within `timeout_s` (+ a few seconds' grace
  to tell the hung server from the peers that timed out waiting for it);
- a server that died between commands (killed, OOM): the next `reset`, `apply` or `serve` raises
  "real backend: server s1 (pid N) died (exit code -9 = SIGKILL) between steps; ..." (it is not restarted
  silently: reported once, the call after that starts fresh servers);
- a server that dies or raises while starting: the start fails at once naming it (not after `start_timeout_s`);
- Ctrl-C: the servers ignore SIGINT; the interrupted call stops them (terminate, then kill) and re-raises
  KeyboardInterrupt; `close()` is idempotent, bounded (seconds) and safe from a KeyboardInterrupt handler,
  `__del__` and atexit (which closes every open backend).
Bad plans raise PlanError before any weight moves.

Launchers: by default the server processes are spawned on this host (`channels.PipeChannel`). Built inside a
torchrun-launched process (several nodes, c10d rendezvous), rank 0 is the driver and server 0 and every other rank
becomes server `rank` and never returns from the constructor (`torchrun.TorchrunChannel`; see real_backend/torchrun.py).
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import shutil
import socket
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as tmp

from coel_env.backend.contract import Metrics, MigrationReport
from coel_env.backend.physics import migration_source
from coel_env.errors import ConfigError, PlanError
from coel_env.plan.deployment import DeploymentPlan
from coel_env.specs import LengthDist
from coel_env.specs.bounds import MAX_EXPERTS, MAX_SECONDS, Arg
from coel_env.world.cluster import Cluster
from coel_env.world.state import ClusterState
from coel_env.world.traces import RoutingModel
from real_backend.channels import PipeChannel, ServerError, check_fault
from real_backend.dist import stream_rows
from real_backend.model import MoEConfig, generate, reference_model
from real_backend.quant import quality
from real_backend.server import WorkerSpec
from real_backend.shaper import NetnsTopology
from real_backend.torchrun import TorchrunChannel, TorchrunSession, torchrun_env
from real_backend.warmup import warm_requests

LINK_MODES = ("app", "netns", "none")
ROUTE_MODES = ("traces", "router")
LAUNCHERS = ("auto", "spawn", "torchrun")
MAX_THREADS = 1024
# the constructor's scalar options (a config's `backend_kwargs`): each checked in one line before anything starts
OPTIONS = {
    "seed": Arg(int, 0),
    "timeout_s": Arg(float, 0, MAX_SECONDS, open_low=True),
    "start_timeout_s": Arg(float, 0, MAX_SECONDS, open_low=True),
    "measure_quality": Arg(bool, optional=True),
    "warmup": Arg(bool, optional=True),
    "cpu_compute": Arg(bool, optional=True),
    "prefetch": Arg(int, 0, MAX_EXPERTS),
    "max_requests_per_server": Arg(int, 1, optional=True),
    "arch": Arg(str, optional=True),
    "threads": Arg(int, 1, MAX_THREADS),
    "gen_device": Arg(str),
    "device": Arg(str),
    "links": Arg(str),
    "route_from": Arg(str),
    "launcher": Arg(str),
}
__all__ = ["LAUNCHERS", "LINK_MODES", "ROUTE_MODES", "RealBackend", "ServerError", "make_real_backend"]
CLOSE_TIMEOUT_S = 5.0  # close(): how long the servers may take to answer "close" (then they are terminated)
EXIT_WAIT_S = 2.0  # close(): how long they may take to exit by themselves after answering
_OPEN: weakref.WeakSet = weakref.WeakSet()  # backends with server processes (closed at exit)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_lengths(dist: LengthDist, n: int, rng: np.random.Generator) -> np.ndarray:
    """n request lengths drawn from `dist` (its inverse CDF `LengthDist.at` at uniform draws), rounded, >= 1."""
    return np.maximum(np.rint(dist.at(rng.uniform(size=n))), 1).astype(np.int64)


class RealBackend:
    """Backend protocol on real processes (gloo on CPU, NCCL on GPUs).

    `launcher`: "spawn" starts one process per server on this host; "torchrun" runs one server per torchrun rank
    (WORLD_SIZE must equal the number of servers; ranks != 0 serve rank 0 and exit without returning from here;
    no crash/hang injection, no restart after a failure); "auto" picks torchrun when torchrun's variables are set.

    `warmup`: after every reset / apply, serve warm-up requests unmeasured (`real_backend.warmup`), so a window
    measures serving, not the first steps' graph captures and expert re-stacking (default: on for CUDA only).

    Failures (see the module docstring): any server failure raises `ServerError` naming the server, after every
    server process has been stopped; a server that died between steps is reported by the next reset / apply /
    serve (never restarted silently); the call after the error starts fresh servers (under torchrun: raises,
    relaunch the job). `close()` is idempotent and bounded."""

    name = "real"

    def __init__(
        self,
        cluster: Cluster,
        *,
        seed: int = 0,
        checkpoint: str | Path | None = None,
        device: str = "cpu",
        links: str = "app",
        timeout_s: float = 60.0,
        start_timeout_s: float = 180.0,
        route_from: str = "traces",
        measure_quality: bool | None = None,
        cpu_compute: bool | None = None,
        prefetch: int = 0,
        max_requests_per_server: int | None = None,
        arch: str | None = None,
        threads: int = 1,
        routing: RoutingModel | None = None,
        gen_device: str = "cpu",
        launcher: str = "auto",
        warmup: bool | None = None,
    ):
        self.channel: PipeChannel | TorchrunChannel | None = None  # first: close() / __del__ work on a failed init
        self.session: TorchrunSession | None = None
        self.netns: NetnsTopology | None = None
        self.ssd_root: str | None = None
        given = dict(
            seed=seed,
            timeout_s=timeout_s,
            start_timeout_s=start_timeout_s,
            measure_quality=measure_quality,
            cpu_compute=cpu_compute,
            prefetch=prefetch,
            max_requests_per_server=max_requests_per_server,
            arch=arch,
            threads=threads,
            gen_device=gen_device,
            device=device,
            links=links,
            route_from=route_from,
            launcher=launcher,
            warmup=warmup,
        )
        ok = {k: OPTIONS[k].check(f"real backend: {k}", v) for k, v in given.items()}
        seed, timeout_s, start_timeout_s = ok["seed"], ok["timeout_s"], ok["start_timeout_s"]
        if checkpoint is not None and not isinstance(checkpoint, (str, Path)):
            raise ConfigError(f"real backend: checkpoint: {type(checkpoint).__name__} given; must be a path or null")
        if links not in LINK_MODES:
            raise ConfigError(f"real backend: links '{links}' unknown; allowed: {', '.join(LINK_MODES)}")
        if route_from not in ROUTE_MODES:
            raise ConfigError(f"real backend: route_from '{route_from}' unknown; allowed: {', '.join(ROUTE_MODES)}")
        if device not in ("cpu", "cuda"):
            raise ConfigError(f"real backend: device '{device}' unknown; allowed: cpu, cuda")
        if launcher not in LAUNCHERS:
            raise ConfigError(f"real backend: launcher '{launcher}' unknown; allowed: {', '.join(LAUNCHERS)}")
        stream_rows()  # a bad COEL_REAL_STREAM_ROWS fails here in one line, not in every server process
        launch = torchrun_env() if launcher != "spawn" else None
        if launcher == "torchrun" and launch is None:
            raise ConfigError(
                "real backend: launcher 'torchrun' but RANK/WORLD_SIZE/LOCAL_RANK/TORCHELASTIC_RUN_ID "
                "are not set; start the script with torchrun"
            )
        self.cluster = cluster
        self.cfg = MoEConfig.from_hf_config(checkpoint) if checkpoint else MoEConfig.from_spec(cluster.model, arch)
        self.seed, self.checkpoint, self.device, self.links = seed, checkpoint, device, links
        self.timeout_s, self.start_timeout_s = timeout_s, start_timeout_s
        self.route_from = route_from
        self.routing = routing or RoutingModel.generate(cluster.model, cluster.spec.routing, seed)
        if measure_quality is None:
            measure_quality = cluster.model.total_params < 50_000_000
        self.measure_quality = measure_quality
        self.cpu_compute = cluster.hw.cpu_compute if cpu_compute is None else cpu_compute
        self.prefetch, self.max_requests, self.threads = prefetch, max_requests_per_server, threads
        self.gen_device = gen_device  # "cuda": server processes draw random weights on their GPU (other values)
        # serve warm-up requests, unmeasured, after every reset / apply (None: on CUDA, where the first steps of a
        # plan re-stack the grouped experts and capture CUDA graphs); their wall seconds: `last_warmup_s`
        self.warmup = device == "cuda" if warmup is None else warmup
        self.last_warmup_s = 0.0
        self.last_migration_phases: list[dict[str, float]] = []
        self.current: DeploymentPlan | None = None
        self._ref = None
        self.window_index = 0
        # closed loop: this many clients per server, each sending its next request when the last one completes
        # (None: the scenario workload's `concurrency`; 0 or None there: Poisson arrivals)
        self.concurrency: int | None = None
        self.last_requests: list[list[dict]] = []
        self.last_details: dict = {}
        if launch is not None:  # on ranks != 0 this serves rank 0's commands, then exits the process
            self.session = TorchrunSession.attach(cluster, launch, device=device, links=links, timeout_s=timeout_s)
        self.launcher = "torchrun" if self.session is not None else "spawn"

    # ---- processes ----------------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.channel is not None and self.channel.alive

    def _start(self) -> None:
        self._shutdown()
        c = self.cluster
        self.ssd_root = tempfile.mkdtemp(prefix="coel-real-")
        addr = "127.0.0.1"
        if self.links == "netns":
            rates = [
                float(min(c.link_bw[k] for k, (a, b) in enumerate(c.link_ends) if n in (a, b)) * 8)
                for n in c.server_names
            ]
            self.netns = NetnsTopology(rates).__enter__()
            addr = self.netns.address(0)
        spec = WorkerSpec(
            cluster=c,
            cfg=self.cfg,
            seed=self.seed,
            checkpoint=str(self.checkpoint) if self.checkpoint else None,
            ssd_root=self.ssd_root,
            device=self.device,
            master_addr=addr,
            master_port=_free_port(),
            timeout_s=self.timeout_s,
            cpu_compute=self.cpu_compute,
            prefetch=self.prefetch,
            affinity=self.routing.affinity if self.prefetch else None,
            links=self.links,
            threads=self.threads,
            gen_device=self.gen_device,
        )
        _OPEN.add(self)
        try:
            if self.session is not None:
                self.channel = TorchrunChannel(self.session, spec, self.start_timeout_s)
            else:
                self.channel = PipeChannel(spec, self.start_timeout_s)
        except BaseException:
            self._shutdown()
            raise

    def _shutdown(self, wait_s: float = 0.0) -> None:
        """Stop the server processes (bounded; see PipeChannel.stop) and remove this backend's temporary state.
        Idempotent; after an interruption (a second Ctrl-C) calling it again finishes the job."""
        if self.channel is not None:
            self.channel.stop(wait_s)
            self.channel = None
        if self.netns is not None:
            self.netns.close()
            self.netns = None
        if self.ssd_root:
            shutil.rmtree(self.ssd_root, ignore_errors=True)
            self.ssd_root = None
        _OPEN.discard(self)

    def _check_servers(self) -> None:
        """A server that died since the last command (between steps) is reported, not restarted silently."""
        if self.channel is not None:
            try:
                self.channel.check("between steps")
            except BaseException:
                self._shutdown()
                self.current = None
                raise

    def _fail(self, msg: str) -> None:
        self._shutdown()
        self.current = None
        raise ServerError(msg)

    def _call(self, cmd: str, args: list | None = None, timeout: float | None = None) -> list:
        """Run a server command on every server; one reply per server. Any failure stops the servers and raises
        ServerError (after which reset() starts new processes, except under torchrun)."""
        if self.channel is None:
            self._fail("server processes not started; call reset() first")
        try:
            return self.channel.call(cmd, args, self.timeout_s if timeout is None else timeout)
        except BaseException:  # ServerError, or Ctrl-C mid-command: the servers are stopped (bounded) either way
            self._shutdown()
            self.current = None
            raise

    # ---- Backend protocol ----------------------------------------------------------------------------------
    def _check(self, plan: DeploymentPlan, state: ClusterState) -> None:
        problems = plan.problems(self.cluster, state.memory_avail)
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            raise PlanError(problems[0] + more)

    def reset(self, plan: DeploymentPlan, state: ClusterState) -> None:
        self._check(plan, state)
        self._check_servers()
        if not self.alive:
            self._start()
        arrs = {"device": plan.device, "tier": plan.tier, "bits": plan.bits}
        self._call("reset", [arrs] * self.cluster.num_servers)
        self.current = plan.copy()
        self.window_index = 0  # the k-th window after a reset draws the same requests whatever ran before (paired runs)
        self._warm_up(plan, state)

    def apply(self, plan: DeploymentPlan, state: ClusterState) -> MigrationReport:
        c = self.cluster
        self._check(plan, state)  # refused before any weight moves
        self._check_servers()
        if self.current is None or not self.alive:
            self.reset(plan, state)
            return MigrationReport(link_bytes=np.zeros(c.num_links))
        moves, removes, added, removed = self.migration_moves(self.current, plan, state.server_up)
        arg = {"moves": moves, "removes": removes, "device": plan.device, "link_factor": state.link_factor}
        res = self._call("apply", [arg] * c.num_servers)
        self.last_migration_phases = [r["phase_s"] for r in res]  # per server: wall seconds by phase (server.apply)
        self.current = plan.copy()
        self._warm_up(plan, state)
        pair = np.stack([r["pair"] for r in res])  # [src, dst] bytes
        link = c.pair_to_links(pair)
        return MigrationReport(
            bytes_total=float(sum(r["local"] + r["peer"] + r["cloud"] for r in res)),
            bytes_local=float(sum(r["local"] for r in res)),
            bytes_peer=float(sum(r["peer"] for r in res)),
            bytes_cloud=float(sum(r["cloud"] for r in res)),
            time_s=float(max(r["time_s"] for r in res)),
            replicas_added=added,
            replicas_removed=removed,
            link_bytes=link,
        )

    def serve(self, plan: DeploymentPlan, state: ClusterState, window_s: float) -> Metrics:
        self._check_servers()
        if self.current is None or plan != self.current or not self.alive:
            self.apply(plan, state)
        requests, arrived, dropped = self.workload(plan, state, window_s)
        return self.serve_requests(plan, state, requests, window_s, arrived, dropped)

    def serve_requests(
        self,
        plan: DeploymentPlan,
        state: ClusterState,
        requests: list[list[dict]],
        window_s: float,
        arrived: np.ndarray | None = None,
        dropped: np.ndarray | None = None,
    ) -> Metrics:
        """Serve given requests (per server: dicts rid, arrival, max_new, prompt, routes, server as `workload`
        makes them) instead of sampling a window; benchmarks use it for fixed-length sweeps."""
        c = self.cluster
        self._check_servers()
        if self.current is None or plan != self.current or not self.alive:
            self.apply(plan, state)
        if arrived is None:
            arrived = np.array([len(r) for r in requests], dtype=np.float64)
        if dropped is None:
            dropped = np.zeros(c.num_servers)
        res = self._serve(plan, state, requests, self.measure_quality)
        self.last_requests = requests
        return self._metrics(res, requests, arrived, dropped, window_s, state)

    def _serve(
        self, plan: DeploymentPlan, state: ClusterState, requests: list[list[dict]], want_logits: bool
    ) -> list[dict]:
        """The servers' "serve" command for given requests (per server) under the installed plan."""
        c, wl = self.cluster, self.cluster.spec.workload
        arg = [
            {
                "requests": requests[s],
                "server_up": state.server_up,
                "prune": self._pair_matrix(plan.prune),
                "fuse": self._pair_matrix(plan.fuse).astype(bool),
                "fusion_fraction": c.hw.quality.fusion_fraction,
                "max_batch": wl.max_batch,
                "max_num_batched_tokens": wl.max_num_batched_tokens,  # a step's token budget (scheduler.py)
                "chunked_prefill": wl.chunked_prefill,
                "want_logits": want_logits,
                "link_factor": state.link_factor,
            }
            for s in range(c.num_servers)
        ]
        return self._call("serve", arg, self.timeout_s + 5.0 * sum(len(r) for r in requests))

    def _warm_up(self, plan: DeploymentPlan, state: ClusterState) -> None:
        """Serve `warmup.warm_requests` (the workload's mean prompt, max_batch requests per live server), unmeasured,
        when `warmup` is on; their wall seconds go to `last_warmup_s`, not into any window's or migration's metrics
        (a one-time cost of this engine's install: a serving engine captures its graphs once, at start)."""
        self.last_warmup_s = 0.0
        if not self.warmup:
            return
        wl = self.cluster.spec.workload
        rng = np.random.default_rng([self.seed, 1 << 20, self.window_index])
        reqs = warm_requests(
            self, state, max(int(wl.input_len.mean), 1), rng, int(wl.max_batch), self._live_experts(plan, state)
        )
        t0 = time.perf_counter()
        self._serve(plan, state, reqs, want_logits=False)
        self.last_warmup_s = time.perf_counter() - t0

    def _live_experts(self, plan: DeploymentPlan, state: ClusterState) -> np.ndarray:
        """[L, E] bool: the expert has a replica on a live server."""
        c = self.cluster
        live = np.zeros(plan.device.shape[:2], dtype=bool)
        up_dev = state.server_up[c.dev_server]
        for r in range(plan.device.shape[-1]):
            d = plan.device[:, :, r]
            live |= (d >= 0) & up_dev[np.maximum(d, 0)]
        return live

    def close(self) -> None:
        """Close the servers ("close" command, then terminate/kill what is left). Idempotent, bounded (at worst
        about CLOSE_TIMEOUT_S + channels.GRACE_S + EXIT_WAIT_S + 2 * channels.TERM_S, 18 s; typically well under
        a second) and safe from a KeyboardInterrupt handler or atexit. It raises nothing for a server that died
        since the last step (closing is what the caller wanted anyway)."""
        try:
            if self.alive:
                with contextlib.suppress(ServerError):
                    self.channel.call("close", None, CLOSE_TIMEOUT_S)
        finally:
            self._shutdown(EXIT_WAIT_S)
            self.current = None

    def __enter__(self) -> RealBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # no messages from a finalizer: just stop the processes (torchrun: its atexit hook)
        if getattr(self, "session", None) is None:
            with contextlib.suppress(Exception):
                self._shutdown()

    # ---- helpers -------------------------------------------------------------------------------------------
    def _pair_matrix(self, per_pair: np.ndarray) -> np.ndarray:
        c = self.cluster
        out = np.zeros((c.num_servers, c.num_servers), dtype=np.float64)
        mask = c.pair_index >= 0
        out[mask] = np.asarray(per_pair, dtype=np.float64)[c.pair_index[mask]]
        return out

    def migration_moves(
        self, old: DeploymentPlan, new: DeploymentPlan, server_up: np.ndarray
    ) -> tuple[list[dict], list[tuple[int, int, int]], int, int]:
        """Moves (local requantize / peer copy / cloud reload) and removals turning `old` into `new`.

        A new replica copies from the source `physics.migration_source` picks (the surrogate's rule): a replica of
        the same server with >= its bits, else the nearest live peer with >= its bits (the peer requantizes and
        sends the packed result), else the checkpoint store; ties by tier, then higher bits, then lower device."""
        srv, lat = self.cluster.dev_server, self.cluster.pair_latency
        up = np.ascontiguousarray(server_up, dtype=np.bool_)
        moves, removes = [], []
        added = removed = 0
        L, E, R = new.device.shape
        for l in range(L):
            for e in range(E):
                o = [
                    (int(old.device[l, e, r]), int(old.tier[l, e, r]), int(old.bits[l, e, r]))
                    for r in range(R)
                    if old.device[l, e, r] >= 0
                ]
                n = [
                    (int(new.device[l, e, r]), int(new.tier[l, e, r]), int(new.bits[l, e, r]))
                    for r in range(R)
                    if new.device[l, e, r] >= 0
                ]
                for d, t, b in n:
                    if (d, t, b) in o:
                        continue
                    added += 1
                    dst = int(srv[d])
                    q = migration_source(old.device[l, e], old.tier[l, e], old.bits[l, e], b, dst, srv, up, lat)
                    m = {"l": l, "e": e, "dev": d, "tier": t, "bits": b, "dst": dst, "src": -1, "src_dev": -1}
                    if q >= 0:
                        od = int(old.device[l, e, q])
                        m.update(src=int(srv[od]), src_dev=od, kind="local" if srv[od] == dst else "peer")
                    else:
                        m["kind"] = "cloud"
                    moves.append(m)
                new_devs = {d for d, _, _ in n}
                for d, t, b in o:
                    if (d, t, b) not in n:
                        removed += 1
                        if d not in new_devs:
                            removes.append((l, e, d))
        return moves, removes, added, removed

    def workload(
        self, plan: DeploymentPlan, state: ClusterState, window_s: float
    ) -> tuple[list[list[dict]], np.ndarray, np.ndarray]:
        """The window's requests per server (seeded): Poisson arrivals, lengths, prompts and forced routes; under a
        closed loop (`closed_loop_clients`) round(rate * window) requests per server, the first of each client's
        chain at 0 and each later one sent when its predecessor completes (`after`).
        Returns (requests to serve, arrived per server, dropped per server)."""
        c, wl = self.cluster, self.cluster.spec.workload
        clients = self.closed_loop_clients()
        rng = np.random.default_rng([self.seed, self.window_index])
        self.window_index += 1
        S = c.num_servers
        live = self._live_experts(plan, state)
        requests: list[list[dict]] = [[] for _ in range(S)]
        arrived, dropped = np.zeros(S), np.zeros(S)
        rid = 0
        for s in range(S):
            if clients:
                n = round(float(state.arrival_rate[s]) * window_s)
                arrivals = np.zeros(n)
            else:
                n = int(rng.poisson(state.arrival_rate[s] * window_s))
                arrivals = np.sort(rng.uniform(0, window_s, n))
            arrived[s] = n
            chain_end: dict[int, int] = {}  # closed loop: client -> rid of its last request so far
            n_in = sample_lengths(wl.input_len, n, rng)
            n_out = sample_lengths(wl.output_len, n, rng)
            for i in range(n):
                if self.max_requests is not None and len(requests[s]) >= self.max_requests:
                    break
                prompt = rng.integers(0, self.cfg.vocab_size, int(n_in[i]))
                routes = None
                if self.route_from == "traces":
                    routes = self.routing.sample(state.domain_mix[s], int(n_in[i] + n_out[i] - 1), rng).astype(np.int16)
                rid += 1
                if not state.server_up[s] or (
                    routes is not None and not live[np.arange(routes.shape[1])[None, :, None], routes].all()
                ):
                    dropped[s] += 1
                    continue
                req = {
                    "rid": rid,
                    "arrival": float(arrivals[i]),
                    "max_new": int(n_out[i]),
                    "prompt": prompt,
                    "routes": routes,
                    "server": s,
                }
                if clients:
                    client = len(requests[s]) % clients
                    req["after"] = chain_end.get(client)
                    chain_end[client] = rid
                requests[s].append(req)
        return requests, arrived, dropped

    def closed_loop_clients(self) -> int:
        """Closed-loop clients per server (0: open loop): `concurrency` if set, else the workload's."""
        n = self.concurrency if self.concurrency is not None else self.cluster.spec.workload.concurrency
        if n is not None and n < 0:
            raise ValueError(f"real backend: concurrency {n} must be >= 0 (closed-loop clients per server)")
        return int(n or 0)

    def reference(self):
        """(model, experts) of the 16-bit single-process reference (built on first use)."""
        if self._ref is None:
            self._ref = reference_model(self.cfg, self.seed, self.checkpoint)
        return self._ref

    def reference_generate(self, req: dict) -> tuple[list[int], torch.Tensor]:
        model, experts = self.reference()
        routes = None if req["routes"] is None else [torch.as_tensor(req["routes"], dtype=torch.long)]
        toks, logits = generate(model, [torch.as_tensor(req["prompt"])], [req["max_new"]], experts, routes)
        return toks[0], logits[0]

    def _metrics(self, res: list[dict], requests, arrived, dropped, window_s, state) -> Metrics:
        c = self.cluster
        done = [d for r in res for d in r["done"]]
        served_n = len(done)
        n_arrived = float(arrived.sum())
        n_dropped = float(dropped.sum())
        sampled_out = n_arrived - n_dropped - served_n  # beyond max_requests_per_server (not served, not dropped)
        ttft = np.array([d["t_first"] - d["arrival"] for d in done])
        e2e = np.array([d["t_last"] - d["arrival"] for d in done])
        tpot = np.array([(d["t_last"] - d["t_first"]) / max(d["n_out"] - 1, 1) for d in done])
        n_out = np.array([d["n_out"] for d in done], dtype=np.float64)
        makespan = max([d["t_last"] for d in done], default=0.0)
        # a closed loop's clients are done when their chains are: throughput over that span
        span = makespan if self.closed_loop_clients() and makespan > 0 else max(window_s, makespan)
        scale = (served_n + sampled_out) / served_n if served_n else 0.0
        stat = lambda a, f: float(f(a)) if len(a) else 0.0  # noqa: E731
        p95 = lambda a: np.percentile(a, 95)  # noqa: E731
        slo = c.spec.workload.slo_s
        late = float((e2e > slo).sum()) * (scale if served_n else 0.0) + n_dropped
        busy = np.array([r["busy_s"] for r in res])
        util = np.minimum(busy[c.dev_server] / max(span, 1e-9), 1.0)
        gpu_up = state.server_up[c.dev_server]
        energy = (
            float(
                ((c.dev_p_idle + (c.dev_p_max - c.dev_p_idle) * util) * gpu_up).sum()
                + (c.cpu_p_idle * state.server_up).sum()
            )
            * window_s
        )
        qloss, kl, agree = 0.0, 0.0, 1.0
        if self.measure_quality and served_n:
            ref_l, got_l = [], []
            by_rid = {q["rid"]: q for reqs in requests for q in reqs}
            for r in res:
                for rid, lg in r["logits"].items():
                    _, ref = self.reference_generate({**by_rid[rid], "max_new": 1})
                    ref_l.append(ref)
                    got_l.append(torch.as_tensor(lg))
            kl, agree = quality(torch.cat(got_l), torch.cat(ref_l))
            qloss = 1.0 - agree
        mem = [r["memory"] for r in res]
        self.last_details = {
            "served": served_n,
            "arrived": n_arrived,
            "dropped": n_dropped,
            "sampled_out": sampled_out,
            "kl": kl,
            "top1_agreement": agree,
            "makespan_s": makespan,
            "wall_s": [r["wall_s"] for r in res],
            "steps": [r["steps"] for r in res],
            "fast_steps": [r["fast_steps"] for r in res],  # batched decode steps over KV slots (fast.py)
            "static": [r["static"] for r in res],  # [static decode steps, peer messages served by static graphs]
            "grouped_layers": [r["grouped_layers"] for r in res],  # MoE layers computed by grouped GEMMs
            "expert_layers": [r["expert_layers"] for r in res],  # MoE layers where the server holds experts
            "busy_s": busy.tolist(),
            "comm_wait_s": [r["comm_wait_s"] for r in res],
            "transport": [r["transport"] for r in res],  # "shm" (one PipeChannel's servers) or "gloo" (process group)
            "transport_fallbacks": [r["transport_fallbacks"] for r in res],  # shm: messages larger than a lane's region
            "tokens_pruned": sum(r["tokens_pruned"] for r in res),
            "streams_served": [r["streams_served"] for r in res],  # long requests served as streams (dist.py)
            "tokens_fused": sum(r["tokens_fused"] for r in res),
            "bytes_to": np.stack([r["bytes_to"] for r in res]).tolist(),
            "tokens_to": np.stack([r["tokens_to"] for r in res]).tolist(),
            "rows_to": np.stack([r["rows_to"] for r in res]).tolist(),
            "msgs_to": np.stack([r["msgs_to"] for r in res]).tolist(),
            "wire": res[0]["wire"],  # the dispatcher's wire format: activation_bytes, row_header_bytes (wire.py)
            "tiers": [r["tiers"] for r in res],
            "peak_gpu_bytes": [r["peak_gpu_bytes"] for r in res],
            "tokens": {d["rid"]: d["tokens"] for d in done},
            "timing": {d["rid"]: (d["arrival"], d["t_first"], d["t_last"]) for d in done},  # on the lock-step clock
            "prompt_logits": {rid: lg for r in res for rid, lg in r["logits"].items()},
        }
        return Metrics(
            ttft_mean_s=stat(ttft, np.mean),
            ttft_p95_s=stat(ttft, p95),
            tpot_mean_s=stat(tpot, np.mean),
            tpot_p95_s=stat(tpot, p95),
            e2e_mean_s=stat(e2e, np.mean),
            e2e_p95_s=stat(e2e, p95),
            tokens_per_s=float(n_out.sum() * scale / span) if span > 0 else 0.0,
            request_tokens_per_s=stat(n_out / np.maximum(e2e, 1e-9), np.mean),
            energy_j=energy,
            quality_loss=qloss,
            dropped_frac=n_dropped / n_arrived if n_arrived else 0.0,
            late_frac=late / n_arrived if n_arrived else 0.0,
            requests=n_arrived,
            window_s=float(window_s),
            gpu_mem_bytes=np.sum([m["gpu"] for m in mem], axis=0),
            cpu_mem_bytes=np.array([m["cpu"] for m in mem]),
            ssd_bytes=np.array([m["ssd"] for m in mem]),
            link_bytes=c.pair_to_links(np.stack([r["bytes_to"] for r in res])),
            device_util=util,
        )

    # ---- test hooks ----------------------------------------------------------------------------------------
    def pids(self) -> list[int]:
        return self.channel.pids() if self.channel is not None else []

    def inject(self, server: int, fault: str) -> None:
        """Make one server crash ('crash') or hang ('hang') on its next command (for robustness tests; locally
        spawned servers only: ConfigError under torchrun)."""
        check_fault(fault)
        if self.channel is None:
            raise ConfigError("inject: no server processes; call reset() first")
        self.channel.inject(server, fault)


def make_real_backend(cluster: Cluster, routing: RoutingModel | None = None, **kw) -> RealBackend:
    """Factory hook for the environment's `make_backend("real", cluster, routing, **kw)` (`routing`: the scenario's
    routing model); an unknown option is a one-line ConfigError naming the allowed ones."""
    allowed = [n for n in inspect.signature(RealBackend.__init__).parameters if n not in ("self", "cluster")]
    unknown = [k for k in kw if k not in allowed]
    if unknown:
        raise ConfigError(f"real backend: unknown option '{unknown[0]}'; allowed: {', '.join(allowed)}")
    return RealBackend(cluster, routing=routing, **kw)


@atexit.register
def _close_all() -> None:
    """At exit: close every open backend (bounded), then kill any server process left (belt and braces: the servers
    also get SIGKILL when the driver dies, via PR_SET_PDEATHSIG)."""
    for b in list(_OPEN):
        with contextlib.suppress(Exception):
            b.close()
    for p in tmp.active_children():
        if p.name.startswith("coel-real-"):
            p.kill()
