"""VLM checkpoint import: key tables for cogvlm-chat-hf / cogvlm-grounding-generalist-hf, cogvlm2-llama3-chat-19B
and glm-4v-9b, and loading (ours: `model.safetensors` + `config.json` of kind "vlm").

Two semantic conversions happen once here, never at run time:
- CogVLM/CogVLM2 rotate q/k NeoX-style (dims i and i + D/2 form a pair); our attention rotates adjacent pairs.
  Permuting each head's q and k rows to (0, D/2, 1, D/2 + 1, ...) makes both compute the same scores.
- Projections that have no bias in the checkpoint (CogVLM's QKVs, CogVLM2's language QKV) get a zero bias, since our
  QKV projections always carry one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path

import torch

from glm.convert import THUDM_TABLE
from multimodal.checkpoint import (
    NATIVE_CONFIG,
    CheckpointError,
    KeyTable,
    Rule,
    build_on_meta,
    convert,
    read_native_config,
    read_state_dict,
    save_native,
)
from multimodal.quantize import load_weights
from vlm.model import VisionLanguageModel, VLMConfig

KIND = "vlm"
FORMATS = ("cogvlm", "cogvlm2", "glm-4v", "native")
_FORMAT_PRESET = {"cogvlm": "cogvlm-chat", "cogvlm2": "cogvlm2-llama3-chat", "glm-4v": "glm-4v-9b"}


def _vision_rules(prefix: str, conv: bool) -> list[Rule]:
    """The EVA2-CLIP tower and the GLU adapter, under `model.vision` (CogVLM) or `transformer.vision` (GLM-4V)."""
    layer = f"{prefix}.transformer.layers.{{n}}"
    rules = [
        Rule("vision.patch_embed.weight", (f"{prefix}.patch_embedding.proj.weight",)),
        Rule("vision.patch_embed.bias", (f"{prefix}.patch_embedding.proj.bias",)),
        Rule("vision.cls_token", (f"{prefix}.patch_embedding.cls_embedding",)),
        Rule("vision.pos_embed.weight", (f"{prefix}.patch_embedding.position_embedding.weight",)),
        Rule("adapter.glu.linear_proj.weight", (f"{prefix}.linear_proj.linear_proj.weight",)),
        Rule("adapter.glu.norm.weight", (f"{prefix}.linear_proj.norm1.weight",)),
        Rule("adapter.glu.norm.bias", (f"{prefix}.linear_proj.norm1.bias",)),
        Rule("adapter.glu.gate_proj.weight", (f"{prefix}.linear_proj.gate_proj.weight",)),
        Rule("adapter.glu.up_proj.weight", (f"{prefix}.linear_proj.dense_h_to_4h.weight",)),
        Rule("adapter.glu.down_proj.weight", (f"{prefix}.linear_proj.dense_4h_to_h.weight",)),
        Rule("adapter.boi", (f"{prefix}.boi",)),
        Rule("adapter.eoi", (f"{prefix}.eoi",)),
    ]
    for kind in ("weight", "bias"):
        rules += [
            Rule(f"vision.blocks.{{n}}.attn_norm.{kind}", (f"{layer}.input_layernorm.{kind}",)),
            Rule(f"vision.blocks.{{n}}.attn.qkv.{kind}", (f"{layer}.attention.query_key_value.{kind}",)),
            Rule(f"vision.blocks.{{n}}.attn.dense.{kind}", (f"{layer}.attention.dense.{kind}",)),
            Rule(f"vision.blocks.{{n}}.mlp.fc1.{kind}", (f"{layer}.mlp.fc1.{kind}",)),
            Rule(f"vision.blocks.{{n}}.mlp.fc2.{kind}", (f"{layer}.mlp.fc2.{kind}",)),
            Rule(f"vision.blocks.{{n}}.mlp_norm.{kind}", (f"{layer}.post_attention_layernorm.{kind}",)),
        ]
        if conv:
            rules.append(Rule(f"adapter.conv.{kind}", (f"{prefix}.conv.{kind}",)))
    return rules


def neox_to_interleaved(config: VLMConfig):
    """Row permutation of a fused QKV (weight or bias) taking NeoX rotary pairs to adjacent pairs, per q/k head."""
    text = config.text
    half = text.head_dim // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()  # [D]
    heads = text.num_heads + text.num_kv_groups  # q and k heads; v rows stay in place
    order = torch.cat([(head * text.head_dim + within) for head in range(heads)]
                      + [torch.arange(heads * text.head_dim, text.qkv_size)])

    def permute(tensor: torch.Tensor) -> torch.Tensor:
        return tensor[order]

    return permute


def cogvlm_table(config: VLMConfig, name: str, vision_qkv_bias: bool) -> KeyTable:
    """cogvlm-chat-hf / cogvlm-grounding-generalist-hf (vision_qkv_bias False) and cogvlm2 (True)."""
    layer = "model.layers.{n}"
    permute = neox_to_interleaved(config)
    rules = [
        Rule("embed.weight", ("model.embed_tokens.weight",)),
        Rule("layers.{n}.attn_norm.weight", (f"{layer}.input_layernorm.weight",)),
        Rule("layers.{n}.mlp_norm.weight", (f"{layer}.post_attention_layernorm.weight",)),
        Rule("layers.{n}.attn.qkv.weight", (f"{layer}.self_attn.language_expert_query_key_value.weight",),
             transform=permute),
        Rule("layers.{n}.attn.dense.weight", (f"{layer}.self_attn.language_expert_dense.weight",)),
        Rule("layers.{n}.attn.vision_qkv.weight", (f"{layer}.self_attn.vision_expert_query_key_value.weight",),
             transform=permute),
        Rule("layers.{n}.attn.vision_dense.weight", (f"{layer}.self_attn.vision_expert_dense.weight",)),
        Rule("final_norm.weight", ("model.norm.weight",)),
        Rule("output.weight", ("lm_head.weight",)),
    ]
    if vision_qkv_bias:
        rules.append(Rule("layers.{n}.attn.vision_qkv.bias", (f"{layer}.self_attn.vision_expert_query_key_value.bias",),
                          transform=permute))
    for ours, theirs in (("mlp", "language_mlp"), ("vision_mlp", "vision_mlp")):
        rules += [
            Rule(f"layers.{{n}}.{ours}.gate_up.weight",
                 (f"{layer}.mlp.{theirs}.gate_proj.weight", f"{layer}.mlp.{theirs}.up_proj.weight")),
            Rule(f"layers.{{n}}.{ours}.down.weight", (f"{layer}.mlp.{theirs}.down_proj.weight",)),
        ]
    rules += _vision_rules("model.vision", conv=config.adapter.conv_width is not None)
    return KeyTable(name=name, rules=rules, ignore=(r"rotary_emb\.inv_freq$",))


def glm4v_table(config: VLMConfig) -> KeyTable:
    rules = list(THUDM_TABLE.rules) + _vision_rules("transformer.vision", conv=True)
    return KeyTable(name="glm-4v-9b checkpoint", rules=rules, ignore=THUDM_TABLE.ignore)


def foreign_table(format: str, config: VLMConfig) -> KeyTable:
    if format == "cogvlm":
        return cogvlm_table(config, "cogvlm-chat-hf checkpoint", vision_qkv_bias=False)
    if format == "cogvlm2":
        return cogvlm_table(config, "cogvlm2-llama3-chat checkpoint", vision_qkv_bias=True)
    if format == "glm-4v":
        return glm4v_table(config)
    raise ValueError(f"Unknown VLM checkpoint format {format!r}; known: auto, {', '.join(FORMATS)}.")


def convert_state(foreign: Mapping[str, torch.Tensor], format: str, config: VLMConfig) -> dict[str, torch.Tensor]:
    """Foreign state dict -> ours, strictly (every foreign key used), with the zero biases the format lacks."""
    state = convert(foreign, foreign_table(format, config))
    text = config.text
    for index in range(text.num_layers):
        for name in ("attn.qkv.bias", "attn.vision_qkv.bias") if config.experts else ("attn.qkv.bias",):
            key = f"layers.{index}.{name}"
            if key not in state and f"layers.{index}.attn.qkv.weight" in state:
                state[key] = torch.zeros(text.qkv_size, dtype=state[f"layers.{index}.attn.qkv.weight"].dtype)
    return state


def detect_format(keys, config_values: Mapping | None = None) -> str:
    keys = list(keys)
    if any(k.startswith("transformer.vision.") for k in keys):
        return "glm-4v"
    if any(".vision_expert_query_key_value." in k for k in keys):
        return "cogvlm2" if any(k.endswith("vision_expert_query_key_value.bias") for k in keys) else "cogvlm"
    if (config_values or {}).get("kind") == KIND:
        return "native"
    raise CheckpointError(
        f"Could not recognise the checkpoint as CogVLM, CogVLM2, GLM-4V or our VLM format (first keys: "
        f"{', '.join(keys[:4])})."
    )


# Where each size lives in the official config classes: CogVLM's and CogVLM2's `CogVLMConfig` (LLaMA-style names, with
# `num_multi_query_heads` for CogVLM2's grouped queries) and GLM-4V's `ChatGLMConfig`; both keep the tower's sizes
# in `vision_config`.
_TEXT_FIELDS = {
    "cogvlm": {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
               "num_heads": "num_attention_heads", "ffn_hidden_size": "intermediate_size", "norm_eps": "rms_norm_eps",
               "max_seq_len": "max_position_embeddings"},
    "glm-4v": {"vocab_size": "padded_vocab_size", "hidden_size": "hidden_size", "num_layers": "num_layers",
               "num_heads": "num_attention_heads", "ffn_hidden_size": "ffn_hidden_size",
               "norm_eps": "layernorm_epsilon", "max_seq_len": "seq_length", "head_dim": "kv_channels"},
}
_VISION_FIELDS = {"image_size": "image_size", "patch_size": "patch_size", "width": "hidden_size",
                  "depth": "num_hidden_layers", "heads": "num_heads", "mlp_dim": "intermediate_size",
                  "norm_eps": "layer_norm_eps"}


def config_from_foreign(format: str, values: Mapping) -> VLMConfig:
    """The model's shapes as the checkpoint's config.json states them, in the official config classes' names; a
    field it leaves out keeps the published model's value (the format's preset). A size that contradicts another is
    one sentence naming both."""
    preset = VLMConfig.from_preset(_FORMAT_PRESET[format])
    family = "glm-4v" if format == "glm-4v" else "cogvlm"
    text = {ours: values[theirs] for ours, theirs in _TEXT_FIELDS[family].items() if theirs in values}
    if family == "cogvlm" and "num_multi_query_heads" in values:
        text["num_kv_groups"] = values["num_multi_query_heads"]
    elif family == "cogvlm" and "num_attention_heads" in values:
        text["num_kv_groups"] = values["num_attention_heads"]  # CogVLM: plain multi-head attention
    if family == "glm-4v" and values.get("multi_query_attention", True) and "multi_query_group_num" in values:
        text["num_kv_groups"] = values["multi_query_group_num"]
    if "rope_ratio" in values:
        text["rope_ratio"] = float(values["rope_ratio"])
    elif "rope_theta" in values:
        text["rope_ratio"] = float(values["rope_theta"]) / 10000.0
    heads = text.get("num_heads", preset.text.num_heads)
    hidden = text.get("hidden_size", preset.text.hidden_size)
    if family == "cogvlm":
        if hidden % heads:
            raise CheckpointError(f"config.json: hidden_size {hidden} is not divisible by {heads} attention heads.")
        text["head_dim"] = hidden // heads
    groups = text.get("num_kv_groups", preset.text.num_kv_groups)
    if heads % groups:
        raise CheckpointError(f"config.json: {heads} attention heads do not split into {groups} key/value groups.")
    text_config = replace(preset.text, **text)
    if family == "cogvlm" and preset.rotary_dim is not None:
        preset = replace(preset, rotary_dim=text_config.head_dim)

    vision_values = values.get("vision_config") or {}
    vision = {ours: vision_values[theirs] for ours, theirs in _VISION_FIELDS.items() if theirs in vision_values}
    try:
        vision_config = replace(preset.vision, **vision)
    except ValueError as error:
        raise CheckpointError(f"config.json: vision_config is inconsistent: {error}") from None
    # The adapter joins the two: its GLU runs at the language model's width and FFN size; CogVLM2's conv keeps the
    # tower's width, GLM-4V's maps it to the language model's.
    conv_width = None
    if preset.adapter.conv_width is not None:
        conv_width = text_config.hidden_size if family == "glm-4v" else vision_config.width
    scaling = float(vision_values.get("scaling_factor", preset.adapter.scaling_factor))
    adapter = replace(preset.adapter, vision_width=vision_config.width, hidden=text_config.hidden_size,
                      ffn=text_config.ffn_hidden_size, conv_width=conv_width, scaling_factor=scaling)
    return replace(preset, text=text_config, vision=vision_config, adapter=adapter)


def read_vlm_checkpoint(path: str | Path, format: str = "auto") -> tuple[VLMConfig, dict[str, torch.Tensor], str]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Checkpoint path {path} does not exist.")
    folder = path if path.is_dir() else path.parent
    if not (folder / NATIVE_CONFIG).exists():
        raise CheckpointError(f"{folder} has no {NATIVE_CONFIG}; the model's shapes cannot be known without it.")
    values = json.loads((folder / NATIVE_CONFIG).read_text())
    weights = read_state_dict(path)
    if format == "auto":
        format = detect_format(weights.keys(), values)
    if format == "native":
        return VLMConfig.from_dict(read_native_config(folder, kind=KIND)), dict(weights), format
    config = config_from_foreign(format, values)
    return config, convert_state(weights, format, config), format


def load_vlm(path: str | Path, dtype: torch.dtype | None = None, device="cpu", format: str = "auto",
             quant: str = "none", group_size: int = 64, exclude: Iterable[str] = ()):
    """Build on the meta device and strictly load a CogVLM, CogVLM2, GLM-4V or native checkpoint.

    A checkpoint written by `multimodal quantize` loads as stored; a float one is quantized while it is read when
    `quant` is "int8" or "int4" (`group_size` and the `exclude` globs as in `multimodal.quantize.QuantSpec`).
    """
    config, state, _ = read_vlm_checkpoint(path, format)
    model = build_on_meta(lambda: VisionLanguageModel(config))
    load_weights(model, state, read_raw_config(path), quant, group_size, dtype, exclude)
    return model.to(device).eval()


def read_raw_config(path: str | Path) -> dict:
    """The config.json beside a checkpoint as stored (a quantized native checkpoint's carries a "quant" entry)."""
    path = Path(path)
    config_path = (path if path.is_dir() else path.parent) / NATIVE_CONFIG
    if not config_path.exists():
        raise CheckpointError(f"{path} has no {NATIVE_CONFIG}; the model's shapes cannot be known without it.")
    return json.loads(config_path.read_text())


def save_vlm(model: VisionLanguageModel, out_dir: str | Path) -> Path:
    return save_native(model.state_dict(), model.vlm_config.to_dict(), out_dir, kind=KIND)
