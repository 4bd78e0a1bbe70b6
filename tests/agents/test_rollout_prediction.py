"""The prediction next to a measured episode (agents.rollout `predicted_step`) holds the same terms as the
measurement: the surrogate predicting an episode that the surrogate itself runs must agree with it exactly, step
for step, migration disruption included (before, the prediction left the migration out)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import coel_env  # noqa: F401  (registers CoEL-v0)
from agents.baselines import make_policy
from agents.rollout import run_episode
from coel_env.backend.surrogate import SurrogateBackend


@pytest.mark.parametrize("policy", ["coel", "eplb"])
def test_a_surrogate_predicting_the_surrogate_agrees_step_for_step(policy):
    env = gym.make("CoEL-v0", scenario="paper-testbed", max_epochs=3)
    ep = run_episode(env, make_policy(policy), seed=4, predictor=SurrogateBackend(env.unwrapped.cluster))
    assert ep["migration_s"] > 0 and ep["migration_bytes"] > 0  # the episode migrated: the disruption applies
    keys = ("e2e_p95_s", "tokens_per_s", "energy_j", "quality_loss", "score_raw", "migration_s", "window_e2e_p95_s")
    for key in keys:
        np.testing.assert_allclose(ep[f"pred_{key}"], ep[key], rtol=1e-9, err_msg=key)
    np.testing.assert_allclose(ep["pred_slo_attainment"], ep["slo_attainment"], rtol=1e-9)
    assert ep["e2e_p95_s"] > ep["window_e2e_p95_s"]  # the migration's wait is in the step, not in the window
