"""The CoEL-v0 Gymnasium environment: spaces, perception, rewards, faults, rendering and a batched vector env."""

from coel_env.backend.registry import BACKENDS, make_backend, register_backend
from coel_env.env.actions import ACTION_SPACES, EDIT_OPS, make_action_codec
from coel_env.env.env import CoELEnv
from coel_env.env.perception import MODES as PERCEPTION_MODES
from coel_env.env.rewards import REWARD_SPACES
from coel_env.plan.repair import REPAIR_KINDS

__all__ = [
    "ACTION_SPACES",
    "BACKENDS",
    "EDIT_OPS",
    "PERCEPTION_MODES",
    "REPAIR_KINDS",
    "REWARD_SPACES",
    "CoELEnv",
    "make_action_codec",
    "make_backend",
    "register_backend",
]
