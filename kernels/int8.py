"""W8A16 weight-only matmul: int8 weights with one float scale per output channel.

Format: `weight` int8 [N, K] (symmetric, values in [-127, 127]) and `scales` [N]; the float weight is
`weight * scales[:, None]`. Because the scale is per output channel it factors out of the matmul:
y = (x @ weight.T) * scales. Three paths live here; the Triton GPU kernel is in `kernels/triton_int8.py` and
`kernels/dispatch.py` picks one.

The planes path multiplies in integers (torch's `_int_mm`, int8 x int8 -> int32, VNNI where the CPU has it). Each
activation row is written as two int8 planes under one float scale, x = scale * (high + low / PLANE_STEP): the high
plane is the row rounded to 127 levels of its largest magnitude, the low plane the rounding remainder at 1/254 of
that step. The error is at most max|x_row| / (127 * 2 * 254) per element, about 1.6e-5 of the row's largest value:
below bfloat16's rounding of that value (2^-9), so the result is as exact as the fused kernel's bfloat16 one. It
pays from 8 rows up (batched decode): 1.2-1.3x the fused kernel's tokens/s in `multimodal bench quant --batch-size 8`.
Fewer rows take the decode kernel (`kernels/cpu_gemv.py`), which reads each weight once where the two planes would
read it twice. From DEQUANTIZED_MIN_ROWS rows (long prefills, the embedded models' batched prompts) the dequantized
path converts the weight to the activations' dtype once per call (exact: an int8 fits bfloat16's significand) and
runs the float matmul, the scales applied to its output: its conversion pass costs 1/M of the matmul, while the planes
split and rescale every activation.
"""

from __future__ import annotations

import torch

# torch's fused CPU kernel reads K in whole vectors (see `cpu_int8pack_supported`); `Int8WeightOnlyLinear` pads to it.
INT8_CPU_K_MULTIPLE = 16
PLANE_STEP = 254  # the low plane counts in 1/254 of the high plane's unit: its remainder in [-0.5, 0.5] -> [-127, 127]
PLANES_MIN_ROWS = 8  # from here on the planes path beats the fused kernel (`multimodal bench quant --batch-size`)
DEQUANTIZED_MIN_ROWS = 128  # from here on the dequantized path beats the planes (`multimodal bench quant --prompt-len`)


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


def int8_matmul_dequantized(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The weight as x's dtype, one float matmul, the per-channel scales applied where they cost less: to the weight
    when it has fewer elements than the output (K <= M), else to the output. x [M, K] -> [M, N]."""
    if weight.shape[1] <= x.shape[0]:
        return torch.nn.functional.linear(x, weight.to(x.dtype) * scales.to(x.dtype)[:, None])
    return torch.nn.functional.linear(x, weight.to(x.dtype)) * scales.to(x.dtype)


def activation_planes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (planes int8 [2M, K]: the high planes of every row, then the low ones; scale [M, 1] float32)
    with x = scale * (high + low / PLANE_STEP) up to max|x_row| / (254 * PLANE_STEP)."""
    x = x.float()
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / 127  # [M, 1]
    scaled = x / scale  # [M, K] in [-127, 127]
    high = scaled.round()
    low = ((scaled - high) * PLANE_STEP).round()
    return torch.cat([high, low]).to(torch.int8), scale


def int8_matmul_planes(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The integer path: both activation planes in one int8 x int8 -> int32 matmul, then the scales. x [M, K] ->
    [M, N] in x's dtype."""
    planes, row_scale = activation_planes(x)
    products = torch._int_mm(planes, weight.T).float()  # [2M, N], exact
    high, low = products.chunk(2)  # [M, N] each
    return ((high + low / PLANE_STEP) * row_scale * scales.float()).to(x.dtype)
