"""One edge server = one process: its share of the model, its expert tiers, its requests and its links.

The parent (`RealBackend`) talks to each server process over a pipe with small commands (reset, apply, serve,
close); the servers talk to each other over a torch.distributed process group (weight copies, barriers) and exchange
the per-layer dispatch messages and the step clock through shared memory when they are processes of one PipeChannel
(real_backend/shm.py; `COEL_REAL_SHM=0`: the process group for those too).
Serving is lock-step, as expert parallelism is: every step each server runs one forward pass of its own continuous
batch (or an empty one) and all servers meet at each MoE layer's token exchange. A step's tokens follow the
surrogate's scheduler semantics (real_backend/scheduler.py: decodes, then prefill chunks within the workload's
max_num_batched_tokens, with or without chunked prefill). The servers share one virtual clock:
each step advances it by the slowest server's measured step time, and when every server is idle it jumps to the next
arrival, so a window of W seconds need not take W seconds of wall time.
"""

from __future__ import annotations

import bisect
import contextlib
import cProfile
import ctypes
import itertools
import os
import signal
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from coel_env.world.cluster import Cluster
from real_backend.dist import Dispatcher, dispatch_targets
from real_backend.fast import FastDecoder, GroupedExperts, SlotCache, compact, fast_enabled, make_pool
from real_backend.model import KVCache, MoEConfig, MoETransformer, WeightSource, expert_shapes
from real_backend.quant import QTensor, int4_group, quantize, requantize
from real_backend.scheduler import schedule_step
from real_backend.shaper import LinkShaper, enter_netns, now, sleep_until
from real_backend.shm import Segment
from real_backend.static import StaticDecoder, StaticServe, pin_ok, static_enabled
from real_backend.tiers import TIER_GPU, Expert, ExpertStore, expert_nbytes
from real_backend.transport import TAG_MIGRATE, GlooTransport, ShmTransport, _bits_f64, _f64_bits


@dataclass
class WorkerSpec:
    """Everything a server process needs to start (picklable)."""

    cluster: Cluster
    cfg: MoEConfig
    seed: int = 0
    checkpoint: str | None = None
    ssd_root: str = "/tmp/coel-real"
    device: str = "cpu"  # "cpu" or "cuda"
    master_addr: str = "127.0.0.1"
    master_port: int = 29512
    timeout_s: float = 60.0
    cpu_compute: bool = False
    prefetch: int = 0
    affinity: np.ndarray | None = None
    links: str = "app"  # app | netns | none
    netns_prefix: str = "coel"
    threads: int = 1
    gen_device: str = "cpu"  # where seeded random weights are drawn ("cuda": fast for full-size models)
    env: dict = field(default_factory=dict)


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no orphans if the parent is killed


def pack_expert(w: Expert) -> torch.Tensor:
    """One contiguous uint8 buffer of an expert's packed tensors (what goes over a link), on their device."""
    return torch.cat([v.contiguous().view(-1).view(torch.uint8) for t in w for v in t.tensors().values()])


def expert_layout(cfg: MoEConfig, bits: int) -> list[tuple[tuple[int, int], list[tuple[torch.dtype, tuple]]]]:
    out = []
    for shape in expert_shapes(cfg):
        o, i = shape
        if bits == 16:
            out.append((shape, [(torch.bfloat16, (o, i))]))
        elif bits == 8:
            out.append((shape, [(torch.int8, (o, i)), (torch.float16, (o,))]))
        else:
            out.append((shape, [(torch.uint8, (o, i // 2)), (torch.float16, (o, i // int4_group(i)))]))
    return out


def expert_buffer_size(cfg: MoEConfig, bits: int) -> int:
    return sum(
        int(np.prod(s)) * torch.empty(0, dtype=dt).element_size()
        for _, parts in expert_layout(cfg, bits)
        for dt, s in parts
    )


def unpack_expert(buf: torch.Tensor, cfg: MoEConfig, bits: int) -> Expert:
    out, off = [], 0
    for shape, parts in expert_layout(cfg, bits):
        ts = []
        for dt, s in parts:
            n = int(np.prod(s)) * torch.empty(0, dtype=dt).element_size()
            ts.append(buf[off : off + n].clone().view(dt).view(s))
            off += n
        group = int4_group(shape[1]) if bits == 4 else 0
        out.append(QTensor(bits, ts[0], ts[1] if len(ts) > 1 else None, shape, group))
    return tuple(out)


def _lowered(w: Expert, bits: int, device: torch.device) -> Expert:
    """An expert's tensors at `bits`, requantized on `device` where they must be lowered (else where they are)."""
    return tuple(t if t.bits == bits else requantize(t.to(device), bits) for t in w)


class _Seq:
    def __init__(self, r: dict, num_layers: int):
        self.rid, self.arrival, self.max_new = r["rid"], r["arrival"], r["max_new"]
        self.after = r.get("after")  # closed loop: sent when request `after` (same client) completes; else None
        self.prompt = torch.as_tensor(r["prompt"], dtype=torch.long)
        self.routes = None if r.get("routes") is None else torch.as_tensor(r["routes"], dtype=torch.long)
        self.cache = KVCache(num_layers)
        self.out: list[int] = []
        self.t_first = self.t_last = 0.0
        self.admitted = -1  # admission order (the scheduler serves prefills first come first served)
        self.logits: list[torch.Tensor] = []  # the prompt's logits so far, a part per prefill chunk (want_logits)

    def to_prefill(self) -> int:
        """Prompt tokens not yet processed (0 once it decodes)."""
        return 0 if self.out else len(self.prompt) - self.cache.length


class ServerProcess:
    """State of one server process (built inside the child)."""

    def __init__(self, rank: int, spec: WorkerSpec, shared_links, shm: Segment | None = None):
        self.rank, self.spec, self.c = rank, spec, spec.cluster
        self.S = self.c.num_servers
        cfg = spec.cfg
        self.cfg = cfg
        use_cuda = spec.device == "cuda" and torch.cuda.is_available()
        n_gpu = torch.cuda.device_count() if use_cuda else 0
        my_devs = np.flatnonzero(self.c.dev_server == rank).tolist()
        self.devices = {d: torch.device(f"cuda:{d % n_gpu}") if use_cuda else torch.device("cpu") for d in my_devs}
        self.device = self.devices[my_devs[0]]
        self.dtype = torch.bfloat16 if use_cuda else torch.float32
        self.comm_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        gen = spec.gen_device if use_cuda else "cpu"
        self.source = WeightSource(cfg, spec.seed, spec.checkpoint, gen_device=gen)
        self.model = MoETransformer(cfg, self.source.non_expert(self.device), self.device, self.dtype)
        ssd = Path(spec.ssd_root) / f"server{rank}"
        self.store = ExpertStore(
            self.devices,
            ssd,
            cpu_compute=spec.cpu_compute,
            dtype=self.dtype,
            prefetch=spec.prefetch,
            affinity=spec.affinity,
        )
        self.shaper = None
        if spec.links != "none":
            self.shaper = LinkShaper(self.c, bandwidth=spec.links == "app", latency=True, shared=shared_links)
        if shm is not None:  # the servers of one PipeChannel: shared-memory lanes
            transport = ShmTransport(shm, rank, spec.timeout_s, self.device, self.comm_device)
            shm.close()  # mapped now: the descriptor is not needed any more
        else:
            transport = GlooTransport(self.device, self.comm_device)
        self.dispatcher = Dispatcher(
            rank, self.S, self.store, self.shaper, self.device, self.comm_device, spec.seed, transport
        )
        self.grouped = GroupedExperts(self.store, cfg.num_moe_layers, cfg.num_experts, self.device)
        self.fast_decoder: FastDecoder | None = None  # built at the first serve that uses KV slots
        self.static_decoder: StaticDecoder | None = None  # with it, where static.static_enabled
        self.static = static_enabled(self.device) and pin_ok(self.dispatcher)
        if self.static:
            self.dispatcher.static = StaticServe(self.dispatcher, self.dtype, cfg.d_model, cfg.top_k)
        self.plan_holders: list[list[set[int]]] | None = None
        self.profiled = 0  # serve calls profiled so far (see PROFILE_ENV)

    # ---- placement ----------------------------------------------------------------------------------------
    def _holders(self, device: np.ndarray) -> list[list[set[int]]]:
        L, E, _R = device.shape
        srv = self.c.dev_server
        return [[{int(srv[d]) for d in device[l, e] if d >= 0} for e in range(E)] for l in range(L)]

    def _master(self, l: int, e: int, bits: int) -> Expert:
        """The checkpoint's expert at `bits`; quantized on the GPU when this server has one (a full plan's experts on
        one host thread take seconds), on the CPU otherwise."""
        dev = self.device if self.device.type == "cuda" else "cpu"
        return tuple(quantize(t, bits) for t in self.source.expert(l, e, device=dev))

    def reset(self, arg: dict) -> dict:
        """Install a plan's replicas for this server straight from the checkpoint store (no cost charged)."""
        for key in list(self.store.replicas):
            self.store.remove(*key)
        dev, tier, bits = arg["device"], arg["tier"], arg["bits"]
        for l, e, r in np.argwhere(dev >= 0):
            d = int(dev[l, e, r])
            if d in self.devices:
                self.store.put(int(l), int(e), d, int(tier[l, e, r]), self._master(int(l), int(e), int(bits[l, e, r])))
        self.plan_holders = self._holders(dev)
        return self.memory()

    def memory(self) -> dict:
        gpu, cpu, ssd = self.store.memory(self.c.num_devices)
        return {"gpu": gpu, "cpu": cpu, "ssd": ssd}

    def apply(self, arg: dict) -> dict:
        """Carry out this server's part of a migration (see RealBackend.migration_moves). Sources are read, lowered
        to the move's bits and packed where this server computes (its GPU when it has one: a full plan's experts
        requantized on one host thread take seconds, which no deployment would spend); only a peer copy's packed
        bytes cross to the host, once each way. `phase_s`: wall seconds by phase (stage the sources, pack and post
        the sends, receive and install, wait for the sends)."""
        me, dev = self.rank, self.device
        if self.shaper is not None and arg.get("link_factor") is not None:
            self.shaper.set_link_factor(arg["link_factor"])
        dist.barrier()
        t0 = time.perf_counter()
        out = {"local": 0, "peer": 0, "cloud": 0, "pair": np.zeros(self.S)}
        staged: dict[int, Expert] = {}
        for i, m in enumerate(arg["moves"]):  # read every source first: a move may replace another's source
            if m["src"] == me:  # a GPU replica: the stored tensors themselves (no copy); else read into host memory
                rep = self.store.replicas[(m["l"], m["e"], m["src_dev"])]
                staged[i] = self.store.read(rep, self.devices[rep.device] if rep.tier == TIER_GPU else "cpu")
        posted = self._post_receives(arg["moves"])
        t1 = time.perf_counter()
        sends = []
        for i, m in enumerate(arg["moves"]):
            if m["kind"] == "peer" and m["src"] == me:
                buf = self._comm(pack_expert(_lowered(staged[i], m["bits"], dev)))
                arrive = self.shaper.reserve(me, m["dst"], buf.numel()) if self.shaper else now()
                out["pair"][m["dst"]] += buf.numel()
                sends += [
                    dist.isend(self._comm(_f64_bits(arrive)), m["dst"], tag=TAG_MIGRATE),
                    dist.isend(buf, m["dst"], tag=TAG_MIGRATE + 1),
                ]
        t2 = time.perf_counter()
        for i, m in enumerate(arg["moves"]):
            if m["dst"] != me:
                continue
            if m["kind"] == "local":
                w = _lowered(staged[i], m["bits"], dev)
                out["local"] += expert_nbytes(w)
            elif m["kind"] == "cloud":
                w = self._master(m["l"], m["e"], m["bits"])
                n = expert_nbytes(w)
                if self.shaper is not None:
                    sleep_until(self.shaper.reserve_cloud(n))
                out["cloud"] += n
            else:
                if posted is None:
                    hdr, buf = self._migration_buffers(m)
                    dist.recv(hdr, m["src"], tag=TAG_MIGRATE)
                    dist.recv(buf, m["src"], tag=TAG_MIGRATE + 1)
                else:
                    hdr, buf, works = posted.pop(i)
                    for work in works:
                        work.wait()
                sleep_until(_bits_f64(hdr.cpu()))
                w = unpack_expert(buf.to(dev), self.cfg, m["bits"])
                out["peer"] += buf.numel()
            self.store.put(m["l"], m["e"], m["dev"], m["tier"], w)
        for l, e, d in arg["removes"]:
            if d in self.devices:
                self.store.remove(l, e, d)
        t3 = time.perf_counter()
        for s in sends:
            s.wait()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t4 = time.perf_counter()
        out["time_s"] = t4 - t0
        out["phase_s"] = {"stage": t1 - t0, "send": t2 - t1, "install": t3 - t2, "wait": t4 - t3}
        self.plan_holders = self._holders(arg["device"])
        out["memory"] = self.memory()
        return out

    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.comm_device)

    def _migration_buffers(self, m: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A peer copy's receive buffers: its arrival stamp and its packed bytes."""
        hdr = torch.empty(1, dtype=torch.int64, device=self.comm_device)
        return hdr, torch.empty(expert_buffer_size(self.cfg, m["bits"]), dtype=torch.uint8, device=self.comm_device)

    def _post_receives(self, moves: list[dict]) -> dict[int, tuple] | None:
        """Over a host-memory process group (gloo), every peer copy into this server is received from the start (per
        move: stamp, bytes, their works), so the bytes flow while this server still packs its own sends; None over
        NCCL, whose sends and receives of a server pair queue on one stream (there they are received in turn)."""
        if self.comm_device.type != "cpu":
            return None
        posted = {}
        for i, m in enumerate(moves):
            if m["kind"] == "peer" and m["dst"] == self.rank:
                hdr, buf = self._migration_buffers(m)
                works = [dist.irecv(hdr, m["src"], tag=TAG_MIGRATE), dist.irecv(buf, m["src"], tag=TAG_MIGRATE + 1)]
                posted[i] = (hdr, buf, works)
        return posted

    # ---- serving -----------------------------------------------------------------------------------------
    def serve(self, arg: dict) -> dict:
        """Serve this server's requests of a window, lock-step with the other servers."""
        me, _S = self.rank, self.S
        if self.shaper is not None and arg.get("link_factor") is not None:
            self.shaper.set_link_factor(arg["link_factor"])
        targets = [dispatch_targets(self.plan_holders, s, arg["server_up"], self.c.pair_latency) for s in range(_S)]
        fast = fast_enabled()
        if fast:
            self.grouped.refresh()
        self.grouped.pairs.zero_()
        self.dispatcher.configure(
            targets[me], arg["prune"], arg["fuse"], arg["fusion_fraction"], targets, self.grouped if fast else None
        )
        self.dispatcher.reset_counters()
        self.store.stats.__init__()
        L = self.cfg.num_layers
        seqs = [_Seq(r, L) for r in arg["requests"]]
        successor = {q.after: q for q in seqs if q.after is not None}  # closed-loop clients' next requests
        pending = deque(sorted((q for q in seqs if q.after is None), key=lambda q: q.arrival))
        max_batch, want_logits = arg["max_batch"], arg["want_logits"]
        # a step's token budget (None: unlimited, every prompt whole: callers from before the budget) and chunking
        budget, chunked = arg.get("max_num_batched_tokens"), bool(arg.get("chunked_prefill", True))
        # decode fast path: static KV slots for this serve's sequences, batched decode steps (fast.py)
        pool = make_pool(self.model, arg["requests"], max_batch)
        if pool is not None and self.fast_decoder is None:
            self.fast_decoder = FastDecoder(self.model)
            if self.static:
                self.static_decoder = StaticDecoder(self.fast_decoder, self.dispatcher)
        static0 = self._static_counts()
        active: list[_Seq] = []
        done, logits_out = [], {}
        clock = busy = 0.0
        steps = fast_steps = n_admitted = 0
        empty = torch.empty(0, self.cfg.d_model, dtype=self.dtype, device=self.device)
        empty_idx = torch.empty(0, self.cfg.top_k, dtype=torch.long, device=self.device)
        dist.barrier()
        wall0 = time.perf_counter()
        while True:
            # one clock for the cluster: jump to the earliest time any server has work, if all are idle
            mine = clock if active else pending[0].arrival if pending else np.inf
            earliest = -self.dispatcher.transport.all_max(-mine)
            if earliest == np.inf:
                break
            clock = max(clock, earliest)
            # this step's tokens (scheduler.py): decodes, prefill chunks under way, then admissions
            free = max_batch - len(active)
            queued = []  # prompt lengths of the arrived requests (pending is sorted by arrival) that a slot could take
            for q in itertools.islice(pending, free):
                if q.arrival > clock:
                    break
                queued.append(len(q.prompt))
            order = sorted(active, key=lambda q: q.admitted)
            plan = schedule_step([q.to_prefill() for q in order], queued, free, budget, chunked)
            take = {id(q): n for q, n in zip(order, plan.running)}
            for _ in plan.admitted:
                q = pending.popleft()
                if pool is not None:
                    q.cache = SlotCache(pool, len(active))
                q.admitted, n_admitted = n_admitted, n_admitted + 1
                active.append(q)
            take.update((id(q), n) for q, n in zip(active[len(active) - len(plan.admitted) :], plan.admitted))
            t0 = time.perf_counter()
            if not active:
                for l in range(self.cfg.num_moe_layers):
                    self.dispatcher(l, empty, empty_idx, empty)
                clock += self._step_time(time.perf_counter() - t0)
                continue
            step = [q for q in active if take[id(q)] > 0]  # slot order (the fast path's)
            toks = [
                torch.tensor([q.out[-1]]) if q.out else q.prompt[q.cache.length : q.cache.length + take[id(q)]]
                for q in step
            ]
            routes = None
            if all(q.routes is not None for q in step):
                routes = [q.routes[q.cache.length : q.cache.length + len(t)] for q, t in zip(step, toks)]
            if pool is not None and len(step) == len(active) and all(q.out for q in step):  # the batched decode
                r = None if routes is None else torch.cat(routes)
                sd = self.static_decoder
                if sd is not None and sd.usable(len(step)):
                    logits = sd.decode(step, pool, r)
                else:
                    logits = self.fast_decoder.decode(step, pool, self.dispatcher, r)
                fast_steps += 1
            else:
                logits = self.model.forward(toks, [q.cache for q in step], self.dispatcher, routes)
            ends = torch.tensor([len(t) for t in toks]).cumsum(0) - 1
            nxt = logits[ends.to(logits.device)].argmax(-1).tolist()
            dt = time.perf_counter() - t0
            clock += self._step_time(dt)
            busy += dt
            steps += 1
            start, finished = 0, set()
            for q, t, tok in zip(step, toks, nxt):
                prefill, start = not q.out, start + len(t)
                if prefill and want_logits:
                    q.logits.append(logits[start - len(t) : start].cpu())
                if prefill and q.cache.length < len(q.prompt):  # an earlier chunk of its prompt: no token yet
                    continue
                if prefill:
                    q.t_first = clock
                    if want_logits:
                        logits_out[q.rid] = torch.cat(q.logits).numpy()
                        q.logits = []
                q.out.append(int(tok))
                if len(q.out) >= q.max_new:
                    q.t_last = clock
                    finished.add(id(q))
                    nxt_q = successor.pop(q.rid, None)
                    if nxt_q is not None:  # its client sends the next request now
                        nxt_q.arrival = clock
                        bisect.insort(pending, nxt_q, key=lambda r: r.arrival)
                    done.append(
                        {
                            "rid": q.rid,
                            "arrival": q.arrival,
                            "t_first": q.t_first,
                            "t_last": q.t_last,
                            "n_out": len(q.out),
                            "tokens": q.out,
                        }
                    )
            still = [q for q in active if id(q) not in finished]
            active = still if pool is None else compact(still, pool)
        wall = time.perf_counter() - wall0
        del pool
        static = [a - b for a, b in zip(self._static_counts(), static0)]
        if self.static and os.environ.get("COEL_REAL_STATIC_LOG") == "1":
            print(
                f"static decode: server {me}: {static[0]} of {fast_steps} decode steps static, {static[1]} peer "
                f"messages served static",
                file=sys.stderr,
                flush=True,
            )
        st = self.store.stats
        st.tier_tokens[0] += int(self.grouped.pairs)  # rows computed by the grouped GPU experts
        d = self.dispatcher
        return {
            "done": done,
            "logits": logits_out,
            "busy_s": busy,
            "wall_s": wall,
            "steps": steps,
            "fast_steps": fast_steps,
            "static": static,  # static decode steps, peer messages served by static graphs
            "grouped_layers": sum(self.dispatcher._fast(l) for l in range(self.cfg.num_moe_layers)),
            "expert_layers": len({l for l, _e, _d in self.store.replicas}),
            "bytes_to": d.bytes_to.copy(),
            "tokens_to": d.tokens_to.copy(),
            "rows_to": d.rows_to.copy(),
            "msgs_to": d.msgs_to.copy(),
            "wire": {
                "activation_bytes": torch.empty(0, dtype=self.dtype).element_size(),
                "row_header_bytes": d.slot_bytes,
            },
            "tokens_pruned": d.tokens_pruned,
            "tokens_fused": d.tokens_fused,
            "remote_tokens_served": d.remote_tokens_served,
            "streams_served": d.streams_served,
            "comm_wait_s": d.comm_wait_s,
            "transport": d.transport.name,
            "transport_fallbacks": d.transport.fallbacks,  # shm: messages over the process group (larger than a lane)
            "memory": self.memory(),
            "tiers": {
                "fetches": st.fetches,
                "fetch_bytes": st.fetch_bytes,
                "cpu_computes": st.cpu_computes,
                "prefetch_hits": st.prefetch_hits,
                "prefetch_issued": st.prefetch_issued,
                "tier_tokens": list(st.tier_tokens),
            },
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0,
        }

    def _static_counts(self) -> tuple[int, int]:
        """(decode steps taken by the static path, peer messages served by its graphs) so far."""
        sd, ss = self.static_decoder, self.dispatcher.static
        return (0 if sd is None else sd.steps, 0 if ss is None else ss.served)

    def _step_time(self, dt: float) -> float:
        """The lock-step's duration: the slowest server's measured time (every server advances by it)."""
        return self.dispatcher.transport.all_max(dt)

    # ---- test hooks ----------------------------------------------------------------------------------------
    def crash(self, arg) -> None:
        os._exit(3)

    def hang(self, arg) -> None:
        time.sleep(1e6)

    def ping(self, arg) -> int:
        return os.getpid()

    def close(self, arg) -> None:
        self.store.close()


PROFILE_ENV = "COEL_PROFILE_DIR"  # set it to cProfile every server's `serve` into <dir>/server<rank>_serve<n>.prof
TORCH_PROFILE_ENV = "COEL_TORCH_PROFILE_DIR"  # torch.profiler (CPU + CUDA) tables of every `serve`, same file names


def run_command(server: ServerProcess, cmd: str, arg) -> tuple[str, object]:
    """Run one driver command (a ServerProcess method) on this server: ("ok", result) or ("error", traceback).
    Every transport (pipe, torchrun control group) goes through here."""
    prof_dir = os.environ.get(PROFILE_ENV) if cmd == "serve" else None
    prof = cProfile.Profile() if prof_dir else None
    torch_dir = os.environ.get(TORCH_PROFILE_ENV) if cmd == "serve" else None
    tprof = None
    if torch_dir:
        acts = [torch.profiler.ProfilerActivity.CPU]
        if server.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        tprof = torch.profiler.profile(activities=acts)
    try:
        if prof is not None:
            prof.enable()
        if tprof is not None:
            tprof.__enter__()
        return "ok", getattr(server, cmd)(arg)
    except Exception:
        return "error", traceback.format_exc()
    finally:
        if tprof is not None:
            tprof.__exit__(None, None, None)
            server.profiled += prof is None
            Path(torch_dir).mkdir(parents=True, exist_ok=True)
            name = Path(torch_dir) / f"server{server.rank}_serve{server.profiled}"
            ka = tprof.key_averages()
            sort = "cuda_time_total" if server.device.type == "cuda" else "self_cpu_time_total"
            name.with_suffix(".txt").write_text(
                ka.table(sort_by=sort, row_limit=40) + "\n" + ka.table(sort_by="self_cpu_time_total", row_limit=25)
            )
        if prof is not None:
            prof.disable()
            server.profiled += 1
            Path(prof_dir).mkdir(parents=True, exist_ok=True)
            prof.dump_stats(Path(prof_dir) / f"server{server.rank}_serve{server.profiled}.prof")


FAIL_START_ENV = "COEL_REAL_FAIL_START"  # test hook: "<rank>" makes that server raise while starting, "<rank>:exit"
# makes it exit with code 3 (both before it joins the process group)


def _start_fault(rank: int) -> None:
    hook = os.environ.get(FAIL_START_ENV, "")
    who, _, how = hook.partition(":")
    if who.strip() != str(rank):
        return
    if how == "exit":
        os._exit(3)
    raise RuntimeError(f"test hook {FAIL_START_ENV}={hook}: server {rank} fails while starting")


def worker_main(rank: int, spec: WorkerSpec, conn, shared_links, shm: Segment | None = None) -> None:
    """Entry point of a server process (torch.multiprocessing spawn target).

    Ctrl-C is for the driver: a server ignores SIGINT (it was spawned with SIGINT blocked), and the driver closes or
    terminates it; if the driver dies, the parent-death signal (SIGKILL) ends the server too."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _die_with_parent()
    os.environ.update(spec.env)
    torch.set_num_threads(spec.threads)
    try:
        _start_fault(rank)
        if spec.links == "netns":
            enter_netns(f"{spec.netns_prefix}{rank}")
            os.environ["GLOO_SOCKET_IFNAME"] = f"{spec.netns_prefix}n{rank}"
        else:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = spec.master_addr, str(spec.master_port)
        n_gpu = torch.cuda.device_count() if spec.device == "cuda" else 0
        if n_gpu:  # the server's first GPU (cluster devices map to cuda:d mod n_gpu, as in ServerProcess)
            torch.cuda.set_device(int(np.flatnonzero(spec.cluster.dev_server == rank)[0]) % n_gpu)
        use_nccl = n_gpu >= spec.cluster.num_servers  # NCCL needs one GPU per rank; else gloo over host memory
        dist.init_process_group(
            "nccl" if use_nccl else "gloo",
            rank=rank,
            world_size=spec.cluster.num_servers,
            timeout=timedelta(seconds=spec.timeout_s),
        )
        server = ServerProcess(rank, spec, shared_links, shm)
        conn.send(("ok", os.getpid()))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    parent = os.getppid()
    while True:
        if not conn.poll(1.0):
            if os.getppid() != parent:
                break
            continue
        try:
            cmd, arg = conn.recv()
        except EOFError:
            break
        conn.send(run_command(server, cmd, arg))
        if cmd == "close":
            break
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    # nothing is left to clean up (the tier files live in the driver's temporary directory): skip the interpreter's
    # teardown, which with torch loaded takes seconds, so that close() returns promptly
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(0)
