"""Inference-only CPU twins of the quantized linears, their weights reordered once into the blocked layouts of
`kernels/csrc/int8_blocked.c` and `kernels/csrc/int4_blocked.c` and held once (the stored layout is dropped).

Where the CPU has AVX512_VNNI, those kernels stream quantized weights about as fast as the blocked bfloat16 kernel
streams its own, where the row-major int8 kernel and the int4 kernel on torch's tiles reached two thirds to three
quarters of it (`multimodal bench quant --threads 1`, README). `block_for_cpu` swaps them in; the engine does it for
every single-process CPU model it loads, `glm.generate.pack_for_cpu` for the benchmarks. The twins cannot be saved:
save the model before, or load it again.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import cpu_gemv
from kernels.int4 import DEQUANTIZED_MIN_ROWS


def _bias(linear: nn.Module) -> nn.Parameter | None:
    return None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)


class BlockedInt8Linear(nn.Module):
    """The int8 weight [N, K] and scales of an `Int8WeightOnlyLinear` in blocks of 16 output rows, for any number of
    rows. Activations are rounded per row to int16 as on the module's own decode path (`kernels/csrc/gemv.c`), so
    results differ from it only by the float rounding of the sums."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()[:, : linear.in_features]  # without the fused kernel's zero columns
        self.blocked = cpu_gemv.block_int8(weight)  # [N / 16, K2 / 2, 16, 2]
        self.scales = linear.scales.detach().to(torch.float32).contiguous()  # [N]
        self.bias = _bias(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # [M, K]
        out = cpu_gemv.int8_blocked_gemv(rows, self.blocked, self.scales, self.out_features).to(x.dtype)  # [M, N]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class BlockedInt4Linear(nn.Module):
    """The int4 weight of an `Int4WeightOnlyLinear` (groups of a multiple of 8 columns) in blocks of 16 output rows
    with their scales and zeros. Up to `DEQUANTIZED_MIN_ROWS` rows run the kernel (activations rounded to int8 per
    group, as the tiled kernel of `kernels/csrc/gemv.c` rounds them); longer prefills dequantize the weight to
    bfloat16 for the call and run one bfloat16 matmul, as `kernels.int4.int4_matmul_dequantized` does."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size = linear.group_size
        canonical = linear.state_dict()  # uint8 [N, K / 2] and [K / G, N, 2] whatever the layout held
        self.blocked = cpu_gemv.block_int4(canonical["weight"], canonical["scales_and_zeros"], self.group_size)
        self.bias = _bias(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # [M, K]
        if rows.shape[0] < DEQUANTIZED_MIN_ROWS:
            out = cpu_gemv.int4_blocked_gemv(rows, self.blocked, self.out_features, self.group_size)  # [M, N]
        else:
            weight = cpu_gemv.dequantize_int4_blocked(self.blocked, self.out_features, self.group_size)  # [N, K]
            out = rows.to(torch.bfloat16) @ weight.T
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def block_for_cpu(model: nn.Module) -> nn.Module:
    """Where the CPU has AVX512_VNNI, swap every CPU `Int8WeightOnlyLinear` and `Int4WeightOnlyLinear` (groups of a
    multiple of 8) on the "auto" backend for its blocked twin, in place; elsewhere leave the model as it is."""
    from multimodal.quantize import Int4WeightOnlyLinear, Int8WeightOnlyLinear

    if not cpu_gemv.vnni_blocks_available():
        return model
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if getattr(child, "backend", None) != "auto" or not child.weight.is_cpu:
                continue
            if type(child) is Int8WeightOnlyLinear:
                setattr(module, name, BlockedInt8Linear(child))
            elif type(child) is Int4WeightOnlyLinear and child.group_size % 8 == 0:
                setattr(module, name, BlockedInt4Linear(child))
    return model
