"""load_glm beyond float decoders: quantized checkpoints, quantizing while loading, and CogView4's bare GlmModel."""

import json

import pytest
import torch
from torch import nn
from transformers import GlmConfig as HFGlmConfig
from transformers import GlmModel as HFGlmModel

from diffusion.text_encoder import GLMTextEncoder
from glm.convert import load_glm, read_glm_checkpoint, save_glm
from glm.model import GLMConfig, GLMModel
from multimodal.cli import main
from multimodal.quantize import Int4WeightOnlyLinear, Int8WeightOnlyLinear, QuantSpec, quantize_model

TINY = GLMConfig.from_preset("tiny", ffn_hidden_size=96)  # 96 input features of mlp.down: INT4 group size 32 fits


def random_glm(seed: int) -> GLMModel:
    return GLMModel(TINY).init_weights(generator=torch.Generator().manual_seed(seed)).eval()


def random_tokens(seed: int, shape=(2, 11)) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("scheme", "extra"), [("int8", []), ("int4", ["--group-size", "32", "--exclude", "output"])])
def test_checkpoint_written_by_quantize_loads_bit_equal_to_in_memory_quantization(tmp_path, scheme, extra):
    save_glm(random_glm(1), tmp_path / "float")
    assert main(["quantize", str(tmp_path / "float"), str(tmp_path / "q"), "--quant", scheme, *extra]) == 0
    loaded = load_glm(tmp_path / "q")
    spec = QuantSpec(scheme, 32, exclude=("output",)) if scheme == "int4" else QuantSpec(scheme)
    expected = quantize_model(random_glm(1), spec)
    quantized_type = Int4WeightOnlyLinear if scheme == "int4" else Int8WeightOnlyLinear
    assert isinstance(loaded.layers[1].mlp.down, quantized_type)
    assert type(loaded.output) is (nn.Linear if scheme == "int4" else Int8WeightOnlyLinear)
    tokens = random_tokens(2)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), expected(tokens))
    with pytest.raises(ValueError, match=f"already quantized to {scheme}"):
        load_glm(tmp_path / "q", quant="int8" if scheme == "int4" else "int4")


def test_float_checkpoint_quantized_while_loading_equals_in_memory_quantization(tmp_path):
    save_glm(random_glm(3), tmp_path / "float")
    loaded = load_glm(tmp_path / "float", quant="int8", exclude=("layers.0.*",))
    expected = quantize_model(random_glm(3), QuantSpec("int8", exclude=("layers.0.*",)))
    assert type(loaded.layers[0].attn.qkv) is nn.Linear
    assert isinstance(loaded.layers[1].attn.qkv, Int8WeightOnlyLinear)
    assert not any(t.is_meta for t in loaded.state_dict().values())
    tokens = random_tokens(4)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), expected(tokens))


def test_convert_keeps_writing_float_checkpoints(tmp_path, capsys):
    save_glm(random_glm(5), tmp_path / "float")
    assert main(["quantize", str(tmp_path / "float"), str(tmp_path / "q"), "--quant", "int8"]) == 0
    assert main(["convert", str(tmp_path / "q"), str(tmp_path / "out")]) == 1
    assert "is quantized; `multimodal convert` writes float checkpoints only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# CogView4's text encoder: a bare transformers GlmModel


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A random transformers GlmModel saved with save_pretrained (as CogView4's text_encoder/) and its folder."""
    torch.manual_seed(6)
    config = HFGlmConfig(
        vocab_size=TINY.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=256,
        pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
    )
    hf = HFGlmModel(config).eval()
    with torch.no_grad():  # transformers initialises biases and norms to constants; make every tensor random
        for name, param in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    folder = tmp_path_factory.mktemp("cogview4") / "text_encoder"
    hf.save_pretrained(folder)
    return hf, folder


def test_bare_glm_model_loads_as_an_encoder_matching_transformers(bare):
    hf, folder = bare
    _, state, detected = read_glm_checkpoint(folder)
    assert detected == "hf-bare" and "output.weight" not in state
    ours = load_glm(folder, dtype=torch.float32)
    assert isinstance(ours.output, nn.Identity)
    tokens = random_tokens(7, (2, 19))
    with torch.no_grad():
        expected = hf(tokens, output_hidden_states=True)
        last, hidden = ours(tokens, output_hidden_states=True)
    torch.testing.assert_close(hidden[-2], expected.hidden_states[-2], atol=1e-5, rtol=0)
    torch.testing.assert_close(last, expected.last_hidden_state, atol=1e-5, rtol=0)


def test_text_encoder_runs_on_the_bare_glm_model(bare):
    hf, folder = bare
    encoder = GLMTextEncoder(load_glm(folder), tokenize=lambda prompt: [], pad_id=0, mask_padding=False)
    rows = [[5, 9, 200, 31, 7], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3]]
    states, mask = encoder.encode_ids(rows)
    assert mask is None and states.shape == (2, 32, 64)
    padded = torch.zeros(2, 32, dtype=torch.long)  # left padding with pad id 0, as the encoder does
    for index, row in enumerate(rows):
        padded[index, 32 - len(row):] = torch.tensor(row)
    with torch.no_grad():
        expected = hf(padded, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(states, expected, atol=1e-5, rtol=0)


def test_bare_glm_model_quantizes_on_load_and_converts_to_an_encoder_only_native_folder(bare, tmp_path, capsys):
    _, folder = bare
    float_model = load_glm(folder)
    quantized = load_glm(folder, quant="int8")
    assert isinstance(quantized.layers[0].mlp.gate_up, Int8WeightOnlyLinear)
    assert isinstance(quantized.output, nn.Identity)
    expected = quantize_model(load_glm(folder), QuantSpec("int8"))
    tokens = random_tokens(8)
    with torch.no_grad():
        assert torch.equal(quantized(tokens), expected(tokens))

    assert main(["convert", str(folder), str(tmp_path / "native")]) == 0
    assert "hf-bare format" in capsys.readouterr().out
    assert json.loads((tmp_path / "native" / "config.json").read_text())["encoder_only"] is True
    native = load_glm(tmp_path / "native")
    assert isinstance(native.output, nn.Identity)
    assert native.state_dict().keys() == float_model.state_dict().keys()
    for key, tensor in native.state_dict().items():
        assert torch.equal(tensor, float_model.state_dict()[key]), key


def test_multimodal_quantize_writes_an_encoder_only_checkpoint_from_the_bare_folder(bare, tmp_path):
    _, folder = bare
    out = tmp_path / "text_encoder-int8"
    assert main(["quantize", str(folder), str(out), "--quant", "int8"]) == 0
    assert json.loads((out / "config.json").read_text())["encoder_only"] is True
    loaded = load_glm(out)
    assert isinstance(loaded.output, nn.Identity)
    expected = quantize_model(load_glm(folder), QuantSpec("int8"))
    tokens = random_tokens(9)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), expected(tokens))
