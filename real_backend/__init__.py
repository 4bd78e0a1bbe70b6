"""The real MoE backend: a PyTorch MoE model over one process per edge server, behind the Backend protocol."""

from real_backend.backend import RealBackend, ServerError, make_real_backend
from real_backend.model import MoEConfig, MoETransformer

__all__ = ["MoEConfig", "MoETransformer", "RealBackend", "ServerError", "make_real_backend"]
