"""`multimodal ground IMAGE QUESTION`: answer with boxes, print them in pixels, optionally save the drawn image."""

from __future__ import annotations

from multimodal.commands._options import add_model_options


def register(subparsers) -> None:
    parser = subparsers.add_parser("ground", help="ask about an image; print the answer and its boxes in pixels")
    parser.add_argument("image", help="image file")
    parser.add_argument("question", help='e.g. "Where is the dog?"')
    parser.add_argument("--save", default=None, help="write the image with the boxes drawn to this file")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    add_model_options(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    import torch

    from multimodal.image import load_image
    from vlm.chat import load_chat
    from vlm.grounding import draw_grounding

    torch.manual_seed(args.seed)
    chat = load_chat(args.checkpoint, device=args.device, dtype=getattr(torch, args.dtype))
    image = load_image(args.image)
    text, grounding, boxes = chat.ground(image, args.question, chat.sampling(args.max_new_tokens, seed=args.seed))
    print(text)
    for phrase, (x0, y0, x1, y1) in boxes:
        print(f"{phrase or '(box)'}: ({x0:.1f}, {y0:.1f}, {x1:.1f}, {y1:.1f})")
    for problem in grounding.problems:
        print(f"warning: {problem}")
    if args.save:
        draw_grounding(image, grounding).save(args.save)
        print(f"saved {args.save}")
    return 0
