"""W8A16 weight-only matmul: int8 weights with one float scale per output channel.

Format: `weight` int8 [N, K] (symmetric, values in [-127, 127]) and `scales` [N]; the float weight is
`weight * scales[:, None]`. Because the scale is per output channel it factors out of the matmul:
y = (x @ weight.T) * scales. Two paths live here; the Triton GPU kernel is in `kernels/triton_int8.py` and
`kernels/dispatch.py` picks one.
"""

from __future__ import annotations

import torch

# torch's fused CPU kernel reads K in whole vectors (see `cpu_int8pack_supported`); `Int8WeightOnlyLinear` pads to it.
INT8_CPU_K_MULTIPLE = 16


def dequantize_int8(weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 [N, K] and scales [N] -> float [N, K]."""
    return (weight.to(torch.float32) * scales.to(torch.float32)[:, None]).to(dtype)


def int8_matmul_ref(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The obvious version: dequantize to float32, matmul in float32, round once to x's dtype. x [M, K] -> [M, N]."""
    return (x.to(torch.float32) @ dequantize_int8(weight, scales).T).to(x.dtype)


def cpu_int8pack_supported(in_features: int) -> bool:
    """Shapes torch's fused CPU int8 kernel handles; others take the reference path."""
    # It reads K in whole vectors and crashes (segfault) on a remainder: vectors of 8 in its AVX2 bfloat16 build, of
    # 16 for every dtype in its AVX-512 build, so K must be a multiple of 16.
    return in_features % INT8_CPU_K_MULTIPLE == 0


def int8_matmul_cpu(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """torch's fused CPU kernel: reads int8 weights directly, no float copy of the weight. x [M, K] -> [M, N]."""
    # The fused op wants the scales in the activation dtype.
    return torch.ops.aten._weight_int8pack_mm(x, weight, scales.to(x.dtype))
