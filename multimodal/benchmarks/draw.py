"""`multimodal bench draw`: text-to-image speed and denoiser FLOPs, single-stage at full size vs base + relay.

Both rows draw the same prompts at the same final size with the same base DiT: "base only" runs it directly at full
resolution for --steps Heun steps; "base + relay" runs it at 1/up_scale of the size, then the relay DiT for
--relay-steps steps at full size. FLOPs are counted analytically from the DiT shapes (`DiT.flops_per_forward`,
guidance's two passes, Heun's 2N - 1 evaluations); time is one measured run after a one-step warm-up. Without
--checkpoint it measures the shipped pipeline (multimodal/assets/diffusion) with its text encoder.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when a benchmark runs, so `multimodal --help` stays fast
    pass


def register(subparsers) -> None:
    parser = subparsers.add_parser("draw", help="text-to-image images/s and FLOPs: base only vs base + relay")
    parser.add_argument("--checkpoint", default=None, help="pipeline folder (default: the shipped one)")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=18, help="base-stage Heun steps")
    parser.add_argument("--relay-steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1, help="images per run")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from diffusion.pipeline import load_relay_pipeline
    from multimodal.assets import asset_path

    torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint or asset_path("diffusion")
    pipe = load_relay_pipeline(checkpoint, device=args.device, dtype=getattr(torch, args.dtype))
    prompts = ["a dog with a hat"] * args.batch
    text_len = pipe.text_encoder(prompts[:1])[0].shape[1]
    size = dict(height=args.height, width=args.width)
    rows = []
    for name, use_relay in (("base only", False), ("base + relay", True)):
        pipe(prompts[:1], num_inference_steps=1, relay_steps=1, use_relay=use_relay, seed=args.seed, **size)
        start = time.perf_counter()
        pipe(prompts, num_inference_steps=args.steps, relay_steps=args.relay_steps, use_relay=use_relay,
             seed=args.seed, output_type="pt", **size)
        seconds = (time.perf_counter() - start) / args.batch
        flops = pipe.flops(args.height, args.width, text_len, args.steps, args.relay_steps, use_relay=use_relay)
        steps = f"{args.steps}+{args.relay_steps}" if use_relay else str(args.steps)
        rows.append((name, steps, flops, seconds))

    print(f"text-to-image at {args.width}x{args.height}, batch {args.batch}, {args.device} {args.dtype}, "
          f"{args.threads} threads, text {text_len} tokens")
    print(f"{'mode':<14} {'steps':>6} {'GFLOP/image':>12} {'s/image':>9} {'images/s':>9}")
    for name, steps, flops, seconds in rows:
        print(f"{name:<14} {steps:>6} {flops / 1e9:>12.2f} {seconds:>9.3f} {1 / seconds:>9.2f}")
    (_, _, flops_single, time_single), (_, _, flops_relay, time_relay) = rows
    print(f"base + relay / base only: FLOPs {flops_relay / flops_single:.2f}x, time {time_relay / time_single:.2f}x")
    return 0
