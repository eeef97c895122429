"""Triton W8A16 kernel: x [M, K] (fp16/bf16/fp32) times int8 weights [N, K] with per-output-channel scales.

The int8 tile is converted to the activation dtype right after it is loaded, so the weight crosses memory as one
byte per element; the per-channel scale is applied once to the accumulator. Importing this module imports Triton;
`kernels/dispatch.py` does so only when a CUDA tensor arrives (or when a test runs Triton's interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int8_matmul_kernel(
    x_ptr, w_ptr, scales_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k = k_start + offs_k
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
            mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        w = tl.load(
            w_ptr + offs_n[None, :] * stride_wn + k[:, None] * stride_wk,
            mask=(offs_n[None, :] < N) & (k[:, None] < K), other=0,
        )  # [BLOCK_K, BLOCK_N] int8
        acc += tl.dot(x, w.to(x.dtype))
    scales = tl.load(scales_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)  # [BLOCK_N]
    acc = acc * scales[None, :]
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
    )


def int8_matmul_triton(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (weight [N, K] int8 * scales [N]).T -> [M, N] in x's dtype."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    # Decode (M of a few tokens) wants narrow M tiles; tl.dot needs every tile side to be at least 16.
    block_m = 16 if rows <= 16 else 64
    block_n, block_k = 64, 64
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, block_n))
    _int8_matmul_kernel[grid](
        x, weight, scales, out,
        rows, out_features, in_features,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out
