"""Real checkpoints' key names (from the reference note, tiny shapes) load strictly; NeoX rotary is converted exactly;
the ViT, adapter and open_clip tower match slow references."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from glm.model import apply_rotary
from multimodal.checkpoint import CheckpointError, build_on_meta, load_into
from vlm.adapter import Adapter, AdapterConfig
from vlm.convert import convert_state, load_vlm, save_vlm
from vlm.model import VisionLanguageModel, VLMConfig
from vlm.vit import VisionTransformer, vit_config


def vision_keys(prefix: str, config: VLMConfig, conv: bool) -> dict[str, tuple]:
    """Key names of §2.1/§2.3 of the note for the EVA2-CLIP tower and the GLU adapter."""
    v, a = config.vision, config.adapter
    keys = {
        f"{prefix}.patch_embedding.proj.weight": (v.width, 3, v.patch_size, v.patch_size),
        f"{prefix}.patch_embedding.proj.bias": (v.width,),
        f"{prefix}.patch_embedding.cls_embedding": (1, v.width),
        f"{prefix}.patch_embedding.position_embedding.weight": (v.num_positions, v.width),
        f"{prefix}.linear_proj.linear_proj.weight": (a.hidden, a.glu_in),
        f"{prefix}.linear_proj.norm1.weight": (a.hidden,),
        f"{prefix}.linear_proj.norm1.bias": (a.hidden,),
        f"{prefix}.linear_proj.dense_h_to_4h.weight": (a.ffn, a.hidden),
        f"{prefix}.linear_proj.gate_proj.weight": (a.ffn, a.hidden),
        f"{prefix}.linear_proj.dense_4h_to_h.weight": (a.hidden, a.ffn),
        f"{prefix}.boi": (1, 1, a.hidden),
        f"{prefix}.eoi": (1, 1, a.hidden),
    }
    if conv:
        keys[f"{prefix}.conv.weight"] = (a.conv_width, v.width, 2, 2)
        keys[f"{prefix}.conv.bias"] = (a.conv_width,)
    for j in range(v.depth):
        layer = f"{prefix}.transformer.layers.{j}"
        for kind in ("weight", "bias"):
            keys[f"{layer}.input_layernorm.{kind}"] = (v.width,)
            keys[f"{layer}.post_attention_layernorm.{kind}"] = (v.width,)
        keys |= {f"{layer}.attention.query_key_value.weight": (3 * v.width, v.width),
                 f"{layer}.attention.query_key_value.bias": (3 * v.width,),
                 f"{layer}.attention.dense.weight": (v.width, v.width), f"{layer}.attention.dense.bias": (v.width,),
                 f"{layer}.mlp.fc1.weight": (v.mlp_dim, v.width), f"{layer}.mlp.fc1.bias": (v.mlp_dim,),
                 f"{layer}.mlp.fc2.weight": (v.width, v.mlp_dim), f"{layer}.mlp.fc2.bias": (v.width,)}
    return keys


def cogvlm_keys(config: VLMConfig, vision_bias: bool) -> dict[str, tuple]:
    t = config.text
    hidden, qkv = t.hidden_size, t.qkv_size
    keys = {"model.embed_tokens.weight": (t.vocab_size, hidden), "model.norm.weight": (hidden,),
            "lm_head.weight": (t.vocab_size, hidden)}
    for i in range(t.num_layers):
        layer = f"model.layers.{i}"
        keys |= {f"{layer}.input_layernorm.weight": (hidden,), f"{layer}.post_attention_layernorm.weight": (hidden,),
                 f"{layer}.self_attn.language_expert_query_key_value.weight": (qkv, hidden),
                 f"{layer}.self_attn.language_expert_dense.weight": (hidden, hidden),
                 f"{layer}.self_attn.vision_expert_query_key_value.weight": (qkv, hidden),
                 f"{layer}.self_attn.vision_expert_dense.weight": (hidden, hidden),
                 f"{layer}.self_attn.rotary_emb.inv_freq": (t.head_dim // 2,)}
        if vision_bias:
            keys[f"{layer}.self_attn.vision_expert_query_key_value.bias"] = (qkv,)
        for mlp in ("language_mlp", "vision_mlp"):
            keys |= {f"{layer}.mlp.{mlp}.gate_proj.weight": (t.ffn_hidden_size, hidden),
                     f"{layer}.mlp.{mlp}.up_proj.weight": (t.ffn_hidden_size, hidden),
                     f"{layer}.mlp.{mlp}.down_proj.weight": (hidden, t.ffn_hidden_size)}
    return keys | vision_keys("model.vision", config, conv=config.adapter.conv_width is not None)


def glm4v_keys(config: VLMConfig) -> dict[str, tuple]:
    t = config.text
    hidden = t.hidden_size
    keys = {"transformer.embedding.word_embeddings.weight": (t.vocab_size, hidden),
            "transformer.encoder.final_layernorm.weight": (hidden,),
            "transformer.output_layer.weight": (t.vocab_size, hidden),
            "transformer.rotary_pos_emb.inv_freq": (t.head_dim // 4,)}
    for i in range(t.num_layers):
        layer = f"transformer.encoder.layers.{i}"
        keys |= {f"{layer}.input_layernorm.weight": (hidden,), f"{layer}.post_attention_layernorm.weight": (hidden,),
                 f"{layer}.self_attention.query_key_value.weight": (t.qkv_size, hidden),
                 f"{layer}.self_attention.query_key_value.bias": (t.qkv_size,),
                 f"{layer}.self_attention.dense.weight": (hidden, hidden),
                 f"{layer}.mlp.dense_h_to_4h.weight": (2 * t.ffn_hidden_size, hidden),
                 f"{layer}.mlp.dense_4h_to_h.weight": (hidden, t.ffn_hidden_size)}
    return keys | vision_keys("transformer.vision", config, conv=True)


CASES = {
    "cogvlm": ("tiny-cogvlm", lambda c: cogvlm_keys(c, vision_bias=False)),
    "cogvlm2": ("tiny-cogvlm2", lambda c: cogvlm_keys(c, vision_bias=True)),
    "glm-4v": ("tiny-glm4v", glm4v_keys),
}


def random_state(shapes: dict[str, tuple], generator) -> dict[str, torch.Tensor]:
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


@pytest.mark.parametrize("format", list(CASES))
def test_each_real_key_layout_loads_with_nothing_missing_or_unexpected(format, generator, tmp_path):
    preset, keys = CASES[format]
    config = VLMConfig.from_preset(preset)
    foreign = random_state(keys(config), generator)
    model = build_on_meta(lambda: VisionLanguageModel(config))
    load_into(model, convert_state(foreign, format, config))
    prefix = "model.vision" if format != "glm-4v" else "transformer.vision"
    assert torch.equal(model.adapter.boi, foreign[f"{prefix}.boi"])
    assert torch.equal(model.vision.blocks[1].mlp.fc2.weight, foreign[f"{prefix}.transformer.layers.1.mlp.fc2.weight"])
    missing = dict(foreign)
    missing.pop(f"{prefix}.linear_proj.gate_proj.weight")
    with pytest.raises(CheckpointError, match="missing keys: .*gate_proj"):
        convert_state(missing, format, config)
    with pytest.raises(CheckpointError, match="unexpected keys: .*surprise"):
        convert_state(foreign | {"model.surprise.weight": torch.ones(1)}, format, config)
    # The native format round-trips through save/load.
    save_vlm(model.to_empty(device="cpu").init_weights(), tmp_path)
    reloaded = load_vlm(tmp_path)
    assert reloaded.vlm_config == config
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor)
    assert json.loads((tmp_path / "config.json").read_text())["kind"] == "vlm"


def test_neox_rotary_checkpoints_give_the_same_attention_scores(generator):
    """CogVLM rotates q/k NeoX style (rotate_half over the full head); our converted weights must give equal scores."""
    config = VLMConfig.from_preset("tiny-cogvlm2")
    foreign = random_state(cogvlm_keys(config, vision_bias=True), generator)
    model = VisionLanguageModel(config)
    load_into(model, convert_state(foreign, "cogvlm2", config))
    t = config.text
    x = torch.randn(1, 7, t.hidden_size, generator=generator)
    positions = torch.tensor([[0, 1, 2, 2, 2, 3, 4]])
    for ours_name, theirs_name in (("qkv", "language_expert"), ("vision_qkv", "vision_expert")):
        weight = foreign[f"model.layers.0.self_attn.{theirs_name}_query_key_value.weight"]
        bias = foreign.get(f"model.layers.0.self_attn.{theirs_name}_query_key_value.bias")
        q, k, _ = F.linear(x, weight, bias).split([t.num_heads * t.head_dim, t.num_kv_groups * t.head_dim,
                                                   t.num_kv_groups * t.head_dim], -1)
        q = q.view(1, 7, t.num_heads, t.head_dim).transpose(1, 2)
        k = k.view(1, 7, t.num_kv_groups, t.head_dim).transpose(1, 2).repeat_interleave(
            t.num_heads // t.num_kv_groups, 1)
        inv_freq = 1.0 / t.rope_theta ** (torch.arange(0, t.head_dim, 2).float() / t.head_dim)
        angles = torch.cat([positions[0, :, None] * inv_freq] * 2, dim=-1)  # [T, D] NeoX layout

        def rotate_half(v):
            return torch.cat([-v[..., t.head_dim // 2:], v[..., : t.head_dim // 2]], dim=-1)

        q_ref, k_ref = (v * angles.cos() + rotate_half(v) * angles.sin() for v in (q, k))
        reference = q_ref @ k_ref.transpose(-1, -2)
        ours = model.layers[0].attn.split_qkv(getattr(model.layers[0].attn, ours_name)(x))
        cos, sin = model.rope(positions)
        q_ours = apply_rotary(ours[0], cos, sin)
        k_ours = apply_rotary(ours[1], cos, sin).repeat_interleave(t.num_heads // t.num_kv_groups, 1)
        torch.testing.assert_close(q_ours @ k_ours.transpose(-1, -2), reference, atol=1e-4, rtol=1e-4)


def test_vit_is_post_norm_and_drops_cls(generator):
    vit = VisionTransformer(vit_config("tiny")).eval()
    with torch.no_grad():
        for parameter in vit.parameters():
            parameter.normal_(0, 0.2, generator=generator)
    pixels = torch.randn(2, 3, 32, 32, generator=generator)
    config = vit.config
    patches = pixels.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).reshape(2, 16, 3 * 64)
    x = patches @ vit.patch_embed.weight.reshape(config.width, -1).T + vit.patch_embed.bias
    x = torch.cat([vit.cls_token.expand(2, 1, -1), x], dim=1) + vit.pos_embed.weight
    for block in vit.blocks:
        qkv = block.attn.qkv(x).view(2, 17, 3, config.heads, -1)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        weights = (q @ k.transpose(-1, -2) / math.sqrt(config.width // config.heads)).softmax(-1)
        x = x + block.attn_norm(block.attn.dense((weights @ v).transpose(1, 2).reshape(2, 17, -1)))
        hidden = block.mlp.fc1(x)
        x = x + block.mlp_norm(block.mlp.fc2(0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))))
    with torch.no_grad():
        torch.testing.assert_close(vit(pixels), x[:, 1:], atol=1e-5, rtol=1e-4)
        assert vit(torch.randn(1, 3, 48, 48, generator=generator)).shape == (1, 36, config.width)
        assert torch.equal(vit.positions(4), vit.pos_embed.weight)
    with pytest.raises(ValueError, match="multiple of 8"):
        vit(torch.randn(1, 3, 30, 30))


def test_adapter_conv_glu_boi_eoi_and_scaling(generator):
    config = AdapterConfig(vision_width=6, hidden=8, ffn=10, conv_width=5, scaling_factor=4.0)
    adapter = Adapter(config)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.normal_(0, 0.5, generator=generator)
    features = torch.randn(2, 16, 6, generator=generator)  # a 4x4 grid
    grid = features.view(2, 4, 4, 6)
    blocks = grid.view(2, 2, 2, 2, 2, 6).permute(0, 1, 3, 5, 2, 4).reshape(2, 4, 24)  # [B, (i, j), (c, dy, dx)]
    pooled = blocks @ adapter.conv.weight.reshape(5, 24).T + adapter.conv.bias  # [B, 4, 5]
    glu = adapter.glu
    h = F.gelu(F.layer_norm(pooled @ glu.linear_proj.weight.T, (8,), glu.norm.weight, glu.norm.bias))
    out = (F.silu(h @ glu.gate_proj.weight.T) * (h @ glu.up_proj.weight.T)) @ glu.down_proj.weight.T
    expected = torch.cat([adapter.boi.expand(2, 1, 8), out, adapter.eoi.expand(2, 1, 8)], dim=1) / 4.0
    with torch.no_grad():
        torch.testing.assert_close(adapter(features), expected, atol=1e-5, rtol=1e-4)
    assert config.num_tokens(4) == 6


def test_an_open_clip_tower_feeds_the_glm_core(generator, tmp_path):
    from dataclasses import replace

    tiny = VLMConfig.from_preset("tiny")
    tower_cfg = {"vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}}
    config = replace(tiny, open_clip=tower_cfg)
    model = VisionLanguageModel(config).eval()
    pixels = torch.randn(1, 3, 32, 32, generator=generator)
    with torch.no_grad():
        embeds = model.encode_image(pixels)
    assert embeds.shape == (1, tiny.image_tokens, tiny.text.hidden_size)
    # A user's whole-CLIP state dict (visual.* plus a text tower) loads strictly into the tower.
    tower_state = model.vision.visual.state_dict()
    user = {f"visual.{k}": torch.randn(v.shape, generator=generator) for k, v in tower_state.items()}
    user["text_projection"] = torch.zeros(4)
    model.vision.load_open_clip_state(user)
    assert torch.equal(model.vision.visual.conv1.weight, user["visual.conv1.weight"])
    user.pop("visual.conv1.weight")
    with pytest.raises(CheckpointError, match="conv1"):
        model.vision.load_open_clip_state(user)
    with torch.no_grad():
        assert not torch.allclose(model.encode_image(pixels), embeds)


def _official_config(format: str, config: VLMConfig) -> dict:
    """config.json as the official config classes write it (CogVLMConfig / ChatGLMConfig names)."""
    text, vision = config.text, config.vision
    tower = {"image_size": vision.image_size, "patch_size": vision.patch_size, "hidden_size": vision.width,
             "num_hidden_layers": vision.depth, "num_heads": vision.heads, "intermediate_size": vision.mlp_dim,
             "layer_norm_eps": vision.norm_eps}
    if format == "glm-4v":
        return {"padded_vocab_size": text.vocab_size, "hidden_size": text.hidden_size, "num_layers": text.num_layers,
                "num_attention_heads": text.num_heads, "multi_query_attention": True,
                "multi_query_group_num": text.num_kv_groups, "kv_channels": text.head_dim,
                "ffn_hidden_size": text.ffn_hidden_size, "layernorm_epsilon": text.norm_eps,
                "seq_length": text.max_seq_len, "rope_ratio": text.rope_ratio,
                "vision_config": {**tower, "scaling_factor": config.adapter.scaling_factor}}
    values = {"vocab_size": text.vocab_size, "hidden_size": text.hidden_size, "num_hidden_layers": text.num_layers,
              "num_attention_heads": text.num_heads, "intermediate_size": text.ffn_hidden_size,
              "rms_norm_eps": text.norm_eps, "max_position_embeddings": text.max_seq_len,
              "rope_theta": 10000.0 * text.rope_ratio, "vision_config": tower}
    if format == "cogvlm2":
        values["num_multi_query_heads"] = text.num_kv_groups
    return values


@pytest.mark.parametrize("format", list(CASES))
def test_every_size_comes_from_the_checkpoints_config_json(format, generator, tmp_path):
    """A checkpoint whose widths, heads, KV groups, FFN, depth and tower differ from the published model's loads from
    its config.json alone, and a config that contradicts itself is one sentence."""
    from dataclasses import replace

    from safetensors.torch import save_file

    from vlm.convert import config_from_foreign

    preset = VLMConfig.from_preset(CASES[format][0])
    groups = 2 if format != "cogvlm" else 6
    text = replace(preset.text, hidden_size=96, num_heads=6, num_kv_groups=groups, head_dim=16, ffn_hidden_size=120,
                   num_layers=3, vocab_size=300)
    vision = replace(preset.vision, width=48, depth=3, heads=3, mlp_dim=80)
    conv = None if preset.adapter.conv_width is None else (96 if format == "glm-4v" else 48)
    config = replace(preset, text=text, vision=vision, rotary_dim=16 if preset.rotary_dim else None,
                     adapter=replace(preset.adapter, vision_width=48, hidden=96, ffn=120, conv_width=conv))
    values = _official_config(format, config)
    assert config_from_foreign(format, values) == config
    foreign = random_state(CASES[format][1](config), generator)
    save_file(foreign, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(values))
    model = load_vlm(tmp_path)
    assert model.vlm_config == config and model.layers[2].mlp.down.weight.shape == (96, 120)
    heads_key = "num_attention_heads"
    with pytest.raises(CheckpointError, match="not divisible|do not split"):
        config_from_foreign(format, {**values, heads_key: 7})


def _bf16(values: torch.Tensor) -> torch.Tensor:
    """Round float64 values to bfloat16 and back: one step of the official bf16 computation."""
    return values.to(torch.bfloat16).double()


def test_cogvlm2_in_bf16_rotates_as_its_official_code_does():
    """CogVLM2 computes rotary positions, angles, cos and sin in the model's dtype. A float64 model of that formula
    (each step rounded to bf16 where the official code holds a bf16 tensor) gives the bf16 model's tables; the
    float32 model keeps exact angles, and the two differ by far more than a bf16 rounding of cos (2**-8)."""
    model = VisionLanguageModel(VLMConfig.from_preset("tiny-cogvlm2"))
    exact_cos = model.rope_cos.clone()
    model = model.to(torch.bfloat16)
    config = model.vlm_config
    dims, theta, length = config.rotated_dims, config.text.rope_theta, config.text.max_seq_len
    inv_freq = _bf16(1.0 / theta ** (torch.arange(0, dims, 2, dtype=torch.float64) / dims))
    positions = _bf16(torch.arange(length, dtype=torch.float64))
    angles = _bf16(positions[:, None] * inv_freq[None, :])
    assert model.rope_cos.dtype == torch.bfloat16
    torch.testing.assert_close(model.rope_cos.double(), _bf16(angles.cos()), rtol=0, atol=2**-8)
    torch.testing.assert_close(model.rope_sin.double(), _bf16(angles.sin()), rtol=0, atol=2**-8)
    assert (model.rope_cos.double() - exact_cos.double()).abs()[20:].max() > 0.1  # not a rounding of the exact
    plain = VisionLanguageModel(VLMConfig.from_preset("tiny-cogvlm"))
    exact_plain = plain.rope_cos.clone()
    assert torch.equal(plain.to(torch.bfloat16).rope_cos, exact_plain.to(torch.bfloat16))  # others: exact, rounded
