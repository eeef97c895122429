"""The whole-step C decode of `glm/cpu_decode.py` (kernels/csrc/decode.c): logits against the model run in float64 on
the same weights, on fresh random inputs, for float32, bfloat16, INT8 and INT4 weights, padded rows, every build target;
generation through it; the models and caches it declines."""

import importlib
import zlib

import pytest
import torch

from glm.cpu_decode import (
    KIND_INT4_BLOCKED,
    KIND_INT8_BLOCKED,
    MAX_ROWS,
    CpuDecoder,
    Unsupported,
    prepare_cpu_decode,
)
from glm.model import GLMConfig, GLMModel
from kernels import cpu_gemv
from kernels.int4 import dequantize_int4
from multimodal.quantize import Int4WeightOnlyLinear, Int8WeightOnlyLinear, QuantSpec, quantize_model, set_backend
from tests.test_cpu_gemv import TARGETS, _library

generate_module = importlib.import_module("glm.generate")
pytestmark = [pytest.mark.skipif(not cpu_gemv.available(), reason="no C compiler builds the decode kernels here"),
              pytest.mark.filterwarnings("ignore:INT4 group size")]  # tiny's 88-wide layers stay in float


def _model(preset: str, dtype: torch.dtype, seed: int, quant: str | None = None) -> GLMModel:
    generator = torch.Generator().manual_seed(seed)
    model = GLMModel(GLMConfig.from_preset(preset)).init_weights(std=0.08, generator=generator).to(dtype).eval()
    return quantize_model(model, QuantSpec(quant, group_size=32)) if quant else model


def _float64_twin(model: GLMModel) -> GLMModel:
    """The same weights (INT8 ones dequantized) in a float64 GLMModel: the slow obvious version of the step."""
    twin = GLMModel(model.config).double().eval()
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, Int4WeightOnlyLinear):
            canonical = module.state_dict()
            state[f"{name}.weight"] = dequantize_int4(canonical["weight"], canonical["scales_and_zeros"],
                                                      module.group_size, torch.float64)
        if isinstance(module, Int8WeightOnlyLinear):
            weight = module.weight[:, : module.in_features].double()  # [N, K] (the CPU copy may be padded)
            state[f"{name}.weight"] = weight * module.scales.double()[:, None]
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias
    for name, tensor in model.state_dict().items():
        state.setdefault(name, tensor)
    twin.load_state_dict({name: state[name].double() for name in twin.state_dict()})
    return twin


@pytest.mark.parametrize("target", [target for target, _ in TARGETS])
@pytest.mark.parametrize("preset, dtype, quant, tolerance", [
    ("tiny", torch.float32, None, 3e-6),  # float32 sums (measured <= 5e-7)
    ("tiny-glm4", torch.float32, None, 3e-6),
    ("tiny", torch.float32, "int8", 4e-4),  # int16-rounded activations, kernels/csrc/gemv.c (measured 9e-5)
    ("tiny", torch.bfloat16, None, 2e-2),  # keys and values stored in bfloat16 (measured 5e-3)
    ("tiny-glm4", torch.bfloat16, "int8", 2e-2),
    # int4: activations rounded to int8 per group of 32, as llama.cpp's Q8 blocks (measured <= 5.5e-2 here, where
    # the eager path's bfloat16 activations give 9e-3; rounding the weights to int4 moves these logits by ~35%)
    ("tiny-glm4", torch.float32, "int4", 8e-2),
    ("tiny", torch.bfloat16, "int4", 8e-2),  # its 88-wide down projections stay in float
])
def test_step_matches_float64_model(target, preset, dtype, quant, tolerance):
    seed = zlib.crc32(f"{target} {preset} {dtype} {quant}".encode())
    model = _model(preset, dtype, seed, quant)
    lib = _library(target)
    if quant == "int4" and not lib.gemv_integer_paths():
        with pytest.raises(Unsupported):  # the int4 kernel is AVX2 code; such a model keeps the eager path
            CpuDecoder(model, lib)
        return
    decoder = CpuDecoder(model, lib)
    twin = _float64_twin(model)
    generator = torch.Generator().manual_seed(seed)
    rows, prompt = 3, 6
    # Left padding: row 1 has 2 pad slots, row 2 has 4; positions restart at each row's first real token.
    valid = torch.ones(rows, prompt + 5, dtype=torch.bool)
    valid[1, :2] = valid[2, :4] = False
    positions = (valid[:, :prompt].long().cumsum(-1) - 1).clamp(min=0)
    ids = torch.randint(1, model.config.vocab_size, (rows, prompt), generator=generator)
    ours_cache, reference_cache = model.allocate_cache(rows, prompt + 5), twin.allocate_cache(rows, prompt + 5)
    with torch.inference_mode():
        model(ids, positions=positions, cache=ours_cache, attention_mask=valid[:, :prompt])  # eager prefill
        twin(ids, positions=positions, cache=reference_cache, attention_mask=valid[:, :prompt])
        tokens = ids[:, -1]
        for offset in range(5):  # each step reads the keys and values the earlier ones wrote
            slot, step_positions = prompt + offset, positions[:, -1] + 1 + offset
            ours = decoder.step(tokens, step_positions, slot, ours_cache, valid).double()  # [B, V]
            expected = generate_module.decode_one_token(twin, tokens, step_positions, slot, reference_cache, valid)
            assert ours.shape == expected.shape
            assert (ours - expected).abs().amax() <= tolerance * expected.abs().amax()
            tokens = expected.argmax(-1)


@pytest.mark.parametrize("target", [target for target, _ in TARGETS])
def test_packed_bfloat16_step_matches_float64_model_for_up_to_eight_rows(target):
    """A bfloat16 model packed for the CPU: where the CPU multiplies bfloat16 natively its linears hold the blocked
    layout, which every build's step reads (the others through the portable loop)."""
    seed = zlib.crc32(f"packed {target}".encode())
    model = _model("tiny-glm4", torch.bfloat16, seed)
    twin = _float64_twin(model)
    generate_module.pack_for_cpu(model)
    decoder = CpuDecoder(model, _library(target))
    for rows in (1, 5, 8):  # bfloat16 keys, values, activations
        assert _one_step_error(model, twin, decoder, rows, seed) <= 2e-2


@pytest.mark.parametrize("target", [target for target, _ in TARGETS])
@pytest.mark.parametrize("preset, dtype, quant, tolerance", [
    ("tiny", torch.float32, "int8", 4e-4), ("tiny-glm4", torch.bfloat16, "int8", 2e-2),
    ("tiny-glm4", torch.float32, "int4", 8e-2), ("tiny", torch.bfloat16, "int4", 8e-2),  # as the tiled kernel's
])
def test_blocked_quantized_step_matches_float64_model(target, preset, dtype, quant, tolerance):
    """INT8 and INT4 linears in the blocked layouts (`glm/cpu_linears.py`, which `block_for_cpu` makes where the CPU
    has AVX512_VNNI), swapped in here on every build, whose step reads them (the others through the portable loop)."""
    seed = zlib.crc32(f"blocked {quant} {target} {preset}".encode())
    model = _model(preset, dtype, seed, quant)
    twin = _float64_twin(model)
    _swap_for_blocked(model)
    decoder = CpuDecoder(model, _library(target))
    assert decoder.blocks[0].qkv.kind == (KIND_INT8_BLOCKED if quant == "int8" else KIND_INT4_BLOCKED)
    for rows in (1, 3):
        assert _one_step_error(model, twin, decoder, rows, seed) <= tolerance


def _swap_for_blocked(model: GLMModel) -> None:
    from glm.cpu_linears import BlockedInt4Linear, BlockedInt8Linear

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Int8WeightOnlyLinear):
                setattr(module, name, BlockedInt8Linear(child))
            elif isinstance(child, Int4WeightOnlyLinear):
                setattr(module, name, BlockedInt4Linear(child))


def _one_step_error(model: GLMModel, twin: GLMModel, decoder: CpuDecoder, rows: int, seed: int) -> float:
    """The largest logit difference of one C step after an eager prefill of 4 tokens, relative to the largest
    logit of the float64 twin."""
    generator = torch.Generator().manual_seed(seed + rows)
    ids = torch.randint(1, model.config.vocab_size, (rows, 4), generator=generator)
    positions = torch.arange(4).expand(rows, 4)
    ours_cache, reference_cache = model.allocate_cache(rows, 6), twin.allocate_cache(rows, 6)
    with torch.inference_mode():
        model(ids, positions=positions, cache=ours_cache)
        twin(ids, positions=positions, cache=reference_cache)
        step_positions = torch.full((rows,), 4)
        ours = decoder.step(ids[:, -1], step_positions, 4, ours_cache, None).double()  # [B, V]
        expected = generate_module.decode_one_token(twin, ids[:, -1], step_positions, 4, reference_cache, None)
    assert ours.shape == expected.shape
    return ((ours - expected).abs().amax() / expected.abs().amax()).item()


def test_generation_through_the_step_equals_eager_generation():
    model = _model("tiny", torch.float32, 5)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14]]  # padded rows
    config = generate_module.SamplingConfig(max_new_tokens=20, temperature=0.8, top_k=50, seed=3)
    expected = generate_module.generate(model, prompts, config)
    prepare_cpu_decode(model)
    assert model.cpu_decoder is not None
    assert generate_module.generate(model, prompts, config) == expected
    assert model.cpu_decoder.max_rows == 1  # a float model batches on the eager path
    wide = [[3 + row, 4] for row in range(MAX_ROWS + 1)]
    assert generate_module.generate(model, wide, config) == generate_module.generate(_model("tiny", torch.float32, 5),
                                                                                     wide, config)


def test_quantized_models_take_a_few_rows_through_the_step(monkeypatch):
    model = prepare_cpu_decode(_model("tiny-glm4", torch.float32, 6, "int8"))
    assert model.cpu_decoder.max_rows == MAX_ROWS
    calls = []
    step = model.cpu_decoder.step
    monkeypatch.setattr(model.cpu_decoder, "step", lambda *args: calls.append(len(args[0])) or step(*args))
    config = generate_module.SamplingConfig(max_new_tokens=4)
    for rows in (1, MAX_ROWS, MAX_ROWS + 1):
        generate_module.generate(model, [[5 + row, 6] for row in range(rows)], config)
    assert calls == [1] * 3 + [MAX_ROWS] * 3  # more rows: the eager path


def test_packed_and_quantized_models_get_a_decoder_and_forced_ones_do_not():
    packed = prepare_cpu_decode(generate_module.pack_for_cpu(_model("tiny", torch.bfloat16, 1)))
    # bfloat16 in the blocked layout where the CPU multiplies it natively, else plain rows widened to float
    assert packed.cpu_decoder.max_rows == (cpu_gemv.BLOCKED_ROWS if cpu_gemv.bf16_blocked_available() else 1)
    assert prepare_cpu_decode(generate_module.pack_for_cpu(_model("tiny", torch.bfloat16, 1), decode_kernel=False)
                              ).cpu_decoder is None  # oneDNN's packed weight alone: nothing for the step to read
    assert prepare_cpu_decode(_model("tiny-glm4", torch.float32, 1, "int8")).cpu_decoder is not None
    forced = set_backend(_model("tiny-glm4", torch.float32, 1, "int8"), "cpu")
    assert prepare_cpu_decode(forced).cpu_decoder is None
    assert prepare_cpu_decode(set_backend(_model("tiny-glm4", torch.float32, 1, "int4"), "dequantized")
                              ).cpu_decoder is None


def test_out_of_range_token_or_slot_is_one_clear_error():
    model = _model("tiny", torch.float32, 2)
    decoder = CpuDecoder(model)
    cache = model.allocate_cache(1, 4)
    with pytest.raises(ValueError, match="out of range"):
        decoder.step(torch.tensor([model.config.vocab_size]), torch.tensor([0]), 0, cache, None)
    with pytest.raises(ValueError, match="out of range"):
        decoder.step(torch.tensor([1]), torch.tensor([0]), 4, cache, None)


def test_a_long_context_splits_the_heads_over_threads_with_the_same_logits():
    config = GLMConfig(vocab_size=320, hidden_size=64, num_layers=2, num_heads=8, num_kv_groups=1, head_dim=16,
                       ffn_hidden_size=88, max_seq_len=1024)
    model = GLMModel(config).init_weights(std=0.08, generator=torch.Generator().manual_seed(9)).eval()
    twin = _float64_twin(model)
    ids = torch.randint(1, 320, (1, 700), generator=torch.Generator().manual_seed(10))
    ours_cache, reference_cache = model.allocate_cache(1, 702), twin.allocate_cache(1, 702)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # 700 slots x 8 heads of one group: the parallel branch of decode.c's attention
    try:
        with torch.inference_mode():
            model(ids, cache=ours_cache)
            twin(ids, cache=reference_cache)
            token, position = ids[:, -1], torch.tensor([700])
            ours = CpuDecoder(model).step(token, position, 700, ours_cache, None).double()
            expected = generate_module.decode_one_token(twin, token, position, 700, reference_cache, None)
    finally:
        torch.set_num_threads(threads)
    assert (ours - expected).abs().amax() <= 3e-6 * expected.abs().amax()
