"""`multimodal demo` (also `make demo`): the Gradio app in the browser at http://127.0.0.1:7860.

Tabs: Chat & ground (upload an image or make an EmojiScenes scene, ask, see the boxes), Draw (prompt -> base and
relay images), Caption (several files -> a table and a JSONL download). Runs the embedded models unless
--checkpoint says otherwise. See `demos/app.py`.
"""

from __future__ import annotations

import argparse

from multimodal.commands._options import add_model_options


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="start the Gradio demo (chat & ground, draw, caption)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    add_model_options(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from demos.app import build_app, launch
    from multimodal.engine import Engine

    if args.tp != 1:
        raise ValueError("The demo runs one process; use --tp 1 "
                         "(tensor parallel works with chat, ground, caption and draw).")
    launch(build_app(Engine.from_args(args), max_new_tokens=args.max_new_tokens), host=args.host, port=args.port)
    return 0
