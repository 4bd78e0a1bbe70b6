"""The knobs agent's residual control: a zero action reproduces its centre policy (CoEL's defaults, or tuned CoEL's
knobs for `coel_tuned`), +-1 reaches the clipped range ends, the tuned centre travels with an exported policy."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest

import coel_env  # noqa: F401  (registers CoEL-v0)
from agents.baselines.tuning import SPACES, bounds, tuned_policy
from agents.knobs import HALF_WIDTHS, KNOB_BASES, KnobbedPolicy, KnobsWrapper, knob_spec, knob_values, resolve_knobs
from coel_env.errors import ConfigError

# tuned CoEL's knobs of a paper-testbed tuning (12 trials: fill and prune far from the defaults, fuse off), with a
# lower drift threshold: on `tiny` it re-deploys every other epoch, so both update paths run
CENTRE = {
    "drift_threshold": 0.02,
    "ema": 0.2893,
    "locality": 0.5157,
    "balance": 1.2617,
    "compress_below_gbps": 3.6371,
    "prune_ratio": 0.5132,
    "fuse": False,
    "fill": 0.551,
}
TUNED = {"base": "coel_tuned", "centre": CENTRE}


def _plan_arrays(plan) -> dict[str, np.ndarray]:
    return {k: np.array(getattr(plan, k)) for k in ("device", "valid", "tier", "bits", "prune", "fuse")}


def test_zero_action_reproduces_coel_tuned_over_an_episode():
    """Same plans, update decisions and metrics, epoch by epoch, as tuned CoEL run by the leaderboard's rollout."""
    kw = {"scenario": "tiny", "max_epochs": 10}
    ref_env, env = gym.make("CoEL-v0", **kw), KnobsWrapper(gym.make("CoEL-v0", **kw), TUNED)
    ref_core, core = ref_env.unwrapped, env.unwrapped
    policy = tuned_policy("coel", CENTRE, seed=3)
    ref_env.reset(seed=3)
    policy.reset(ref_core.cluster, seed=3, scenario=ref_core.scenario)
    env.reset(seed=3)
    zero = np.zeros(env.action_space.shape, dtype=np.float32)
    updates = []
    for step in range(10):
        d = policy.decide(ref_core.perceived_state(), ref_core.cluster, ref_core.plan if step else None)
        updates.append(d.update)
        *_, ref_info = ref_core.step_plan(d.plan, update=d.update)
        *_, info = env.step(zero)
        for k, v in _plan_arrays(ref_core.plan).items():
            np.testing.assert_array_equal(_plan_arrays(core.plan)[k], v, err_msg=f"epoch {step}: plan.{k}")
        assert info["metrics"] == ref_info["metrics"], f"epoch {step}"
        assert info["migration"]["bytes_total"] == ref_info["migration"]["bytes_total"]
    assert 1 < sum(updates) < len(updates)  # re-deployed and kept
    assert env.knobbed.base.fuse is False and env.knobbed.base.ema == CENTRE["ema"]  # fixed at the tuned values


@pytest.mark.parametrize("knobs", ["coel", TUNED])
def test_plus_minus_one_hit_the_clipped_range_ends(knobs):
    spec = knob_spec(knobs)
    assert list(spec.ranges) == list(HALF_WIDTHS["coel"])
    for k, (lo, hi) in spec.ranges.items():
        c, half = spec.centre[k], HALF_WIDTHS["coel"][k]
        assert (lo, hi) == (max(bounds("coel", k)[0], c - half), min(bounds("coel", k)[1], c + half))
    n = spec.num_knobs
    assert knob_values(spec, np.full(n, -1.0)) == {k: lo for k, (lo, _) in spec.ranges.items()}
    assert knob_values(spec, np.full(n, 1.0)) == {k: hi for k, (_, hi) in spec.ranges.items()}
    assert knob_values(spec, np.full(n, 7.0)) == knob_values(spec, np.full(n, 1.0))  # clipped
    assert knob_values(spec, np.zeros(n)) == {k: spec.centre[k] for k in spec.ranges}


def test_a_range_clipped_on_one_side_keeps_zero_at_the_centre():
    spec = knob_spec({**TUNED, "centre": {**CENTRE, "drift_threshold": 0.01, "fill": 0.995}})
    assert spec.ranges["drift_threshold"] == pytest.approx((SPACES["coel"]["drift_threshold"][1], 0.06))  # below
    assert spec.ranges["fill"] == pytest.approx((0.975, 1.0))  # clipped above
    i = list(spec.ranges).index("drift_threshold")
    half = np.zeros(spec.num_knobs)
    half[i] = -0.5
    assert knob_values(spec, half)["drift_threshold"] == pytest.approx(0.01 - 0.5 * (0.01 - 0.005))


def test_zero_action_of_coel_is_its_defaults():
    knobbed = KnobbedPolicy("coel")
    assert knob_values(knobbed.spec, np.zeros(knobbed.num_knobs)) == {
        k: getattr(knobbed.base, k) for k in HALF_WIDTHS["coel"]
    }


@pytest.mark.parametrize(
    "knobs, message",
    [
        ("coel_tunned", "knobs: 'coel_tunned' has no knobs; allowed: " + ", ".join(KNOB_BASES)),
        ({"base": "eplb"}, "knobs.base: 'eplb' has no knobs; allowed: "),
        ("coel_tuned", "knobs: 'coel_tuned' needs its tuned centre"),
        ({**TUNED, "centre": {**CENTRE, "fill": 2.0}}, "knobs.centre.fill: 2.0 must be a number in [0.5, 1.0]"),
        ({**TUNED, "centre": {**CENTRE, "fuse": 1}}, "knobs.centre.fuse: 1 must be true or false"),
        ({**TUNED, "centre": {"fill": 0.9}}, "knobs.centre: must map exactly the knobs"),
        ({**TUNED, "centre": [1, 2]}, "knobs.centre: must map exactly the knobs"),
    ],
)
def test_bad_knobs_are_one_line_config_errors(knobs, message):
    with pytest.raises(ConfigError) as err:
        KnobbedPolicy(knobs)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_cached_tuning_is_reused_without_tuning():
    table = {"tiny": {"coel": {"params": CENTRE, "value": 0.5, "default_value": 0.4, "trials": 12}}}
    knobs, out = resolve_knobs("coel_tuned", {"scenario": "tiny"}, {"trials": 0}, table)  # trials 0: tune() refuses
    assert knobs["base"] == "coel_tuned" and knobs["centre"] == CENTRE and out == table
    assert knobs["tuning"]["scenario"] == "tiny" and knobs["tuning"]["value"] == 0.5
    assert resolve_knobs("coel", {"scenario": "tiny"}, {}) == ("coel", {})
    bad = {"tiny": {"coel": {"params": {**CENTRE, "ema": 5.0}}}}
    with pytest.raises(ConfigError, match=r"^knobs.centre.ema: 5.0 must be"):
        resolve_knobs("coel_tuned", {"scenario": "tiny"}, {}, bad)


def test_export_load_round_trip_keeps_the_tuned_centre(tmp_path):
    """policy.json carries the centre (plain JSON, integrity-checked); the deployed agent steers the same policy."""
    from stable_baselines3 import PPO

    from agents.deployed import DeployedAgent
    from agents.envs import make_flat_env
    from agents.export import export_policy

    kwargs = {"scenario": "tiny", "max_epochs": 4}
    env = make_flat_env(kwargs, TUNED, ("plan",))
    model = PPO("MlpPolicy", env, n_steps=16, batch_size=16, n_epochs=1, seed=0, device="cpu")
    spec = {
        "id": "CoEL-v0",
        "kwargs": kwargs,
        "knobs": TUNED,
        "obs_keys": [k for k in env.unwrapped.observation_space.spaces if k != "plan"],
    }
    export_policy(model, tmp_path / "policy", env_spec=spec)
    assert json.loads((tmp_path / "policy" / "policy.json").read_text())["env"]["knobs"] == TUNED
    agent = DeployedAgent(tmp_path / "policy")
    assert agent.knobbed.spec == knob_spec(TUNED)
    assert agent.knobbed.base.fill == CENTRE["fill"] and agent.knobbed.base.fuse is False
