"""`multimodal train tokenizer|judge|vlm|diffusion|export`: train the embedded default models on the EmojiScenes
world, then export the runs as a suite folder.

Runs resume from their folder (`--out`), print progress, and keep one thread by default so several jobs can share a
small CPU. `export` reads `--runs DIR` (its vlm/, diffusion/ and judge/ runs) and writes the suite to `--out`
(the shipped copy is multimodal/assets); the runs it lacks must already be in that suite. The recipe that
produced the shipped models is in the README.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

MODELS = ("tokenizer", "judge", "vlm", "diffusion", "export")


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train an embedded model on the EmojiScenes world",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of the batch order")
    parser.add_argument("--out", default=None, help="run folder (default runs/<model>; tokenizer: a .json path)")
    parser.add_argument("--steps", type=int, default=None, help="total optimizer steps (the schedule's length)")
    parser.add_argument("--minutes", type=float, default=None, help="stop (after saving) when this much time passed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for this job")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the shipped one)")
    parser.add_argument("--text-encoder", default=None,
                        help="diffusion: the VLM run whose frozen GLM core encodes prompts (default: the shipped VLM)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the model's own)")
    parser.add_argument("--init", default=None,
                        help="vlm: continue a finished VLM (e.g. multimodal/assets/vlm) with a vision stage of its own")
    parser.add_argument("--runs", default="runs", help="export: the folder holding the vlm, diffusion and judge runs")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path("runs") / args.model
    if args.model == "tokenizer":
        from multimodal.training.tokenizer import save_tokenizer, train_tokenizer

        path = save_tokenizer(train_tokenizer(), out if out.suffix == ".json" else out / "tokenizer.json")
        print(f"saved {path}")
        return 0

    if args.model == "export":
        from multimodal.assets import asset_path
        from multimodal.training.export import export_suite

        runs = Path(args.runs)
        tokenizer = Path(args.tokenizer) if args.tokenizer else asset_path("tokenizer.json")
        print(f"exported {export_suite(runs, tokenizer, out)}")
        return 0

    from multimodal.assets import load_world_tokenizer

    tokenizer = load_world_tokenizer(args.tokenizer)
    budget = {"minutes": args.minutes} | ({"steps": args.steps} if args.steps else {}) | (
        {"lr": args.lr} if args.lr else {})
    if args.model == "judge":
        from multimodal.training.judge import train_judge

        path = train_judge(out, tokenizer, seed=args.seed, **budget)
    elif args.model == "vlm":
        from multimodal.training.vlm import train_vlm

        path = train_vlm(out, tokenizer, seed=args.seed, init=args.init, **budget)
    else:
        from multimodal.training.diffusion import train_diffusion

        path = train_diffusion(out, tokenizer, text_encoder=args.text_encoder, seed=args.seed, **budget)
    print(f"saved {path}")
    return 0
