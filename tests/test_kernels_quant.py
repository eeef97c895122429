"""The quantized matmul paths against their references: torch's fused CPU kernels, the layouts, the dispatch."""

import pytest
import torch

from kernels.dispatch import CANONICAL, CPU_TILED, GEMV_MAX_ROWS, INT8_SMALL_WEIGHT, int4_linear, int8_linear
from kernels.int4 import (
    DEQUANTIZED_MIN_ROWS,
    cpu_int4pack_layout_known,
    dequantize_int4,
    from_cpu_int4pack,
    int4_matmul_cpu,
    int4_matmul_ref,
    pack_int4,
    to_cpu_int4pack,
    unpack_int4,
)
from kernels.int8 import DEQUANTIZED_MIN_ROWS as INT8_DEQUANTIZED_MIN_ROWS
from kernels.int8 import (
    PLANE_STEP,
    PLANES_MIN_ROWS,
    activation_planes,
    dequantize_int8,
    int8_matmul_cpu,
    int8_matmul_dequantized,
    int8_matmul_planes,
    int8_matmul_ref,
)


def _tolerance(dtype, reference):
    # The fused kernels round products/partial sums in the activation dtype; the reference rounds once.
    relative = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    return relative * reference.float().abs().max().item() + 1e-6


def _random_int8(out_features, in_features, generator):
    weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    scales = torch.rand(out_features, generator=generator) * 0.02 + 1e-3
    return weight, scales


# torch tiles int4 weights for its CPU kernel by instruction set; the suite knows the AVX2 and AVX-512 tilings.
known_int4_layout = pytest.mark.skipif(not cpu_int4pack_layout_known(),
                                       reason="this machine's torch tiles int4 weights in another layout")

def _random_int4(out_features, in_features, group_size, generator):
    values = torch.randint(0, 16, (out_features, in_features), generator=generator)
    scales_and_zeros = torch.randn(in_features // group_size, out_features, 2, generator=generator) * 0.05
    return pack_int4(values), scales_and_zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,out_features,in_features", [(1, 64, 128), (5, 17, 48), (8, 96, 256), (3, 1, 16)])
def test_int8_fused_cpu_matches_reference(rows, out_features, in_features, dtype):
    generator = torch.Generator().manual_seed(rows * 1000 + in_features)
    weight, scales = _random_int8(out_features, in_features, generator)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    reference = int8_matmul_ref(x, weight, scales)
    fused = int8_matmul_cpu(x, weight, scales)
    assert fused.dtype == dtype and fused.shape == (rows, out_features)
    assert (fused.float() - reference.float()).abs().max().item() <= _tolerance(dtype, reference)


def test_int8_odd_in_features():
    generator = torch.Generator().manual_seed(6)
    weight, scales = _random_int8(17, 33, generator)
    # K % 16 != 0 would crash torch's kernel: auto falls back to the reference, forcing it is a clear error.
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 33, generator=generator).to(dtype)
        torch.testing.assert_close(int8_linear(x, weight, scales), int8_matmul_ref(x, weight, scales))
        with pytest.raises(ValueError, match="divisible by 16"):
            int8_linear(x, weight, scales, backend="cpu")


def test_activation_planes_rebuild_each_row_within_their_bound():
    generator = torch.Generator().manual_seed(11)
    magnitudes = torch.logspace(-3, 2, 9, dtype=torch.float64)[:, None]  # rows from 1e-3 to 1e2
    x = torch.randn(9, 70, generator=generator, dtype=torch.float64) * magnitudes
    x[3, 5] = 400.0  # an outlier sets its row's scale
    x[7] = 0.0  # an all-zero row
    planes, scale = activation_planes(x.float())
    assert planes.dtype == torch.int8 and planes.shape == (18, 70) and scale.shape == (9, 1)
    high, low = planes.double().chunk(2)
    rebuilt = scale.double() * (high + low / PLANE_STEP)
    bound = x.abs().amax(dim=1, keepdim=True) / (127 * 2 * PLANE_STEP)  # half a low step, in x's units
    # float32 rounding of x and of the scale adds a few ulps of the row maximum
    assert ((rebuilt - x).abs() <= bound * 1.001 + 1e-6 * x.abs().amax(dim=1, keepdim=True)).all()
    assert high.abs().max() <= 127 and low.abs().max() <= 127
    assert (high[7] == 0).all() and (low[7] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,out_features,in_features", [(8, 64, 128), (33, 17, 45), (1, 5, 7), (64, 96, 256)])
def test_int8_planes_match_the_float64_linear(rows, out_features, in_features, dtype):
    generator = torch.Generator().manual_seed(rows * 100 + in_features)
    weight, scales = _random_int8(out_features, in_features, generator)
    x = torch.randn(rows, in_features, generator=generator)
    x[0, 0] = 30.0  # an outlier as GLM activations have them
    x = x.to(dtype)
    dequantized = weight.double() * scales.double()[:, None]  # [N, K]
    expected = x.double() @ dequantized.T
    out = int8_matmul_planes(x, weight, scales)
    assert out.dtype == dtype and out.shape == (rows, out_features)
    # Each element of x is off by at most max|x_row| / (127 * 2 * 254), so each output by that times sum|w|; then
    # the result is rounded to x's dtype. Dropping the low plane would be 254 times over this bound.
    plane_bound = x.double().abs().amax(dim=1, keepdim=True) / (127 * 2 * PLANE_STEP) * dequantized.abs().sum(1)
    rounding = expected.abs() * (2**-8 if dtype == torch.bfloat16 else 1e-6)
    assert ((out.double() - expected).abs() <= plane_bound + rounding + 1e-7).all()


def _record_calls(patch: pytest.MonkeyPatch, names: tuple[str, ...], calls: list[str]) -> None:
    """Wrap these kernels of `kernels.dispatch` so each call appends its name to `calls`."""
    import kernels.dispatch as dispatch

    for name in names:
        def recorded(*args, name=name, kernel=getattr(dispatch, name)):
            calls.append(name)
            return kernel(*args)

        patch.setattr(dispatch, name, recorded)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,out_features,in_features", [(128, 64, 128), (200, 17, 45), (1, 5, 7)])
def test_int8_dequantized_matches_the_float64_linear(rows, out_features, in_features, dtype):
    generator = torch.Generator().manual_seed(rows * 10 + in_features)
    weight, scales = _random_int8(out_features, in_features, generator)
    x = (torch.randn(rows, in_features, generator=generator) * 3).to(dtype)
    dequantized = weight.double() * scales.double()[:, None]  # [N, K]
    expected = x.double() @ dequantized.T
    out = int8_matmul_dequantized(x, weight, scales)
    assert out.dtype == dtype and out.shape == (rows, out_features)
    # The int8 weight is exact in either dtype; the matmul's sums, its rounding to x's dtype and the scaling add the
    # rest: about 2^-8 relative in bfloat16 (two roundings), float32 sums in float32.
    terms = x.double().abs() @ dequantized.abs().T
    bound = terms * (2**-7 if dtype == torch.bfloat16 else 1e-5)
    assert ((out.double() - expected).abs() <= bound + 1e-7).all()


def test_int8_auto_takes_the_planes_or_the_dequantized_path_from_their_row_counts_and_the_fused_kernel_below():
    generator = torch.Generator().manual_seed(12)
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        _record_calls(patch, ("int8_matmul_cpu", "int8_matmul_planes", "int8_matmul_dequantized"), calls)
        large = _random_int8(INT8_SMALL_WEIGHT // 64 + 16, 64, generator)  # more elements than a small weight
        small = _random_int8(32, 64, generator)
        for weight, scales in (large, small):
            for rows in (GEMV_MAX_ROWS + 1, PLANES_MIN_ROWS - 1, PLANES_MIN_ROWS, 40, INT8_DEQUANTIZED_MIN_ROWS - 1,
                         INT8_DEQUANTIZED_MIN_ROWS, 300):  # fewer: tests/test_cpu_gemv.py
                x = torch.randn(rows, 64, generator=generator)
                out = int8_linear(x, weight, scales)
                torch.testing.assert_close(out, int8_matmul_ref(x, weight, scales), rtol=2e-2, atol=_tolerance(
                    torch.bfloat16, out))
    fused_below = ["int8_matmul_cpu"] * 2
    assert calls[:7] == fused_below + ["int8_matmul_planes"] * 3 + ["int8_matmul_dequantized"] * 2
    assert calls[7:] == fused_below + ["int8_matmul_dequantized"] * 5  # a small weight converts in cache
    with pytest.raises(ValueError, match="int8 weights"):
        int4_linear(torch.randn(2, 64), *_random_int4(16, 64, 32, generator), 32, backend="planes")


def test_int8_reference_is_the_dequantized_linear():
    generator = torch.Generator().manual_seed(1)
    weight, scales = _random_int8(24, 40, generator)
    x = torch.randn(4, 40, generator=generator, dtype=torch.float64)
    expected = x @ (weight.double() * scales.double()[:, None]).T
    torch.testing.assert_close(int8_matmul_ref(x.float(), weight, scales).double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dequantize_int8(weight, scales), weight.float() * scales[:, None])


def test_int4_pack_unpack_round_trip_and_nibble_order():
    generator = torch.Generator().manual_seed(2)
    values = torch.randint(0, 16, (5, 12), generator=generator)
    packed = pack_int4(values)
    assert packed.shape == (5, 6) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), values.to(torch.uint8))
    assert torch.equal(packed[:, 0], (values[:, 0] + 16 * values[:, 1]).to(torch.uint8))  # even column low nibble


@pytest.mark.parametrize("out_features", [16, 48, 64, 80, 160])
@pytest.mark.parametrize("in_features", [32, 96])
@known_int4_layout
def test_cpu_tile_layout_inverts_torch_packing(out_features, in_features):
    generator = torch.Generator().manual_seed(out_features + in_features)
    packed = pack_int4(torch.randint(0, 16, (out_features, in_features), generator=generator))
    tiled = to_cpu_int4pack(packed)
    assert not torch.equal(tiled, packed)  # the layouts really differ, so the inverse is doing work
    assert torch.equal(from_cpu_int4pack(tiled), packed)


def test_int4_dequantize_formula():
    generator = torch.Generator().manual_seed(3)
    packed, scales_and_zeros = _random_int4(8, 64, 32, generator)
    values = unpack_int4(packed).double()
    row, column = 5, 40  # group 1
    scale, zero = scales_and_zeros[1, row].double()
    expected = (values[row, column] - 8) * scale + zero
    assert dequantize_int4(packed, scales_and_zeros, 32, torch.float64)[row, column].item() == pytest.approx(
        expected.item(), rel=1e-6
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "rows,out_features,in_features,group_size",
    [(1, 64, 128, 32), (7, 48, 192, 64), (2, 16, 128, 128), (9, 112, 96, 32)],
)
def test_int4_fused_cpu_matches_reference(rows, out_features, in_features, group_size, dtype):
    generator = torch.Generator().manual_seed(rows * 7 + out_features)
    packed, scales_and_zeros = _random_int4(out_features, in_features, group_size, generator)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    reference = int4_matmul_ref(x, packed, scales_and_zeros, group_size)
    fused = int4_matmul_cpu(x, to_cpu_int4pack(packed), scales_and_zeros, group_size)
    assert fused.dtype == dtype and fused.shape == (rows, out_features)
    assert (fused.float() - reference.float()).abs().max().item() <= _tolerance(dtype, reference)


def _relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.double() - reference.double()).norm() / reference.double().norm()).item()


@known_int4_layout
def test_dispatch_handles_leading_dims_and_every_backend_agrees():
    """float32 activations: the fused kernels compute in bfloat16, so they agree with the float32 reference to
    bfloat16's rounding (relative error well under 1%), the same whichever layout the weight arrives in."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 64, generator=generator)
    weight8, scales = _random_int8(32, 64, generator)
    reference8 = int8_linear(x, weight8, scales, "reference")
    outputs = [int8_linear(x, weight8, scales, backend) for backend in ("auto", "cpu")]
    assert outputs[0].shape == (2, 3, 32) and outputs[0].dtype == torch.float32
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert _relative_error(outputs[0], reference8) < 5e-3
    packed, scales_and_zeros = _random_int4(32, 64, 32, generator)
    tiled = to_cpu_int4pack(packed)
    reference = int4_linear(x, packed, scales_and_zeros, 32, CANONICAL, "reference")
    for weight, layout in ((packed, CANONICAL), (tiled, CPU_TILED)):
        for backend in ("auto", "cpu"):
            out = int4_linear(x, weight, scales_and_zeros, 32, layout, backend)
            assert out.dtype == torch.float32 and _relative_error(out, reference) < 5e-3
        torch.testing.assert_close(int4_linear(x, weight, scales_and_zeros, 32, layout, "reference"), reference,
                                   rtol=1e-6, atol=1e-6)


@known_int4_layout
def test_int4_auto_dequantizes_from_its_row_count_and_keeps_the_fused_kernel_below():
    generator = torch.Generator().manual_seed(13)
    packed, scales_and_zeros = _random_int4(32, 64, 32, generator)
    tiled = to_cpu_int4pack(packed)
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        _record_calls(patch, ("int4_matmul_cpu", "int4_matmul_dequantized"), calls)
        for rows in (1, DEQUANTIZED_MIN_ROWS - 1, DEQUANTIZED_MIN_ROWS):
            x = torch.randn(rows, 64, generator=generator)
            out = int4_linear(x, tiled, scales_and_zeros, 32, CPU_TILED)
            assert _relative_error(out, int4_matmul_ref(x, packed, scales_and_zeros, 32)) < 5e-3
    assert calls == ["int4_matmul_cpu", "int4_matmul_cpu", "int4_matmul_dequantized"]


def test_int4_odd_rows_fall_back_to_reference_and_forcing_the_fused_kernel_is_a_clear_error():
    generator = torch.Generator().manual_seed(5)
    packed, scales_and_zeros = _random_int4(17, 64, 32, generator)  # 17 rows: the fused CPU kernel refuses
    x = torch.randn(3, 64, generator=generator)
    out = int4_linear(x, packed, scales_and_zeros, 32)
    torch.testing.assert_close(out, int4_matmul_ref(x, packed, scales_and_zeros, 32))
    for backend in ("cpu", "dequantized"):
        with pytest.raises(ValueError, match="divisible by 16"):
            int4_linear(x, packed, scales_and_zeros, 32, backend=backend)
    with pytest.raises(ValueError, match="Unknown kernel backend"):
        int4_linear(x, packed, scales_and_zeros, 32, backend="cuda")
