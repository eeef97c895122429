"""CogView4 against diffusers' `CogView4Pipeline`: from the same embeddings, and end to end from a folder in
diffusers' layout with a transformers GLM text encoder and a tokenizer.json, through `multimodal draw --checkpoint`."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_diffusion_pipeline import tokenize

from diffusion.cogview4 import LatentFlowPipeline, load_cogview4, load_diffusers_transformer
from diffusion.denoiser import DIFFUSERS_KEYS, DiT, config_from_diffusers
from diffusion.text_encoder import GLMTextEncoder
from glm.model import GLMConfig, GLMModel
from glm.tokenizer import train_bpe
from multimodal.checkpoint import CheckpointError, convert, load_into


def tiny_components(text_dim: int = 32):
    from diffusers import AutoencoderKL, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    transformer = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=text_dim, time_embed_dim=8, condition_dim=4,
    ).eval()
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    vae = AutoencoderKL(
        block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_shift=0.25, max_shift=0.75, base_image_seq_len=256, use_dynamic_shifting=True, time_shift_type="linear"
    )
    return transformer, vae, scheduler


def test_cogview4_latent_pipeline_matches_diffusers(tmp_path):
    from diffusers import CogView4Pipeline as DiffusersCogView4

    transformer, vae, scheduler = tiny_components()
    reference = DiffusersCogView4(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler
    )
    g = torch.Generator().manual_seed(1)
    embeds, negative = torch.randn(1, 16, 32, generator=g), torch.randn(1, 16, 32, generator=g)
    expected = reference(
        prompt_embeds=embeds, negative_prompt_embeds=negative, height=32, width=32, num_inference_steps=3,
        guidance_scale=4.0, num_images_per_prompt=2, output_type="pt",
        generator=[torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)],
    ).images

    ours_dit = DiT(config_from_diffusers(dict(transformer.config)))
    load_into(ours_dit, convert(transformer.state_dict(), DIFFUSERS_KEYS))
    ours = LatentFlowPipeline(None, ours_dit, vae)(
        prompt_embeds=embeds, negative_prompt_embeds=negative, height=32, width=32, num_inference_steps=3,
        guidance_scale=4.0, num_images_per_prompt=2, seed=[7, 8], output_type="pt",
    )
    assert expected.shape == (2, 3, 32, 32)
    torch.testing.assert_close(torch.stack(ours.images), expected, atol=1e-5, rtol=1e-5)

    # The same weights from a diffusers folder on disk, and prompts through a GLM encoder (CogView4's padding).
    transformer.save_pretrained(tmp_path / "transformer")
    loaded = load_diffusers_transformer(tmp_path / "transformer")
    glm = GLMModel(GLMConfig.from_preset("tiny", hidden_size=32, head_dim=8)).init_weights(
        generator=torch.Generator().manual_seed(3)
    )
    encoder = GLMTextEncoder(glm, tokenize, pad_id=0, mask_padding=False)
    pipe = LatentFlowPipeline(encoder, loaded, vae)
    options = dict(height=32, width=32, num_inference_steps=2, guidance_scale=3.0, seed=4, output_type="pt")
    from_prompt = pipe("a dog", negative_prompt="blurry", **options).images[0]
    from_embeds = pipe(prompt_embeds=encoder("a dog")[0], negative_prompt_embeds=encoder("blurry")[0], **options)
    torch.testing.assert_close(from_prompt, from_embeds.images[0])
    expected = reference(
        prompt_embeds=encoder("a dog")[0], negative_prompt_embeds=encoder("blurry")[0], height=32, width=32,
        num_inference_steps=2, guidance_scale=3.0, output_type="pt", generator=[torch.Generator().manual_seed(4)],
    ).images[0]
    torch.testing.assert_close(from_prompt, expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def cogview4_folder(tmp_path_factory):
    """A CogView4Pipeline of tiny random parts, saved by diffusers: a transformers GlmModel text encoder and a
    tokenizer.json whose post-processor adds [gMASK] <sop>, as GLM-4's does."""
    from diffusers import CogView4Pipeline as DiffusersCogView4
    from tokenizers import processors
    from transformers import GlmConfig, GlmModel, PreTrainedTokenizerFast

    bpe = train_bpe(["a dog with a hat", "a cat wearing sunglasses", "blurry, low quality"] * 8, vocab_size=300)
    backend = bpe.backend.tokenizer
    backend.encode_special_tokens = False  # as transformers' fast tokenizer parses text
    backend.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A", special_tokens=[(name, bpe.token_id(name)) for name in ("[gMASK]", "<sop>")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>", padding_side="left")
    config = GlmConfig(
        vocab_size=bpe.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
    )
    torch.manual_seed(5)
    text_encoder = GlmModel(config).eval()
    with torch.no_grad():  # transformers initialises biases and norms to constants; make every tensor random
        for p in text_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    transformer, vae, scheduler = tiny_components()
    reference = DiffusersCogView4(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                                  scheduler=scheduler)
    folder = tmp_path_factory.mktemp("cogview4") / "CogView4-tiny"
    reference.save_pretrained(folder)
    return folder, reference


def test_a_diffusers_cogview4_folder_draws_the_same_image_as_diffusers(cogview4_folder, tmp_path):
    from multimodal.cli import main

    folder, reference = cogview4_folder
    options = dict(height=32, width=64, num_inference_steps=3, guidance_scale=3.5)
    prompt, negative = "a dog with a hat", "blurry"
    expected = reference(prompt, negative_prompt=negative, output_type="pt",
                         generator=[torch.Generator().manual_seed(11)], **options).images[0]
    pipe = load_cogview4(folder)
    ours = pipe(prompt, negative_prompt=negative, output_type="pt", seed=11, **options).images[0]
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)  # prompts, padding, GLM states, sampling, VAE
    other = pipe("a cat wearing sunglasses", negative_prompt=negative, output_type="pt", seed=11, **options)
    assert (other.images[0] - expected).abs().max() > 1e-3  # another prompt moves pixels 100x the tolerance

    out = tmp_path / "dog.png"
    assert main(["draw", prompt, "--checkpoint", str(folder), "--negative", negative, "--height", "32", "--width",
                 "64", "--steps", "3", "--guidance", "3.5", "--seed", "11", "--out", str(out)]) == 0
    expected_pixels = reference(prompt, negative_prompt=negative, generator=[torch.Generator().manual_seed(11)],
                                **options).images[0]
    difference = np.abs(np.asarray(Image.open(out), np.int16) - np.asarray(expected_pixels, np.int16))
    assert difference.max() <= 1  # the same image, to 8-bit rounding


def test_a_folder_that_is_not_cogview4_is_one_sentence(cogview4_folder, tmp_path):
    import json
    import shutil

    folder, _ = cogview4_folder
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": False}))
    with pytest.raises(CheckpointError, match="not CogView4's"):
        load_cogview4(broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(CheckpointError, match="lacks vae"):
        load_cogview4(broken)
