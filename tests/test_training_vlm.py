"""The VLM's two-stage training: the text encoder's weights stay exactly those of the language stage, the rest
learns, and the diffusion export refuses a VLM whose text encoder differs."""

from __future__ import annotations

import torch

from multimodal.assets import load_world_tokenizer
from multimodal.training.vlm import is_text_encoder_parameter, text_encoder_fingerprint, train_vlm
from vlm.convert import load_vlm


def test_vision_stage_keeps_the_text_encoder_and_trains_the_rest(tmp_path):
    torch.set_num_threads(1)
    tokenizer = load_world_tokenizer()
    train_vlm(tmp_path, tokenizer, steps=2, language_steps=2, batch_size=2, scenes=6)
    language = load_vlm(tmp_path / "language" / "model")
    vision = load_vlm(tmp_path / "model")
    assert text_encoder_fingerprint(language) == text_encoder_fingerprint(vision)
    layers = vision.config.num_layers
    before, after = language.state_dict(), vision.state_dict()
    changed = {name for name in after if not torch.equal(before[name], after[name])}
    frozen = {name for name in after if is_text_encoder_parameter(name, layers)}
    assert frozen and not changed & frozen
    assert "vision.patch_embed.weight" in changed and f"layers.{layers - 1}.attn.qkv.weight" in changed
    assert f"layers.{layers - 2}.attn.vision_qkv.weight" in changed
