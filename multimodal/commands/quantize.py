"""`multimodal quantize SRC OUT --quant int8|int4 [--group-size G] [--exclude GLOB ...]`: write a quantized checkpoint.

SRC is a GLM or VLM checkpoint in any format the suite imports (native, THUDM, transformers, CogVLM ...). OUT is a
native folder whose config.json carries the model config plus a "quant" entry (scheme, group size, excluded layers,
quantization format version); the weights are the canonical device-independent tensors, so the same folder loads on
CPU and GPU. Every command that loads a model reads it through `multimodal.quantize.load_weights`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the command imports torch only when it runs, so `--help` stays fast
    from multimodal.quantize import QuantSpec

MODEL_KINDS = ("auto", "glm", "vlm")
# Files a loader needs beside the weights; copied so the quantized folder loads on its own.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def register(subparsers) -> None:
    parser = subparsers.add_parser("quantize", help="write an INT8 or INT4 weight-only quantized checkpoint")
    parser.add_argument("source", help="checkpoint folder (or weights file beside its config.json)")
    parser.add_argument("out", help="folder to write (model.safetensors + config.json)")
    parser.add_argument("--quant", choices=["int8", "int4"], required=True, help="weight-only scheme")
    parser.add_argument("--group-size", type=int, default=64, help="INT4 group size: 32, 64 or 128")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                        help="keep Linear layers whose name matches in float, e.g. 'output' or 'vision.*' (repeatable)")
    parser.add_argument("--model", choices=MODEL_KINDS, default="auto",
                        help="model family of the source (auto: the kind in a native config.json, else glm)")
    parser.set_defaults(func=run)


def _raw_config(source: Path) -> dict:
    from multimodal.checkpoint import NATIVE_CONFIG

    config_path = (source if source.is_dir() else source.parent) / NATIVE_CONFIG
    return json.loads(config_path.read_text()) if config_path.exists() else {}


def _read_float_checkpoint(source: Path, kind: str):
    """(meta model, float state dict, config dict) of a GLM or VLM checkpoint."""
    from multimodal.checkpoint import build_on_meta
    if kind == "vlm":
        from vlm.convert import read_vlm_checkpoint
        from vlm.model import VisionLanguageModel

        config, state, _ = read_vlm_checkpoint(source)
        return build_on_meta(lambda: VisionLanguageModel(config)), state, config.to_dict()
    from glm.convert import ENCODER_ONLY, build_glm, is_encoder_only, read_glm_checkpoint

    config, state, detected = read_glm_checkpoint(source)
    encoder_only = is_encoder_only(detected, _raw_config(source))
    config_dict = {**config.to_dict(), **({ENCODER_ONLY: True} if encoder_only else {})}
    return build_glm(config, encoder_only), state, config_dict


def quantize_checkpoint(source: str | Path, out: str | Path, spec: QuantSpec, model_kind: str = "auto") -> Path:
    """Read a float checkpoint, quantize its Linear weights one at a time, load strictly, write the native folder."""
    from multimodal.checkpoint import load_into
    from multimodal.quantize import convert_for_runtime, quantize_state_dict, save_quantized

    source = Path(source)
    if not source.exists():
        raise ValueError(f"The checkpoint {source} does not exist.")
    raw_config = _raw_config(source)
    if "quant" in raw_config:
        raise ValueError(f"{source} is already quantized; quantize its float original instead.")
    kind = model_kind if model_kind != "auto" else "vlm" if raw_config.get("kind") == "vlm" else "glm"
    model, state, config = _read_float_checkpoint(source, kind)
    quantized_state = quantize_state_dict(state, model, spec)
    load_into(convert_for_runtime(model, spec), quantized_state)  # strict: every key used, every shape checked
    written = save_quantized(model, spec, config, out, kind)
    folder = source if source.is_dir() else source.parent
    for name in TOKENIZER_FILES:
        if (folder / name).exists():
            shutil.copy2(folder / name, Path(out) / name)
    return written


def run(args) -> int:
    from multimodal.quantize import QuantSpec

    spec = QuantSpec(args.quant, args.group_size, tuple(args.exclude))
    out = quantize_checkpoint(args.source, args.out, spec, args.model)
    print(f"wrote {args.quant} checkpoint to {out}")
    return 0
