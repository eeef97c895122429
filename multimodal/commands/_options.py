"""Options shared by every command that loads a model."""

from __future__ import annotations

import argparse


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--checkpoint", default=None, help="checkpoint folder or file (default: the embedded model)")
    group.add_argument("--quant", choices=["none", "int8", "int4"], default="none",
                       help="weight-only quantization of the float model's Linear layers (a checkpoint written by "
                            "`multimodal quantize` loads as stored)")
    group.add_argument("--group-size", type=int, default=64, help="INT4 group size (32, 64 or 128)")
    group.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                       help="with --quant, keep Linear layers whose name matches in float, e.g. 'output' or "
                            "'*.down' (repeatable)")
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    group.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="compute dtype")
    group.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (under torchrun --nproc-per-node N)")
    group.add_argument("--seed", type=int, default=0, help="random seed")
