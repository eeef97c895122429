"""GLM checkpoint import: key tables for THUDM's format and transformers' `GlmForCausalLM`, config mapping, loading.

Four formats are recognised from their key names and config.json:
- THUDM (chatglm3-6b, glm-4-9b-chat): `transformer.encoder.layers.{n}.self_attention.query_key_value...`, config
  with `padded_vocab_size`, `multi_query_group_num`, `kv_channels`, `rope_ratio`.
- transformers' native `GlmForCausalLM` (glm-4-9b-chat-hf): `model.layers.{n}.self_attn.{q,k,v}_proj...` (fused
  here into our qkv) and `mlp.gate_up_proj`, config with `rope_parameters` / `rope_theta`.
- transformers' bare `GlmModel` (CogView4's `text_encoder/`): the same keys without the `model.` prefix and no
  `lm_head`, so the checkpoint is an encoder only.
- our native format (`multimodal convert` output): our key names, config.json with kind "glm"; written by
  `multimodal quantize`, config.json also has a "quant" entry and the Linear weights are stored quantized.

Encoder-only models. A checkpoint without an output layer loads into a plain `GLMModel` whose `output` is replaced
by `nn.Identity` (see `build_glm`): the model and its config stay those of the full decoder, no vocabulary-sized
weight is invented, and `forward` returns the final-normed hidden states (transformers' `last_hidden_state`) in place
of logits; `hidden_states[-2]`, all that a text encoder needs, is unchanged. Such a model is for encoding, not for
generation. Saved in our native format it has no `output.weight` and its config.json says `"encoder_only": true`, so
the strict key check still holds when it is read back.

`load_glm` builds the model on the meta device and reads through `multimodal.quantize.load_weights`: a quantized
checkpoint loads as stored, a float one is quantized while it is read when `quant` is given; no weight exists twice.

The rotary base of THUDM checkpoints is computed here as 10000 * rope_ratio; transformers' conversion script has
read rope_ratio with getattr on a dict, which silently yields 10000, so we never rely on it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

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
from multimodal.quantize import load_weights

KIND = "glm"
FORMATS = ("thudm", "hf", "hf-bare", "native")
ENCODER_ONLY_FORMATS = ("hf-bare",)  # formats that never carry an output layer
ENCODER_ONLY = "encoder_only"  # the native config.json entry of a model saved without its output layer

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


def _hf_table(name: str, prefix: str, with_output: bool) -> KeyTable:
    """transformers' GLM keys under `prefix` ("model." in GlmForCausalLM, "" in a bare GlmModel)."""
    def qkv(kind: str) -> Rule:
        return Rule(f"layers.{{n}}.attn.qkv.{kind}",
                    tuple(f"{prefix}layers.{{n}}.self_attn.{p}_proj.{kind}" for p in "qkv"), dim=0)

    rules = [
        Rule("embed.weight", (f"{prefix}embed_tokens.weight",)),
        Rule("layers.{n}.attn_norm.weight", (f"{prefix}layers.{{n}}.input_layernorm.weight",)),
        qkv("weight"),
        qkv("bias"),
        Rule("layers.{n}.attn.dense.weight", (f"{prefix}layers.{{n}}.self_attn.o_proj.weight",)),
        Rule("layers.{n}.mlp_norm.weight", (f"{prefix}layers.{{n}}.post_attention_layernorm.weight",)),
        Rule("layers.{n}.mlp.gate_up.weight", (f"{prefix}layers.{{n}}.mlp.gate_up_proj.weight",)),
        Rule("layers.{n}.mlp.down.weight", (f"{prefix}layers.{{n}}.mlp.down_proj.weight",)),
        Rule("final_norm.weight", (f"{prefix}norm.weight",)),
    ]
    if with_output:
        rules.append(Rule("output.weight", ("lm_head.weight",)))
    return KeyTable(name=name, rules=rules, ignore=(r"rotary_emb\.inv_freq$",))


HF_TABLE = _hf_table("transformers GlmForCausalLM checkpoint", "model.", with_output=True)
HF_BARE_TABLE = _hf_table("transformers GlmModel checkpoint", "", with_output=False)


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
    """'thudm', 'hf', 'hf-bare' or 'native' from the key names (and config.json's `kind` for ours)."""
    keys = list(keys)
    if any(k.startswith("transformer.encoder.layers.") for k in keys):
        return "thudm"
    if any(k.startswith("model.layers.") and ".self_attn.q_proj." in k for k in keys):
        return "hf"
    if any(k.startswith("layers.") and ".self_attn.q_proj." in k for k in keys):
        return "hf-bare"
    if any(k.startswith("layers.") and ".attn.qkv." in k for k in keys) and (config or {}).get("kind") == KIND:
        return "native"
    raise CheckpointError(
        "Could not recognise the checkpoint as THUDM GLM, transformers GlmForCausalLM / GlmModel or our native GLM "
        f"format (first keys: {', '.join(keys[:4])})."
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


def _read_checkpoint(path: str | Path, format: str) -> tuple[GLMConfig, dict[str, torch.Tensor], str, dict]:
    """(our config, our state dict, the detected format, config.json as stored)."""
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
        return config_from_thudm(config_values), convert(weights, THUDM_TABLE), format, config_values
    if format in ("hf", "hf-bare"):
        table = HF_TABLE if format == "hf" else HF_BARE_TABLE
        return config_from_hf(config_values), convert(weights, table), format, config_values
    config = GLMConfig.from_dict(read_native_config(folder, kind=KIND))
    return config, dict(weights), format, config_values


def read_glm_checkpoint(path: str | Path, format: str = "auto") -> tuple[GLMConfig, dict[str, torch.Tensor], str]:
    """Read any supported GLM checkpoint into (our config, our state dict, the detected format)."""
    config, state, detected, _ = _read_checkpoint(path, format)
    return config, state, detected


def is_encoder_only(detected_format: str, checkpoint_config: Mapping) -> bool:
    """Whether a checkpoint has no output layer: a bare GlmModel, or a native one saved from such a model."""
    return detected_format in ENCODER_ONLY_FORMATS or bool(checkpoint_config.get(ENCODER_ONLY, False))


def build_glm(config: GLMConfig, encoder_only: bool = False) -> GLMModel:
    """A GLMModel on the meta device; an encoder-only one has `nn.Identity` as its output layer."""
    model = build_on_meta(lambda: GLMModel(config))
    if encoder_only:
        model.output = nn.Identity()
    return model


def load_glm(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device="cpu",
    format: str = "auto",
    quant: str | None = None,
    group_size: int = 64,
    exclude: Iterable[str] = (),
) -> GLMModel:
    """Build a GLMModel on the meta device and strictly load a THUDM, transformers or native checkpoint into it.

    A checkpoint written by `multimodal quantize` loads as stored; a float one is quantized while it is read when
    `quant` is "int8" or "int4" (`group_size` and the `exclude` globs as in `multimodal.quantize.QuantSpec`).
    A bare transformers GlmModel loads as an encoder-only model (see the module docstring).
    """
    config, state, detected, checkpoint_config = _read_checkpoint(path, format)
    model = build_glm(config, is_encoder_only(detected, checkpoint_config))
    load_weights(model, state, checkpoint_config, quant or "none", group_size, dtype, exclude)
    return model.to(device).eval()


def save_glm(model: GLMModel, out_dir: str | Path) -> Path:
    """Write a model in our native format (model.safetensors + config.json, kind "glm")."""
    config = model.config.to_dict()
    if isinstance(model.output, nn.Identity):
        config[ENCODER_ONLY] = True
    return save_native(model.state_dict(), config, out_dir, kind=KIND)


def convert_checkpoint(src: str | Path, out_dir: str | Path, format: str = "auto", dtype=None) -> tuple[Path, str]:
    """Convert a THUDM / transformers / native GLM checkpoint into our float native format; returns (folder, format).

    Quantized checkpoints are refused: their float weights are gone, and `multimodal quantize` writes those.
    """
    config, state, detected, checkpoint_config = _read_checkpoint(src, format)
    if "quant" in checkpoint_config:
        raise CheckpointError(f"{src} is quantized; `multimodal convert` writes float checkpoints only.")
    model = build_glm(config, is_encoder_only(detected, checkpoint_config))
    load_into(model, state, dtype=dtype)  # strict: every key used, every shape checked
    return save_glm(model, out_dir), detected
