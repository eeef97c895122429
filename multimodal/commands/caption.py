"""`multimodal caption DIR|GLOB|FILE-LIST ... --out captions.jsonl`: caption many images into one JSONL file.

Each output line is one image: {"image": PATH, "caption": TEXT} (with --grounded also "grounded_caption" and
"boxes": [{"phrase", "box": [x0, y0, x1, y1] in pixels}]), or {"image": PATH, "error": SENTENCE} for a file that
could not be read. Images run in sorted order, in batches; each finished batch is flushed to disk, so a killed run
loses at most the batch in flight, and `--resume` picks up where it stopped (error rows count as done).

Several processes: `torchrun --standalone --nproc-per-node N -m multimodal.cli caption ... --out captions.jsonl`
gives each rank its own shard of the images; the ranks' results are merged into --out, one row per image. With
`--tp N` instead the N ranks run one tensor-parallel model over all the images.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from multimodal.commands._options import add_model_options


def register(subparsers) -> None:
    parser = subparsers.add_parser("caption", help="caption a folder, glob or list of images into a JSONL file",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="DIR|GLOB|FILE-LIST",
                        help="folders (searched recursively), glob patterns, .txt lists of paths, or image files")
    parser.add_argument("--out", required=True, help="output JSONL file")
    parser.add_argument("--grounded", action="store_true", help="captions with boxes for the objects they name")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run, skipping finished images")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="longest caption in tokens (default 96)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_options(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from multimodal.captioning import Shard, collect_inputs, merge_parts, part_paths, read_done, run
    from multimodal.engine import Engine, Sampling
    from multimodal.tp import maybe_init_distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.tp not in (1, world):
        raise ValueError(f"--tp must be 1 (one model per rank) or the number of ranks ({world}), not {args.tp}.")
    context = maybe_init_distributed(tp=world, device=args.device)
    rank = context.rank if context else 0
    shard = Shard.from_ranks(rank, world, args.tp)
    paths = collect_inputs(args.inputs)
    engine = Engine.from_args(args)
    summary = run(engine, paths, args.out, grounded=args.grounded, batch_size=args.batch_size, resume=args.resume,
                  shard=shard, progress=not args.no_progress,
                  sampling=Sampling(max_new_tokens=args.max_new_tokens, seed=args.seed))
    counts = torch.tensor([summary.captioned, summary.errors, summary.skipped] if shard.writer else [0, 0, 0])
    if context is not None:
        dist.all_reduce(counts)  # also the barrier: every shard is on disk before the merge
    captioned, errors, skipped = counts.tolist()
    if rank == 0:
        out = Path(args.out)
        rows = merge_parts(out, paths) if part_paths(out) else len(read_done(out))
        print(f"captioned {captioned} images ({errors} unreadable), skipped {skipped} already done; "
              f"{rows} rows in {out}")
    if context is not None:
        dist.barrier()  # no rank tears down gloo while another still merges (it aborted at exit now and then)
        dist.destroy_process_group()
    return 0
