"""GLM-4.1V / 4.6V (`vlm.glm4v`) against transformers' Glm4vForConditionalGeneration with the same tiny random weights:
logits text only, with one image and with two images of different sizes; greedy tokens with the KV cache; strict
loading of a folder transformers saved; the config's sizes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from multimodal.checkpoint import CheckpointError
from vlm.glm4v import Glm4vConfig, Glm4vModel, convert_transformers_state, generate_glm4v, load_glm4v

IMAGE, START, END, VIDEO = 290, 291, 292, 293


@pytest.fixture(scope="module")
def reference():
    from transformers import Glm4vConfig as TransformersConfig
    from transformers import Glm4vForConditionalGeneration

    config = TransformersConfig(
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=2, hidden_size=32, num_heads=4, intermediate_size=48, out_hidden_size=64,
                           image_size=56, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=IMAGE, image_start_token_id=START, image_end_token_id=END, video_token_id=VIDEO,
    )
    torch.manual_seed(0)
    model = Glm4vForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers initialises norms and biases to constants; make every tensor random
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def ours(reference):
    model = Glm4vModel(Glm4vConfig.from_transformers(reference.config.to_dict()))
    from multimodal.checkpoint import load_into

    load_into(model, convert_transformers_state(reference.state_dict()))
    return model.eval()


def prompt_with_images(grids: list[tuple[int, int, int]], generator: torch.Generator):
    """Text, then per image its start token, one image token per merged patch and its end token, then text."""
    parts, pixels = [torch.randint(0, 280, (3,), generator=generator)], []
    for t, h, w in grids:
        parts += [torch.tensor([START] + [IMAGE] * (t * h * w // 4) + [END]), torch.randint(0, 280, (2,),
                                                                                             generator=generator)]
        pixels.append(torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=generator))
    return torch.cat(parts)[None], torch.cat(pixels), torch.tensor(grids)


def test_text_only_logits_equal_transformers(reference, ours):
    ids = torch.randint(0, 280, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grids", [[(1, 4, 6)], [(1, 4, 4), (1, 2, 8)]], ids=["one image", "two images"])
def test_logits_with_images_equal_transformers(reference, ours, grids):
    ids, pixels, grid = prompt_with_images(grids, torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=pixels, image_grid_thw=grid,
                             mm_token_type_ids=(ids == IMAGE).int()).logits
        torch.testing.assert_close(ours(ids, pixels, grid), expected, atol=1e-5, rtol=1e-5)


def test_greedy_tokens_with_the_cache_equal_transformers_generate(reference, ours):
    ids, pixels, grid = prompt_with_images([(1, 4, 6)], torch.Generator().manual_seed(3))
    expected = reference.generate(input_ids=ids, pixel_values=pixels, image_grid_thw=grid,
                                  mm_token_type_ids=(ids == IMAGE).int(), attention_mask=torch.ones_like(ids),
                                  max_new_tokens=12, do_sample=False, eos_token_id=None)[0, ids.shape[1]:]
    assert list(generate_glm4v(ours, ids, pixels, grid, max_new_tokens=12)) == expected.tolist()


def test_a_saved_transformers_folder_loads_strictly(reference, tmp_path):
    reference.save_pretrained(tmp_path / "glm4v")
    loaded = load_glm4v(tmp_path / "glm4v")
    ids = torch.randint(0, 280, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), reference(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    values = json.loads((tmp_path / "glm4v" / "config.json").read_text())
    config = Glm4vConfig.from_transformers(values)
    assert (config.text.num_kv_heads, config.text.mrope_section, config.vision.out_hidden_size) == (2, (2, 1, 1), 64)
    values["text_config"]["hidden_size"] = 96
    with pytest.raises(CheckpointError, match="out_hidden_size 64 differs"):
        Glm4vConfig.from_transformers(values)
    with pytest.raises(CheckpointError, match="model_type"):
        Glm4vConfig.from_transformers({"model_type": "chatglm"})


# ----------------------------------------------------------------------------------------------------------------
# Images, prompts and answers


def test_images_become_the_patches_transformers_processor_makes():
    from transformers.models.glm4v import Glm4vImageProcessorPil

    from vlm.glm4v_chat import ImageSettings, image_patches

    settings = ImageSettings(min_pixels=2 * 56 * 56, max_pixels=2 * 112 * 140)
    reference = Glm4vImageProcessorPil(size={"shortest_edge": settings.min_pixels,
                                             "longest_edge": settings.max_pixels})
    generator = np.random.default_rng(5)
    for size in [(30, 20), (300, 170), (97, 64)]:  # enlarged, shrunk, kept
        image = Image.fromarray(generator.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        expected = reference(images=[image], return_tensors="pt")
        pixels, grid = image_patches(image, settings)
        assert grid.tolist() == expected["image_grid_thw"].tolist()
        torch.testing.assert_close(pixels, expected["pixel_values"], atol=1e-5, rtol=1e-5)


def test_the_visible_answer_drops_the_thinking_and_rewrites_boxes():
    from vlm.glm4v_chat import visible_answer

    raw = ("<think>The dog is left.</think><answer>The dog <|begin_of_box|>[100,200,300,1000]<|end_of_box|> "
           "sits.</answer>")
    assert visible_answer(raw) == "The dog [[100,200,300,999]] sits."
    assert visible_answer("<think>still thinking") == ""
    assert visible_answer("The dog <|begin_of_box|>[100,2", final=False) == "The dog "
    assert visible_answer("two <|begin_of_box|>[[1,2,3,4],[5,6,7,8]]<|end_of_box|>") == \
        "two [[001,002,003,004];[005,006,007,008]]"


@pytest.fixture(scope="module")
def glm4v_folder(reference, tmp_path_factory):
    """A transformers folder of the tiny model with a tokenizer (ids below the image tokens) and processor bounds."""
    from glm.tokenizer import train_bpe

    folder = tmp_path_factory.mktemp("glm4v") / "GLM-4.1V-tiny"
    reference.save_pretrained(folder)
    train_bpe(["What is in the image?", "a dog and a cat", "Where is the dog?"] * 5, vocab_size=280).save(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 2 * 56 * 56, "longest_edge": 2 * 112 * 112}, "patch_size": 14,
         "temporal_patch_size": 2, "merge_size": 2}))
    return folder


def test_the_engine_answers_with_a_glm4v_folder_as_transformers_generates(reference, glm4v_folder):
    from transformers.models.glm4v import Glm4vImageProcessorPil

    from multimodal.engine import Engine, Sampling
    from vlm.glm4v_chat import visible_answer

    engine = Engine.load(glm4v_folder)
    image = Image.fromarray(np.random.default_rng(6).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    answer = engine.chat(image, "What is in the image?", sampling=Sampling(max_new_tokens=10))

    ids, _, grid = engine.chat_model.prompt(image, [("user", "What is in the image?")])
    inputs = Glm4vImageProcessorPil(size={"shortest_edge": 2 * 56 * 56, "longest_edge": 2 * 112 * 112})(
        images=[image], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == grid.tolist()
    prompt = torch.tensor([ids])
    assert int((prompt == IMAGE).sum()) == int(grid.prod()) // 4
    tokens = reference.generate(input_ids=prompt, pixel_values=inputs["pixel_values"], image_grid_thw=grid,
                                mm_token_type_ids=(prompt == IMAGE).int(), attention_mask=torch.ones_like(prompt),
                                max_new_tokens=10, do_sample=False,
                                eos_token_id=list(engine.chat_model.tokenizer.stop_tokens))[0, prompt.shape[1]:]
    tokens = [t for t in tokens.tolist() if t not in engine.chat_model.tokenizer.stop_tokens]
    expected = visible_answer(engine.chat_model.tokenizer.decode(tokens, skip_special_tokens=False))
    assert answer == expected
    assert engine.chat(image, "Where is the dog?", [("user", "What is in the image?"), ("assistant", answer)],
                       Sampling(max_new_tokens=4)) is not None  # a follow-up turn runs on the same image


@pytest.mark.parametrize("quant,group", [("int8", 64), ("int4", 32)])
def test_quantized_glm4v_equals_float_with_the_dequantized_weights(glm4v_folder, quant, group):
    """INT8 / INT4 through the engine: every Linear the scheme fits is quantized, and the logits equal those of the
    float model given the dequantized weights (the reference kernels; the fused ones to bfloat16's rounding)."""
    from kernels.int4 import dequantize_int4
    from kernels.int8 import dequantize_int8
    from multimodal.engine import Engine
    from multimodal.quantize import set_backend

    quantized = Engine.load(glm4v_folder, quant=quant, group_size=group).chat_model
    dequantized = Engine.load(glm4v_folder).chat_model.model
    replaced = 0
    for name, module in quantized.model.named_modules():
        if type(module).__name__.startswith("Int"):
            state = module.state_dict()  # canonical layout, whatever the runtime layout
            weight = (dequantize_int8(state["weight"], state["scales"]) if quant == "int8" else
                      dequantize_int4(state["weight"], state["scales_and_zeros"], group))
            dequantized.get_submodule(name).weight.data = weight
            replaced += 1
    assert replaced >= 4 * 2 + 2  # the language layers' projections at least, and the output
    ids, pixels, grid = quantized.prompt(Image.new("RGB", (64, 64), "orange"), [("user", "a dog")])
    prompt = torch.tensor([ids])
    with torch.no_grad():
        expected = dequantized(prompt, pixels, grid)
        torch.testing.assert_close(set_backend(quantized.model, "reference")(prompt, pixels, grid), expected,
                                   rtol=1e-4, atol=1e-4)
        fused = set_backend(quantized.model, "auto")(prompt, pixels, grid)
        assert ((fused - expected).norm() / expected.norm()).item() < 2e-2
