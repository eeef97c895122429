"""`multimodal serve`: an OpenAI-compatible HTTP API on 127.0.0.1 (chat with images, streaming, image generation).

    multimodal serve --port 8000
    curl http://127.0.0.1:8000/v1/models

With the official client: `openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")`, then
`client.chat.completions.create(model=..., messages=[{"role": "user", "content": [{"type": "image_url",
"image_url": {"url": "data:image/png;base64,..."}}, {"type": "text", "text": "Where is the dog?"}]}], stream=True)`
and `client.images.generate(prompt="a dog with a hat", response_format="b64_json")`. See `multimodal/server.py`.
"""

from __future__ import annotations

import argparse

from multimodal.commands._options import add_model_options


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="serve an OpenAI-compatible HTTP API (chat, streaming, images)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--max-batch", type=int, default=8, help="chat requests answered together at most")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more get 429")
    parser.add_argument("--max-tokens", type=int, default=256, help="answer length when a request sets none")
    add_model_options(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from multimodal.engine import Engine
    from multimodal.server import serve

    if args.tp != 1:
        raise ValueError("The server runs one process; use --tp 1 "
                         "(tensor parallel works with chat, ground, caption and draw).")
    engine = Engine.from_args(args)
    serve(engine, host=args.host, port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
          default_max_tokens=args.max_tokens)
    return 0
