"""One place that picks the matmul path for quantized weights, by device and shape, with an override for tests.

Backends:
- "reference": dequantize to float32 and matmul (any device, any shape; slow, the ground truth).
- "cpu": torch's fused CPU kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`).
- "gemv" (int8 only): the decode kernel of `kernels/cpu_gemv.py` for a few rows (built on first use; int8 weights
  times int16-rounded activations, in integers where the CPU has AVX2).
- "planes" (int8 only): integer matmuls on two int8 planes of the activations (`kernels.int8.int8_matmul_planes`).
- "dequantized": int4, the CPU-tiled weight dequantized to bfloat16 per call, then a bfloat16 matmul
  (`kernels.int4.int4_matmul_dequantized`); int8, the weight converted to x's dtype, a float matmul, then the scales
  (`kernels.int8.int8_matmul_dequantized`).
- "triton": the Triton W8A16 / W4A16 kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
- "auto": Triton on CUDA when Triton is installed. On the CPU, for int8: the gemv kernel up to GEMV_MAX_ROWS rows
  (where it builds; any K), the dequantized path from its DEQUANTIZED_MIN_ROWS rows (and from PLANES_MIN_ROWS for
  a weight of at most INT8_SMALL_WEIGHT elements), the planes path from PLANES_MIN_ROWS rows below that, the fused
  kernel between; for int4 (where the shape allows the tile layout): the dequantized path from DEQUANTIZED_MIN_ROWS
  rows, the fused kernel below.
  Otherwise the reference. A shape a fused CPU kernel refuses (int4: N not a multiple of 16, or a tile layout it does
  not know; int8: K not a multiple of 16) silently takes the reference path, so no model crashes on an odd
  projection; it is only slower there. Forcing "cpu" on such a shape is a ValueError.

The functions take x of any leading shape [..., K] and return [..., N] in x's dtype. The fused CPU kernels compute
in bfloat16 whatever x's dtype (`_in_bf16`), as does int4's dequantized path; the planes, gemv and int8 dequantized
paths take x as it comes.
The bias is not handled here: the modules in `multimodal/quantize.py` add it after the matmul.
"""

from __future__ import annotations

import importlib.util

import torch

from kernels import cpu_gemv
from kernels.int4 import (
    DEQUANTIZED_MIN_ROWS,
    cpu_int4pack_supported,
    from_cpu_int4pack,
    int4_matmul_cpu,
    int4_matmul_dequantized,
    int4_matmul_ref,
    to_cpu_int4pack,
)
from kernels.int8 import (
    DEQUANTIZED_MIN_ROWS as INT8_DEQUANTIZED_MIN_ROWS,
)
from kernels.int8 import (
    PLANES_MIN_ROWS,
    cpu_int8pack_supported,
    int8_matmul_cpu,
    int8_matmul_dequantized,
    int8_matmul_planes,
    int8_matmul_ref,
)

BACKENDS = ("auto", "reference", "cpu", "gemv", "planes", "dequantized", "triton")
# Up to here the gemv kernel (one pass over the weights per 4 rows) beats the fused one: `multimodal bench quant
# --threads 1 --batch-size 2|4 --int8-kernel gemv|cpu` decodes 128.8 against 76.3 tok/s at 2 rows, 153.0 against
# 128.2 at 4.
GEMV_MAX_ROWS = 4
# A weight this small converts to float in cache for less than the planes cost (the embedded VLM's 192-wide layers:
# `multimodal eval vqa --quant int8` decodes batches of 32 rows).
INT8_SMALL_WEIGHT = 1 << 19  # elements: 512 KB of int8, within a 1 MB L2
CANONICAL, CPU_TILED = "canonical", "cpu_tiled"  # int4 weight layouts, see kernels/int4.py


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _in_bf16(flat: torch.Tensor, fused) -> torch.Tensor:
    """Run a fused CPU kernel on float32 activations in bfloat16: torch's kernels have no fast float32 path (10x
    slower per row at M = 1, and linear in the rows; `tests/test_kernels_any_cpu.py` checks the error stays at the
    level of the weights' own rounding)."""
    if flat.dtype != torch.float32:
        return fused(flat.contiguous())
    return fused(flat.to(torch.bfloat16).contiguous()).float()


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"Unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}.")


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """x [..., K] @ (weight int8 [N, K] * scales [N]).T -> [..., N]."""
    _check_backend(backend)
    in_features = x.shape[-1]
    if backend == "auto":
        if x.is_cuda and triton_available():
            backend = "triton"
        elif x.device.type == "cpu" and x.numel() <= GEMV_MAX_ROWS * in_features and cpu_gemv.available():
            backend = "gemv"
        elif x.device.type == "cpu" and (x.numel() >= INT8_DEQUANTIZED_MIN_ROWS * in_features or (
                x.numel() >= PLANES_MIN_ROWS * in_features and weight.numel() <= INT8_SMALL_WEIGHT)):
            backend = "dequantized"
        elif x.device.type == "cpu" and x.numel() >= PLANES_MIN_ROWS * in_features:
            backend = "planes"
        elif x.device.type == "cpu" and cpu_int8pack_supported(in_features):
            backend = "cpu"
        else:
            backend = "reference"
    if backend in ("planes", "gemv") and x.device.type != "cpu":
        raise ValueError(f"The int8 {backend} path runs on the CPU only.")
    if backend == "gemv" and not cpu_gemv.available():
        raise ValueError("The gemv path needs kernels/csrc/gemv.c built, and no C compiler could build it.")
    if backend == "cpu" and not cpu_int8pack_supported(in_features):
        raise ValueError(f"The fused CPU int8 kernel needs in_features divisible by 16; got {in_features}.")
    flat = x.reshape(-1, in_features)  # [M, K]
    if backend == "triton":
        from kernels.triton_int8 import int8_matmul_triton

        out = int8_matmul_triton(flat, weight, scales)
    elif backend == "cpu":
        out = _in_bf16(flat, lambda x: int8_matmul_cpu(x, weight, scales))
    elif backend == "planes":
        out = int8_matmul_planes(flat, weight, scales)
    elif backend == "dequantized":
        out = int8_matmul_dequantized(flat, weight, scales)
    elif backend == "gemv":
        out = cpu_gemv.int8_gemv(flat, weight, scales).to(x.dtype)
    else:
        out = int8_matmul_ref(flat, weight, scales)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def int4_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    group_size: int,
    layout: str = CANONICAL,
    backend: str = "auto",
) -> torch.Tensor:
    """x [..., K] @ dequantized(weight uint8 [N, K/2] in `layout`, scales_and_zeros [K/G, N, 2]).T -> [..., N]."""
    _check_backend(backend)
    if backend in ("planes", "gemv"):
        raise ValueError(f"The {backend} path multiplies int8 weights; int4 layers take auto, reference, cpu, "
                         "dequantized or triton.")
    out_features = weight.shape[0]
    in_features = x.shape[-1]
    if backend == "auto":
        if x.is_cuda and triton_available():
            backend = "triton"
        elif x.device.type == "cpu" and cpu_int4pack_supported(out_features, in_features, group_size):
            backend = "dequantized" if x.numel() >= DEQUANTIZED_MIN_ROWS * in_features else "cpu"
        else:
            backend = "reference"
    tiled = backend in ("cpu", "dequantized")  # the backends that read torch's CPU tile layout
    if tiled and not cpu_int4pack_supported(out_features, in_features, group_size):
        raise ValueError(
            f"The CPU int4 paths need out_features divisible by 16 and in_features by the group size; "
            f"got {out_features} x {in_features} with group size {group_size}."
        )
    # Each backend reads one layout; converting here is slow and only happens when a test forces a backend.
    if tiled and layout == CANONICAL:
        weight, layout = to_cpu_int4pack(weight), CPU_TILED
    elif not tiled and layout == CPU_TILED:
        weight, layout = from_cpu_int4pack(weight), CANONICAL
    flat = x.reshape(-1, in_features)  # [M, K]
    if backend == "triton":
        from kernels.triton_int4 import int4_matmul_triton

        out = int4_matmul_triton(flat, weight, scales_and_zeros, group_size)
    elif backend == "cpu":
        out = _in_bf16(flat, lambda x: int4_matmul_cpu(x, weight, scales_and_zeros, group_size))
    elif backend == "dequantized":
        out = int4_matmul_dequantized(flat, weight, scales_and_zeros, group_size)
    else:
        out = int4_matmul_ref(flat, weight, scales_and_zeros, group_size)
    return out.reshape(*x.shape[:-1], out_features)
