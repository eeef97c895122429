"""`multimodal bench train vlm|diffusion|judge`: the training loop as it first ran against the loop the commands run
now, on the shipped model shapes, in one run.

Both loops start from the same weights and draw batches from the same scene pool with the same seed. "reference"
is the float32 eager loop at its old defaults (batch 16 for the VLM and the DiTs, one thread, scenes rendered and
prompts encoded inside the loop); "fast" is `multimodal train`'s default (bf16 autocast where the CPU has native
bf16, with `kernels.attention`'s explicit path; cached scenes and text states; a larger batch at the linearly
scaled learning rate; every core, as threads of one process or with `--processes 2` as data-parallel processes of
`multimodal.training.parallel`). Each trains for the same number of samples under its recipe's schedule, shortened
to the bench: a warmup over the first tenth of the samples, then cosine decay. The table gives samples/s, their
ratio, and the loss each reached, measured after training in float32 on the same fixed validation batches (same
scenes, prompts and noise), so that the speed is shown not to cost learning per sample. The one-time scene-cache
build is timed apart: every later run reuses it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when a benchmark runs, so `multimodal --help` stays fast
    import torch

MODELS = ("vlm", "diffusion", "judge")


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="training samples/s and loss: the reference loop vs the fast one",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("--samples", type=int, default=2048, help="training samples per loop")
    parser.add_argument("--reference-threads", type=int, default=1, help="threads of the reference loop (its default)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of the fast loop, or of each of its processes (default: every core, shared)")
    parser.add_argument("--processes", default="1",
                        help="comma-separated data-parallel process counts of the fast loop, one row each (vlm, "
                             "diffusion)")
    parser.add_argument("--batch-sizes", default=None,
                        help="comma-separated batches for the fast loop, one row each (default: the model's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eval-batches", type=int, default=8, help="fixed validation batches of 16 for the loss")
    parser.add_argument("--scenes", type=int, default=20000, help="the training scene pool (the recipes' size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


@dataclass
class Bench:
    module: torch.nn.Module  # what trains
    params: list  # the optimizer's parameters
    step_loss: Callable  # (pool, batch size) -> step -> (loss, components)
    pool: object  # the training scenes
    validation: object  # the validation scenes of the loss measurement
    weight_decay: float = 0.01  # the recipe's AdamW weight decay


def _setup(model: str, settings, seed: int, tokenizer, scenes: int = 20000) -> Bench:
    import torch

    from multimodal.assets import asset_path, load_world_tokenizer
    from multimodal.training.loop import TrainScenes, ValidationScenes

    device = settings.runtime.device
    torch.manual_seed(seed)
    if model == "diffusion":
        from diffusion.pipeline import RelayConfig
        from multimodal.training import diffusion as recipe
        from multimodal.training.data import CachedTextEncoder
        from multimodal.world import DRAWING

        vlm, encoder = recipe.frozen_text_encoder(asset_path("vlm"), tokenizer, device)
        stages = recipe.Stages(recipe.stage_configs(vlm.config.hidden_size)).to(device)
        encoder = CachedTextEncoder(encoder) if settings.cached else encoder

        def diffusion_loss(pool, batch):
            return recipe.diffusion_step_loss(stages, encoder, pool, RelayConfig(), seed, batch, device)

        return Bench(stages, list(stages.parameters()), diffusion_loss,
                     TrainScenes(scenes, 64, DRAWING, cached=settings.cached), ValidationScenes(256, 64, DRAWING))
    if model == "vlm":
        from multimodal.training import vlm as recipe
        from vlm.convert import load_vlm

        vlm = load_vlm(asset_path("vlm")).to(device)
        if (asset_path("vlm") / "tokenizer.json").exists():  # the shipped VLM reads text with its own copy
            tokenizer = load_world_tokenizer(asset_path("vlm") / "tokenizer.json")
        recipe.freeze_text_encoder(vlm)
        heads = recipe.vision_heads(vlm.vlm_config, recipe.PatchDetectionHead(vlm.vlm_config.vision.width)).to(device)
        size = vlm.vlm_config.vision.image_size

        def vision_loss(pool, batch):
            return recipe.vision_step_loss(vlm, heads, tokenizer, pool, seed, batch, device, settings.groups)

        return Bench(torch.nn.ModuleDict({"vlm": vlm, "heads": heads}),
                     [p for p in vlm.parameters() if p.requires_grad] + list(heads.parameters()), vision_loss,
                     TrainScenes(scenes, size, cached=settings.cached), ValidationScenes(256, size))
    from multimodal.judge import build_judge
    from multimodal.training import judge as recipe

    config = recipe.judge_config(tokenizer)
    judge = build_judge(config).to(device)

    def judge_loss(pool, batch):
        return recipe.judge_step_loss(judge, config, tokenizer, pool, seed, batch, device)

    return Bench(judge, list(judge.parameters()), judge_loss,
                 recipe.judge_pool(scenes, config.image_size, cached=settings.cached),
                 recipe.judge_pool(256, config.image_size, validation=True), weight_decay=0.05)


def _train(model: str, settings, samples: int, seed: int, eval_batches: int, tokenizer, scenes: int) -> dict:
    """One loop's samples/s and validation loss; in a process group, this process's share of it (the first
    process's result is the loop's)."""
    import torch
    import torch.distributed as dist

    from multimodal.assets import load_world_tokenizer
    from multimodal.training.loop import Runtime
    from multimodal.training.parallel import average_gradients, is_main, world

    tokenizer = tokenizer or load_world_tokenizer()
    processes = world()[1]
    built = time.perf_counter()
    bench = _setup(model, settings, seed, tokenizer, scenes)
    setup_seconds = time.perf_counter() - built
    steps = max(1, samples // settings.batch_size)
    schedule = settings.schedule(steps, samples // 10)  # the bench's own warmup, in samples, the same for both
    params = bench.params
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=bench.weight_decay)
    step_loss = bench.step_loss(bench.pool, settings.batch_size)
    bench.module.train()
    if processes > 1:
        dist.barrier()  # the clock starts when every process has built its model
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)
        with settings.runtime.context():
            loss, _ = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if processes > 1:
            average_gradients(params, stop=False)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    seconds = time.perf_counter() - start
    if not is_main():  # the same weights as the first process's
        return {}
    if processes > 1:  # the loss below is measured as one process, on the same batches for every loop
        dist.destroy_process_group()
    bench.module.eval()
    evaluate = bench.step_loss(bench.validation, 16)
    with torch.no_grad(), Runtime(settings.runtime.device).context():  # float32, the same for both loops
        val_loss = sum(evaluate(10_000 + index)[0].item() for index in range(eval_batches)) / eval_batches
    return {"samples": steps * settings.batch_size, "seconds": seconds, "val_loss": val_loss,
            "setup": setup_seconds}


def run(args: argparse.Namespace) -> int:
    import importlib

    import torch

    from multimodal.assets import load_world_tokenizer
    from multimodal.training.loop import default_threads, native_bf16
    from multimodal.training.parallel import check_processes, launch

    recipe = importlib.import_module(f"multimodal.training.{args.model}").RECIPE
    tokenizer = load_world_tokenizer()
    batches = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [recipe.fast_batch]
    process_counts = [int(p) for p in args.processes.split(",")]
    check_processes(args.model, args.device, max(process_counts))
    loops = [("reference", None, args.reference_threads, 1)] + [
        ("fast", batch, args.threads or max(1, default_threads() // count), count)
        for batch in batches for count in process_counts]
    rows = []
    for loop, batch, loop_threads, processes in loops:
        settings = recipe.settings(loop, args.device, batch)
        task = (args.model, settings, args.samples, args.seed, args.eval_batches)
        if processes == 1:
            torch.set_num_threads(loop_threads)
            result = _train(*task, tokenizer, args.scenes)
        else:
            result = launch(_train, processes, loop_threads, *task, None, args.scenes)
        rows.append((loop, settings, loop_threads, processes, result))
        print(f"{loop} (batch {settings.batch_size}, {processes} x {loop_threads} threads): {result['samples']} "
              f"samples in {result['seconds']:.1f} s (setup {result['setup']:.1f} s)", flush=True)

    print(f"\ntraining {args.model}, {args.samples} samples per loop, device {args.device}, "
          f"native bf16: {native_bf16(args.device)}")
    print(f"{'loop':<10} {'runtime':<20} {'procs':>5} {'threads':>7} {'batch':>5} {'lr':>8} {'samples/s':>9} "
          f"{'vs ref':>7} {'val loss':>9} {'vs ref':>7}")
    reference = rows[0][4]
    reference_rate = reference["samples"] / reference["seconds"]
    for loop, settings, loop_threads, processes, result in rows:
        rate = result["samples"] / result["seconds"]
        print(f"{loop:<10} {settings.runtime.describe():<20} {processes:>5} {loop_threads:>7} "
              f"{settings.batch_size:>5} {settings.lr:>8.2e} {rate:>9.1f} {rate / reference_rate:>6.2f}x "
              f"{result['val_loss']:>9.4f} {result['val_loss'] - reference['val_loss']:>+7.3f}")
    return 0
