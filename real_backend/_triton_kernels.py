"""Fused int4 dequantize-and-matmul for CUDA (Triton). Imported only when Triton and a GPU are present."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int4_mm_kernel(x_ptr, p_ptr, s_ptr, y_ptr, M, N, K, G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rh = tl.arange(0, G // 2)
    rk = tl.arange(0, G)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    ngroups = K // G
    for g in range(0, ngroups):
        x = tl.load(x_ptr + rm[:, None] * K + g * G + rk[None, :], mask=rm[:, None] < M, other=0.0)
        p = tl.load(p_ptr + rn[:, None] * (K // 2) + g * (G // 2) + rh[None, :], mask=rn[:, None] < N, other=0)
        lo = (p & 0x0F).to(tl.int8) - 8
        hi = (p >> 4).to(tl.int8) - 8
        w = tl.reshape(tl.join(lo, hi), (BN, G)).to(tl.float32)
        s = tl.load(s_ptr + rn * ngroups + g, mask=rn < N, other=0.0).to(tl.float32)
        w = (w * s[:, None]).to(x.dtype)
        acc += tl.dot(x, tl.trans(w))
    tl.store(
        y_ptr + rm[:, None] * N + rn[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rn[None, :] < N),
    )


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, k: int, group: int) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, k).contiguous()
    M, N = x2.shape[0], packed.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    BM, BN = 16, 64
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _int4_mm_kernel[grid](x2, packed, scale, y, M, N, k, G=group, BM=BM, BN=BN)
    return y.reshape(*shape[:-1], N)
