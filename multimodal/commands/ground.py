"""`multimodal ground IMAGE QUESTION`: answer with boxes, print them in pixels, optionally save the drawn image.

The model is loaded by `multimodal.engine.Engine.load`, so --quant, --exclude and --tp (under torchrun) apply; with
several ranks every rank computes the answer and only the first prints and saves it.
"""

from __future__ import annotations

import argparse

from multimodal.assets import EMBEDDED_LIMITS
from multimodal.commands._options import add_model_options


def register(subparsers) -> None:
    parser = subparsers.add_parser("ground", help="ask about an image; print the answer and its boxes in pixels",
                                   description=__doc__ + "\n" + EMBEDDED_LIMITS,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", help="image file")
    parser.add_argument("question", help='e.g. "Where is the dog?"')
    parser.add_argument("--save", default=None, help="write the image with the boxes drawn to this file")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="longest answer in tokens (default 256: a four-object grounded caption fits)")
    add_model_options(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from multimodal.image import load_image

    image = load_image(args.image)  # a bad image fails before torch and the model are loaded

    from multimodal.engine import Engine, Sampling
    from multimodal.tp import is_main_process

    engine = Engine.from_args(args)
    answer = engine.ground(image, args.question, Sampling(max_new_tokens=args.max_new_tokens, seed=args.seed))
    if not is_main_process():
        return 0
    print(answer.text)
    for phrase, (x0, y0, x1, y1) in answer.boxes:
        print(f"{phrase or '(box)'}: ({x0:.1f}, {y0:.1f}, {x1:.1f}, {y1:.1f})")
    for problem in answer.problems:
        print(f"warning: {problem}")
    if args.save:
        answer.drawn_on(image).save(args.save)
        print(f"saved {args.save}")
    return 0
