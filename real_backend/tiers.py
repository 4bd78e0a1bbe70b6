"""Expert storage tiers of one edge server: GPU memory, (pinned) CPU memory, or an SSD file read on demand.

A cold expert (CPU or SSD tier) is fetched to the compute device when a token needs it, or computed on the CPU
(Fiddler-style, `cpu_compute=True`) when it sits in CPU memory; a next-layer predictor (the routing model's
inter-layer affinity) can prefetch the likely experts of layer l+1 in a background thread while layer l runs.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from real_backend.quant import QTensor, qlinear

TIER_GPU, TIER_CPU, TIER_SSD = 0, 1, 2
PROJ = ("gate", "up", "down")
Expert = tuple[QTensor, QTensor, QTensor]


def expert_nbytes(w: Expert) -> int:
    return sum(t.nbytes for t in w)


def expert_forward(x: torch.Tensor, w: Expert) -> torch.Tensor:
    g, u, d = w
    return qlinear(F.silu(qlinear(x, g)) * qlinear(x, u), d)


def save_expert(path: Path, w: Expert) -> None:
    from safetensors.torch import save_file

    tensors, meta = {}, {}
    for name, t in zip(PROJ, w):
        for k, v in t.tensors().items():
            tensors[f"{name}.{k}"] = v.contiguous().cpu()
        meta[name] = {"bits": t.bits, "shape": list(t.shape), "group": t.group}
    save_file(tensors, str(path), metadata={"coel": json.dumps(meta)})


def load_expert(path: Path, device="cpu") -> Expert:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as h:
        meta = json.loads(h.metadata()["coel"])
        keys = set(h.keys())
        out = []
        for name in PROJ:
            m = meta[name]
            scale = h.get_tensor(f"{name}.scale") if f"{name}.scale" in keys else None
            out.append(QTensor(m["bits"], h.get_tensor(f"{name}.data"), scale, tuple(m["shape"]), m["group"]))
    return tuple(out)


@dataclass
class Replica:
    layer: int
    expert: int
    device: int  # cluster device index (a GPU of this server)
    tier: int
    bits: int
    weights: Expert | None = None  # None when on SSD
    path: Path | None = None
    nbytes: int = 0


@dataclass
class TierStats:
    fetches: int = 0
    fetch_bytes: int = 0
    cpu_computes: int = 0
    prefetch_hits: int = 0
    prefetch_issued: int = 0
    tier_tokens: list[int] = field(default_factory=lambda: [0, 0, 0])


class ExpertStore:
    """The routed-expert replicas held by one server, by (layer, expert, device)."""

    def __init__(
        self,
        devices: dict[int, torch.device],
        ssd_dir: str | Path,
        *,
        cpu_compute: bool = False,
        pin: bool = True,
        dtype: torch.dtype = torch.float32,
        prefetch: int = 0,
        affinity: np.ndarray | None = None,
    ):
        self.devices = devices  # cluster device index -> torch device this process computes on
        self.ssd_dir = Path(ssd_dir)
        self.ssd_dir.mkdir(parents=True, exist_ok=True)
        self.cpu_compute, self.dtype = cpu_compute, dtype
        self.pin = pin and torch.cuda.is_available()
        self.replicas: dict[tuple[int, int, int], Replica] = {}
        self._best: dict[tuple[int, int], Replica] = {}  # (layer, expert) -> the replica computed with
        self.stats = TierStats()
        self.prefetch_k, self.affinity = prefetch, affinity
        self._pool = ThreadPoolExecutor(1) if prefetch and affinity is not None else None
        self._cache: dict[tuple[int, int], Future] = {}
        self._lock = threading.Lock()
        self.version = 0  # bumped by every put/remove (fast.GroupedExperts re-stacks when it changes)

    # ---- placement ------------------------------------------------------------------------------------
    def put(self, layer: int, expert: int, device: int, tier: int, w: Expert) -> Replica:
        """Store `w` in `tier` (replacing any replica of this expert on `device`); returns the replica."""
        self.remove(layer, expert, device)
        bits = w[0].bits
        rep = Replica(layer, expert, device, tier, bits, nbytes=expert_nbytes(w))
        if tier == TIER_GPU:
            rep.weights = tuple(t.to(self.devices[device]) for t in w)
        elif tier == TIER_CPU:
            cpu = tuple(t.to("cpu") for t in w)
            rep.weights = tuple(t.pin() for t in cpu) if self.pin else cpu
        else:
            rep.path = self.ssd_dir / f"L{layer}_E{expert}_D{device}_b{bits}.safetensors"
            save_expert(rep.path, w)
        self.replicas[(layer, expert, device)] = rep
        self._rank(layer, expert)
        self.version += 1
        return rep

    def remove(self, layer: int, expert: int, device: int) -> Replica | None:
        rep = self.replicas.pop((layer, expert, device), None)
        if rep is not None and rep.path is not None:
            rep.path.unlink(missing_ok=True)
        self._cache.pop((layer, expert), None)
        if rep is not None:
            self._rank(layer, expert)
            self.version += 1
        return rep

    def _rank(self, layer: int, expert: int) -> None:
        """Re-pick the replica an expert is computed with (the fastest tier, then the highest precision)."""
        reps = [self.replicas[(layer, expert, d)] for d in self.devices if (layer, expert, d) in self.replicas]
        if reps:
            self._best[(layer, expert)] = min(reps, key=lambda r: (r.tier, -r.bits, r.device))
        else:
            self._best.pop((layer, expert), None)

    def read(self, rep: Replica, device: torch.device | str = "cpu") -> Expert:
        """The replica's packed weights on `device` (for copies and re-tiering; the stored tensors themselves
        where they already sit there: treat them as read-only)."""
        if rep.weights is None:
            return load_expert(rep.path, device)
        return tuple(t.to(device) for t in rep.weights)

    def holds(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self._best

    def best(self, layer: int, expert: int) -> Replica | None:
        """The replica this server computes with: the fastest tier, then the highest precision."""
        return self._best.get((layer, expert))

    def memory(self, num_devices: int) -> tuple[np.ndarray, float, float]:
        """Bytes actually held: per GPU [D], in CPU memory, on SSD."""
        gpu = np.zeros(num_devices)
        cpu = ssd = 0.0
        for r in self.replicas.values():
            if r.tier == TIER_GPU:
                gpu[r.device] += r.nbytes
            elif r.tier == TIER_CPU:
                cpu += r.nbytes
            else:
                ssd += r.path.stat().st_size if r.path and r.path.exists() else r.nbytes
        return gpu, cpu, ssd

    # ---- compute --------------------------------------------------------------------------------------
    def _fetch(self, rep: Replica) -> Expert:
        dev = self.devices[rep.device]
        self.stats.fetches += 1
        self.stats.fetch_bytes += rep.nbytes
        if rep.weights is None:
            return load_expert(rep.path, dev if dev.type == "cuda" else "cpu")
        return tuple(t.to(dev, non_blocking=True) for t in rep.weights)

    def compute(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """The expert's output for tokens x [n, d] (on x's device)."""
        rep = self.best(layer, expert)
        if rep is None:
            raise KeyError(f"layer {layer} expert {expert} is not held by this server")
        self.stats.tier_tokens[rep.tier] += int(x.shape[0])
        dev = self.devices[rep.device]  # a server with several GPUs computes each expert where it lives
        if rep.tier == TIER_GPU:
            return expert_forward(x.to(dev, self.dtype), rep.weights).to(x.device, x.dtype)
        if rep.tier == TIER_CPU and self.cpu_compute:
            self.stats.cpu_computes += 1
            return expert_forward(x.to("cpu", torch.float32), rep.weights).to(x.device, x.dtype)
        fut = self._cache.pop((layer, expert), None)
        if fut is not None:
            self.stats.prefetch_hits += 1
            w = fut.result()
        else:
            w = self._fetch(rep)
        return expert_forward(x.to(w[0].data.device, self.dtype), w).to(x.device, x.dtype)

    def prefetch(self, layer: int, experts: torch.Tensor) -> None:
        """Start loading the cold experts most likely needed at layer+1, given layer's chosen experts."""
        if self._pool is None or layer >= self.affinity.shape[0] or experts.numel() == 0:
            return
        scores = self.affinity[layer][np.unique(experts.cpu().numpy())].sum(0)
        for e in np.argsort(-scores)[: self.prefetch_k].tolist():
            rep = self.best(layer + 1, e)
            if rep is None or rep.tier == TIER_GPU or (rep.tier == TIER_CPU and self.cpu_compute):
                continue
            if (layer + 1, e) not in self._cache:
                self.stats.prefetch_issued += 1
                self._cache[(layer + 1, e)] = self._pool.submit(self._fetch, rep)

    def clear_prefetch(self) -> None:
        self._cache.clear()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
