"""Per-expert weight quantization, stored packed: int8 per output channel, int4 group-wise (two values a byte).

Error bounds (symmetric round-to-nearest; what tests/real_backend/test_real_quant.py checks):
  int8: |w - deq(w)| <= scale_row / 2 with scale_row = max|w_row| / 127  (relative matmul error typically < 1%)
  int4: |w - deq(w)| <= scale_group / 2 with scale_group = max|w_group| / 7  (relative matmul error typically < 12%)
Scales are stored in fp16, like the byte counts of `coel_env.specs.ModelSpec.expert_bytes`.
On CUDA, int4 matmuls can use a fused Triton dequantize-and-matmul kernel (`triton_int4_matmul`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from coel_env.errors import ConfigError
from coel_env.specs.model import INT4_GROUP_SIZE

BITS = (16, 8, 4)


@dataclass
class QTensor:
    """A 2-D weight [out, in] at 16, 8 or 4 bits. data: bf16 / int8 / uint8 packed [out, in/2]; scale fp16."""

    bits: int
    data: torch.Tensor
    scale: torch.Tensor | None
    shape: tuple[int, int]
    group: int = 0

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + (
            0 if self.scale is None else self.scale.numel() * self.scale.element_size()
        )

    def to(self, device, non_blocking: bool = False) -> QTensor:
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return QTensor(self.bits, mv(self.data), mv(self.scale), self.shape, self.group)

    def pin(self) -> QTensor:
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return QTensor(self.bits, pin(self.data), pin(self.scale), self.shape, self.group)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"data": self.data}
        if self.scale is not None:
            out["scale"] = self.scale
        return out

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.bits == 16:
            return self.data.to(dtype)
        if self.bits == 8:
            return (self.data.to(torch.float32) * self.scale.to(torch.float32)[:, None]).to(dtype)
        q = unpack_int4(self.data, self.shape[1]).to(torch.float32)
        out, inp = self.shape
        q = q.view(out, inp // self.group, self.group) * self.scale.to(torch.float32)[..., None]
        return q.view(out, inp).to(dtype)


def int4_group(in_features: int) -> int:
    """Group size: 128, or the largest power of two <= 128 dividing `in_features` (small test models)."""
    g = INT4_GROUP_SIZE
    while g > 1 and in_features % g:
        g //= 2
    return g


def quantize(w: torch.Tensor, bits: int) -> QTensor:
    """Quantize a 2-D weight [out, in] (any float dtype) to `bits` (16 keeps bf16)."""
    if bits not in BITS:
        raise ConfigError(f"bits: {bits} is not supported; allowed: {', '.join(map(str, BITS))}")
    shape = (int(w.shape[0]), int(w.shape[1]))
    if bits == 16:
        return QTensor(16, w.to(torch.bfloat16).contiguous(), None, shape)
    wf = w.to(torch.float32)
    if bits == 8:
        scale = (wf.abs().amax(1) / 127.0).clamp_min(1e-8).half()
        q = torch.round(wf / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return QTensor(8, q.contiguous(), scale, shape)
    if shape[1] % 2:
        raise ConfigError(f"int4: in_features must be even, got {shape[1]}")
    g = int4_group(shape[1])
    wg = wf.view(shape[0], shape[1] // g, g)
    scale = (wg.abs().amax(-1) / 7.0).clamp_min(1e-8).half()
    q = torch.round(wg / scale.float()[..., None]).clamp(-8, 7).to(torch.int8).view(shape)
    return QTensor(4, pack_int4(q), scale, shape, g)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7] [out, in] -> uint8 [out, in/2] (low nibble: even column)."""
    u = (q + 8).to(torch.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4(p: torch.Tensor, in_features: int) -> torch.Tensor:
    lo = (p & 0x0F).to(torch.int8) - 8
    hi = (p >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], -1).view(p.shape[0], in_features)


def requantize(t: QTensor, bits: int) -> QTensor:
    """Lower a tensor's precision (raising it cannot restore what was lost: that needs a fresh copy)."""
    if bits > t.bits:
        raise ConfigError(f"requantize: cannot raise {t.bits}-bit to {bits}-bit locally; copy from a peer or the cloud")
    return t if bits == t.bits else quantize(t.dequantize(torch.float32), bits)


def qlinear(x: torch.Tensor, w: QTensor) -> torch.Tensor:
    """x @ deq(w).T in x's dtype (dequantize then matmul; the Triton kernel for int4 on CUDA when available)."""
    if w.bits == 4 and x.is_cuda and _triton_ok():
        return triton_int4_matmul(x, w)
    return F.linear(x, w.dequantize(x.dtype) if w.bits != 16 else w.data.to(x.dtype))


def quality(logits: torch.Tensor, ref_logits: torch.Tensor) -> tuple[float, float]:
    """(mean KL(ref || q) in nats, top-1 agreement) over rows of two logit matrices [N, V]."""
    lp, lr = logits.float().log_softmax(-1), ref_logits.float().log_softmax(-1)
    kl = (lr.exp() * (lr - lp)).sum(-1).mean().item()
    agree = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    return kl, agree


# ---- optional fused Triton kernel (CUDA only) -----------------------------------------------------------
_TRITON: bool | None = None


def _triton_ok() -> bool:
    global _TRITON
    if _TRITON is None:
        try:
            import triton  # noqa: F401

            _TRITON = torch.cuda.is_available() and _triton_selfcheck()
        except Exception:  # no Triton, or a kernel that does not compile here: use dequantize + matmul
            _TRITON = False
    return _TRITON


def _triton_selfcheck() -> bool:
    g = torch.Generator(device="cuda").manual_seed(0)
    w = quantize(torch.randn(96, 256, device="cuda", generator=g), 4)
    x = torch.randn(5, 256, device="cuda", generator=g, dtype=torch.bfloat16)
    ref = F.linear(x.float(), w.dequantize(torch.float32))
    return bool(torch.allclose(triton_int4_matmul(x, w).float(), ref, atol=0.1, rtol=0.05))


def triton_int4_matmul(x: torch.Tensor, w: QTensor) -> torch.Tensor:
    """y[M, N] = x[M, K] @ deq(w)[N, K].T with int4 group-wise weights dequantized in registers."""
    from real_backend._triton_kernels import int4_matmul

    return int4_matmul(x, w.data, w.scale, w.shape[1], w.group)
