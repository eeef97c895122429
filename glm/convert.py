"""GLM checkpoint import: key tables for THUDM's format and transformers' `GlmForCausalLM`, config mapping, loading.

Three formats are recognised from their key names and config.json:
- THUDM (chatglm3-6b, glm-4-9b-chat): `transformer.encoder.layers.{n}.self_attention.query_key_value...`, config
  with `padded_vocab_size`, `multi_query_group_num`, `kv_channels`, `rope_ratio`.
- transformers' native `GlmForCausalLM` (glm-4-9b-chat-hf): `model.layers.{n}.self_attn.{q,k,v}_proj...` (fused
  here into our qkv) and `mlp.gate_up_proj`, config with `rope_parameters` / `rope_theta`.
- our native format (`multimodal convert` output): our key names, config.json with kind "glm".

The rotary base of THUDM checkpoints is computed here as 10000 * rope_ratio; transformers' conversion script has
read rope_ratio with getattr on a dict, which silently yields 10000, so we never rely on it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from glm.model import GLMConfig, GLMModel
from multimodal.checkpoint import (
    NATIVE_CONFIG,
    CheckpointError,
    KeyTable,
    Rule,
    build_on_meta,
    convert,
    load_into,
    read_native_config,
    read_state_dict,
    save_native,
)

KIND = "glm"
FORMATS = ("thudm", "hf", "native")

THUDM_TABLE = KeyTable(
    name="THUDM GLM checkpoint",
    rules=[
        Rule("embed.weight", ("transformer.embedding.word_embeddings.weight",)),
        Rule("layers.{n}.attn_norm.weight", ("transformer.encoder.layers.{n}.input_layernorm.weight",)),
        Rule("layers.{n}.attn.qkv.weight", ("transformer.encoder.layers.{n}.self_attention.query_key_value.weight",)),
        Rule("layers.{n}.attn.qkv.bias", ("transformer.encoder.layers.{n}.self_attention.query_key_value.bias",)),
        Rule("layers.{n}.attn.dense.weight", ("transformer.encoder.layers.{n}.self_attention.dense.weight",)),
        Rule("layers.{n}.mlp_norm.weight", ("transformer.encoder.layers.{n}.post_attention_layernorm.weight",)),
        Rule("layers.{n}.mlp.gate_up.weight", ("transformer.encoder.layers.{n}.mlp.dense_h_to_4h.weight",)),
        Rule("layers.{n}.mlp.down.weight", ("transformer.encoder.layers.{n}.mlp.dense_4h_to_h.weight",)),
        Rule("final_norm.weight", ("transformer.encoder.final_layernorm.weight",)),
        Rule("output.weight", ("transformer.output_layer.weight",)),
    ],
    ignore=(r"rotary_pos_emb\.inv_freq$",),
)


def _hf_qkv(kind: str) -> Rule:
    return Rule(
        f"layers.{{n}}.attn.qkv.{kind}",
        tuple(f"model.layers.{{n}}.self_attn.{p}_proj.{kind}" for p in "qkv"),
        dim=0,
    )


HF_TABLE = KeyTable(
    name="transformers GlmForCausalLM checkpoint",
    rules=[
        Rule("embed.weight", ("model.embed_tokens.weight",)),
        Rule("layers.{n}.attn_norm.weight", ("model.layers.{n}.input_layernorm.weight",)),
        _hf_qkv("weight"),
        _hf_qkv("bias"),
        Rule("layers.{n}.attn.dense.weight", ("model.layers.{n}.self_attn.o_proj.weight",)),
        Rule("layers.{n}.mlp_norm.weight", ("model.layers.{n}.post_attention_layernorm.weight",)),
        Rule("layers.{n}.mlp.gate_up.weight", ("model.layers.{n}.mlp.gate_up_proj.weight",)),
        Rule("layers.{n}.mlp.down.weight", ("model.layers.{n}.mlp.down_proj.weight",)),
        Rule("final_norm.weight", ("model.norm.weight",)),
        Rule("output.weight", ("lm_head.weight",)),
    ],
    ignore=(r"rotary_emb\.inv_freq$",),
)


# ----------------------------------------------------------------------------------------------------------------
# Configs


def config_from_thudm(values: Mapping) -> GLMConfig:
    """Map a THUDM config.json (ChatGLMConfig) onto ours; refuse variants this model does not implement."""
    expected = {
        "rmsnorm": True, "add_bias_linear": False, "add_qkv_bias": True, "original_rope": True,
        "post_layer_norm": True, "apply_residual_connection_post_layernorm": False,
    }
    for key, value in expected.items():
        if key in values and values[key] != value:
            raise CheckpointError(f"THUDM config has {key}={values[key]}; only {key}={value} is supported.")
    heads = values["num_attention_heads"]
    groups = values.get("multi_query_group_num", heads) if values.get("multi_query_attention", False) else heads
    return GLMConfig(
        vocab_size=values.get("padded_vocab_size", values.get("vocab_size")),
        hidden_size=values["hidden_size"],
        num_layers=values["num_layers"],
        num_heads=heads,
        num_kv_groups=groups,
        head_dim=values.get("kv_channels", values["hidden_size"] // heads),
        ffn_hidden_size=values["ffn_hidden_size"],
        norm_eps=values.get("layernorm_epsilon", 1e-5),
        rope_ratio=float(values.get("rope_ratio", 1.0)),
        max_seq_len=values.get("seq_length", 8192),
    )


def config_from_hf(values: Mapping) -> GLMConfig:
    """Map a transformers GlmConfig dict onto ours (model_type "glm"; "glm4" has extra sandwich norms)."""
    if values.get("model_type", "glm") != "glm":
        raise CheckpointError(f"config.json has model_type {values.get('model_type')!r}; only 'glm' is supported.")
    rope = dict(values.get("rope_parameters") or {})
    theta = rope.get("rope_theta", values.get("rope_theta", 10000.0))
    partial = rope.get("partial_rotary_factor", values.get("partial_rotary_factor", 0.5))
    if partial != 0.5:
        raise CheckpointError(f"config.json has partial_rotary_factor={partial}; GLM rotates exactly half a head.")
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"config.json asks for rope_type {rope['rope_type']!r}; only 'default' is supported.")
    if not values.get("attention_bias", True):
        raise CheckpointError("config.json has attention_bias=false; GLM's fused QKV always has a bias.")
    heads = values["num_attention_heads"]
    return GLMConfig(
        vocab_size=values["vocab_size"],
        hidden_size=values["hidden_size"],
        num_layers=values["num_hidden_layers"],
        num_heads=heads,
        num_kv_groups=values.get("num_key_value_heads") or heads,
        head_dim=values.get("head_dim") or values["hidden_size"] // heads,
        ffn_hidden_size=values["intermediate_size"],
        norm_eps=values.get("rms_norm_eps", 1.5625e-07),
        rope_ratio=float(theta) / 10000.0,
        max_seq_len=values.get("max_position_embeddings", 131072),
    )


# ----------------------------------------------------------------------------------------------------------------
# Detection and loading


def detect_format(keys, config: Mapping | None = None) -> str:
    """'thudm', 'hf' or 'native' from the key names (and config.json's `kind` for ours)."""
    keys = list(keys)
    if any(k.startswith("transformer.encoder.layers.") for k in keys):
        return "thudm"
    if any(k.startswith("model.layers.") and ".self_attn.q_proj." in k for k in keys):
        return "hf"
    if any(k.startswith("layers.") and ".attn.qkv." in k for k in keys) and (config or {}).get("kind") == KIND:
        return "native"
    raise CheckpointError(
        "Could not recognise the checkpoint as THUDM GLM, transformers GlmForCausalLM or our native GLM format "
        f"(first keys: {', '.join(keys[:4])})."
    )


def _read_weights(path: Path) -> Mapping[str, torch.Tensor]:
    """Weights of a folder or file; sharded `.bin` folders (pytorch_model.bin.index.json) are merged."""
    index = path / "pytorch_model.bin.index.json" if path.is_dir() else None
    if index is not None and index.exists() and not list(path.glob("*.safetensors")):
        merged: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            merged.update(read_state_dict(path / shard))
        return merged
    return read_state_dict(path)


def read_glm_checkpoint(path: str | Path, format: str = "auto") -> tuple[GLMConfig, dict[str, torch.Tensor], str]:
    """Read any supported GLM checkpoint into (our config, our state dict, the detected format)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Checkpoint path {path} does not exist.")
    folder = path if path.is_dir() else path.parent
    config_path = folder / NATIVE_CONFIG
    if not config_path.exists():
        raise CheckpointError(f"{folder} has no {NATIVE_CONFIG}; the model's shapes cannot be known without it.")
    config_values = json.loads(config_path.read_text())
    weights = _read_weights(path)
    if format == "auto":
        format = detect_format(weights.keys(), config_values)
    if format not in FORMATS:
        raise ValueError(f"Unknown checkpoint format {format!r}; known: auto, {', '.join(FORMATS)}.")
    if format == "thudm":
        return config_from_thudm(config_values), convert(weights, THUDM_TABLE), format
    if format == "hf":
        return config_from_hf(config_values), convert(weights, HF_TABLE), format
    config = GLMConfig.from_dict(read_native_config(folder, kind=KIND))
    return config, dict(weights), format


def load_glm(path: str | Path, dtype: torch.dtype | None = None, device="cpu", format: str = "auto") -> GLMModel:
    """Build a GLMModel on the meta device and strictly load a THUDM, transformers or native checkpoint into it."""
    config, state, _ = read_glm_checkpoint(path, format)
    model = build_on_meta(lambda: GLMModel(config))
    load_into(model, state, dtype=dtype)
    return model.to(device).eval()


def save_glm(model: GLMModel, out_dir: str | Path) -> Path:
    """Write a model in our native format (model.safetensors + config.json, kind "glm")."""
    return save_native(model.state_dict(), model.config.to_dict(), out_dir, kind=KIND)


def convert_checkpoint(src: str | Path, out_dir: str | Path, format: str = "auto", dtype=None) -> tuple[Path, str]:
    """Convert a THUDM / transformers / native GLM checkpoint into our native format; returns (folder, format)."""
    config, state, detected = read_glm_checkpoint(src, format)
    model = build_on_meta(lambda: GLMModel(config))
    load_into(model, state, dtype=dtype)  # strict: every key used, every shape checked
    return save_glm(model, out_dir), detected
