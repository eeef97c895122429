"""`multimodal bench tp`: what each tensor-parallel rank holds, and (under torchrun) decode speed against TP=1.

Weights: for each model and world size, the real shapes are built on the meta device (nothing is allocated),
sharded as rank r would shard them, and their bytes summed: the whole model, one rank's share, total / N, the part
every rank holds whole (norms, biases, replicated embeddings) and rank / (total / N). With 2 KV groups, more than 2
ranks hold copies of the groups, which is the excess above the ideal. `--quant int8/int4` gives the same for the
weight-only quantized shards ("n/a" where the INT4 group size does not divide a shard).

Speed (`torchrun --standalone --nproc-per-node N -m multimodal.cli bench tp --speed`): rank 0 first decodes alone
with the whole model (TP=1, the other ranks wait), then all ranks decode with the sharded model; greedy tokens of
the two runs are compared so the speed-up cannot come from computing something else.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when a benchmark runs, so `multimodal --help` stays fast
    import torch

MODELS = ("chatglm3-6b", "glm-4-9b", "cogvlm-chat", "glm-4v-9b", "cogview4-6b")


def register(subparsers) -> None:
    parser = subparsers.add_parser("tp", help="per-rank weight bytes under tensor parallel; decode speed vs TP=1")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--quant", choices=["none", "int8", "int4"], default="none")
    parser.add_argument("--group-size", type=int, default=64, help="INT4 group size")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--speed", action="store_true", help="also time greedy decode (run under torchrun)")
    parser.add_argument("--preset", default="bench-200m", help="GLM preset for --speed")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per rank")
    parser.set_defaults(func=run)


def builder(name: str, dtype: torch.dtype):
    """A function building model `name` (meta-friendly) in `dtype`."""
    if name in ("chatglm3-6b", "glm-4-9b"):
        from glm.model import GLMConfig, GLMModel

        return lambda: GLMModel(GLMConfig.from_preset(name)).to(dtype)
    if name in ("cogvlm-chat", "glm-4v-9b"):
        from vlm.model import VisionLanguageModel, VLMConfig

        return lambda: VisionLanguageModel(VLMConfig.from_preset(name)).to(dtype)
    from diffusion.denoiser import DiT, dit_config

    return lambda: DiT(dit_config(name)).to(dtype)


def weights_table(args: argparse.Namespace) -> None:
    import torch

    from multimodal.quantize import QuantSpec
    from multimodal.tp import tp_weight_report

    quant = None if args.quant == "none" else QuantSpec(args.quant, args.group_size)
    print(f"per-rank weight bytes, {args.dtype}" + (f", {args.quant}" if quant else "")
          + (f" (group size {args.group_size})" if args.quant == "int4" else ""))
    print(f"{'model':<13} {'N':>2} {'total GB':>9} {'rank GB':>8} {'total/N':>8} {'replicated':>10} "
          f"{'rank/(total/N)':>15}")
    for name in args.models:
        build = builder(name, getattr(torch, args.dtype))
        for world in args.worlds:
            try:
                report = tp_weight_report(build, world, quant)
            except ValueError as error:
                print(f"{name:<13} {world:>2} n/a: {error}")
                continue
            share = report.total_bytes / world
            print(f"{name:<13} {world:>2} {report.total_bytes / 1e9:>9.3f} {max(report.rank_bytes) / 1e9:>8.3f} "
                  f"{share / 1e9:>8.3f} {report.replicated_bytes / 1e9:>10.3f} {max(report.rank_bytes) / share:>15.3f}")


def speed(args: argparse.Namespace, context) -> None:
    """Greedy generation at TP=1 and TP=world (call it under `torch.no_grad()`)."""
    import torch
    import torch.distributed as dist

    from glm.generate import SamplingConfig, generate
    from glm.model import GLMConfig, GLMModel
    from multimodal.tp import is_main_process, shard_model, weight_bytes

    config = GLMConfig.from_preset(args.preset)
    dtype = getattr(torch, args.dtype)
    device = context.device if context else torch.device(args.device)
    model = GLMModel(config).init_weights(generator=torch.Generator().manual_seed(0)).to(device, dtype).eval()
    prompts = torch.randint(3, config.vocab_size, (args.batch, args.prompt_len),
                            generator=torch.Generator().manual_seed(1)).tolist()
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)

    def timed(m) -> tuple[float, list]:
        generate(m, [p[:4] for p in prompts], SamplingConfig(max_new_tokens=2))  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        tokens = generate(m, prompts, sampling)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, tokens

    rows = []
    if is_main_process():
        seconds, reference_tokens = timed(model)
        rows.append((1, weight_bytes(model), seconds))
    world = context.world if context else 1
    if world > 1:
        dist.barrier()  # the other ranks wait while rank 0 runs TP=1
        shard_model(model)
        seconds, tokens = timed(model)
        rows.append((world, weight_bytes(model), seconds))
    if not is_main_process():
        return
    new_tokens = args.batch * args.new_tokens
    print(f"greedy generation, {args.preset}, batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new "
          f"tokens, {device.type} {args.dtype}")
    print(f"{'TP':>3} {'rank GB':>8} {'s':>8} {'tokens/s':>9} {'vs TP=1':>8}")
    for ranks, held, seconds in rows:
        print(f"{ranks:>3} {held / 1e9:>8.3f} {seconds:>8.3f} {new_tokens / seconds:>9.1f} "
              f"{rows[0][2] / seconds:>7.2f}x")
    if world > 1:
        print(f"greedy tokens identical to TP=1: {tokens == reference_tokens}")


def run(args: argparse.Namespace) -> int:
    import torch

    from multimodal.tp import is_main_process, maybe_init_distributed

    if args.threads:
        torch.set_num_threads(args.threads)
    context = maybe_init_distributed(device=args.device)
    if is_main_process():
        weights_table(args)
    if args.speed:
        if is_main_process():
            print()
        with torch.no_grad():
            speed(args, context)
    return 0
