"""GLM-4.1V / 4.6V (`vlm.glm4v`) against transformers' Glm4vForConditionalGeneration with the same tiny random weights:
logits text only, with one image and with two images of different sizes; greedy tokens with the KV cache; strict
loading of a folder transformers saved; the config's sizes."""

import json

import pytest
import torch

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
