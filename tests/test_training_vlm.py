"""The VLM's two-stage training: the text encoder's weights stay exactly those of the language stage, the rest
learns, and the diffusion export ships the run's moving average and refuses a VLM whose text encoder differs; the
auxiliary vision losses."""

from __future__ import annotations

import torch

from diffusion.text_encoder import GLMTextEncoder
from multimodal.assets import load_world_tokenizer
from multimodal.training.vlm import (
    GROWN_LAYERS,
    MIN_SPREAD,
    PatchDetectionHead,
    grow,
    is_text_encoder_parameter,
    patch_targets,
    spread_loss,
    text_encoder_fingerprint,
    train_vlm,
    world_vlm_config,
)
from multimodal.world import CLASSES, make_scene, split_seeds
from vlm.convert import load_vlm
from vlm.model import VisionLanguageModel


def test_vision_stage_keeps_the_text_encoder_and_trains_the_rest(tmp_path):
    torch.set_num_threads(1)
    tokenizer = load_world_tokenizer()
    train_vlm(tmp_path, tokenizer, steps=2, language_steps=2, tower_steps=2, batch_size=2, scenes=6)
    language = load_vlm(tmp_path / "language" / "model")
    vision = load_vlm(tmp_path / "model")
    assert text_encoder_fingerprint(language) == text_encoder_fingerprint(vision)
    layers = language.config.num_layers
    assert vision.config.num_layers == layers + GROWN_LAYERS and vision.config.encoder_layers == layers - 1
    before, after = language.state_dict(), vision.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    frozen = {name for name in after if is_text_encoder_parameter(name, layers - 1)}
    assert frozen and not changed & frozen
    assert "vision.patch_embed.convs.0.weight" in changed and f"layers.{layers - 1}.attn.qkv.weight" in changed
    assert f"layers.{layers - 2}.attn.vision_qkv.weight" in changed
    assert after[f"layers.{layers}.attn.dense.weight"].abs().sum() > 0  # a grown layer's zero projection learned


def test_grown_layers_start_as_the_identity(generator):
    config = world_vlm_config(300)
    model = VisionLanguageModel(config).init_weights(generator=generator)
    grown, grown_config = grow(model, config, 2)
    assert grown_config.text.num_layers == config.text.num_layers + 2 and grown_config.text.encoder_layers == 3
    ids = torch.randint(0, 300, (2, 9), generator=generator)
    pixels = torch.randn(2, 3, 64, 64, generator=generator)
    positions = torch.arange(9 + config.image_tokens).expand(2, -1)
    ids_with_image = torch.cat([ids[:, :2], torch.zeros(2, config.image_tokens, dtype=torch.long), ids[:, 2:]], 1)
    with torch.no_grad():
        expected = model(ids_with_image, image_embeds=model.encode_image(pixels), image_start=2, positions=positions)
        actual = grown(ids_with_image, image_embeds=grown.encode_image(pixels), image_start=2, positions=positions)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        text_states = [GLMTextEncoder(m, lambda t: [3 + ord(c) % 200 for c in t], pad_id=0)(["a dog"])[0]
                       for m in (model, grown)]
    torch.testing.assert_close(text_states[1], text_states[0], rtol=0, atol=0)


def test_patch_targets_mark_the_patch_holding_each_box_centre():
    scenes = [make_scene(seed) for seed in split_seeds("train", 12)]
    grid = 8
    classes, boxes = patch_targets(scenes, grid)
    names = list(CLASSES)
    for row, scene in enumerate(scenes):
        expected = {}
        for index, obj in enumerate(scene.objects):  # the slow way: the centre in pixels, the patch it falls in
            x0, y0, x1, y1 = obj.box
            col, line = int((x0 + x1) / 2 / scene.size * grid), int((y0 + y1) / 2 / scene.size * grid)
            cell = line * grid + col
            area = (x1 - x0) * (y1 - y0)
            if cell not in expected or area > expected[cell][0]:
                expected[cell] = (area, index)
        assert set(classes[row].nonzero().flatten().tolist()) == set(expected)
        for cell, (_, index) in expected.items():
            assert classes[row, cell] == 1 + names.index(scene.objects[index].name)
            x0, y0, x1, y1 = scene.objects[index].box
            torch.testing.assert_close(boxes[row, cell], torch.tensor([x0, y0, x1, y1]) / scene.size, atol=2e-3, rtol=0)


def test_spread_loss_is_zero_for_varied_images_and_positive_for_a_constant_prefix(generator):
    varied = torch.randn(64, 3, 16, generator=generator)  # [B, n, H]: every dimension varies across images
    assert spread_loss(varied).item() < 0.05
    constant = torch.randn(1, 3, 16, generator=generator) * 10 + 0.1 * varied  # a prefix with the image 1% of it
    normalized = constant / constant.pow(2).mean(-1, keepdim=True).sqrt()
    expected = (MIN_SPREAD - normalized.std(0)).clamp(min=0).mean()
    torch.testing.assert_close(spread_loss(constant), expected, rtol=1e-4, atol=1e-6)
    assert spread_loss(constant).item() > 0.5


def test_the_detection_heads_live_in_the_trainer_state_not_the_model(tmp_path):
    torch.set_num_threads(1)
    tokenizer = load_world_tokenizer()
    train_vlm(tmp_path, tokenizer, steps=1, language_steps=1, tower_steps=1, batch_size=2, scenes=4)
    model = load_vlm(tmp_path / "model")
    tower = PatchDetectionHead(model.vision.width)
    tower.load_state_dict(torch.load(tmp_path / "tower" / "trainer.pt", weights_only=True)["extra"])  # strict
    heads = torch.nn.ModuleDict({"tower": tower, "tokens": PatchDetectionHead(model.config.hidden_size)})
    heads.load_state_dict(torch.load(tmp_path / "trainer.pt", weights_only=True)["extra"])
    assert not any(".classes." in name or name.startswith("classes") for name in model.state_dict())


def test_diffusion_run_exports_its_moving_average_and_refuses_another_text_encoder(tmp_path):
    import shutil

    import pytest

    from diffusion.pipeline import load_relay_pipeline
    from multimodal.checkpoint import NATIVE_WEIGHTS, read_state_dict
    from multimodal.training.diffusion import train_diffusion
    from multimodal.training.export import export_suite
    from multimodal.training.judge import train_judge

    torch.set_num_threads(1)
    tokenizer = load_world_tokenizer()
    runs = tmp_path / "runs"
    train_vlm(runs / "vlm", tokenizer, steps=1, language_steps=1, tower_steps=1, batch_size=2, scenes=4)
    train_diffusion(runs / "diffusion", tokenizer, runs / "vlm", steps=3, batch_size=2, scenes=4)
    train_judge(runs / "judge", tokenizer, steps=1, batch_size=2, scenes=4)
    tokenizer_file = tokenizer.save(tmp_path / "tokenizer.json")

    suite = export_suite(runs / "vlm", runs / "diffusion", runs / "judge", tokenizer_file, tmp_path / "suite")
    pipeline = load_relay_pipeline(suite / "diffusion")
    averaged = read_state_dict(runs / "diffusion" / "ema" / NATIVE_WEIGHTS)
    last = read_state_dict(runs / "diffusion" / "model" / NATIVE_WEIGHTS)
    name = "proj_out.weight"
    torch.testing.assert_close(pipeline.base.state_dict()[name], averaged[f"base.{name}"], rtol=0, atol=0)
    assert not torch.equal(averaged[f"base.{name}"], last[f"base.{name}"])
    image = pipeline("a dog with a hat", seed=0, num_inference_steps=2, relay_steps=2).images[0]
    assert image.size == (64, 64)

    shutil.rmtree(runs / "vlm")  # a VLM trained from another seed has another text encoder
    train_vlm(runs / "vlm", tokenizer, seed=1, steps=1, language_steps=1, tower_steps=1, batch_size=2, scenes=4)
    with pytest.raises(ValueError, match="another text encoder"):
        export_suite(runs / "vlm", runs / "diffusion", runs / "judge", tokenizer_file, tmp_path / "suite2")
