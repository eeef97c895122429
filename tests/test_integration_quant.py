"""Quantization through the regular loaders: a checkpoint written by `multimodal quantize` loads back through
`Engine.load` and `multimodal ground` and answers exactly like the same quantization applied in memory; `--quant`
on a float suite quantizes the VLM (also the painter's text encoder) and both denoisers; `--exclude` keeps layers
that fit no INT4 group size in float."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.pipeline import RelayPipeline
from diffusion.text_encoder import GLMTextEncoder
from glm.cpu_linears import BlockedInt4Linear, BlockedInt8Linear, block_for_cpu
from multimodal.cli import main
from multimodal.engine import Engine, Sampling
from multimodal.quantize import QUANTIZED_LINEARS, Int4WeightOnlyLinear, QuantSpec, quantize_model
from vlm.chat import VLMChat

SHORT = Sampling(max_new_tokens=8)
QUESTION = "Where is the dog?"
INT4_MISFITS = ("*.down", "adapter.glu.down_proj")  # the tiny VLM's 88 / 72 input features fit no group size


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn from a seeded normal: the denoisers' zero-initialised output layers would make the
    drawings independent of their weights (and of their quantization)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.1
            param.copy_(noise + 1 if "norm" in name and name.endswith("weight") else noise)
    return model


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.set_num_threads(1)
    engine = Engine.random_tiny(seed=11)
    randomize(engine.painter.base, 12)
    randomize(engine.painter.relay, 13)
    return engine


@pytest.fixture(scope="module")
def suite(engine, tmp_path_factory):
    return engine.save(tmp_path_factory.mktemp("float") / "suite")


def random_image(seed: int, size=(40, 30)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


QUANTIZED = QUANTIZED_LINEARS + (BlockedInt8Linear, BlockedInt4Linear)  # the engine blocks them on VNNI CPUs


def quantized_twin(engine: Engine, spec: QuantSpec) -> Engine:
    """The engine's float models quantized in memory: what every loader must reproduce."""
    model = block_for_cpu(quantize_model(copy.deepcopy(engine.chat_model.model), spec))  # as the engine loads it
    tokenizer = engine.chat_model.tokenizer
    painter = engine.painter
    base, relay = (quantize_model(copy.deepcopy(m), spec) for m in (painter.base, painter.relay))
    painter = RelayPipeline(GLMTextEncoder.from_tokenizer(model, tokenizer), base, relay, painter.config)
    return Engine.from_parts(VLMChat(model, tokenizer), painter, "twin")


def logits(engine: Engine, seed: int) -> torch.Tensor:
    model = engine.chat_model.model
    ids = torch.randint(0, model.vlm_config.text.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)


def test_a_checkpoint_from_multimodal_quantize_loads_through_the_engine_and_ground(engine, suite, tmp_path, capsys):
    quantized = tmp_path / "int8-suite"
    assert main(["quantize", str(suite / "vlm"), str(quantized / "vlm"), "--quant", "int8"]) == 0
    assert (quantized / "vlm" / "tokenizer.json").read_bytes() == (suite / "vlm" / "tokenizer.json").read_bytes()
    shutil.copytree(suite / "diffusion", quantized / "diffusion")
    shutil.copy(suite / "tokenizer.json", quantized / "tokenizer.json")  # the painter's, as its config records
    loaded = Engine.load(quantized)
    twin = quantized_twin(engine, QuantSpec("int8"))
    assert sum(isinstance(m, QUANTIZED) for m in loaded.chat_model.model.modules()) > 10
    assert torch.equal(logits(loaded, 1), logits(twin, 1))
    image = random_image(2)
    expected = twin.chat(image, QUESTION, sampling=SHORT)
    assert loaded.chat(image, QUESTION, sampling=SHORT) == expected
    # The painter's text encoder is the loaded (quantized) GLM: drawings use it.
    assert loaded.painter.text_encoder.model is loaded.chat_model.model

    image.save(tmp_path / "scene.png")
    capsys.readouterr()
    assert main(["ground", str(tmp_path / "scene.png"), QUESTION, "--checkpoint", str(quantized),
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith(expected + "\n")
    assert main(["ground", str(tmp_path / "scene.png"), QUESTION, "--checkpoint", str(quantized),
                 "--quant", "int4"]) == 1
    assert "already quantized to int8; drop --quant or pass --quant int8" in capsys.readouterr().err


def test_quant_on_a_float_suite_quantizes_vlm_and_denoisers_like_in_memory(engine, suite, tmp_path, capsys):
    loaded = Engine.load(suite, quant="int8")
    twin = quantized_twin(engine, QuantSpec("int8"))
    for part in (loaded.painter.base, loaded.painter.relay):
        assert any(isinstance(m, QUANTIZED_LINEARS) for m in part.modules())
    assert torch.equal(logits(loaded, 3), logits(twin, 3))
    image = random_image(4)
    assert loaded.chat(image, QUESTION, sampling=SHORT) == twin.chat(image, QUESTION, sampling=SHORT)
    drawn, expected = loaded.draw("a dog with a hat", seed=5), twin.draw("a dog with a hat", seed=5)
    assert drawn.relay[0].tobytes() == expected.relay[0].tobytes()
    assert drawn.relay[0].tobytes() != engine.draw("a dog with a hat", seed=5).relay[0].tobytes()

    out = tmp_path / "dog.png"
    assert main(["draw", "a dog with a hat", "--checkpoint", str(suite), "--quant", "int8", "--out", str(out),
                 "--seed", "5"]) == 0
    assert Image.open(out).tobytes() == expected.relay[0].tobytes()


def test_int4_with_exclude_keeps_the_misfit_layers_in_float(engine, suite, capsys):
    vlm_folder = suite / "vlm"  # a lone VLM: the tiny denoisers' 16-wide layers fit no INT4 group either
    with pytest.warns(UserWarning, match="does not divide the input features of layers.0.mlp.down"):
        loaded = Engine.load(vlm_folder, quant="int4", group_size=32)  # the misfits stay float by themselves
    model = loaded.chat_model.model
    assert type(model.layers[0].mlp.down) is torch.nn.Linear
    assert isinstance(model.layers[0].attn.qkv, (Int4WeightOnlyLinear, BlockedInt4Linear))
    twin = block_for_cpu(quantize_model(copy.deepcopy(engine.chat_model.model), QuantSpec("int4", 32, INT4_MISFITS)))
    ids = torch.randint(0, model.vlm_config.text.vocab_size, (2, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(model(ids), twin(ids))

    image_path = suite.parent / "int4.png"
    random_image(7).save(image_path)
    arguments = ["ground", str(image_path), QUESTION, "--checkpoint", str(vlm_folder), "--max-new-tokens", "6",
                 "--quant", "int4", "--group-size", "32"]
    assert main(arguments + [f"--exclude={pattern}" for pattern in INT4_MISFITS]) == 0
    expected = VLMChat(twin, loaded.chat_model.tokenizer).answer(Image.open(image_path), QUESTION,
                                                                 sampling=Sampling(max_new_tokens=6))
    assert capsys.readouterr().out.startswith(expected + "\n")


def test_draw_quantizes_a_lone_pipeline_folder_and_refuses_tp_there(engine, suite, tmp_path, capsys):
    from diffusion.pipeline import save_relay_pipeline

    painter = engine.painter
    pipe = save_relay_pipeline(tmp_path / "pipe", painter.base, painter.relay, painter.config, text_encoder={
        "checkpoint": str(suite / "vlm"), "tokenizer": str(suite / "vlm" / "tokenizer.json"), "format": "vlm"})
    out = tmp_path / "dog.png"
    assert main(["draw", "a dog with a hat", "--checkpoint", str(pipe), "--quant", "int8", "--out", str(out),
                 "--seed", "5"]) == 0
    expected = quantized_twin(engine, QuantSpec("int8")).draw("a dog with a hat", seed=5).relay[0]
    assert Image.open(out).tobytes() == expected.tobytes()
    assert main(["draw", "a dog", "--checkpoint", str(pipe), "--tp", "2", "--out", str(out)]) == 1
    assert "--tp needs a suite folder" in capsys.readouterr().err
