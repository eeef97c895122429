"""The decode kernels of `kernels/csrc/gemv.c`, built for this CPU and for the targets it does not pick (AVX2 alone,
plain x86-64), each against float64 on fresh random inputs; the dispatch that picks them; the fallback without a
compiler."""

import platform

import pytest
import torch

from kernels import cpu_gemv
from kernels.dispatch import GEMV_MAX_ROWS, PLANES_MIN_ROWS, int4_linear, int8_linear
from kernels.int4 import int4_matmul_ref, pack_int4

X86 = platform.machine().lower() in ("x86_64", "amd64")
# (target, whether its int8 path multiplies in integers); the explicit targets exist on x86 only.
TARGETS = [("native", None)] + ([("x86-64-v3", True), ("x86-64", False)] if X86 else [])
needs_kernels = pytest.mark.skipif(not cpu_gemv.available(), reason="no C compiler builds the decode kernels here")


def _library(target: str):
    lib = cpu_gemv.build(target)
    if lib is None:
        pytest.skip(f"the compiler cannot build for {target}")
    return lib


@needs_kernels
@pytest.mark.parametrize("target, in_integers", TARGETS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("in_features", [1, 15, 16, 17, 100, 257, 1000])
def test_int8_kernel_matches_float64_within_its_rounding(target, in_integers, rows, in_features):
    lib = _library(target)
    if in_integers is not None:
        assert lib.gemv_integer_paths() == in_integers
    generator = torch.Generator().manual_seed(rows * 1000 + in_features)
    weight = torch.randint(-127, 128, (37, in_features), dtype=torch.int8, generator=generator)
    scales = torch.rand(37, generator=generator) * 0.01
    x = torch.randn(rows, in_features, generator=generator) * torch.logspace(-3, 2, rows)[:, None]
    x[0, 0] = 30 * x[0].abs().max()  # an outlier
    expected = (x.double() @ weight.double().T) * scales.double()  # [M, N]
    out = cpu_gemv.int8_gemv(x, weight, scales, lib)
    assert out.shape == (rows, 37) and out.dtype == torch.float32
    # int16 rounding of each activation row moves each element by <= max|x_row| / 65534; float32 sums add their own.
    activation = x.double().abs().amax(1, keepdim=True) / 65534 * (weight.double().abs().sum(1) * scales.double())
    summation = 1e-5 * (x.double().abs() @ weight.double().abs().T) * scales.double()
    assert ((out.double() - expected).abs() <= activation + summation + 1e-30).all()


@needs_kernels
@pytest.mark.parametrize("target, in_integers", TARGETS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows, in_features", [(1, 1), (1, 31), (1, 33), (1, 1024), (3, 100), (6, 257), (9, 130)])
def test_float_kernels_match_float64(target, in_integers, dtype, rows, in_features):
    lib = _library(target)
    generator = torch.Generator().manual_seed(rows * 7 + in_features)
    weight = torch.randn(29, in_features, generator=generator).to(dtype)
    x = torch.randn(rows, in_features, generator=generator)
    if dtype == torch.bfloat16 and lib.gemv_bf16_rows() > 0:
        x = x.bfloat16().float()  # AVX512_BF16 builds round the activations to bfloat16, as a bfloat16 model has them
    expected = x.double() @ weight.double().T
    out = cpu_gemv.float_gemv(x, weight, lib)
    bound = 1e-5 * (x.double().abs() @ weight.double().abs().T)  # float32 sums of exact products
    assert out.shape == (rows, 29) and ((out.double() - expected).abs() <= bound + 1e-30).all()
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        cpu_gemv.float_gemv(x, weight.to(torch.float16), lib)


@needs_kernels
@pytest.mark.parametrize("target, in_integers", TARGETS)
@pytest.mark.parametrize("blocked", [False, True])
def test_long_rows_do_not_overflow_the_integer_sums(target, in_integers, blocked):
    """At the largest weights and activations an int32 lane of 2^15 columns would reach 4.3e9 without flushes, in
    the row-major kernel and in the blocked one."""
    lib = _library(target)
    in_features = 1 << 15
    weight = torch.full((3, in_features), 127, dtype=torch.int8)
    weight[1] = -127
    scales = torch.tensor([1.0, 0.5, 2.0])
    x = torch.ones(1, in_features)
    if blocked:
        out = cpu_gemv.int8_blocked_gemv(x, cpu_gemv.block_int8(weight, lib), scales, 3, lib)
    else:
        out = cpu_gemv.int8_gemv(x, weight, scales, lib)
    expected = torch.tensor([127.0, -63.5, 254.0]) * in_features
    torch.testing.assert_close(out[0], expected, rtol=1e-6, atol=0)


@needs_kernels
def test_int8_auto_takes_the_kernel_for_a_few_rows(monkeypatch):
    generator = torch.Generator().manual_seed(3)
    weight = torch.randint(-127, 128, (32, 64), dtype=torch.int8, generator=generator)
    scales = torch.rand(32, generator=generator) * 0.01
    calls = []
    kernel = cpu_gemv.int8_gemv
    monkeypatch.setattr(cpu_gemv, "int8_gemv", lambda *args: calls.append(len(args[0])) or kernel(*args))
    for rows in range(1, PLANES_MIN_ROWS + 1):
        x = torch.randn(rows, 64, generator=generator).to(torch.bfloat16)
        out = int8_linear(x, weight, scales)
        expected = int8_linear(x, weight, scales, "reference")
        assert out.dtype == torch.bfloat16 and ((out - expected).float().norm() / expected.float().norm()) < 1e-2
    assert calls == list(range(1, GEMV_MAX_ROWS + 1))
    int8_linear(torch.randn(5, 64), weight, scales, "gemv")  # forced at any row count
    assert calls[-1] == 5
    with pytest.raises(ValueError, match="int8 weights"):
        int4_linear(torch.randn(2, 64), torch.zeros(16, 32, dtype=torch.uint8), torch.zeros(2, 16, 2), 32,
                    backend="gemv")


def _tiles(values: torch.Tensor, block: int) -> torch.Tensor:
    """Values [N, K] in [0, 15] -> torch's CPU tile layout of `block` rows, written out slowly: in a full tile byte i
    of line k holds row i (low nibble) and row block/2 + i (high); the tail's byte i holds rows 2i and 2i + 1."""
    rows, columns = values.shape
    out = []
    full = rows // block * block
    for start in range(0, full, block):
        for k in range(columns):
            out += [int(values[start + i, k]) | int(values[start + block // 2 + i, k]) << 4 for i in range(block // 2)]
    for k in range(columns):
        out += [int(values[full + 2 * i, k]) | int(values[full + 2 * i + 1, k]) << 4 for i in range((rows - full) // 2)]
    return torch.tensor(out, dtype=torch.uint8).reshape(rows, columns // 2)


@needs_kernels
@pytest.mark.parametrize("target, in_integers", TARGETS)
@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("rows, in_features, group_size", [(64, 64, 32), (80, 128, 64), (16, 256, 128), (112, 96, 32)])
def test_int4_kernel_reads_both_tilings(target, in_integers, block, rows, in_features, group_size):
    lib = _library(target)
    if not lib.gemv_integer_paths():
        pytest.skip("int4 layers keep torch's fused kernel on builds without AVX2")
    generator = torch.Generator().manual_seed(rows + in_features + block)
    values = torch.randint(0, 16, (rows, in_features), generator=generator)
    scales_and_zeros = (torch.randn(in_features // group_size, rows, 2, generator=generator) * 0.05).bfloat16()
    x = torch.randn(2, in_features, generator=generator)
    out = cpu_gemv.int4_gemv(x, _tiles(values, block), scales_and_zeros, group_size, block, lib)  # [2, N]
    # Exact but for float32 sums once x is rounded to int8 per group, as the kernel rounds it.
    grouped = x.view(2, -1, group_size)
    step = grouped.abs().amax(-1, keepdim=True) / 127
    rounded = ((grouped / step).round() * step).view(2, -1).double()
    scale, zero = (part.double().T.repeat_interleave(group_size, 1) for part in scales_and_zeros.unbind(-1))  # [N, K]
    expected = rounded @ (values * scale).T + x.double() @ (zero - 8 * scale).T
    terms = rounded.abs() @ (values * scale).abs().T + x.double().abs() @ (zero - 8 * scale).abs().T
    assert ((out.double() - expected).abs() <= 1e-5 * terms).all()
    # Against the plain dequantized weight: within the activation rounding, <= max|x_group| / 254 per element.
    plain = int4_matmul_ref(x, pack_int4(values), scales_and_zeros.float(), group_size).double()
    weight = ((values - 8) * scale + zero).abs()  # [N, K]
    bound = (step.double() / 2).expand(-1, -1, group_size).reshape(2, -1) @ weight.T
    assert ((out.double() - plain).abs() <= bound + 1e-5 * terms).all()


def test_without_a_compiler_the_kernels_are_off_with_one_warning(monkeypatch):
    monkeypatch.setattr(cpu_gemv, "_compiler", lambda: None)
    cpu_gemv.build.cache_clear()
    cpu_gemv.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="Decode kernels unavailable"):
            assert cpu_gemv.library() is None
        assert not cpu_gemv.available()
        weight, scales = torch.randint(-127, 128, (16, 32), dtype=torch.int8), torch.rand(16)
        x = torch.randn(1, 32)
        out = int8_linear(x, weight, scales)  # auto falls back to torch's fused kernel
        expected = int8_linear(x, weight, scales, "reference")
        assert ((out - expected).norm() / expected.norm()) < 1e-2
        with pytest.raises(ValueError, match="no C compiler"):
            int8_linear(x, weight, scales, "gemv")
    finally:
        cpu_gemv.build.cache_clear()
        cpu_gemv.library.cache_clear()


@needs_kernels
@pytest.mark.parametrize("target, in_integers", TARGETS)
def test_bfloat16_weights_round_the_activations_only_where_the_cpu_multiplies_in_bfloat16(target, in_integers):
    lib = _library(target)
    x = torch.tensor([[1.0 + 2**-10, 1.0]])  # the first value is not a bfloat16
    out = cpu_gemv.float_gemv(x, torch.ones(1, 2, dtype=torch.bfloat16), lib)
    assert out.item() == (2.0 if lib.gemv_bf16_rows() > 0 else 2.0 + 2**-10)
    if target != "native":  # the explicit targets lack AVX512_BF16
        assert lib.gemv_bf16_rows() == 0


@needs_kernels
@pytest.mark.parametrize("target, in_integers", TARGETS)
@pytest.mark.parametrize("rows, out_features, in_features", [
    (1, 70, 96),  # one row: a block at a time; 70 rows: a partial last block (16-row blocks)
    (3, 128, 38),  # two blocks of a full four-block task side by side
    (8, 200, 64),  # a full pass of eight rows over 13 blocks: three full tasks and a one-block tail
    (11, 64, 2),  # a second, partial pass of rows; the narrowest even K
])
def test_blocked_bfloat16_kernel_matches_float64(target, in_integers, rows, out_features, in_features):
    lib = _library(target)
    generator = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    x = torch.randn(rows, in_features, generator=generator)
    blocked = cpu_gemv.block_bf16(weight, lib)
    assert blocked.shape == (-(-out_features // 16), in_features // 2, 16, 2)
    assert blocked[-1, 0, out_features % 16 or 16:].abs().sum() == 0  # the rows past N are zeros
    expected = x.bfloat16().double() @ weight.double().T  # the kernel rounds activations to bfloat16
    out = cpu_gemv.bf16_blocked_gemv(x, blocked, out_features, lib)
    assert out.shape == (rows, out_features)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5 * in_features)


def test_blocked_layout_takes_bfloat16_with_even_columns_only():
    with pytest.raises(ValueError, match="even number of columns"):
        cpu_gemv.block_bf16(torch.ones(4, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="even number of columns"):
        cpu_gemv.block_bf16(torch.ones(4, 4))


@needs_kernels
@pytest.mark.parametrize("target, in_integers", TARGETS)
@pytest.mark.parametrize("rows, out_features, in_features", [
    (1, 70, 96),  # one row, a partial last block (16-row blocks)
    (3, 37, 17),  # an odd K: a zero column completes the last pair
    (8, 200, 64),  # a full pass of eight rows over three full tasks of four blocks and a one-block tail
    (11, 64, 2),  # a second, partial pass of rows; the narrowest pair
    (2, 33, 1),  # a single column
    (1, 19, 1001),  # an odd number of pairs after an even loop
])
def test_blocked_int8_kernel_matches_float64_within_its_rounding(target, in_integers, rows, out_features, in_features):
    lib = _library(target)
    if target != "native":  # the explicit targets lack AVX512_VNNI: the portable loop reads the same layout
        assert lib.gemv_vnni_blocks() == 0
    generator = torch.Generator().manual_seed(rows * 1000 + out_features + in_features)
    weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    scales = torch.rand(out_features, generator=generator) * 0.01
    x = torch.randn(rows, in_features, generator=generator) * torch.logspace(-3, 2, rows)[:, None]
    x[0, 0] = 30 * x[0].abs().max()  # an outlier
    blocked = cpu_gemv.block_int8(weight, lib)
    pairs = (in_features + 1) // 2
    assert blocked.shape == (-(-out_features // 16), pairs, 16, 2)
    assert blocked[-1, :, out_features % 16 or 16:].abs().sum() == 0  # the rows past N are zeros
    assert in_features % 2 == 0 or blocked[:, -1, :, 1].abs().sum() == 0  # and the column past an odd K
    assert torch.equal(cpu_gemv.unblock_int8(blocked, out_features, in_features), weight)
    expected = (x.double() @ weight.double().T) * scales.double()  # [M, N]
    out = cpu_gemv.int8_blocked_gemv(x, blocked, scales, out_features, lib)
    assert out.shape == (rows, out_features) and out.dtype == torch.float32
    # the row-major kernel's bound: int16 rounding of each activation row, then float32 sums
    activation = x.double().abs().amax(1, keepdim=True) / 65534 * (weight.double().abs().sum(1) * scales.double())
    summation = 1e-5 * (x.double().abs() @ weight.double().abs().T) * scales.double()
    assert ((out.double() - expected).abs() <= activation + summation + 1e-30).all()
    if lib.gemv_integer_paths():  # both kernels sum the same int16 x int8 products exactly in integers
        torch.testing.assert_close(out, cpu_gemv.int8_gemv(x, weight, scales, lib), rtol=1e-6, atol=0)


def test_blocked_int8_layout_takes_int8_matrices_only():
    with pytest.raises(ValueError, match="int8 matrix"):
        cpu_gemv.block_int8(torch.ones(4, 3))
    with pytest.raises(ValueError, match="int8 matrix"):
        cpu_gemv.block_int8(torch.ones(4, dtype=torch.int8))


@needs_kernels
@pytest.mark.parametrize("target, in_integers", TARGETS)
@pytest.mark.parametrize("rows, out_features, in_features, group_size", [
    (1, 64, 64, 32),  # one row, whole blocks
    (3, 37, 128, 64),  # a partial last block
    (5, 80, 256, 128),  # a second pass of rows (four per pass)
    (2, 20, 64, 8),  # the smallest group: one chunk per record
])
def test_blocked_int4_kernel_matches_float64_within_its_rounding(target, in_integers, rows, out_features, in_features,
                                                                 group_size):
    lib = _library(target)
    generator = torch.Generator().manual_seed(rows + out_features + in_features)
    values = torch.randint(0, 16, (out_features, in_features), generator=generator)
    scales_and_zeros = (torch.randn(in_features // group_size, out_features, 2, generator=generator) * 0.05).bfloat16()
    blocked = cpu_gemv.block_int4(pack_int4(values), scales_and_zeros, group_size, lib)
    assert blocked.shape == (-(-out_features // 16), in_features // group_size, 8 * group_size + 64)
    packed, table = cpu_gemv.unblock_int4(blocked, out_features, group_size)
    assert torch.equal(packed, pack_int4(values)) and torch.equal(table, scales_and_zeros)
    x = torch.randn(rows, in_features, generator=generator)
    out = cpu_gemv.int4_blocked_gemv(x, blocked, out_features, group_size, lib)  # [M, N]
    # Exact but for float32 sums once x is rounded to int8 per group, as the kernel rounds it (in float32).
    grouped = x.view(rows, -1, group_size)
    step = grouped.abs().amax(-1, keepdim=True) / 127
    rounded = ((grouped / step).round().double() * step.double()).view(rows, -1)
    scale, zero = (part.double().T.repeat_interleave(group_size, 1) for part in scales_and_zeros.unbind(-1))  # [N, K]
    expected = rounded @ (values * scale).T + x.double() @ (zero - 8 * scale).T
    terms = rounded.abs() @ (values * scale).abs().T + x.double().abs() @ (zero - 8 * scale).abs().T
    assert out.shape == (rows, out_features) and ((out.double() - expected).abs() <= 1e-5 * terms).all()
    with pytest.raises(ValueError, match="multiple of 8"):
        cpu_gemv.block_int4(pack_int4(values), scales_and_zeros, 12, lib)
