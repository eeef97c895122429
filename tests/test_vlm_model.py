"""The visual-expert model against slow references written from the CogVLM reference note: position ids, the routing
rule, span routing vs boolean-mask routing, cached decode vs the full forward, a batch vs each row alone."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from glm.generate import SamplingConfig, decode_one_token
from glm.model import GLMModel
from multimodal.training.vlm import world_vlm_config
from vlm.convert import load_vlm, save_vlm
from vlm.generate import generate, prefill
from vlm.model import LANGUAGE, VISION, VisionLanguageModel, VLMConfig
from vlm.processor import Processor, position_ids, template_pieces, vision_expert_span
from vlm.vit import ConvStem, ViTConfig

L, V = LANGUAGE, VISION


class CharTokenizer:
    """Printable ASCII one id per character, plus the special tokens the templates use."""

    SPECIALS = ["<pad>", "<s>", "</s>", "[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|begin_of_text|>",
                "<|endoftext|>"]

    def encode(self, text):
        return [20 + ord(c) - 32 if 32 <= ord(c) < 127 else 19 for c in text.replace("\n", "~")]

    def decode(self, ids):
        return "".join(chr(i - 20 + 32) for i in ids if 20 <= i < 115)

    def token_id(self, name):
        if name not in self.SPECIALS:
            raise ValueError(f"Unknown special token {name!r}.")
        return self.SPECIALS.index(name)


def build(preset: str, seed: int = 0) -> VisionLanguageModel:
    generator = torch.Generator().manual_seed(seed)
    return VisionLanguageModel(VLMConfig.from_preset(preset)).init_weights(std=0.1, generator=generator).eval()


def random_image(seed: int, size=(40, 30), mode="RGB") -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), mode="RGB").convert(mode)


# ---------------------------------------------------------------------------------------------------------------
# Slow references, from the note (§0, §1.1)


def reference_positions(types: list[int]) -> list[int]:
    """CogVLM's build_position_ids on an unpadded row: boi/eoi relabelled LANGUAGE, then a cumulative count of tokens
    that are language or vision-after-language."""
    n = len(types)
    relabel = [t == V and (i == 0 or types[i - 1] == L or i == n - 1 or types[i + 1] == L) for i, t in enumerate(types)]
    tmp = [L if r else t for t, r in zip(types, relabel)]
    positions = [0]
    for i in range(1, n):
        positions.append(positions[-1] + int(tmp[i] == L or (tmp[i] == V and tmp[i - 1] == L)))
    return positions


def reference_expert_mask(types: list[int]) -> list[bool]:
    """get_expert_mask: vision iff this and the next token are vision-typed."""
    return [types[i] == V and i + 1 < len(types) and types[i + 1] == V for i in range(len(types))]


def reference_rotary(x, positions, rotated, theta):
    """Adjacent pairs (2i, 2i+1) of the first `rotated` dims turn by position * theta^(-2i/rotated)."""
    out = x.clone()
    for i in range(rotated // 2):
        angle = positions[:, None, :].double() * theta ** (-2 * i / rotated)  # [B, 1, T]
        a, b = x[..., 2 * i].double(), x[..., 2 * i + 1].double()
        out[..., 2 * i] = (a * angle.cos() - b * angle.sin()).to(x.dtype)
        out[..., 2 * i + 1] = (b * angle.cos() + a * angle.sin()).to(x.dtype)
    return out


def reference_forward(model: VisionLanguageModel, ids, image_embeds, image_start, types, positions, valid):
    """Boolean-mask routing (HF style `out[mask] = vision(x[mask])`), explicit softmax attention with GQA."""
    config, text = model.vlm_config, model.vlm_config.text
    x = model.embed(ids).clone()
    x[:, image_start:image_start + image_embeds.shape[1]] = image_embeds
    expert = torch.tensor([reference_expert_mask(row) for row in types.tolist()])  # [B, T]
    batch, length, _ = x.shape
    causal = torch.ones(length, length).tril().bool()
    allowed = causal[None] & valid[:, None, :] | torch.eye(length, dtype=torch.bool)[None]  # [B, T, T]

    def routed(language, vision, h):
        out = language(h)
        out[expert] = vision(h[expert])
        return out

    for layer in model.layers:
        qkv = routed(layer.attn.qkv, layer.attn.vision_qkv, layer.attn_norm(x))
        q, k, v = qkv.split([text.num_heads * text.head_dim, text.num_kv_groups * text.head_dim,
                             text.num_kv_groups * text.head_dim], dim=-1)
        q = q.view(batch, length, text.num_heads, text.head_dim).transpose(1, 2)
        k = k.view(batch, length, text.num_kv_groups, text.head_dim).transpose(1, 2)
        v = v.view(batch, length, text.num_kv_groups, text.head_dim).transpose(1, 2)
        q = reference_rotary(q, positions, config.rotated_dims, text.rope_theta)
        k = reference_rotary(k, positions, config.rotated_dims, text.rope_theta)
        repeat = text.num_heads // text.num_kv_groups
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(text.head_dim)  # [B, H, T, T]
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, -1)
        x = x + routed(layer.attn.dense, layer.attn.vision_dense, attended)
        x = x + routed(layer.mlp, layer.vision_mlp, layer.mlp_norm(x))
    return model.output(model.final_norm(x))


# ---------------------------------------------------------------------------------------------------------------


def test_positions_follow_the_note_example_and_the_reference(generator):
    n = 5  # boi + 3 patches + eoi
    types = torch.tensor([[L] + [V] * n + [L] * 3])
    assert position_ids(types).tolist() == [[0, 1, 2, 2, 2, 3, 4, 5, 6]]
    for _ in range(20):
        prefix = int(torch.randint(0, 4, (1,), generator=generator))
        patches = int(torch.randint(0, 5, (1,), generator=generator))
        suffix = int(torch.randint(1, 5, (1,), generator=generator))
        row = [L] * prefix + [V] * (patches + 2) + [L] * suffix
        assert position_ids(torch.tensor([row])).tolist() == [reference_positions(row)]
        # Padding anywhere does not advance positions: the real tokens keep the unpadded row's positions.
        valid = torch.rand(len(row) + 6, generator=generator) > 0.5
        while int(valid.sum()) < len(row):
            valid[int(torch.randint(0, len(valid), (1,), generator=generator))] = True
        keep = valid.nonzero().squeeze(1)[: len(row)]
        valid = torch.zeros_like(valid)
        valid[keep] = True
        padded = torch.full((1, len(valid)), L)
        padded[0, keep] = torch.tensor(row)
        assert position_ids(padded, valid[None])[0, keep].tolist() == reference_positions(row)


def test_routing_span_is_the_reference_expert_mask():
    for prefix, image_tokens, suffix in [(1, 6, 4), (4, 3, 1), (0, 2, 3)]:
        types = [L] * prefix + [V] * image_tokens + [L] * suffix
        start, end = vision_expert_span(prefix, image_tokens)
        assert [start <= i < end for i in range(len(types))] == reference_expert_mask(types)
        assert not reference_expert_mask(types)[prefix + image_tokens - 1]  # eoi is language


@pytest.mark.parametrize("preset", ["tiny", "tiny-cogvlm2"])
def test_span_routing_equals_boolean_mask_routing(preset):
    model = build(preset, seed=1)
    processor = Processor(CharTokenizer(), model.vlm_config)
    inputs = processor(["What is here?", "Colour?"], [random_image(1), random_image(2, (17, 60), "L")],
                       histories=[[("Hi", "Hello there")], []])
    assert inputs.padded and inputs.image_start is not None
    with torch.no_grad():
        embeds = model.encode_image(inputs.pixels)
        ours = model(inputs.input_ids, image_embeds=embeds, image_start=inputs.image_start,
                     positions=inputs.positions, attention_mask=inputs.attention_mask)
        reference = reference_forward(model, inputs.input_ids, embeds, inputs.image_start, inputs.token_types,
                                      inputs.positions, inputs.attention_mask)
    real = inputs.attention_mask
    torch.testing.assert_close(ours[real], reference[real], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("preset", ["tiny", "tiny-cogvlm2", "tiny-glm4v"])
def test_cached_decode_with_an_image_equals_the_full_forward(preset, generator):
    model = build(preset, seed=2)
    processor = Processor(CharTokenizer(), model.vlm_config)
    inputs = processor(["Describe it.", "Where?"], [random_image(3), random_image(4)])
    steps = 4
    new_tokens = torch.randint(20, 110, (2, steps), generator=generator)
    batch, width = inputs.input_ids.shape
    with torch.no_grad():
        embeds = model.encode_image(inputs.pixels)
        cache = model.allocate_cache(batch, width + steps)
        valid = torch.cat([inputs.attention_mask, torch.ones(batch, steps, dtype=torch.bool)], dim=1)
        cached = [prefill(model, inputs, embeds, cache)]
        for step in range(steps - 1):
            cached.append(decode_one_token(model, new_tokens[:, step], inputs.positions[:, -1] + 1 + step,
                                           width + step, cache, valid))
        full_ids = torch.cat([inputs.input_ids, new_tokens], dim=1)
        full_positions = torch.cat([inputs.positions, inputs.positions[:, -1:] + 1 + torch.arange(steps)], dim=1)
        full = model(full_ids, image_embeds=embeds, image_start=inputs.image_start, positions=full_positions,
                     attention_mask=valid)
    torch.testing.assert_close(torch.stack(cached, 1), full[:, width - 1:width - 1 + steps], atol=2e-5, rtol=1e-4)


def test_a_batch_equals_each_row_alone():
    model = build("tiny", seed=3)
    processor = Processor(CharTokenizer(), model.vlm_config)
    questions = ["What animal is this?", "Hi", "Count the objects please."]
    histories = [[], [("First?", "Yes.")], [("A", "B"), ("C", "D")]]
    images = [random_image(5), random_image(6, (64, 16), "RGBA"), random_image(7, (9, 9), "P")]
    config = SamplingConfig(max_new_tokens=5)
    batch_inputs = processor(questions, images, histories)
    with torch.no_grad():
        batch_logits = model(batch_inputs.input_ids, image_embeds=model.encode_image(batch_inputs.pixels),
                             image_start=batch_inputs.image_start, positions=batch_inputs.positions,
                             attention_mask=batch_inputs.attention_mask)
    batch_tokens = generate(model, batch_inputs, config)
    for row in range(3):
        alone = processor([questions[row]], [images[row]], [histories[row]])
        assert not alone.padded
        with torch.no_grad():
            logits = model(alone.input_ids, image_embeds=model.encode_image(alone.pixels),
                           image_start=alone.image_start, positions=alone.positions)
        real = batch_inputs.attention_mask[row]
        torch.testing.assert_close(batch_logits[row][real], logits[0], atol=2e-5, rtol=1e-4)
        assert generate(model, alone, config)[0] == batch_tokens[row]


def test_text_only_path_is_a_glm_model_over_the_same_tensors(generator):
    model = build("tiny", seed=4)
    view = model.language_model()
    assert isinstance(view, GLMModel) and view.layers[0].attn.qkv.weight is model.layers[0].attn.qkv.weight
    ids = torch.randint(0, 320, (2, 9), generator=generator)
    plain = GLMModel(model.config)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()})
    with torch.no_grad():
        torch.testing.assert_close(view(ids), plain(ids))
        torch.testing.assert_close(model(ids), plain(ids))
    with pytest.raises(ValueError, match="full head"):
        build("tiny-cogvlm2").language_model()


def test_templates_place_the_image_and_history():
    chat = template_pieces("cogvlm-chat", "Why?", [("Q1", "A1")])
    assert chat[2] == "Question: Q1 Answer: A1\nQuestion: Why? Answer:"
    assert template_pieces("cogvlm-vqa", "Why?")[2] == "Question: Why? Short answer:"
    with pytest.raises(ValueError, match="history"):
        template_pieces("cogvlm-base", "x", [("a", "b")])
    tokenizer = CharTokenizer()
    processor = Processor(tokenizer, VLMConfig.from_preset("tiny-glm4v"))
    before, after = processor.prompt_ids("Hi", [("Q", "A")])
    assert before == [3, 4, 5] + tokenizer.encode("\n")
    assert after == tokenizer.encode("Q") + [6] + tokenizer.encode("\nA") + [5] + tokenizer.encode("\nHi") + [6]
    with pytest.raises(ValueError, match="template"):
        Processor(tokenizer, VLMConfig.from_preset("tiny"), template="nope")


def test_conv_stem_makes_the_patch_grid_from_local_pixels(generator):
    with pytest.raises(ValueError, match="8-pixel patches, not 16"):
        ViTConfig(image_size=64, patch_size=16, width=32, depth=1, heads=2, mlp_dim=64, conv_stem=3)
    stem = ConvStem(3, 32)
    pixels = torch.randn(2, 3, 64, 64, generator=generator)
    features = stem(pixels)  # [B, W, 8, 8]
    assert features.shape == (2, 32, 8, 8)
    # Three 3x3 stride-2 convs see at most 15 pixels around a cell: a pixel change far away leaves it untouched.
    changed = pixels.clone()
    changed[:, :, 48:, 48:] += 1.0
    moved = (stem(changed) - features).abs().amax(dim=(0, 1))  # [8, 8]
    assert moved[:4, :4].max() == 0 and moved[6:, 6:].min() > 0


def test_a_conv_stem_vlm_saves_and_loads(tmp_path):
    config = world_vlm_config(300)
    model = VisionLanguageModel(config).init_weights(generator=torch.Generator().manual_seed(1))
    save_vlm(model, tmp_path)
    loaded = load_vlm(tmp_path)
    assert loaded.vlm_config.vision.conv_stem == 3
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_glm4v_generation_prompt_ends_at_the_assistant_token():
    """THUDM's glm-4v chat template ends the generation prompt at <|assistant|>; past answers follow a "\\n". The
    suite's own model was trained with a "\\n" after the last <|assistant|> and keeps it."""
    from vlm.processor import IMAGE, Special, template_pieces

    glm4v = template_pieces("glm-4v", "Where is the dog?", [("Describe the image.", "A dog.")])
    assert glm4v == [Special("[gMASK]"), Special("<sop>"), Special("<|user|>"), "\n", IMAGE, "Describe the image.",
                     Special("<|assistant|>"), "\n", "A dog.", Special("<|user|>"), "\n", "Where is the dog?",
                     Special("<|assistant|>")]
    assert template_pieces("suite", "Where is the dog?")[-2:] == [Special("<|assistant|>"), "\n"]
