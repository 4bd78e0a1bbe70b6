"""CoELCore: N CoEL environments stepped together with numpy (the single env is N = 1).

One step = one decision epoch: decode the action -> repair -> if update: apply (migration) -> dynamics
-> faults (restore orphaned experts, fit memory) -> Hello perception -> serve the window (measured) -> migration
disruption (served, disruption.py) -> StepRecord (record.py) -> reward and penalties (rewards.StepScorer).
The public infos of CoELEnv and CoELVectorEnv are derived from the StepRecord (record.py).
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from coel_env.backend.contract import Backend, BatchBackend, MigrationBatch, as_batch_backend
from coel_env.env.actions import View, make_action_codec
from coel_env.env.disruption import MigrationDisruption
from coel_env.env.faults import handle_faults
from coel_env.env.observations import ObservationEncoder
from coel_env.env.perception import Perception
from coel_env.env.record import StepRecord, env_info
from coel_env.env.rewards import PenaltyWeights, RewardContext, StepScorer, demand_tokens_per_s, make_reward
from coel_env.errors import ConfigError, PlanError
from coel_env.plan.batch import PlanBatch
from coel_env.plan.deployment import DeploymentPlan
from coel_env.plan.kernels import differs_kernel, flat
from coel_env.plan.repair import REPAIR_KINDS, repair, usage_of
from coel_env.world.state import Scenario, StateBatch

__all__ = ["CoELCore"]


class CoELCore:
    def __init__(
        self,
        scenario: Scenario,
        backend: Backend | BatchBackend,
        num_envs: int = 1,
        action_space: str = "full",
        observation_space: str = "default",
        reward_space: str = "latency",
        reward_weights: dict | None = None,
        perception: str = "hello",
        max_epochs: int = 200,
        num_edits: int = 4,
        repair_penalty: float = 0.1,
        repair_unit_penalty: float = 1.0,
        invalid_edit_penalty: float = 0.02,
        migration_slowdown: float = 0.5,
        hello_cost_per_kbit: float = 0.0,
        budget_penalty: float = 1.0,
        drop_cost: float = 2.0,
        hello: dict | None = None,
        initial_plan: DeploymentPlan | None = None,
    ):
        if max_epochs < 1:
            raise ConfigError(f"max_epochs: {max_epochs}; allowed: an integer >= 1")
        self.scenario = scenario
        self.cluster = c = scenario.cluster
        self.backend = be = as_batch_backend(backend, c.num_links)
        if be.max_envs is not None and num_envs > be.max_envs:
            raise ConfigError(
                f"num_envs: {num_envs}; the {be.name} backend serves at most {be.max_envs} env(s) per call; "
                "use gymnasium.vector.SyncVectorEnv/AsyncVectorEnv for more"
            )
        self.N = num_envs
        spec = scenario.spec
        self.window = spec.dynamics.epoch_s
        self.max_epochs = max_epochs
        self.codec = make_action_codec(action_space, c, **({"num_edits": num_edits} if action_space == "edit" else {}))
        self.reward_fn = make_reward(reward_space, reward_weights)
        self.reward_space = reward_space
        wl = spec.workload
        in_mean, out_mean = wl.input_len.grid_mean, wl.output_len.grid_mean
        tok_per_req = in_mean + out_mean
        self.ctx = RewardContext(
            window_s=self.window,
            slo_s=wl.slo_s,
            demand_tokens_per_s=demand_tokens_per_s(wl, spec.arrival_rates, c.num_servers, out_mean),
            power_max_w=float(c.dev_p_max.sum() + c.cpu_p_max.sum()),
            drop_cost=drop_cost,
        )
        self.budgets = spec.budgets
        weights = PenaltyWeights(
            repair=repair_penalty,
            unit=repair_unit_penalty,
            invalid=invalid_edit_penalty,
            hello=hello_cost_per_kbit,
            budget=budget_penalty,
        )
        self.scorer = StepScorer(
            self.reward_fn, self.ctx, weights, self.budgets, c.model.num_moe_layers * c.model.num_experts
        )
        self.disruption = MigrationDisruption(self.window, wl.slo_s, migration_slowdown)
        perc = Perception(
            c,
            num_envs,
            np.asarray(spec.arrival_rates, dtype=np.float64),
            self.window,
            tok_per_req,
            mode=perception,
            **(hello or {}),
        )
        self.perception = perc
        self.states = StateBatch(scenario, num_envs, extra=perc.normals)  # perception's draws ride on the dynamics'
        self.obs_encoder = ObservationEncoder(c, max_epochs, observation_space)
        plan0 = initial_plan if initial_plan is not None else DeploymentPlan.uniform(c)
        plan0.validate(c)
        self.plan0 = PlanBatch.from_plans([plan0])
        self._usage0 = usage_of(self.plan0, c)  # memory use of the initial plan, copied into an env on reset
        self.plans = PlanBatch.tile(plan0, num_envs)
        self.usage = usage_of(self.plans, c)
        self.rngs: list[np.random.Generator] = [np.random.default_rng() for _ in range(num_envs)]
        self.last_record: StepRecord | None = None
        self._cap_version, self._cap = -1, np.empty(0)

    @property
    def penalties(self) -> dict[str, float]:
        """The penalty weights by name (a copy; see rewards.PenaltyWeights)."""
        return asdict(self.scorer.weights)

    # ---- reset --------------------------------------------------------------------------------------
    def reset_env(self, i: int, seed: int | None = None) -> dict:
        """Reset env i (re-seeding it when `seed` is given); returns its reset info."""
        if seed is not None:
            self.rngs[i] = np.random.default_rng(seed)
        rng = self.rngs[i]
        st = self.scenario.initial_state(rng)
        self.states.load(i, st)
        self.states.refresh_popularity([i])
        self.plans.set(i, self.plan0)
        for arr, row in zip(self.usage, self._usage0):  # only env i's plan changed: no pass over all N envs
            arr[i] = row[0]
        bits = self.perception.reset(i, self.states, self.perception.normals.draw(rng))
        rows = np.zeros(self.N, dtype=bool)
        rows[i] = True
        self.backend.reset_batch(self.plans, self.states, rows)
        return {"hello_bits": bits, "epoch": 0}

    # ---- step ---------------------------------------------------------------------------------------
    def step(
        self,
        actions: np.ndarray | None = None,
        proposed: PlanBatch | None = None,
        update: np.ndarray | None = None,
        active: np.ndarray | None = None,
        single: bool = False,
        clipped: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, StepRecord]:
        """Step every env (rows with active=False are about to be reset: they draw no randomness).

        `actions` [N, A] (or, with `single`, one action of the space's shape for N = 1) are validated before
        anything changes (ActionError; Box values outside the bounds are clipped and counted, see actions.py);
        `proposed` plans must have this cluster's shapes (PlanError); `clipped` [N] marks proposals made from a
        clipped wrapper action (counted like a clipped action). Returns (reward [N], terminated [N], truncated [N],
        StepRecord); the record is also kept as `last_record`."""
        c, N, st, perc = self.cluster, self.N, self.states, self.perception
        view = View(st.server_up, perc.pop)
        if proposed is None:
            if single and N != 1:
                raise ConfigError(f"single: a single action needs num_envs == 1, not {N}")
            actions, clipped = self.codec.check(actions, None if single else N)
            proposed, update, invalid = self.codec.decode_batch(actions, self.plans, view)
        else:
            self.check_plans(proposed)
            invalid = np.zeros(N, dtype=np.int64)
            update = np.broadcast_to(np.asarray(update, dtype=bool), (N,))
            clipped = np.zeros(N, dtype=bool) if clipped is None else np.broadcast_to(np.asarray(clipped, bool), (N,))
        proposed, rcounts, usage = self._repair(proposed, update)
        changed = self._differs(self.plans, proposed, update)
        mig = self._migrate(self.plans, proposed, changed)
        self.plans = proposed
        # dynamics, faults, perception
        prev_up = st.server_up.copy()
        st.draw(self.rngs if active is None else [r if a else None for r, a in zip(self.rngs, active)])
        st.advance()
        gpu_cap = self._gpu_cap()
        fixed, fchanged, lost, restored, fcounts, self.usage = handle_faults(
            self.plans, c, st.server_up, gpu_cap, perc.pop, usage
        )
        fmig = None
        if np.count_nonzero(fchanged):
            fmig = self._migrate(self.plans, fixed, fchanged)
            self.plans = fixed
        hello_bits = perc.observe(st, st.extra, st.server_up & ~prev_up).copy()
        # serve, disrupt, record, score
        measured = self._serve()
        mig_s = mig["time_s"] + (fmig["time_s"] if fmig is not None else 0.0)
        rec = StepRecord(
            measured=measured,
            served=self.disruption(measured, mig_s),
            migration=mig,
            restore_migration=fmig,
            migration_time_s=mig_s,
            update=update,
            changed=changed,
            repair_counts=rcounts,
            invalid_edits=invalid,
            clipped=clipped,
            hello_bits=hello_bits,
            replicas_lost=lost,
            restored_experts=restored,
            fault_counts=fcounts,
            servers_up=st.server_up.sum(1),
            epoch=st.epoch.copy(),
            truncated=st.epoch >= self.max_epochs,
        )
        self.scorer.score(rec)
        self.last_record = rec
        return rec.reward, rec.terminated, rec.truncated, rec

    def check_plans(self, proposed: PlanBatch) -> None:
        """PlanError (one line) unless `proposed` holds N plans shaped for this cluster."""
        N, P, ler = self.N, self.cluster.num_pairs, self.plans.dev.shape[1:]
        got = dict(
            device=proposed.dev.shape,
            tier=proposed.tier.shape,
            bits=proposed.bits.shape,
            prune=proposed.prune.shape,
            fuse=proposed.fuse.shape,
        )
        want = dict(device=ler, tier=ler, bits=ler, prune=(P,), fuse=(P,))
        if any(g[:1] != (N,) for g in got.values()):
            raise PlanError(f"plan: {proposed.dev.shape[:1] or 0} plans given; expected one per env ({N},)")
        bad = [f"{k} {g[1:]}" for k, g in got.items() if g[1:] != want[k]]
        if bad:
            raise PlanError(
                f"plan: {', '.join(bad)} given; expected device/tier/bits {ler} and prune/fuse ({P},) "
                f"for scenario '{self.scenario.name}'"
            )

    def observe(self) -> dict[str, np.ndarray]:
        return self.obs_encoder.encode(self)

    # ---- pieces -------------------------------------------------------------------------------------
    def _repair(self, proposed: PlanBatch, update: np.ndarray) -> tuple[PlanBatch, np.ndarray, tuple]:
        """`repair` of the committed proposals (rows `update`); the other envs keep their (valid) plans. Returns
        (plans, repair counts [N, kinds], their memory usage)."""
        c, st, pop, gpu_cap = self.cluster, self.states, self.perception.pop, self._gpu_cap()
        if np.count_nonzero(update) == self.N:
            return repair(proposed, c, gpu_cap, st.server_up, pop, self.plans)
        rcounts = np.zeros((self.N, len(REPAIR_KINDS)), dtype=np.int64)
        idx = np.flatnonzero(update)
        if not idx.size:
            return self.plans, rcounts, self.usage
        sub, sub_counts, sub_usage = repair(
            proposed.take(idx), c, gpu_cap[idx], st.server_up[idx], pop[idx], self.plans.take(idx)
        )
        merged = self.plans.copy()
        merged.put(idx, sub)
        rcounts[idx] = sub_counts
        usage = tuple(u.copy() for u in self.usage)
        for u, su in zip(usage, sub_usage):
            u[idx] = su
        return merged, rcounts, usage

    def _gpu_cap(self) -> np.ndarray:
        """[N, D] GPU expert capacity at the states' free memory (read-only; kept while the states' version is)."""
        st = self.states
        if self._cap_version != st.version:
            self._cap = self.cluster.gpu_expert_capacity_at(st.memory_avail)
            self._cap.flags.writeable = False
            self._cap_version = st.version
        return self._cap

    @staticmethod
    def _differs(a: PlanBatch, b: PlanBatch, rows: np.ndarray) -> np.ndarray:
        out = np.zeros(len(a), dtype=bool)
        if np.count_nonzero(rows):
            differs_kernel(*flat(a.dev, a.tier, a.bits, b.dev, b.tier, b.bits), np.ascontiguousarray(rows), out)
        return out

    def _migrate(self, old: PlanBatch, new: PlanBatch, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Migration cost per env (zeros where rows is False): MIGRATION_FIELDS [N] and link_bytes [N, K]."""
        if not np.count_nonzero(rows):
            return MigrationBatch.zeros(self.N, self.cluster.num_links).fields
        return self.backend.migrate_batch(old, new, self.states, rows).fields

    def _serve(self) -> dict[str, np.ndarray]:
        return self.backend.serve_batch(self.plans, self.states, self.window).fields

    # ---- info ---------------------------------------------------------------------------------------
    def env_info(self, i: int) -> dict:
        """Env i's public info from the last step (plain Python values; record.env_info)."""
        if self.last_record is None:
            raise RuntimeError("env_info: no step yet")
        return env_info(self.last_record, i)
