"""`multimodal bench denoiser`: the base stage's two candidate denoisers trained for the same CPU time on the same
batches, their learning curves side by side: the CogView4-style DiT the suite ships, and a UNet as RDM's and
CogView3's base stages are (diffusers' `UNet2DConditionModel` with cross-attention to the GLM states,
`diffusion.unet`).

Each trains the base stage as `multimodal train diffusion` does (32x32 drawing-world scenes and their prompts, the
frozen GLM states whitened, EDM's loss, the recipe's batch, learning rate and warmup, bf16 autocast where the CPU
has it, every core) for --minutes of training time. Every --every seconds of training time it measures, in float32
on fixed validation batches (the same scenes, prompts, noise levels and noise for both), the EDM loss and the prompt
gap: the loss with each image given another image's prompt over the loss with its own, less 1 (0: the prompt is not
used). Measuring is not counted as training time.
"""

from __future__ import annotations

import argparse
import random
import time

CANDIDATES = ("dit", "unet")


def register(subparsers) -> None:
    parser = subparsers.add_parser("denoiser", help="base-stage learning curves at equal CPU time: DiT vs UNet",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="training time per denoiser")
    parser.add_argument("--every", type=float, default=60.0, help="seconds of training time between measurements")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--val-batches", type=int, default=8, help="fixed validation batches of 16")
    parser.add_argument("--scenes", type=int, default=20000, help="the training scene pool (the recipe's size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def build(candidate: str, text_dim: int):
    from diffusion.denoiser import DiT
    from diffusion.unet import UNetBackbone, UNetConfig
    from multimodal.training.diffusion import stage_configs

    return DiT(stage_configs(text_dim)["base"]) if candidate == "dit" else UNetBackbone(UNetConfig(text_dim))


def batch(pool, encoder, rng: random.Random, size: int):
    """(images [B, 3, 32, 32], cond) of `size` scenes of the pool with one prompt each (10% dropped)."""
    import torch.nn.functional as F

    from multimodal.training.diffusion import draw_prompt

    seeds = pool.batch_seeds(rng, size)
    states, mask = encoder([draw_prompt(pool.scene(s), rng) for s in seeds])
    return F.avg_pool2d(pool.images(seeds), 2), {"text": states, "text_mask": mask}


def measure(denoiser, batches) -> tuple[float, float]:
    """(EDM loss, prompt gap) over fixed validation batches, in float32."""
    import torch

    from diffusion.sampling import edm_loss
    from multimodal.training.diffusion import P_MEAN, P_STD

    def loss(images, cond, index: int) -> float:
        generator = torch.Generator().manual_seed(index)
        return edm_loss(denoiser, images, cond, P_MEAN, P_STD, generator=generator).mean().item()

    with torch.no_grad():
        own = sum(loss(images, cond, i) for i, (images, cond) in enumerate(batches))
        other = sum(loss(images, {name: value.roll(1, dims=0) for name, value in cond.items()}, i)
                    for i, (images, cond) in enumerate(batches))
    return own / len(batches), other / own - 1


def curve(candidate: str, text_dim: int, encoder, pool, validation, args, settings) -> dict:
    import torch

    from diffusion.sampling import EDMDenoiser, edm_loss
    from multimodal.training.diffusion import P_MEAN, P_STD, WARMUP_SAMPLES, set_text_statistics
    from multimodal.training.loop import Runtime

    torch.manual_seed(args.seed)
    model = build(candidate, text_dim)
    set_text_statistics([model], encoder, pool, args.seed)
    denoiser = EDMDenoiser(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    points, trained, step, next_at = [], 0.0, 0, 0.0
    while True:
        if trained >= next_at:
            model.eval()
            with Runtime("cpu").context():
                loss, gap = measure(denoiser, validation)
            points.append((trained, step * settings.batch_size, loss, gap))
            print(f"{candidate}: {trained:6.0f} s, {step * settings.batch_size:6d} samples, val loss {loss:.4f}, "
                  f"prompt gap {gap:+.4f}", flush=True)
            model.train()
            next_at += args.every
            if trained >= args.minutes * 60:
                break
        start = time.perf_counter()
        rng = random.Random(f"denoiser-bench-{args.seed}-{step}")
        images, cond = batch(pool, encoder, rng, settings.batch_size)
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * min(1.0, (step + 1) * settings.batch_size / WARMUP_SAMPLES)
        with settings.runtime.context():
            loss = edm_loss(denoiser, images, cond, P_MEAN, P_STD, generator=torch.Generator().manual_seed(step)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        trained += time.perf_counter() - start
    return {"params": sum(p.numel() for p in model.parameters()), "points": points}


def run(args: argparse.Namespace) -> int:
    import torch

    from multimodal.assets import asset_path, load_world_tokenizer
    from multimodal.training import diffusion as recipe
    from multimodal.training.data import CachedTextEncoder
    from multimodal.training.loop import TrainScenes, ValidationScenes, default_threads
    from multimodal.world import DRAWING

    torch.set_num_threads(args.threads or default_threads())
    settings = recipe.RECIPE.settings()
    vlm, encoder = recipe.frozen_text_encoder(asset_path("vlm"), load_world_tokenizer())
    encoder = CachedTextEncoder(encoder)
    pool = TrainScenes(args.scenes, 64, DRAWING, cached=True)
    held = ValidationScenes(256, 64, DRAWING)
    validation = [batch(held, encoder, random.Random(f"denoiser-val-{i}"), 16) for i in range(args.val_batches)]
    results = {name: curve(name, vlm.config.hidden_size, encoder, pool, validation, args, settings)
               for name in CANDIDATES}

    print(f"\nbase stage, {args.minutes:g} min of training each, {settings.runtime.describe()}, "
          f"{torch.get_num_threads()} threads, batch {settings.batch_size}")
    print(" ".join(f"{name}: {results[name]['params'] / 1e6:.2f} M parameters" for name in CANDIDATES))
    print(f"{'seconds':>7} " + " ".join(f"{name + ' samples':>13} {name + ' loss':>10} {name + ' gap':>9}"
                                        for name in CANDIDATES))
    for rows in zip(*(results[name]["points"] for name in CANDIDATES)):
        print(f"{rows[0][0]:>7.0f} " + " ".join(f"{samples:>13} {loss:>10.4f} {gap:>+9.4f}"
                                                 for _, samples, loss, gap in rows))
    final = {name: results[name]["points"][-1] for name in CANDIDATES}
    print(f"at equal time the UNet's loss is {final['unet'][2] / final['dit'][2]:.2f}x the DiT's, its prompt gap "
          f"{final['unet'][3]:+.4f} against {final['dit'][3]:+.4f}")
    return 0
