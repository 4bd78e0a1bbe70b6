"""Named action spaces ("full", "edit", "threshold"), their vectorized codecs and action masks.

Every codec turns a batch of flat actions [N, A] plus the current plans into proposed plans and an update flag;
`repair.repair` then makes the proposals valid. Masks follow sb3-contrib's MaskablePPO convention: one flat bool
vector over the concatenated choices of every MultiDiscrete dimension.

Action validation (`ActionCheck`, run before anything is decoded or applied, vectorized: one `np.asarray`, a dtype
and shape check, `np.isfinite`, min/max against the bounds). A refused action raises a one-line
`coel_env.errors.ActionError` naming the space, the expected shape and range (and, in a batch, the env index), e.g.
`action (threshold): shape (3,) given; expected (16,) float32 in [-1, 1]`; the env is left exactly as it was and
the next valid step works.

- every space: something that is not a numeric array (ragged, strings, objects, None, a `np.ma` masked array, an
  object whose conversion fails such as a torch tensor that requires grad), a wrong shape or ndim (a single env
  takes `space.shape`, a batch of N envs `(N, *space.shape)`) -> ActionError.
- sizes: a codec whose mask (MultiDiscrete) or Box would exceed `specs.bounds.MAX_ACTION_ENTRIES` entries is refused
  when it is built (ConfigError naming the product; `full` grows with layers x experts x replicas x devices).
- MultiDiscrete (`full`, `edit`): the dtype must be integer (or bool); floats, even integral ones, are refused.
  Any entry outside [0, nvec[i]) -> ActionError (what `space.contains` says; negative indices never wrap).
- Box (`threshold`, and the `knobs` wrapper of agents/knobs.py): integer or float dtypes; NaN/inf -> ActionError.
  Finite values outside [low, high] are a documented repair: clipped to the bounds, the step counts as repaired
  (`info["repaired"]`, `"action_clipped"` first in `info["repair_reasons"]`) and pays the flat `repair_penalty`
  (once per step, like any other repair).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from gymnasium import spaces

from coel_env.errors import ActionError, ConfigError
from coel_env.plan.deployment import MAX_PRUNE, DeploymentPlan
from coel_env.plan.kernels import (
    apply_edits_kernel,
    decode_full_kernel,
    flat,
    in_range_kernel,
    multi_replica_kernel,
    slots,
    within_kernel,
)
from coel_env.specs import BIT_WIDTHS
from coel_env.specs.bounds import MAX_ACTION_ENTRIES
from coel_env.specs.model import BITS_INDEX
from coel_env.world.cluster import Cluster

BITS = np.array(BIT_WIDTHS, dtype=np.int8)  # action index -> bits (16, 8, 4)
PRUNE_LEVELS = np.array([0.0, 0.2, 0.4, 0.6, 0.8])
EDIT_OPS: tuple[str, ...] = ("noop", "move", "replicate", "drop", "set_tier", "set_bits", "set_compression")


@dataclass
class View:
    """What decoding may look at, batched: live servers [N, S] and observed popularity [N, L, E]."""

    up: np.ndarray
    popularity: np.ndarray


class ActionCheck:
    """Validates (a batch of) actions for one flat space: `check(actions, num_envs)` -> (actions [N, A], clipped [N]
    bool). `num_envs=None` takes a single action of `space.shape`; rules in the module docstring."""

    def __init__(self, name: str, space: spaces.Space):
        if len(space.shape) != 1:
            raise TypeError(f"ActionCheck: a flat space is required, got shape {space.shape}")
        self.name, self.shape = name, tuple(space.shape)
        if isinstance(space, spaces.MultiDiscrete):
            self.discrete, self.kinds = True, "biu"
            self.nvec = np.asarray(space.nvec, dtype=np.int64).reshape(-1)
            lo, hi = int(self.nvec.min()), int(self.nvec.max())
            self.what = (
                f"integers in [0, {lo})" if lo == hi else f"integers in [0, nvec[i]) with nvec from {lo} to {hi}"
            )
        elif isinstance(space, spaces.Box):
            self.discrete, self.kinds = False, "iuf"
            self.low = np.asarray(space.low, dtype=np.float64).reshape(-1)
            self.high = np.asarray(space.high, dtype=np.float64).reshape(-1)
            self.lo, self.hi = float(self.low.min()), float(self.high.max())
            uniform = bool((self.low == self.lo).all() and (self.high == self.hi).all())
            self.uniform = uniform
            self.finite_uniform = uniform and bool(np.isfinite([self.lo, self.hi]).all())
            self.what = f"{space.dtype} in [{self.lo:g}, {self.hi:g}]" if uniform else f"{space.dtype} in [low, high]"
        else:
            raise TypeError(f"ActionCheck: unsupported space {type(space).__name__}")

    def _fail(self, label: str, msg: str, shape: tuple) -> ActionError:
        return ActionError(f"{label}: {msg}; expected {shape} {self.what}")

    def __call__(self, actions, num_envs: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        batched = num_envs is not None
        label = f"actions ({self.name})" if batched else f"action ({self.name})"
        want = (num_envs, *self.shape) if batched else self.shape
        if isinstance(actions, np.ma.MaskedArray):  # np.asarray would silently use the data under the mask
            raise self._fail(label, "a masked array given (pass .filled(...) or the data you mean)", want)
        try:
            a = np.asarray(actions)
        except (ValueError, TypeError):  # ragged nesting
            raise self._fail(label, "a ragged sequence given", want) from None
        except Exception as exc:  # e.g. a torch tensor that requires grad, an object whose __array__ fails
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise self._fail(
                label, f"{type(actions).__name__} that cannot be read as an array given ({why})", want
            ) from None
        if a.dtype.kind not in self.kinds:
            if a.dtype.kind not in "OUSV":
                given = f"dtype {a.dtype}"
            else:
                given = f"{type(actions).__name__}" if a.ndim == 0 else f"a non-numeric array (dtype {a.dtype})"
            raise self._fail(label, f"{given} given", want)
        if a.shape != want:
            raise self._fail(label, f"shape {a.shape} given", want)
        a2 = a if batched else a[None]
        N = a2.shape[0]
        if self.discrete:
            if a2.size and not self._in_range(a2):
                n, j = np.argwhere((a2 < 0) | (a2 >= self.nvec))[0]
                raise self._fail(
                    self._row(label, n, batched), f"a[{j}] = {a2[n, j]} out of range [0, {self.nvec[j]})", self.shape
                )
            return a2, np.zeros(N, dtype=bool)
        if a2.dtype.kind == "f" and self.finite_uniform and within_kernel(a2, self.lo, self.hi):
            return a2, np.zeros(N, dtype=bool)  # the usual case: finite and inside, in one pass
        if a2.dtype.kind == "f" and not np.isfinite(a2).all():
            n, j = np.argwhere(~np.isfinite(a2))[0]
            raise self._fail(self._row(label, n, batched), f"a[{j}] = {a2[n, j]} is not finite", self.shape)
        if self.uniform:
            inside = a2.min() >= self.lo and a2.max() <= self.hi
        else:
            inside = bool((a2 >= self.low).all() and (a2 <= self.high).all())
        if inside:
            return a2, np.zeros(N, dtype=bool)
        clipped = ((a2 < self.low) | (a2 > self.high)).any(1)
        return np.clip(a2, self.low, self.high), clipped

    def _in_range(self, a2: np.ndarray) -> bool:
        """Every entry of integer actions [N, A] lies in [0, nvec[i]) (one numba pass for int64, gymnasium's dtype)."""
        if a2.dtype == np.int64:
            return in_range_kernel(a2, self.nvec)
        return not (a2.min() < 0 or (a2 >= self.nvec).any())

    def _row(self, label: str, n: int, batched: bool) -> str:
        return f"action ({self.name}) of env {int(n)}" if batched else label


class ActionCodec:
    """Base: a gymnasium action space over one env, batched decode, masks (None for Box spaces)."""

    name = "base"
    space: spaces.Space

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        m = cluster.model
        self.L, self.E, self.R = m.num_moe_layers, m.num_experts, cluster.spec.max_replicas
        self.D, self.S, self.P = cluster.num_devices, cluster.num_servers, cluster.num_pairs
        self._mask_cache: dict[bytes, np.ndarray] = {}

    def _refuse_if_too_big(self, entries: int, product: str, smaller: str = "") -> None:
        """ConfigError (one line naming the product and the cap) if this space would need more than
        MAX_ACTION_ENTRIES entries (mask entries of a MultiDiscrete, dimensions of a Box); checked before any array
        of that size is allocated."""
        if entries > MAX_ACTION_ENTRIES:
            hint = f"; use {smaller} for a cluster and model this big" if smaller else ""
            raise ConfigError(
                f"action_space {self.name}: {product} = {entries} entries; must be <= {MAX_ACTION_ENTRIES}{hint}"
            )

    @cached_property
    def check(self) -> ActionCheck:
        """This space's validator: `codec.check(actions, num_envs=None)` -> (actions [N, A], clipped [N])."""
        return ActionCheck(self.name, self.space)

    def decode_batch(self, actions: np.ndarray, current, view: View):
        """(proposed PlanBatch, update [N] bool, invalid edits [N] int) of already validated actions [N, A]
        (`check`); unvalidated input may index out of bounds."""
        raise NotImplementedError

    def decode(self, action, current_plan: DeploymentPlan, view) -> tuple[DeploymentPlan, dict]:
        """One action -> (repaired plan, repair info); `view` is a ClusterState (e.g. the perceived one). The action
        is validated first (ActionError, or clipped and reported as `action_clipped` for Box spaces)."""
        from coel_env.plan.batch import PlanBatch
        from coel_env.plan.deployment import gpu_capacity
        from coel_env.plan.repair import REPAIR_KINDS, repair

        cur = PlanBatch.from_plans([current_plan])
        v = View(view.server_up[None].astype(bool), _popularity_of(view)[None])
        a, clipped = self.check(action)
        pb, update, invalid = self.decode_batch(a, cur, v)
        pb = pb.where(~update, cur) if not update[0] else pb
        cap = gpu_capacity(self.cluster, view.memory_avail)[None]
        pb, counts, _ = repair(pb, self.cluster, cap, v.up, v.popularity, cur)
        reasons = ["action_clipped"] * bool(clipped[0]) + [k for k, c in zip(REPAIR_KINDS, counts[0]) if c]
        return pb.plan(0), {
            "update": bool(update[0]),
            "repaired": bool(reasons or invalid[0]),
            "repair_reasons": reasons,
            "repair_counts": dict(zip(REPAIR_KINDS, counts[0].tolist())),
            "invalid_edits": int(invalid[0]),
        }

    def masks(self, up: np.ndarray, current=None) -> np.ndarray | None:
        """[N, sum(nvec)] flat masks (None for continuous spaces)."""
        return None


def _popularity_of(state) -> np.ndarray:
    pop = state.popularity
    return pop.sum(0) if pop.ndim == 3 else pop


class FullCodec(ActionCodec):
    """Every (layer, expert, replica slot): device (D = empty), tier, bits index; per server pair: prune level,
    fusion; last: update flag (0 keep, 1 apply). Slot 0 may not be empty (masked; repaired if chosen)."""

    name = "full"

    def __init__(self, cluster: Cluster):
        super().__init__(cluster)
        L, E, R, D, P = self.L, self.E, self.R, self.D, self.P
        per_slot, per_pair = D + 1 + 3 + len(BITS), len(PRUNE_LEVELS) + 2
        self._refuse_if_too_big(
            L * E * R * per_slot + P * per_pair + 2,
            f"mask of MoE layers ({L}) x experts ({E}) x max_replicas ({R}) x (devices ({D}) + {per_slot - D}) "
            f"+ {per_pair} x server pairs ({P}) + 2",
            "action_space 'edit' or 'threshold'",
        )
        slot = np.array([D + 1, 3, len(BITS)], dtype=np.int64)
        self.n_slots = L * E * R * 3
        nvec = np.concatenate([np.tile(slot, L * E * R), np.tile([len(PRUNE_LEVELS), 2], P), [2]])
        self.space = spaces.MultiDiscrete(nvec)
        self.nvec = nvec

    def decode_batch(self, actions, current, view):
        from coel_env.plan.batch import PlanBatch

        a = np.asarray(actions, dtype=np.int64)
        N = a.shape[0]
        L, E, R, D, P = self.L, self.E, self.R, self.D, self.P
        dev = np.empty((N, L, E, R), dtype=np.int16)
        tier = np.empty((N, L, E, R), dtype=np.int8)
        bits = np.empty((N, L, E, R), dtype=np.int8)
        decode_full_kernel(a, D, BITS, *flat(dev, tier, bits))
        c = a[:, self.n_slots : self.n_slots + 2 * P].reshape(N, P, 2)
        prune = PRUNE_LEVELS[np.clip(c[..., 0], 0, len(PRUNE_LEVELS) - 1)]
        fuse = c[..., 1] == 1
        update = a[:, -1] == 1
        return PlanBatch(dev, tier, bits, prune, fuse), update, np.zeros(N, dtype=np.int64)

    def encode(self, plan: DeploymentPlan, update: bool = True) -> np.ndarray:
        """The action that decodes to `plan` (prune ratios rounded to the nearest level)."""
        valid = plan.device >= 0
        s = np.stack(
            [
                np.where(valid, plan.device, self.D),
                np.where(valid, plan.tier, 0),
                np.where(valid, BITS_INDEX[np.clip(plan.bits, 0, 16)], 0),
            ],
            -1,
        ).astype(np.int64)
        lvl = np.abs(np.asarray(plan.prune, dtype=np.float64)[:, None] - PRUNE_LEVELS[None]).argmin(1)
        c = np.stack([lvl, plan.fuse.astype(np.int64)], -1)
        return np.concatenate([s.ravel(), c.ravel(), [int(update)]]).astype(np.int64)

    def masks(self, up, current=None):
        up = np.asarray(up, dtype=bool)
        out = np.empty((up.shape[0], int(self.nvec.sum())), dtype=bool)
        for i, row in enumerate(up):
            out[i] = self.mask_for(row)
        return out

    def mask_for(self, up_row: np.ndarray) -> np.ndarray:
        """Cached (read-only) mask of one env; the cache holds at most 64 masks and 4 x MAX_ACTION_ENTRIES bytes."""
        up_row = np.asarray(up_row, dtype=bool)
        key = up_row.tobytes()
        m = self._mask_cache.get(key)
        if m is None:
            m = self._build_mask(up_row)
            if len(self._mask_cache) >= max(1, min(64, 4 * MAX_ACTION_ENTRIES // max(m.size, 1))):
                self._mask_cache.clear()
            self._mask_cache[key] = m
        return m

    def _build_mask(self, up_row: np.ndarray) -> np.ndarray:
        D, R = self.D, self.R
        live = up_row[self.cluster.dev_server]
        block = np.ones((R, D + 1 + 3 + len(BITS)), dtype=bool)
        block[:, :D] = live
        block[0, D] = False  # slot 0 never empty
        tail = np.ones(self.P * (len(PRUNE_LEVELS) + 2) + 2, dtype=bool)
        m = np.concatenate([np.tile(block.ravel(), self.L * self.E), tail])
        m.flags.writeable = False
        return m


class EditCodec(ActionCodec):
    """`num_edits` edits, each (op, layer, expert, slot, device, tier, bits, pair, prune level, fusion), then a
    commit flag (0 keep the deployment, 1 apply current + edits). Ops: noop; move (slot -> device); replicate
    (first empty slot := device, tier, bits); drop (slot; never the last replica); set_tier; set_bits;
    set_compression (pair := level, fusion). Edits that do not apply (empty slot, last replica, no free slot) are
    ignored and counted as invalid."""

    name = "edit"
    FIELDS = 10

    def __init__(self, cluster: Cluster, num_edits: int = 4):
        super().__init__(cluster)
        if isinstance(num_edits, bool) or not isinstance(num_edits, (int, np.integer)) or num_edits < 1:
            raise ConfigError(f"num_edits: {num_edits!r}; allowed: an integer >= 1")
        num_edits = int(num_edits)
        per_edit = (
            len(EDIT_OPS) + self.L + self.E + self.R + self.D + 3 + len(BITS) + max(self.P, 1) + len(PRUNE_LEVELS) + 2
        )
        self._refuse_if_too_big(
            num_edits * per_edit + 2, f"mask of num_edits ({num_edits}) x {per_edit} + 2", "fewer num_edits"
        )
        self.K = num_edits
        edit = np.array(
            [len(EDIT_OPS), self.L, self.E, self.R, self.D, 3, len(BITS), max(self.P, 1), len(PRUNE_LEVELS), 2],
            dtype=np.int64,
        )
        self.nvec = np.concatenate([np.tile(edit, num_edits), [2]])
        self.space = spaces.MultiDiscrete(self.nvec)

    def decode_batch(self, actions, current, view):
        a = np.ascontiguousarray(actions, dtype=np.int64)
        pb = current.copy()
        invalid = np.zeros(a.shape[0], dtype=np.int64)
        apply_edits_kernel(
            a, self.K, self.FIELDS, BITS, PRUNE_LEVELS, self.P, pb.dev, pb.tier, pb.bits, pb.prune, pb.fuse, invalid
        )
        return pb, a[:, -1] == 1, invalid

    def masks(self, up, current=None):
        up = np.asarray(up, dtype=bool)
        N = up.shape[0]
        out = np.repeat(self._mask_row[None], N, axis=0)
        size, offs = int(self._field_offsets[-1]), self._field_offsets
        edits = np.reshape(out[:, : self.K * size], (N, self.K, size), copy=False)  # a view per edit
        edits[:, :, offs[4] : offs[5]] = up[:, None, self.cluster.dev_server]  # live devices
        if current is not None:  # drop needs an expert with >= 2 replicas
            multi = np.zeros(N, dtype=bool)
            multi_replica_kernel(*slots(current.dev), multi)
            edits[:, :, EDIT_OPS.index("drop")] = multi[:, None]
        return out

    @cached_property
    def _mask_row(self) -> np.ndarray:
        """One env's mask with every device live and drop allowed (set_compression masked without server pairs)."""
        row = np.ones(int(self.nvec.sum()), dtype=bool)
        if self.P == 0:
            size = int(self._field_offsets[-1])
            row[EDIT_OPS.index("set_compression") + size * np.arange(self.K)] = False
        return row

    @cached_property
    def _field_offsets(self) -> np.ndarray:
        """Where each field's choices start in one edit's mask (and the edit's size, last)."""
        return np.concatenate([[0], np.cumsum(self.nvec[: self.FIELDS])])


class ThresholdCodec(ActionCodec):
    """Compact parametric space, Box [-1, 1]: per layer (replicated fraction, GPU fraction, 16-bit fraction) of
    experts ranked by observed popularity, per pair a prune ratio, and an update flag (> 0 applies). Ranked experts
    go round-robin over live GPUs; the top replicated fraction gets a second replica on another GPU."""

    name = "threshold"

    def __init__(self, cluster: Cluster):
        super().__init__(cluster)
        self._refuse_if_too_big(
            3 * self.L + self.P + 1, f"Box of 3 x MoE layers ({self.L}) + server pairs ({self.P}) + 1"
        )
        self.space = spaces.Box(-1.0, 1.0, shape=(3 * self.L + self.P + 1,), dtype=np.float32)

    def decode_batch(self, actions, current, view):
        from coel_env.plan.batch import PlanBatch

        x = (np.clip(np.nan_to_num(np.asarray(actions, dtype=np.float64)), -1, 1) + 1) / 2
        N = x.shape[0]
        L, E, R = self.L, self.E, self.R
        frac = x[:, : 3 * L].reshape(N, L, 3)
        order = np.argsort(-view.popularity, axis=-1, kind="stable")  # [N, L, E] experts by popularity
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(E)[None, None], -1)
        live = view.up[:, self.cluster.dev_server]  # [N, D]
        live_sorted = np.argsort(~live, axis=1, kind="stable")  # live GPUs first
        nlive = np.maximum(live.sum(1), 1)
        pos = (rank + np.arange(L)[None, :, None] * E) % nlive[:, None, None]
        dev = np.full((N, L, E, R), -1, dtype=np.int16)
        tier = np.zeros((N, L, E, R), dtype=np.int8)
        bits = np.zeros((N, L, E, R), dtype=np.int8)
        rows = np.arange(N)[:, None, None]
        dev[..., 0] = live_sorted[rows, pos]
        on_gpu = rank < np.round(frac[..., 1:2] * E)
        tier[..., 0] = np.where(on_gpu, 0, 1)
        hi = rank < np.round(frac[..., 2:3] * E)
        bits[..., 0] = np.where(hi, 16, 8)
        if R > 1:
            rep = (rank < np.round(frac[..., 0:1] * E)) & (nlive[:, None, None] > 1)
            pos2 = (pos + np.maximum(nlive // 2, 1)[:, None, None]) % nlive[:, None, None]
            dev[..., 1] = np.where(rep, live_sorted[rows, pos2], -1)
            tier[..., 1] = np.where(rep, tier[..., 0], 0)
            bits[..., 1] = np.where(rep, bits[..., 0], 0)
        prune = x[:, 3 * L : 3 * L + self.P] * MAX_PRUNE
        fuse = np.zeros_like(prune, dtype=bool)
        return PlanBatch(dev, tier, bits, prune, fuse), x[:, -1] > 0.5, np.zeros(N, dtype=np.int64)


ACTION_SPACES = {"full": FullCodec, "edit": EditCodec, "threshold": ThresholdCodec}


def make_action_codec(name: str, cluster: Cluster, **kw) -> ActionCodec:
    if name not in ACTION_SPACES:
        raise ConfigError(f"action_space: unknown name '{name}'; allowed: {', '.join(ACTION_SPACES)}")
    return ACTION_SPACES[name](cluster, **kw)
