"""`multimodal quantize`: the written checkpoint loads strictly and equals quantizing in memory."""

import pytest
import torch

from glm.convert import save_glm
from glm.model import GLMConfig, GLMModel
from multimodal.checkpoint import build_on_meta, read_native_config, read_state_dict
from multimodal.cli import main
from multimodal.quantize import Int8WeightOnlyLinear, QuantSpec, load_weights, quantize_model

TINY = GLMConfig.from_preset("tiny", ffn_hidden_size=96)


def test_quantize_command_writes_a_checkpoint_equal_to_in_memory_quantization(tmp_path, capsys):
    model = GLMModel(TINY).init_weights(generator=torch.Generator().manual_seed(7)).eval()
    save_glm(model, tmp_path / "float")
    assert main(["quantize", str(tmp_path / "float"), str(tmp_path / "int4"), "--quant", "int4",
                 "--group-size", "32", "--exclude", "output"]) == 0
    config = read_native_config(tmp_path / "int4", kind="glm")
    assert config["quant"] == {"format_version": 1, "scheme": "int4", "group_size": 32, "exclude": ["output"]}
    loaded = build_on_meta(lambda: GLMModel(GLMConfig.from_dict(config)))
    load_weights(loaded, read_state_dict(tmp_path / "int4"), config)
    expected_model = quantize_model(model, QuantSpec("int4", 32, exclude=("output",)))
    tokens = torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), expected_model(tokens))
    assert type(loaded.output) is torch.nn.Linear


def test_quantize_command_errors_are_one_sentence(tmp_path, capsys):
    save_glm(GLMModel(TINY).init_weights(), tmp_path / "float")
    with pytest.warns(UserWarning, match="group size 64 does not divide the input features of layers.0.mlp.down"):
        assert main(["quantize", str(tmp_path / "float"), str(tmp_path / "int4"), "--quant", "int4",
                     "--group-size", "64"]) == 0  # the 96-wide layers stay float, and the folder loads back
    assert main(["quantize", str(tmp_path / "float"), str(tmp_path / "bad"), "--quant", "int4",
                 "--group-size", "48"]) == 1
    assert "INT4 group size must be one of 32, 64, 128" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "float"), str(tmp_path / "int8"), "--quant", "int8"]) == 0
    assert main(["quantize", str(tmp_path / "int8"), str(tmp_path / "again"), "--quant", "int8"]) == 1
    assert "already quantized" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "missing"), str(tmp_path / "x"), "--quant", "int8"]) == 1


def test_quantize_command_on_a_vlm_quantizes_experts_and_vision_tower(tmp_path):
    from vlm.convert import save_vlm
    from vlm.model import VisionLanguageModel, VLMConfig

    model = VisionLanguageModel(VLMConfig.from_preset("tiny")).init_weights(generator=torch.Generator().manual_seed(9))
    save_vlm(model, tmp_path / "vlm")
    assert main(["quantize", str(tmp_path / "vlm"), str(tmp_path / "q"), "--quant", "int8"]) == 0
    config = read_native_config(tmp_path / "q", kind="vlm")
    loaded = build_on_meta(lambda: VisionLanguageModel(VLMConfig.from_dict(config)))
    load_weights(loaded, read_state_dict(tmp_path / "q"), config)
    for name in ("layers.0.attn.vision_qkv", "layers.0.vision_mlp.down", "vision.blocks.0.mlp.fc1", "output"):
        assert isinstance(loaded.get_submodule(name), Int8WeightOnlyLinear), name
