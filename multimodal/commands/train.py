"""`multimodal train tokenizer|judge|vlm|diffusion|export`: train the embedded default models on the EmojiScenes
world, then export the runs as a suite folder; `recipe` does all of it in one command (`--device cuda` on a GPU)
and evaluates the result.

Runs resume from their folder (`--out`), print progress (each loss component, samples/s, and for the diffusion
models how much the prompt lowers the loss), and use every core by default (`--threads 1` lets jobs share a CPU;
`--processes 2` runs the VLM or the DiTs as two data-parallel processes instead of two threads; `multimodal bench
train MODEL --processes 1,2` measures which is faster).
The loop runs in bf16 autocast where the CPU (or GPU) has native bf16, on scenes and text states cached once
(`multimodal bench train` measures it against the float32 loop it replaced, `--loop reference`).
`export` reads `--runs DIR` (its vlm/, diffusion/ and judge/ runs) and writes the suite to `--out`
(the shipped copy is multimodal/assets); the runs it lacks must already be in that suite. The recipe that
produced the shipped models is in the README.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MODELS = ("tokenizer", "judge", "vlm", "diffusion", "export", "recipe")


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train an embedded model on the EmojiScenes world",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of the batch order")
    parser.add_argument("--out", default=None, help="run folder (default runs/<model>; tokenizer: a .json path)")
    parser.add_argument("--steps", type=int, default=None, help="total optimizer steps (the schedule's length)")
    parser.add_argument("--minutes", type=float, default=None, help="stop (after saving) when this much time passed")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for this job, or for each of its processes (default: every core, shared)")
    parser.add_argument("--processes", type=int, default=1,
                        help="vlm, diffusion on the CPU: data-parallel processes, each with its share of every batch")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (the same checkpoints either way)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="samples per step (default: the model's; the learning rate scales linearly with it)")
    parser.add_argument("--loop", choices=["fast", "reference"], default="fast",
                        help="reference: the float32 eager loop without caches (for comparisons)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json (default: the shipped one; vlm --init: the init folder's own, if it has "
                             "one); tokenizer: give this one the rule that cuts Chinese object names out as pieces "
                             "(same vocabulary) rather than training one")
    parser.add_argument("--text-encoder", default=None,
                        help="diffusion: the VLM run whose frozen GLM core encodes prompts (default: the shipped VLM)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate at the recipe's base batch (default: the model's own)")
    parser.add_argument("--init", default=None,
                        help="vlm: continue a finished VLM (e.g. multimodal/assets/vlm) with a vision stage of its "
                             "own; diffusion: continue the denoisers of a pipeline folder")
    parser.add_argument("--drawing-share", type=float, default=None,
                        help="vlm: the share of vision-stage scenes from the drawing world (default 0.2)")
    parser.add_argument("--runs", default="runs", help="export: the folder holding the vlm, diffusion and judge runs")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="recipe: multiply every stage's steps (the defaults are the CPU recipe's)")
    parser.add_argument("--eval-count", type=int, default=1000, help="recipe: test items per understanding measure")
    parser.add_argument("--scenes", type=int, default=20000,
                        help="judge, vlm, diffusion, recipe: how many train-split scenes the batches draw from")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from multimodal.training.loop import default_threads

    torch.set_num_threads(args.threads or default_threads())  # (a missing --device is refused by cli.check_device)
    out = Path(args.out) if args.out else Path("runs") / args.model
    if args.model == "tokenizer":
        from multimodal.training.tokenizer import save_tokenizer, train_tokenizer, with_name_pieces

        out = out if out.suffix == ".json" else out / "tokenizer.json"
        if args.tokenizer:
            if not Path(args.tokenizer).is_file():
                raise FileNotFoundError(f"The tokenizer {args.tokenizer} does not exist.")
            path = with_name_pieces(args.tokenizer, out)
        else:
            path = save_tokenizer(train_tokenizer(), out)
        print(f"saved {path}")
        return 0

    if args.model == "export":
        from multimodal.assets import asset_path
        from multimodal.training.export import export_suite

        runs = Path(args.runs)
        tokenizer = Path(args.tokenizer) if args.tokenizer else asset_path("tokenizer.json")
        print(f"exported {export_suite(runs, tokenizer, out)}")
        return 0

    if args.model == "recipe":
        from multimodal.assets import asset_path
        from multimodal.training.recipe import RecipeSteps, run_recipe

        record = run_recipe(out, Path(args.tokenizer) if args.tokenizer else asset_path("tokenizer.json"),
                            args.device, RecipeSteps().scaled(args.scale), args.seed, args.eval_count,
                            max(2, args.eval_count // 5), args.scenes)
        print(json.dumps(record["seconds"]))
        return 0

    if args.scenes < 1:
        raise ValueError(f"--scenes must be at least 1, not {args.scenes}.")
    if args.processes == 1:
        path = train_model(args)
    else:
        from multimodal.training.parallel import check_processes, launch

        check_processes(args.model, args.device, args.processes)
        threads = args.threads or max(1, default_threads() // args.processes)
        path = launch(train_model, args.processes, threads, args)
    print(f"saved {path}")
    return 0


def train_model(args: argparse.Namespace) -> Path:
    """One training process of `multimodal train judge|vlm|diffusion`: the run folder's model checkpoint."""
    from multimodal.assets import load_world_tokenizer

    # a VLM continued from a folder reads text as it was trained to, with that folder's own tokenizer if it has one
    own = Path(args.init) / "tokenizer.json" if args.model == "vlm" and args.init else None
    tokenizer = load_world_tokenizer(args.tokenizer or (own if own and own.exists() else None))
    out = Path(args.out) if args.out else Path("runs") / args.model
    budget = {"minutes": args.minutes, "scenes": args.scenes} | ({"steps": args.steps} if args.steps else {})
    if args.model == "judge":
        from multimodal.training import judge as recipe
    elif args.model == "vlm":
        from multimodal.training import vlm as recipe
    else:
        from multimodal.training import diffusion as recipe
    settings = recipe.RECIPE.settings(args.loop, args.device, args.batch_size, args.lr)
    if args.model == "judge":
        path = recipe.train_judge(out, tokenizer, seed=args.seed, settings=settings, **budget)
    elif args.model == "vlm":
        share = {} if args.drawing_share is None else {"drawing_share": args.drawing_share}
        path = recipe.train_vlm(out, tokenizer, seed=args.seed, init=args.init, settings=settings, **budget, **share)
    else:
        path = recipe.train_diffusion(out, tokenizer, text_encoder=args.text_encoder, seed=args.seed,
                                      settings=settings, init=args.init, **budget)
    return path
