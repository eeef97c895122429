"""`multimodal draw "a dog with a hat" --out dog.png`: text -> image with the relay pipeline.

Writes the final (relay) image to --out and the base-stage image beside it (`dog.base.png`); with several images,
`dog-1.png`, `dog-1.base.png`, ... Prints the seed of every image, so any one can be drawn again alone.
--checkpoint is a pipeline folder (config.json, base/, relay/) or a suite folder holding one in diffusion/; the
default is the embedded model in multimodal/assets/diffusion.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from multimodal.commands._options import add_model_options


def register(subparsers) -> None:
    parser = subparsers.add_parser("draw", help="draw an image from a text prompt (base + relay stages)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", help="what to draw")
    parser.add_argument("--out", default="image.png", help="output PNG path (default image.png)")
    parser.add_argument("--negative", default=None, help="negative prompt (default: the empty prompt)")
    parser.add_argument("--height", type=int, default=None, help="final height in pixels (default: the model's)")
    parser.add_argument("--width", type=int, default=None, help="final width in pixels (default: the model's)")
    parser.add_argument("--steps", type=int, default=None, help="base-stage Heun steps (default: the model's)")
    parser.add_argument("--relay-steps", type=int, default=None, help="relay-stage steps (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--num-images", type=int, default=1, help="images to draw, seeds seed, seed+1, ...")
    parser.add_argument("--no-relay", action="store_true", help="stop after the base stage")
    add_model_options(parser)
    parser.set_defaults(func=main)


def pipeline_folder(checkpoint: str | None) -> Path:
    """The pipeline folder named by --checkpoint, or the embedded one; one sentence when there is none."""
    from multimodal.assets import ASSETS_DIR

    if checkpoint is None:
        folder = ASSETS_DIR / "diffusion"
        if not folder.is_dir():
            raise ValueError(
                f"No --checkpoint was given and the embedded text-to-image model ({folder}) is not built yet; "
                "train it with `multimodal train diffusion` or pass --checkpoint."
            )
        return folder
    folder = Path(checkpoint)
    if not folder.exists():
        raise ValueError(f"The checkpoint {folder} does not exist.")
    return folder / "diffusion" if (folder / "diffusion").is_dir() else folder


def main(args: argparse.Namespace) -> int:
    import torch

    from diffusion.pipeline import load_relay_pipeline

    if args.quant != "none" or args.tp != 1:
        raise ValueError("draw runs the float model on one device; --quant and --tp are not supported here.")
    if args.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, not {args.num_images}.")
    pipe = load_relay_pipeline(pipeline_folder(args.checkpoint), device=args.device, dtype=getattr(torch, args.dtype))
    result = pipe(
        args.prompt, negative_prompt=args.negative, height=args.height, width=args.width,
        num_inference_steps=args.steps, relay_steps=args.relay_steps, guidance_scale=args.guidance,
        num_images_per_prompt=args.num_images, seed=args.seed, use_relay=not args.no_relay,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for index, (image, base, seed) in enumerate(zip(result.images, result.base, result.seeds)):
        stem = out.stem if len(result.images) == 1 else f"{out.stem}-{index + 1}"
        final_path = out.with_name(f"{stem}{out.suffix or '.png'}")
        image.save(final_path)
        written = [str(final_path)]
        if result.relay:
            base_path = out.with_name(f"{stem}.base{out.suffix or '.png'}")
            base.save(base_path)
            written.append(str(base_path))
        print(f"seed {seed}: {', '.join(written)}")
    return 0
