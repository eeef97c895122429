"""Quantized kernels on every x86 CPU: torch's CPU int4 tile layout in both of its forms (tiles of 32 rows on AVX2,
64 on AVX-512; each checked on any machine against the layout written out slowly here), the int4 prefill path that
dequantizes from either form, and INT8 layers of any input width on the fused kernel."""

from __future__ import annotations

import pytest
import torch

from kernels.int4 import (
    cpu_int4pack_block,
    from_cpu_int4pack,
    int4_matmul_dequantized,
    int4_matmul_ref,
    pack_int4,
    to_cpu_int4pack,
)
from kernels.int8 import int8_matmul_ref
from multimodal.quantize import Int8WeightOnlyLinear, QuantSpec, quantize_linear


def _slow_cpu_tiles(values: torch.Tensor, block: int) -> torch.Tensor:
    """[N, K] nibbles -> torch's CPU layout, one byte at a time: full tiles of `block` rows hold rows i and
    block/2 + i in byte k * block/2 + i; the remaining R rows hold rows 2i and 2i + 1 in byte k * R/2 + i."""
    rows, columns = values.shape
    out = torch.zeros(rows * columns // 2, dtype=torch.uint8)
    full = rows // block * block
    for tile in range(0, full, block):
        base = tile * columns // 2
        for k in range(columns):
            for i in range(block // 2):
                out[base + k * block // 2 + i] = values[tile + i, k] | (values[tile + block // 2 + i, k] << 4)
    tail = rows - full
    base = full * columns // 2
    for k in range(columns):
        for i in range(tail // 2):
            out[base + k * tail // 2 + i] = values[full + 2 * i, k] | (values[full + 2 * i + 1, k] << 4)
    return out.reshape(rows, columns // 2)


@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("rows", [16, 48, 64, 80, 144])
def test_int4_tile_inverse_for_both_instruction_sets(block, rows, generator):
    values = torch.randint(0, 16, (rows, 24), generator=generator).to(torch.uint8)
    assert torch.equal(from_cpu_int4pack(_slow_cpu_tiles(values, block), block), pack_int4(values))


def test_this_cpu_uses_one_of_the_known_tilings(generator):
    block = cpu_int4pack_block()
    assert block in (32, 64), "torch's int4 layout on this CPU is not one the suite knows: INT4 would run slowly"
    values = torch.randint(0, 16, (block + 16, 32), generator=generator).to(torch.uint8)
    assert torch.equal(to_cpu_int4pack(pack_int4(values)), _slow_cpu_tiles(values, block))


@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("rows,in_features,group_size", [(48, 64, 32), (144, 256, 64), (64, 128, 128), (16, 64, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_dequantized_path_reads_both_tilings(block, rows, in_features, group_size, dtype, generator):
    values = torch.randint(0, 16, (rows, in_features), generator=generator).to(torch.uint8)
    scales_and_zeros = torch.randn(in_features // group_size, rows, 2, generator=generator) * 0.05
    x = torch.randn(5, in_features, generator=generator).to(dtype)
    reference = int4_matmul_ref(x.float(), pack_int4(values), scales_and_zeros, group_size).double()
    out = int4_matmul_dequantized(x, _slow_cpu_tiles(values, block), scales_and_zeros, group_size, block)
    assert out.dtype == dtype and out.shape == (5, rows)
    # bfloat16 weights and activations, float32 sums: relative error at bfloat16's rounding; a row or a nibble in
    # the wrong place is off by the size of the result itself.
    assert ((out.double() - reference).norm() / reference.norm()).item() < 1e-2


@pytest.mark.parametrize("in_features", [33, 48, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_layers_of_any_width_take_the_fused_kernel(in_features, dtype, generator):
    linear = torch.nn.Linear(in_features, 24)
    torch.nn.init.normal_(linear.weight, std=0.2, generator=generator)
    module = quantize_linear(linear, QuantSpec("int8"))
    assert module.padded == (in_features % 16 != 0) and module.weight.shape[1] % 16 == 0
    module.backend = "cpu"  # refuses (ValueError) any width the fused kernel cannot read
    module.bias.data = module.bias.data.to(dtype)
    x = torch.randn(3, 5, in_features, generator=generator).to(dtype)
    expected = int8_matmul_ref(x.reshape(15, -1), module.state_dict()["weight"], module.scales).reshape(3, 5, 24)
    out = module(x)
    assert out.shape == (3, 5, 24) and out.dtype == dtype
    # The fused kernel computes in bfloat16 whatever the activations: agreement to bfloat16's rounding.
    error = ((out - module.bias).double() - expected.double()).norm() / expected.double().norm()
    assert error.item() < 1e-2

    state = module.state_dict()
    assert state["weight"].shape == (24, in_features)  # checkpoints never hold the padding
    fresh = Int8WeightOnlyLinear(in_features, 24)
    fresh.load_state_dict(state)
    fresh.load_state_dict(state)  # a second load into a padded module
    assert fresh.padded == module.padded
    fresh.bias.data = fresh.bias.data.to(dtype)
    fresh.backend = "cpu"
    torch.testing.assert_close(fresh(x), out, rtol=0, atol=0)
    fresh.backend = "auto"  # 15 rows: the planes path, on the padded weight
    error = ((fresh(x) - fresh.bias).double() - expected.double()).norm() / expected.double().norm()
    assert error.item() < (1e-2 if dtype == torch.bfloat16 else 1e-4)
