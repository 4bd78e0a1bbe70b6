"""DeploymentPlan: where every expert replica lives (device, tier, bits) and per-link token compression.

Stored as dense arrays so that the surrogate and the action decoders stay vectorized:
`device[L, E, R]` (-1 = empty slot), `tier[L, E, R]` (0 GPU, 1 CPU, 2 SSD), `bits[L, E, R]` (16/8/4, 0 empty),
`prune[P]` (fraction of cross-server tokens pruned on logical link P) and `fuse[P]` (token fusion on/off).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coel_env.atomic import atomic_write_json
from coel_env.errors import PlanError, read_json_object
from coel_env.specs import BIT_WIDTHS
from coel_env.world.cluster import GB, TIERS, Cluster

MANIFEST_FORMAT = "coel-deployment-manifest"
MANIFEST_VERSION = 1
MAX_PRUNE = 0.9


def gpu_capacity(cluster: Cluster, memory_avail: np.ndarray | None = None) -> np.ndarray:
    """[D] bytes of GPU memory for routed experts, given the free memory fraction of each GPU."""
    if memory_avail is None:
        return cluster.gpu_expert_capacity
    return cluster.gpu_expert_capacity_at(memory_avail)


@dataclass
class DeploymentPlan:
    device: np.ndarray
    tier: np.ndarray
    bits: np.ndarray
    prune: np.ndarray
    fuse: np.ndarray

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def empty(cls, num_layers: int, num_experts: int, max_replicas: int, num_pairs: int) -> DeploymentPlan:
        shape = (num_layers, num_experts, max_replicas)
        return cls(
            device=np.full(shape, -1, dtype=np.int16),
            tier=np.zeros(shape, dtype=np.int8),
            bits=np.zeros(shape, dtype=np.int8),
            prune=np.zeros(num_pairs, dtype=np.float32),
            fuse=np.zeros(num_pairs, dtype=bool),
        )

    @classmethod
    def for_cluster(cls, cluster: Cluster) -> DeploymentPlan:
        m = cluster.model
        return cls.empty(m.num_moe_layers, m.num_experts, cluster.spec.max_replicas, cluster.num_pairs)

    @classmethod
    def uniform(cls, cluster: Cluster) -> DeploymentPlan:
        """vLLM-style contiguous blocks over all GPUs, one replica each, at the highest precision that fits
        (falling back to CPU memory when even 4-bit does not fit)."""
        plan = cls.for_cluster(cluster)
        L, E, _ = plan.device.shape
        D = cluster.num_devices
        flat = np.arange(L * E)
        dev = (flat * D // (L * E)).reshape(L, E)
        plan.device[:, :, 0] = dev
        counts = np.bincount(dev.ravel(), minlength=D)
        cap = cluster.gpu_expert_capacity
        bits = np.zeros(D, dtype=np.int8)
        for b in sorted(BIT_WIDTHS):  # ascending: the last that fits wins
            fits = counts * cluster.expert_bytes_by_bits[b] <= cap
            bits[fits] = b
        plan.bits[:, :, 0] = np.where(bits[dev] > 0, bits[dev], 4)
        plan.tier[:, :, 0] = np.where(bits[dev] > 0, 0, 1)
        return plan

    def copy(self) -> DeploymentPlan:
        return DeploymentPlan(
            self.device.copy(), self.tier.copy(), self.bits.copy(), self.prune.copy(), self.fuse.copy()
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DeploymentPlan):
            return NotImplemented
        return all(
            np.array_equal(getattr(self, f), getattr(other, f)) for f in ("device", "tier", "bits", "prune", "fuse")
        )

    # ---- accounting ---------------------------------------------------------------------------------
    @property
    def valid(self) -> np.ndarray:
        return self.device >= 0

    @property
    def replica_count(self) -> np.ndarray:
        return self.valid.sum(-1)

    def memory_usage(self, cluster: Cluster) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Bytes of experts per GPU [D], per server in CPU RAM [S] and on SSD [S]."""
        v = self.valid
        dev = self.device[v].astype(np.int64)
        size = cluster.expert_bytes_by_bits[self.bits[v]]
        tier = self.tier[v]
        D, S = cluster.num_devices, cluster.num_servers
        srv = cluster.dev_server[dev]
        gpu = np.bincount(dev[tier == 0], weights=size[tier == 0], minlength=D)
        cpu = np.bincount(srv[tier == 1], weights=size[tier == 1], minlength=S)
        ssd = np.bincount(srv[tier == 2], weights=size[tier == 2], minlength=S)
        return gpu, cpu, ssd

    def problems(self, cluster: Cluster, memory_avail: np.ndarray | None = None) -> list[str]:
        """Every reason the plan is invalid for `cluster`, as one-line messages (empty if valid)."""
        out: list[str] = []
        m = cluster.model
        want = (m.num_moe_layers, m.num_experts, cluster.spec.max_replicas)
        if self.device.shape != want or self.tier.shape != want or self.bits.shape != want:
            return [
                f"plan: replica arrays have shape {self.device.shape}; expected {want} (layers, experts, max_replicas)"
            ]
        if self.prune.shape != (cluster.num_pairs,) or self.fuse.shape != (cluster.num_pairs,):
            return [f"plan: compression arrays have {self.prune.shape[0]} links; expected {cluster.num_pairs}"]
        v = self.valid
        if (self.device >= cluster.num_devices).any():
            bad = int(self.device.max())
            out.append(f"plan: device index {bad} out of range; allowed 0..{cluster.num_devices - 1}")
        bad_bits = v & ~np.isin(self.bits, BIT_WIDTHS)
        if bad_bits.any():
            l, e, _ = np.argwhere(bad_bits)[0]
            out.append(f"plan: layer {l} expert {e} has bits={self.bits[bad_bits][0]}; allowed: 16, 8, 4")
        bad_tier = v & ((self.tier < 0) | (self.tier >= len(TIERS)))
        if bad_tier.any():
            out.append(f"plan: tier {int(self.tier[bad_tier][0])} unknown; allowed: 0 (gpu), 1 (cpu), 2 (ssd)")
        missing = ~v.any(-1)
        if missing.any():
            l, e = np.argwhere(missing)[0]
            out.append(f"plan: layer {l} expert {e} has no replica ({int(missing.sum())} experts without one)")
        if not (np.isfinite(self.prune).all() and (self.prune >= 0).all() and (self.prune <= MAX_PRUNE).all()):
            out.append(f"plan: prune ratios must lie in [0, {MAX_PRUNE}]")
        if out:
            return out
        dup = _duplicate_slots(self)
        if dup is not None:
            out.append(f"plan: layer {dup[0]} expert {dup[1]} has two replicas on {cluster.device_names[dup[2]]}")
        gpu, cpu, ssd = self.memory_usage(cluster)
        for used, cap, names, tier in (
            (gpu, gpu_capacity(cluster, memory_avail), cluster.device_names, "GPU"),
            (cpu, cluster.cpu_expert_capacity, cluster.server_names, "CPU"),
            (ssd, cluster.ssd_bytes, cluster.server_names, "SSD"),
        ):
            over = np.flatnonzero(used > cap * (1 + 1e-9))
            for i in over:
                out.append(
                    f"plan: {names[i]} {tier} tier holds {used[i] / GB:.2f} GB of experts; "
                    f"capacity {cap[i] / GB:.2f} GB"
                )
        return out

    def validate(self, cluster: Cluster, memory_avail: np.ndarray | None = None) -> DeploymentPlan:
        """Raise PlanError (one line: the first problem) if the plan is invalid; return self otherwise."""
        problems = self.problems(cluster, memory_avail)
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            raise PlanError(problems[0] + more)
        return self

    # ---- manifest -----------------------------------------------------------------------------------
    def to_manifest(self, cluster: Cluster) -> dict:
        """A JSON-able manifest a human can read and an operator can apply."""
        experts = []
        L, E, R = self.device.shape
        for l in range(L):
            for e in range(E):
                reps = [
                    {
                        "device": cluster.device_names[int(self.device[l, e, r])],
                        "tier": TIERS[int(self.tier[l, e, r])],
                        "bits": int(self.bits[l, e, r]),
                    }
                    for r in range(R)
                    if self.device[l, e, r] >= 0
                ]
                experts.append({"layer": l, "expert": e, "replicas": reps})
        links = [
            {
                "servers": [cluster.server_names[a], cluster.server_names[b]],
                "prune_ratio": float(str(np.float32(self.prune[p]))),
                "fusion": bool(self.fuse[p]),
            }
            for p, (a, b) in enumerate(cluster.pair_servers)
        ]
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "scenario": cluster.spec.name,
            "model": cluster.model.name,
            "max_replicas": R,
            "devices": cluster.device_names,
            "experts": experts,
            "links": links,
        }

    @classmethod
    def from_manifest(cls, data: dict, cluster: Cluster) -> DeploymentPlan:
        """Parse a manifest for `cluster`; PlanError (one line) on any malformed or unknown entry."""
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise PlanError(f"manifest: 'format' must be '{MANIFEST_FORMAT}'")
        if data.get("version") != MANIFEST_VERSION:
            raise PlanError(f"manifest: version {data.get('version')!r} unsupported; allowed: {MANIFEST_VERSION}")
        if data.get("model") != cluster.model.name:
            raise PlanError(
                f"manifest: model '{data.get('model')}' does not match the scenario's '{cluster.model.name}'"
            )
        plan = cls.for_cluster(cluster)
        L, E, R = plan.device.shape
        dev_id = {n: i for i, n in enumerate(cluster.device_names)}
        seen: set[tuple[int, int]] = set()
        try:
            for item in data["experts"]:
                l, e = int(item["layer"]), int(item["expert"])
                if not (0 <= l < L and 0 <= e < E):
                    raise PlanError(
                        f"manifest: layer {l} expert {e} out of range; layers 0..{L - 1}, experts 0..{E - 1}"
                    )
                if (l, e) in seen:
                    raise PlanError(f"manifest: layer {l} expert {e} is listed twice; allowed: one entry each")
                seen.add((l, e))
                reps = item["replicas"]
                if len(reps) > R:
                    raise PlanError(f"manifest: layer {l} expert {e} has {len(reps)} replicas; max_replicas={R}")
                for r, rep in enumerate(reps):
                    if rep["device"] not in dev_id:
                        raise PlanError(
                            f"manifest: unknown device '{rep['device']}'; allowed: {', '.join(cluster.device_names)}"
                        )
                    if rep["tier"] not in TIERS:
                        raise PlanError(f"manifest: unknown tier '{rep['tier']}'; allowed: {', '.join(TIERS)}")
                    bits = int(rep["bits"])
                    if bits not in BIT_WIDTHS:
                        raise PlanError(
                            f"manifest: layer {l} expert {e} has bits={bits}; allowed: "
                            f"{', '.join(map(str, BIT_WIDTHS))}"
                        )
                    plan.device[l, e, r] = dev_id[rep["device"]]
                    plan.tier[l, e, r] = TIERS.index(rep["tier"])
                    plan.bits[l, e, r] = bits
            pair_of = {frozenset(cluster.server_names[i] for i in pr): p for p, pr in enumerate(cluster.pair_servers)}
            for link in data.get("links", []):
                key = frozenset(link["servers"])
                if key not in pair_of:
                    raise PlanError(f"manifest: unknown link {link['servers']}")
                plan.prune[pair_of[key]] = float(link["prune_ratio"])
                plan.fuse[pair_of[key]] = bool(link["fusion"])
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, PlanError):
                raise
            raise PlanError(f"manifest: malformed entry ({type(exc).__name__}: {exc})") from None
        return plan.validate(cluster)

    def save_manifest(self, path: str | Path, cluster: Cluster) -> Path:
        """Write the JSON manifest atomically (a crash never leaves half a manifest); returns the path."""
        return atomic_write_json(path, self.to_manifest(cluster), indent=1)

    @classmethod
    def load_manifest(cls, path: str | Path, cluster: Cluster) -> DeploymentPlan:
        return cls.from_manifest(read_json_object(path, "manifest", PlanError), cluster)


def _duplicate_slots(plan: DeploymentPlan) -> tuple[int, int, int] | None:
    """The first (layer, expert, device) holding two replicas of one expert, if any."""
    d = np.where(plan.valid, plan.device, -1 - np.arange(plan.device.shape[-1], dtype=np.int16))
    s = np.sort(d, axis=-1)
    same = (s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)
    if not same.any():
        return None
    l, e, r = np.argwhere(same)[0]
    return int(l), int(e), int(s[l, e, r])
