"""`multimodal chat [--image IMAGE]`: an interactive conversation; the image is encoded once for all turns."""

from __future__ import annotations

import sys

from multimodal.commands._options import add_model_options


def register(subparsers) -> None:
    parser = subparsers.add_parser("chat", help="chat about an image in the terminal (empty line or Ctrl-D ends)")
    parser.add_argument("--image", default=None, help="image file to talk about")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    add_model_options(parser)
    parser.set_defaults(func=run)


def run(args, stdin=None) -> int:
    import torch

    from vlm.chat import load_chat

    stdin = stdin or sys.stdin
    chat = load_chat(args.checkpoint, device=args.device, dtype=getattr(torch, args.dtype))
    conversation = chat.start(args.image)
    sampling = chat.sampling(args.max_new_tokens, args.temperature, seed=args.seed)
    while True:
        print("you> ", end="", flush=True)
        question = stdin.readline()
        if not question.strip():
            return 0
        print("model> ", end="", flush=True)
        for delta in conversation.ask(question.strip(), sampling):
            print(delta, end="", flush=True)
        print()
