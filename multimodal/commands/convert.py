"""`multimodal convert SRC OUT`: import a GLM checkpoint (THUDM's or transformers' format) into our native format.

The output is always a float checkpoint (`multimodal quantize` writes quantized ones). A bare transformers `GlmModel`
(CogView4's text encoder) has no output layer and converts into an encoder-only native checkpoint.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert a THUDM / transformers GLM checkpoint into the suite's native format"
    )
    parser.add_argument("src", help="checkpoint folder (config.json + safetensors or .bin weights)")
    parser.add_argument("out", help="output folder (model.safetensors + config.json)")
    parser.add_argument("--format", choices=["auto", "thudm", "hf", "hf-bare", "native"], default="auto",
                        help="source key layout; hf-bare: a GlmModel without lm_head (default: detected from the keys)")
    parser.add_argument("--dtype", choices=["keep", "float32", "bfloat16", "float16"], default="keep",
                        help="store the weights in this dtype (default: as in the source)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from glm.convert import convert_checkpoint

    dtype = None if args.dtype == "keep" else getattr(torch, args.dtype)
    out, detected = convert_checkpoint(args.src, args.out, format=args.format, dtype=dtype)
    print(f"converted {args.src} ({detected} format) -> {out}")
    return 0
