"""Triton W4A16 kernel: x [M, K] times group-wise int4 weights in the canonical layout of `kernels/int4.py`.

The group dequantization `(q - 8) * scale + zero` happens in the inner loop on a tile already in registers, so the
weight crosses memory as half a byte per element and no float copy of it is ever written. Each K tile lies inside
one quantization group (BLOCK_K divides the group size), so one scale and one zero per output row serve the tile.
Even and odd input columns sit in the low and high nibbles of a byte; rather than interleaving them back, the
kernel splits x the same way and accumulates two dot products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int4_matmul_kernel(
    x_ptr, w_ptr, sz_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_szg, stride_szn, stride_om, stride_on,
    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_pair = tl.arange(0, BLOCK_K // 2)  # byte columns of the tile
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_even = k_start + 2 * offs_pair
        x_rows = x_ptr + offs_m[:, None] * stride_xm
        x_even = tl.load(x_rows + k_even[None, :] * stride_xk, mask=mask_m[:, None], other=0.0)  # [BM, BK/2]
        x_odd = tl.load(x_rows + (k_even + 1)[None, :] * stride_xk, mask=mask_m[:, None], other=0.0)  # [BM, BK/2]
        packed = tl.load(
            w_ptr + offs_n[None, :] * stride_wn + (k_start // 2 + offs_pair)[:, None] * stride_wk,
            mask=mask_n[None, :], other=0,
        )  # [BK/2, BN] uint8
        group = k_start // GROUP_SIZE
        sz_row = sz_ptr + group * stride_szg + offs_n * stride_szn
        scale = tl.load(sz_row, mask=mask_n, other=0.0).to(tl.float32)[None, :]  # [1, BN]
        zero = tl.load(sz_row + 1, mask=mask_n, other=0.0).to(tl.float32)[None, :]  # [1, BN]
        w_even = ((packed & 0xF).to(tl.float32) - 8.0) * scale + zero  # [BK/2, BN]
        w_odd = ((packed >> 4).to(tl.float32) - 8.0) * scale + zero  # [BK/2, BN]
        acc += tl.dot(x_even, w_even.to(x_even.dtype))
        acc += tl.dot(x_odd, w_odd.to(x_odd.dtype))
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


def int4_matmul_triton(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                       group_size: int) -> torch.Tensor:
    """x [M, K] @ dequantized(packed [N, K/2], scales_and_zeros [K/G, N, 2]).T -> [M, N] in x's dtype."""
    rows, in_features = x.shape
    out_features = packed.shape[0]
    if scales_and_zeros.stride(2) != 1:
        scales_and_zeros = scales_and_zeros.contiguous()
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    block_m = 16 if rows <= 16 else 64
    block_n = 64
    block_k = min(group_size, 64)  # divides every supported group size (32, 64, 128)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, block_n))
    _int4_matmul_kernel[grid](
        x, packed, scales_and_zeros, out,
        rows, out_features, in_features,
        x.stride(0), x.stride(1), packed.stride(0), packed.stride(1),
        scales_and_zeros.stride(0), scales_and_zeros.stride(1), out.stride(0), out.stride(1),
        GROUP_SIZE=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out
