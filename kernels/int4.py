"""W4A16 weight-only matmul: 4-bit weights, group-wise asymmetric scales and zeros along the input dimension.

Canonical (checkpoint) format, independent of the device:
- `weight` uint8 [N, K / 2]: two 4-bit values q in [0, 15] per byte; column 2j in the low nibble, 2j+1 in the high.
- `scales_and_zeros` float [K / G, N, 2]: for the group g = k // G of output row n, the float weight is
  `(q - 8) * scale + zero` (the zero point lives in the float domain, as in torch's tinygemm kernels).

torch's fused CPU kernel wants its own tiled nibble order; `to_cpu_int4pack` converts at load time and
`from_cpu_int4pack` converts back when a CPU-resident model is saved. The Triton kernel (`kernels/triton_int4.py`)
reads the canonical format directly.

From DEQUANTIZED_MIN_ROWS rows on (prefill), the CPU instead dequantizes the layer to bfloat16 straight from that
tile layout, each tile already transposed as a matmul wants it, and runs one bfloat16 matmul
(`int4_matmul_dequantized`): the fused kernel's cost grows with the rows as a matmul's does, at under half of
bfloat16's speed, while dequantizing costs a few passes over the weight, once per call.
"""

from __future__ import annotations

import functools

import torch

# torch's CPU packing interleaves rows in tiles of 32 or 64; the rows after the last full tile are a multiple of 16.
CPU_ROW_MULTIPLE = 16
DEQUANTIZED_MIN_ROWS = 128  # from here on dequantizing + a bfloat16 matmul beats the fused kernel (bench quant)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """[N, K] integers in [0, 15] (K even) -> uint8 [N, K / 2], even columns in the low nibble."""
    values = values.to(torch.uint8)
    return values[:, 0::2] | (values[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 2] -> uint8 [N, K] with values in [0, 15]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def dequantize_int4(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Canonical int4 -> float [N, K]."""
    values = unpack_int4(packed).to(torch.float32)  # [N, K]
    scales = scales_and_zeros[..., 0].to(torch.float32).T.repeat_interleave(group_size, dim=1)  # [N, K]
    zeros = scales_and_zeros[..., 1].to(torch.float32).T.repeat_interleave(group_size, dim=1)  # [N, K]
    return ((values - 8) * scales + zeros).to(dtype)


def int4_matmul_ref(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """The obvious version: dequantize to float32, matmul in float32, round once to x's dtype. x [M, K] -> [M, N]."""
    return (x.to(torch.float32) @ dequantize_int4(packed, scales_and_zeros, group_size).T).to(x.dtype)


def cpu_int4pack_supported(out_features: int, in_features: int, group_size: int) -> bool:
    """Shapes torch's fused CPU int4 kernel accepts, on a machine whose tile layout `cpu_int4pack_block` recognises;
    everything else takes the reference path."""
    return out_features % CPU_ROW_MULTIPLE == 0 and in_features % group_size == 0 and cpu_int4pack_layout_known()


@functools.lru_cache(maxsize=1)
def cpu_int4pack_block() -> int | None:
    """The row tile of torch's CPU int4 layout on this machine: 64 where torch runs its AVX-512 kernels, 32 on AVX2
    (torch picks by instruction set at run time); None for a layout neither (the reference path then runs).

    Found by packing each row's index // 16: in a full tile of B rows, byte 0 holds row 0 and row B / 2."""
    rows = torch.arange(128, dtype=torch.int32)[:, None].expand(128, 8) // 16  # [128, 8], values 0..7
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(rows, 2)
    except RuntimeError:
        return None
    low, high = int(packed[0, 0]) & 15, int(packed[0, 0]) >> 4
    return {1: 32, 2: 64}.get(high) if low == 0 else None


@functools.lru_cache(maxsize=1)
def cpu_int4pack_layout_known() -> bool:
    """Check once per process, on random weights, that the conversion round-trips through `from_cpu_int4pack` and
    the fused kernel matches the reference, with full tiles and a tail of 16 rows."""
    if cpu_int4pack_block() is None:
        return False
    generator = torch.Generator().manual_seed(0)
    rows = cpu_int4pack_block() + 16
    packed = torch.randint(0, 256, (rows, 32), dtype=torch.uint8, generator=generator)  # K 64
    scales_and_zeros = torch.rand(2, rows, 2, generator=generator)  # group size 32
    x = torch.randn(3, 64, generator=generator)
    try:
        cpu_packed = to_cpu_int4pack(packed)
        fused = int4_matmul_cpu(x, cpu_packed, scales_and_zeros, 32)
    except RuntimeError:
        return False
    return torch.equal(from_cpu_int4pack(cpu_packed), packed) and torch.allclose(
        fused, int4_matmul_ref(x, packed, scales_and_zeros, 32), rtol=1e-3, atol=1e-3)


def to_cpu_int4pack(packed: torch.Tensor) -> torch.Tensor:
    """Canonical uint8 [N, K / 2] -> torch's CPU tile layout for this machine, uint8 [N, K / 2]."""
    # The CPU op ignores inner_k_tiles (a CUDA tiling parameter) but still takes it.
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(packed).to(torch.int32), 2)


def from_cpu_int4pack(cpu_packed: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Inverse of `to_cpu_int4pack` (block: the row tile, `cpu_int4pack_block()` by default).

    torch's layout: rows go in tiles of B (32 on AVX2, 64 on AVX-512); inside a tile, byte k * B/2 + i holds row i
    in its low nibble and row B/2 + i in its high nibble. The rows past the last full tile (a multiple of 16) instead
    hold rows 2i and 2i + 1 in byte k * R/2 + i, R the number of those rows.
    """
    block = block or cpu_int4pack_block()
    if block is None:
        raise RuntimeError("torch's CPU int4 layout on this machine is not one this suite knows.")
    rows, half_k = cpu_packed.shape
    in_features = 2 * half_k
    full_rows = rows // block * block
    parts = []
    if full_rows:
        tiles = cpu_packed[:full_rows].reshape(full_rows // block, in_features, block // 2)  # [T, K, B/2]
        values = torch.cat([tiles & 0xF, tiles >> 4], dim=2)  # [T, K, B]
        parts.append(values.transpose(1, 2).reshape(full_rows, in_features))
    if rows > full_rows:
        tail_rows = rows - full_rows
        tail = cpu_packed[full_rows:].reshape(in_features, tail_rows // 2)  # [K, R/2]
        values = torch.stack([tail & 0xF, tail >> 4], dim=2).reshape(in_features, tail_rows)  # [K, R]
        parts.append(values.T)
    return pack_int4(torch.cat(parts))


def int4_matmul_cpu(x: torch.Tensor, cpu_packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """torch's fused CPU kernel on weights already in its tile layout (`to_cpu_int4pack`). x [M, K] -> [M, N]."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, cpu_packed, group_size, scales_and_zeros.to(x.dtype))


def int4_matmul_dequantized(x: torch.Tensor, cpu_packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                            group_size: int, block: int | None = None) -> torch.Tensor:
    """The weight in torch's CPU tile layout (`to_cpu_int4pack`; `block` its row tile, this machine's by default)
    dequantized to bfloat16 for this call only, then x @ it in bfloat16. x [M, K] -> [M, N] in x's dtype.

    A full tile of B rows is stored [K, B/2]: its low nibbles are rows 0..B/2-1 and its high nibbles rows B/2..B-1,
    so splitting the nibbles gives that tile's transposed weight [K, B] with no reordering; the tail rows hold rows
    2i and 2i+1 in byte i of each of their K lines, so they give [K, R] the same way."""
    block = block or cpu_int4pack_block()
    if block is None:
        raise RuntimeError("torch's CPU int4 layout on this machine is not one this suite knows.")
    rows, half_k = cpu_packed.shape
    in_features, groups = 2 * half_k, 2 * half_k // group_size
    full = rows // block * block
    scale = scales_and_zeros[..., 0].float()  # [K/G, N]
    offset = scales_and_zeros[..., 1].float() - 8 * scale  # w = q * scale + offset
    weight_t = torch.empty(in_features, rows, dtype=torch.bfloat16, device=x.device)  # [K, N], what x @ wants
    if full:
        tiles = full // block
        packed = cpu_packed[:full].reshape(tiles, in_features, block // 2)  # [T, K, B/2]
        values = torch.cat([packed & 0xF, packed >> 4], dim=2).view(tiles, groups, group_size, block).float()
        tile_scale = scale[:, :full].reshape(groups, tiles, 1, block).transpose(0, 1).contiguous()  # [T, K/G, 1, B]
        tile_offset = offset[:, :full].reshape(groups, tiles, 1, block).transpose(0, 1).contiguous()
        values = torch.addcmul(tile_offset, values, tile_scale, out=values)  # [T, K/G, G, B]
        weight_t[:, :full].view(in_features, tiles, block).copy_(values.view(tiles, in_features, block).transpose(0, 1))
    if rows > full:
        tail = rows - full
        packed = cpu_packed[full:].reshape(in_features, tail // 2)  # [K, R/2]
        values = torch.stack([packed & 0xF, packed >> 4], dim=2).view(groups, group_size, tail).float()
        values = torch.addcmul(offset[:, None, full:], values, scale[:, None, full:], out=values)  # [K/G, G, R]
        weight_t[:, full:].copy_(values.view(in_features, tail))
    return (x.to(torch.bfloat16) @ weight_t).to(x.dtype)
