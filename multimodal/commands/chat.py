"""`multimodal chat [--image IMAGE]`: an interactive conversation; the image is encoded once for all turns. A GLM text
model's folder (ChatGLM3, GLM-4 chat) as --checkpoint chats without an image.

The model is loaded by `multimodal.engine.Engine.load`, so --quant, --exclude and --tp apply. Under torchrun the
first rank reads the questions and prints the answers; every rank gets each question, since all of them run the
model together.
"""

from __future__ import annotations

import argparse
import sys

from multimodal.assets import EMBEDDED_LIMITS
from multimodal.commands._options import add_model_options


def register(subparsers) -> None:
    parser = subparsers.add_parser("chat", help="chat about an image in the terminal (empty line or Ctrl-D ends)",
                                   description=__doc__ + "\n" + EMBEDDED_LIMITS,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=None, help="image file to talk about")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (the default) answers greedily")
    add_model_options(parser)
    parser.set_defaults(func=run)


def _next_question(stdin, main_process: bool) -> str:
    """The next line the user typed, read by the first rank and shared with the others ("" ends the chat)."""
    import torch.distributed as dist

    question = ""
    if main_process:
        print("you> ", end="", flush=True)
        question = stdin.readline().strip()
    if dist.is_initialized():
        shared = [question]
        dist.broadcast_object_list(shared, src=0)
        question = shared[0]
    return question


def run(args, stdin=None) -> int:
    from multimodal.engine import Engine, Sampling
    from multimodal.image import load_image
    from multimodal.tp import is_main_process

    stdin = stdin or sys.stdin
    image = load_image(args.image) if args.image is not None else None  # a bad image fails before loading
    engine = Engine.from_args(args)
    main_process = is_main_process()
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    history = []
    while question := _next_question(stdin, main_process):
        if main_process:
            print("model> ", end="", flush=True)
        pieces = []
        for delta in engine.chat_stream(image, question, history, sampling):  # the image is encoded once
            pieces.append(delta)
            if main_process:
                print(delta, end="", flush=True)
        if main_process:
            print()
        history += [("user", question), ("assistant", "".join(pieces))]
    return 0
