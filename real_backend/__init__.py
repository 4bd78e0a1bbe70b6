"""The real MoE backend: a PyTorch MoE model over one process per edge server, behind the Backend protocol.

Importing this package registers it with the environment: `gymnasium.make("CoEL-v0", backend="real")`.
"""

from coel_env.backend.registry import register_backend
from real_backend.backend import RealBackend, ServerError, make_real_backend
from real_backend.model import MoEConfig, MoETransformer

register_backend("real", make_real_backend)

__all__ = ["MoEConfig", "MoETransformer", "RealBackend", "ServerError", "make_real_backend"]
