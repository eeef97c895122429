"""The blocked CPU twins of the quantized linears (`glm/cpu_linears.py`): the same outputs as the modules they
replace, on every CPU (where it lacks AVX512_VNNI the tests force them, and the kernels run their portable loops);
the models `block_for_cpu` leaves as they are."""

import copy

import pytest
import torch

from glm.cpu_linears import BlockedInt4Linear, BlockedInt8Linear, block_for_cpu
from glm.generate import SamplingConfig, generate, pack_for_cpu
from glm.model import GLMConfig, GLMModel
from kernels import cpu_gemv
from multimodal.quantize import Int4WeightOnlyLinear, Int8WeightOnlyLinear, QuantSpec, quantize_model, set_backend

pytestmark = [pytest.mark.skipif(not cpu_gemv.available(), reason="no C compiler builds the decode kernels here"),
              pytest.mark.filterwarnings("ignore:INT4 group size")]  # tiny's 88-wide layers stay in float
TWINS = {Int8WeightOnlyLinear: BlockedInt8Linear, Int4WeightOnlyLinear: BlockedInt4Linear}


def _quantized(scheme: str, seed: int) -> GLMModel:
    generator = torch.Generator().manual_seed(seed)
    model = GLMModel(GLMConfig.from_preset("tiny")).init_weights(std=0.08, generator=generator).eval()
    return quantize_model(model, QuantSpec(scheme, group_size=32))


def _prompts(seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 300, (length,), generator=generator).tolist() for length in (7, 3)]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_blocked_twins_match_the_quantized_modules(monkeypatch, scheme):
    model = _quantized(scheme, seed=8)
    kind = Int8WeightOnlyLinear if scheme == "int8" else Int4WeightOnlyLinear
    layers = [m for m in model.modules() if isinstance(m, kind)]
    assert layers and (scheme == "int4" or any(m.padded for m in layers))  # int8: 88 columns padded to 96
    monkeypatch.setattr(cpu_gemv, "vnni_blocks_available", lambda lib=None: True)
    blocked = block_for_cpu(copy.deepcopy(model))
    twins = [m for m in blocked.modules() if isinstance(m, TWINS[kind])]
    assert len(twins) == len(layers) and not any(isinstance(m, kind) for m in blocked.modules())
    for layer, twin in zip(layers, twins):
        stored = sum(t.nbytes for t in layer.state_dict().values() if t.dtype in (torch.int8, torch.uint8))
        assert twin.blocked.nbytes < 1.3 * stored + 1024  # the weight held once, in blocks (scales beside int4's)
        for rows in (1, 3, 20, 130):  # decode rows, prefills (int4 dequantizes from 128 rows)
            x = torch.randn(rows, layer.in_features)
            with torch.no_grad():
                if scheme == "int8":  # the row-major decode kernel: the same int16 rounding
                    expected = set_backend(copy.deepcopy(layer), "gemv")(x)
                    torch.testing.assert_close(twin(x), expected, rtol=1e-5, atol=1e-5)
                else:
                    expected, bound = _int4_expected(layer, x)
                    expected = expected + (0 if layer.bias is None else layer.bias.double())
                    assert ((twin(x).double() - expected).abs() <= bound).all(), rows
    prompts, config = _prompts(9), SamplingConfig(max_new_tokens=8)
    reference = generate(set_backend(copy.deepcopy(model), "reference"), prompts, config)
    assert generate(blocked, prompts, config) == reference or scheme == "int4"  # int4 rounds activations to int8
    assert len(generate(blocked, prompts, config)[0]) == 8


def _int4_expected(layer: Int4WeightOnlyLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 layer's output in float64 the slow way, with the activations rounded as the twin rounds them: to
    int8 per group below 128 rows (w = (q - 8) s + z, so x w = s xq q + (z - 8 s) x), to bfloat16 from 128 rows
    (the dequantized bfloat16 matmul, whose output is bfloat16 too); and a bound for the rounding of the sums."""
    canonical, group = layer.state_dict(), layer.group_size
    values = torch.stack([canonical["weight"] & 0x0F, canonical["weight"] >> 4], -1).flatten(-2).double()  # [N, K]
    scale, zero = (part.double().T.repeat_interleave(group, 1) for part in canonical["scales_and_zeros"].unbind(-1))
    if x.shape[0] >= 128:
        weight = ((values - 8) * scale + zero).bfloat16().double()
        expected = x.bfloat16().double() @ weight.T
        return expected, 1e-5 * (x.bfloat16().double().abs() @ weight.abs().T) + 2**-8 * expected.abs()
    grouped = x.float().view(x.shape[0], -1, group)
    step = grouped.abs().amax(-1, keepdim=True) / 127  # in float32, as the kernel divides and rounds
    rounded = ((grouped / step).round().double() * step.double()).view(x.shape[0], -1)
    expected = rounded @ (values * scale).T + x.double() @ (zero - 8 * scale).T
    return expected, 1e-5 * (rounded.abs() @ (values * scale).abs().T + x.double().abs() @ (zero - 8 * scale).abs().T)


def test_an_int4_twin_keeps_every_stored_value():
    layer = next(m for m in _quantized("int4", seed=3).modules() if isinstance(m, Int4WeightOnlyLinear))
    canonical = layer.state_dict()
    twin = BlockedInt4Linear(layer)
    packed, table = cpu_gemv.unblock_int4(twin.blocked, layer.out_features, layer.group_size)
    assert torch.equal(packed, canonical["weight"]) and torch.equal(table, canonical["scales_and_zeros"].bfloat16())
    dequantized = cpu_gemv.dequantize_int4_blocked(twin.blocked, layer.out_features, layer.group_size)
    values = torch.stack([packed & 0x0F, packed >> 4], -1).flatten(-2).double()  # [N, K], slowly
    scale, zero = (part.double().T.repeat_interleave(layer.group_size, 1) for part in table.unbind(-1))
    torch.testing.assert_close(dequantized.double(), ((values - 8) * scale + zero).bfloat16().double())


def test_models_stay_as_they_are_without_vnni_without_decode_kernels_or_on_a_forced_backend(monkeypatch):
    model = _quantized("int8", seed=4)
    monkeypatch.setattr(cpu_gemv, "vnni_blocks_available", lambda lib=None: False)
    assert not any(isinstance(m, BlockedInt8Linear) for m in pack_for_cpu(copy.deepcopy(model)).modules())
    monkeypatch.setattr(cpu_gemv, "vnni_blocks_available", lambda lib=None: True)
    assert not any(isinstance(m, BlockedInt8Linear)
                   for m in pack_for_cpu(copy.deepcopy(model), decode_kernel=False).modules())
    forced = set_backend(copy.deepcopy(model), "cpu")
    assert not any(isinstance(m, BlockedInt8Linear) for m in pack_for_cpu(forced).modules())
    assert any(isinstance(m, BlockedInt8Linear) for m in pack_for_cpu(copy.deepcopy(model)).modules())
