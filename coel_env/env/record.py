"""StepRecord: what one step of N envs did (batched arrays), and the ONE derivation of the public `info` from it.

`CoELCore.step` fills a record (no copies of big arrays: it holds the step's own, freshly made arrays; treat them
as read-only). `info_values` is the one derivation of the public info: env i's as plain Python values (`env_info`,
CoELEnv.step) or all envs' batched, to which `vector_info` (CoELVectorEnv.step) adds gymnasium's `_key` masks, so
both envs always show the same keys and values. Public info keys, in order: metrics, migration,
restore_migration, migration_time_s, update, plan_changed, repaired, repair_reasons, penalty, budget_excess,
hello_bits, dropped_requests, replicas_lost, restored_experts, servers_up, epoch (+ action_mask, added by the envs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from numba import njit

from coel_env.backend.metrics import INFO_METRICS, MIGRATION_FIELDS
from coel_env.plan.repair import REPAIR_KINDS

INFO_KEYS = (
    "metrics",
    "migration",
    "restore_migration",
    "migration_time_s",
    "update",
    "plan_changed",
    "repaired",
    "repair_reasons",
    "penalty",
    "budget_excess",
    "hello_bits",
    "dropped_requests",
    "replicas_lost",
    "restored_experts",
    "servers_up",
    "epoch",
)
ALWAYS_VALID = ("hello_bits", "epoch")  # vector infos: also set for envs that were reset this step


@dataclass(eq=False)
class StepRecord:
    """One step of N envs; every array has a leading env axis [N]."""

    measured: dict[str, np.ndarray]
    """Backend metrics of the window as measured (real backend) or predicted (surrogate): Metrics fields [N] (or
    [N, ...] for per-device/link arrays). Never edited."""
    served: dict[str, np.ndarray]
    """`measured` after the migration disruption model (disruption.py): what rewards and info["metrics"] use. The
    same dict as `measured` when nothing migrated."""
    migration: dict[str, np.ndarray]
    """Cost of the committed plan change: MIGRATION_FIELDS [N] and link_bytes [N, K] (zeros where nothing changed)."""
    restore_migration: dict[str, np.ndarray] | None
    """Cost of the fault handling's plan change (restored experts, memory passes); None when no env had one."""
    migration_time_s: np.ndarray
    """[N] total migration time of the step: plan change + restoration (the disruption model's t)."""
    update: np.ndarray
    """[N] bool: the action asked to commit a new plan."""
    changed: np.ndarray
    """[N] bool: the committed (repaired) plan differs from the previous one."""
    repair_counts: np.ndarray
    """[N, len(REPAIR_KINDS)] repairs made to the proposed plan, by kind (repair.py)."""
    invalid_edits: np.ndarray
    """[N] int: edits of an `edit` action that could not be applied."""
    clipped: np.ndarray
    """[N] bool: the (Box) action was outside its bounds and clipped."""
    hello_bits: np.ndarray
    """[N] int: bits of Hello messages sent this epoch (perception)."""
    replicas_lost: np.ndarray
    """[N] int: replicas on servers that failed this epoch."""
    restored_experts: np.ndarray
    """[N] int: experts whose every replica was lost, restored by the fault handling."""
    fault_counts: np.ndarray
    """[N, len(REPAIR_KINDS)] memory passes of the fault handling, by kind."""
    servers_up: np.ndarray
    """[N] int: live servers after the step's dynamics."""
    epoch: np.ndarray
    """[N] int: epoch after the step."""
    truncated: np.ndarray
    """[N] bool: the episode reached max_epochs."""
    reward: np.ndarray = field(init=False)
    """[N] reward space's value minus `penalty` (set by rewards.StepScorer)."""
    penalty: np.ndarray = field(init=False)
    """[N] repair, invalid-edit, Hello and budget penalties (set by rewards.StepScorer)."""
    budget_excess: np.ndarray = field(init=False)
    """[N] summed relative excess over the energy / latency budgets, >= 0 (set by rewards.StepScorer)."""
    terminated: np.ndarray = field(init=False)
    """[N] bool: a budget was exceeded in budget mode 'terminate' (set by rewards.StepScorer)."""

    @property
    def num_envs(self) -> int:
        return len(self.update)

    @cached_property
    def repaired(self) -> np.ndarray:
        """[N] bool: the action needed fixing (any repair, an invalid edit or clipping)."""
        out = np.empty(self.num_envs, dtype=bool)
        repaired_kernel(self.repair_counts, self.invalid_edits, self.clipped, out)
        return out

    @property
    def repaired_replicas(self) -> np.ndarray:
        """[N] repairs that touched a replica (every kind but `infeasible`)."""
        return self.repair_counts[:, :-1].sum(1)

    def repair_reasons(self, i: int) -> list[str]:
        """Env i's repair reasons: action_clipped, the repair kinds that happened, invalid_edit."""
        return _reasons(self.repair_counts[i].tolist(), bool(self.clipped[i]), bool(self.invalid_edits[i]))

    def all_repair_reasons(self) -> np.ndarray:
        """[N] object array: every env's `repair_reasons`."""
        out = np.empty(self.num_envs, dtype=object)
        rows = zip(self.repair_counts.tolist(), self.clipped.tolist(), self.invalid_edits.tolist())
        for j, (counts, clipped, invalid) in enumerate(rows):
            out[j] = _reasons(counts, bool(clipped), bool(invalid))
        return out


@njit(cache=True)
def repaired_kernel(counts, invalid, clipped, out):
    """out[n] = env n had a repair of any kind (counts [N, kinds]), an invalid edit or a clipped action."""
    for n in range(counts.shape[0]):
        out[n] = clipped[n] or invalid[n] > 0
        for k in range(counts.shape[1]):
            out[n] |= counts[n, k] > 0


def _reasons(counts: list[int], clipped: bool, invalid: bool) -> list[str]:
    """Repair reasons of one env from its repair counts (REPAIR_KINDS order) and its clipped / invalid-edit flags."""
    kinds = [k for k, n in zip(REPAIR_KINDS, counts) if n]
    return ["action_clipped"] * clipped + kinds + ["invalid_edit"] * invalid


def _floats(d: dict[str, np.ndarray] | None, keys: tuple[str, ...], i: int | None, n: int) -> dict[str, Any]:
    if i is not None:
        return dict.fromkeys(keys, 0.0) if d is None else {k: float(d[k].item(i)) for k in keys}
    return {k: np.zeros(n) for k in keys} if d is None else {k: np.asarray(d[k], dtype=np.float64) for k in keys}


def info_values(rec: StepRecord, i: int | None = None) -> dict[str, Any]:
    """THE public info, keys in INFO_KEYS order: env i's as plain Python values (float, int, bool, list) when `i`
    is given (CoELEnv), else every env's batched (arrays [N], dicts of [N] arrays for metrics and migrations,
    `repair_reasons` an object array of lists; CoELVectorEnv via `vector_info`)."""
    n, f, one = rec.num_envs, rec.served, i is not None
    reasons: Any = rec.repair_reasons(i) if one else rec.all_repair_reasons()
    return {
        "metrics": _floats(f, INFO_METRICS, i, n),
        "migration": _floats(rec.migration, MIGRATION_FIELDS, i, n),
        "restore_migration": _floats(rec.restore_migration, MIGRATION_FIELDS, i, n),
        "migration_time_s": float(rec.migration_time_s[i])
        if one
        else np.asarray(rec.migration_time_s, dtype=np.float64) * np.ones(n),
        "update": bool(rec.update[i]) if one else rec.update.copy(),
        "plan_changed": bool(rec.changed[i]) if one else rec.changed.copy(),
        "repaired": bool(rec.repaired[i]) if one else rec.repaired.copy(),
        "repair_reasons": reasons,
        "penalty": float(rec.penalty[i]) if one else rec.penalty.astype(np.float64),
        "budget_excess": float(rec.budget_excess[i]) if one else rec.budget_excess.astype(np.float64),
        "hello_bits": int(rec.hello_bits[i]) if one else rec.hello_bits,
        "dropped_requests": float(f["dropped_frac"][i] * f["requests"][i])
        if one
        else f["dropped_frac"] * f["requests"],
        "replicas_lost": int(rec.replicas_lost[i]) if one else rec.replicas_lost.copy(),
        "restored_experts": int(rec.restored_experts[i]) if one else rec.restored_experts.copy(),
        "servers_up": int(rec.servers_up[i]) if one else rec.servers_up,
        "epoch": int(rec.epoch[i]) if one else rec.epoch.copy(),
    }


def env_info(rec: StepRecord, i: int) -> dict[str, Any]:
    """Env i's info (CoELEnv.step): `info_values(rec, i)`."""
    return info_values(rec, i)


def vector_info(rec: StepRecord, resetting: np.ndarray, reset_values: dict[str, np.ndarray]) -> dict[str, Any]:
    """Vector-env infos (CoELVectorEnv.step): batched `info_values` with `_key` masks (False for envs reset this step,
    except ALWAYS_VALID keys); `reset_values` [N] replace the rows of those envs (their fresh episode's values)."""
    stepped = ~resetting
    ones = np.ones(len(resetting), dtype=bool)
    out: dict[str, Any] = {}
    for key, value in info_values(rec).items():
        if isinstance(value, dict):
            value = {name: a for k, a in value.items() for name, a in ((k, a), ("_" + k, stepped))}
        elif key in reset_values:
            value = np.where(resetting, reset_values[key], value)
        out[key] = value
        out["_" + key] = ones if key in ALWAYS_VALID else stepped
    return out
