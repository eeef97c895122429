"""`multimodal draw "a dog with a hat" --out dog.png`: text -> image with the relay pipeline.

Writes the final (relay) image to --out and the base-stage image beside it (`dog.base.png`); with several images,
`dog-1.png`, `dog-1.base.png`, ... Prints the seed of every image, so any one can be drawn again alone.
`--grid sheet.png` takes one or more prompts and writes a contact sheet instead: a row per prompt, a column per
seed, after a first column with a rendered drawing-world scene of that prompt when there is one.
--checkpoint is a pipeline folder (config.json, base/, relay/), a suite folder holding one in diffusion/, or a
CogView4 folder in diffusers' layout (model_index.json, transformer/, text_encoder/, tokenizer/, vae/, scheduler/;
one stage, 50 steps and guidance 5 by default, as diffusers runs it); the default is the embedded model in
multimodal/assets/diffusion.
--quant quantizes the text encoder's GLM and both denoisers. A suite folder loads through
`multimodal.engine.Engine.load`, so a VLM written by `multimodal quantize` and --tp (under torchrun) work there; a
lone pipeline folder names its own text encoder and runs on one process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from multimodal.assets import DRAWING_LIMITS
from multimodal.commands._options import add_model_options


def register(subparsers) -> None:
    parser = subparsers.add_parser("draw", help="draw an image from a text prompt (base + relay stages)",
                                   description=__doc__ + "\n" + DRAWING_LIMITS,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="+", help="what to draw (several prompts need --grid)")
    parser.add_argument("--grid", default=None, help="write a contact sheet (prompts x seeds) to this PNG")
    parser.add_argument("--out", default="image.png", help="output PNG path (default image.png)")
    parser.add_argument("--negative", default=None, help="negative prompt (default: the empty prompt)")
    parser.add_argument("--height", type=positive_int, default=None,
                        help="final height in pixels (default: the model's)")
    parser.add_argument("--width", type=positive_int, default=None, help="final width in pixels (default: the model's)")
    parser.add_argument("--steps", type=positive_int, default=None, help="base-stage Heun steps (default: the model's)")
    parser.add_argument("--relay-steps", type=positive_int, default=None,
                        help="relay-stage steps (default: the model's)")
    parser.add_argument("--guidance", type=non_negative_float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--num-images", type=positive_int, default=1, help="images to draw, seeds seed, seed+1, ...")
    parser.add_argument("--no-relay", action="store_true",
                        help="stop after the base stage (drawn at its own resolution, then enlarged to the size)")
    add_model_options(parser)
    parser.set_defaults(func=main)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


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


def load_pipeline(args: argparse.Namespace):
    """The relay pipeline of --checkpoint with --quant (and, for a suite folder, --tp) applied."""
    import torch

    from diffusion.cogview4 import is_cogview4_folder, load_cogview4
    from diffusion.pipeline import load_relay_pipeline
    from multimodal.engine import Engine

    folder = pipeline_folder(args.checkpoint)
    if is_cogview4_folder(folder):
        if args.tp != 1:
            raise ValueError("--tp is not supported for CogView4 folders; draw on one process.")
        pipe = load_cogview4(folder, device=args.device, dtype=getattr(torch, args.dtype))
        _quantize(args, (pipe.text_encoder.model, pipe.transformer))
        return pipe
    suite = folder.parent
    if folder.name == "diffusion" and (suite / "vlm").is_dir():  # the text encoder is the suite's VLM
        return Engine.load(suite, args.quant, args.group_size, args.device, args.dtype, args.tp, args.exclude).painter
    if args.tp != 1:
        raise ValueError(f"--tp needs a suite folder (vlm/ beside diffusion/); {folder} is a lone pipeline folder.")
    pipe = load_relay_pipeline(folder, device=args.device, dtype=getattr(torch, args.dtype))
    _quantize(args, (pipe.text_encoder.model, pipe.base, pipe.relay))
    return pipe


def _quantize(args: argparse.Namespace, models) -> None:
    if args.quant != "none":
        from multimodal.quantize import QuantSpec, quantize_model

        spec = QuantSpec(args.quant, args.group_size, tuple(args.exclude))
        for model in models:
            quantize_model(model, spec)


def main(args: argparse.Namespace) -> int:
    from PIL import Image

    from diffusion.cogview4 import LatentFlowPipeline
    from multimodal.tp import is_main_process

    if len(args.prompt) > 1 and args.grid is None:
        raise ValueError(f"{len(args.prompt)} prompts were given; draw one at a time, or pass --grid for a sheet.")
    if args.checkpoint is None and is_main_process():
        from multimodal.drawing import prompt_warning

        for warning in filter(None, map(prompt_warning, args.prompt)):
            print(f"warning: {warning}", file=sys.stderr)
    pipe = load_pipeline(args)
    height, width = args.height or pipe.sizes[0][0], args.width or pipe.sizes[0][1]
    if (height, width) not in pipe.sizes and is_main_process():
        trained = ", ".join(f"{w}x{h}" for h, w in pipe.sizes)
        print(f"warning: this model was trained to draw {trained}; at {width}x{height} expect a poor image.",
              file=sys.stderr)
    relay = not isinstance(pipe, LatentFlowPipeline)  # CogView4 draws in one stage
    if not relay and (args.no_relay or args.relay_steps is not None):
        raise ValueError("This CogView4 model has no relay stage; drop --no-relay and --relay-steps.")
    up = pipe.config.up_scale if relay else 1
    if args.no_relay and (height % up or width % up):
        raise ValueError(f"With --no-relay the size must be a multiple of {up} (the base stage draws at 1/{up}).")
    # Without the relay stage the base stage still draws at its own scale (1/up_scale), as it was trained.
    draw_height, draw_width = (height // up, width // up) if args.no_relay else (height, width)
    stages = {"relay_steps": args.relay_steps, "use_relay": not args.no_relay} if relay else {}
    if args.grid is not None:
        return write_grid(pipe, args, draw_height, draw_width, stages)
    result = pipe(
        args.prompt[0], negative_prompt=args.negative, height=draw_height, width=draw_width,
        num_inference_steps=args.steps, guidance_scale=args.guidance, num_images_per_prompt=args.num_images,
        seed=args.seed, **stages,
    )
    if not is_main_process():  # every rank drew the same images; one writes them
        return 0
    if args.no_relay:
        result.images = [image.resize((width, height), Image.Resampling.BICUBIC) for image in result.images]
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


def write_grid(pipe, args: argparse.Namespace, height: int, width: int, stages: dict) -> int:
    from multimodal.sheet import contact_sheet, rendered_scene_for
    from multimodal.tp import is_main_process

    rows = []
    for prompt in args.prompt:
        result = pipe(
            prompt, negative_prompt=args.negative, height=height, width=width, num_inference_steps=args.steps,
            guidance_scale=args.guidance, num_images_per_prompt=args.num_images, seed=args.seed, **stages,
        )  # fmt: skip
        rows.append((prompt, [rendered_scene_for(prompt), *result.images]))
    if not is_main_process():
        return 0
    header = ["rendered scene"] + [f"seed {seed}" for seed in result.seeds]
    out = Path(args.grid)
    out.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(rows, header=header).save(out)
    print(f"{len(args.prompt)} prompts x {args.num_images} seeds: {out}")
    return 0
