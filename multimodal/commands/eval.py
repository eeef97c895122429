"""`multimodal eval ground|absent|caption|vqa|chat|draw`: the quality measures of the README's quality table, on the
test split (`--split val` to choose between models without looking at it).

Questions alternate English and Chinese and, in pairs, a training phrasing and one held out of training; every
measure is also reported by language and by phrasing split (`--wording canonical` asks each question in its form's
first wording instead, as the world's templates do). ground: Acc@IoU0.5 of referring expressions (as
RefCOCO), split class-only / with-region; absent: the same questions about a class the scene lacks, answered as absent
with no box; caption: object-set F1 of captions against the scene; vqa: exact-match accuracy by topic; chat: the vqa
questions as the first turn and as a follow-up after a caption request, and follow-ups that refer back ("And how
many cats?"); draw: all named objects present by the judge and by the VLM,
R-precision, per composition and on held-out compositions, background colour, CLIPScore, Frechet distance, relay
against single stage at equal compute, each beside its value on the rendered scenes (`--sheet` writes the images).

The models are the embedded ones unless --checkpoint names a suite folder (`vlm/`, `diffusion/`); `--quant`
quantizes them after loading, as every command does. The draw measure also needs the judge (`--judge`, default
the suite folder's, else the shipped one) and the single-stage baseline (`diffusion/single/` of the suite folder; a
float32 comparison, so a quantized run leaves it out).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from multimodal.commands._options import add_model_options

TASKS = ("ground", "absent", "caption", "vqa", "chat", "draw")


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="measure the models on the EmojiScenes test split",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("--count", type=int, default=None,
                        help="test items (default: 200)")
    parser.add_argument("--sheet", default=None, help="draw: write a contact sheet of the first 24 prompts here")
    parser.add_argument("--split", choices=["test", "val"], default="test",
                        help="the val split is for choosing between models and sampler settings, the test split for "
                             "reporting")
    parser.add_argument("--guidance", type=float, default=None, help="draw: guidance scale (default: the model's)")
    parser.add_argument("--judge", default=None, help="judge checkpoint folder (default: the shipped judge)")
    parser.add_argument("--wording", choices=["mixed", "canonical"], default="mixed",
                        help="questions in training and held-out phrasings (mixed), or each in its form's first "
                             "wording (canonical: \"Where is the dog?\")")
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    add_model_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from multimodal.engine import Engine
    from multimodal.evaluation import answer_turns_with, answer_with, evaluate_follow_ups, evaluate_understanding

    engine = Engine.from_args(args)
    count = args.count or 200
    if count < 2:
        raise ValueError(f"--count must be at least 2, not {count}.")
    if args.task == "draw":
        from multimodal.evaluation_draw import evaluate_draw, write_sheet

        if args.guidance is not None:
            engine.painter.config = replace(engine.painter.config, guidance_scale=args.guidance)
        single = _single_stage(args.checkpoint) if args.quant == "none" else None  # a float32 comparison
        result, items, images = evaluate_draw(engine.painter, single, _judge(args.judge, args.checkpoint),
                                              count, answer_with(engine.chat_model), seed=args.seed, split=args.split)
        if args.sheet:
            write_sheet(args.sheet, items, images)
    elif args.task == "chat":
        result = evaluate_follow_ups(answer_turns_with(engine.chat_model), count, wording=args.wording,
                                     split=args.split)
    else:
        result = evaluate_understanding(args.task, answer_with(engine.chat_model), count, wording=args.wording,
                                        split=args.split)
    tags = ([args.quant] if args.quant != "none" else []) + ([f"{args.wording} wording"] if args.wording != "mixed"
                                                             else [])
    print(result.line() + "".join(f" [{tag}]" for tag in tags))
    if args.json:
        record = {"task": result.task, "measure": result.measure, "value": result.value, "count": result.count,
                  "bar": result.bar, "passed": result.passed, "quant": args.quant, "wording": args.wording,
                  "split": args.split, **result.details}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


def _single_stage(checkpoint: str | None):
    from diffusion.pipeline import load_dit
    from multimodal.assets import ASSETS_DIR

    folder = (Path(checkpoint) if checkpoint else ASSETS_DIR) / "diffusion" / "single"
    if not folder.exists():
        raise FileNotFoundError(f"The draw measure needs the single-stage baseline at {folder}.")
    return load_dit(folder)


def _judge(path: str | None, checkpoint: str | None):
    """--judge, else the judge of the --checkpoint suite folder, else the shipped one."""
    from multimodal.assets import asset_path, load_world_tokenizer
    from multimodal.judge import load_judge

    suite_judge = Path(checkpoint) / "judge" if checkpoint else None
    if path is None and suite_judge is not None and suite_judge.is_dir():
        path = suite_judge
    return load_judge(path or asset_path("judge"), load_world_tokenizer())
