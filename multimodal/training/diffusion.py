"""Training the embedded text-to-image models: a base DiT at 32x32, a relay DiT at 64x64, and a single-stage DiT at
64x64 that exists only as the equal-compute baseline of the relay claim (`multimodal eval draw`).

Prompts are encoded by the VLM's GLM core, frozen (CogView4 uses GLM-4 the same way): the states of its
second-to-last layer. Those weights are final once the VLM's language stage is done, so this can train beside the
VLM's vision stage; the run records their fingerprint and the export checks the shipped VLM has the same one.

Data: scenes of the drawing world (`multimodal.drawing`: one large entity or two) from the train split, each with
one of its prompts in English or Chinese ("a dog with a hat", "一只戴着帽子的狗", half of them naming the background
colour); 10% of prompts are dropped to "" so classifier-free guidance has an unconditional model. Losses: EDM's
for the base and the single-stage model, RDM's blurring loss with block noise for the relay model. One optimizer
steps all three on the same batch; the export ships an exponential moving average of the weights (`EMA_DECAY`),
which smooths out the noise of small-batch steps.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.denoiser import DiT, DiTConfig
from diffusion.pipeline import PIPELINE_KIND, RelayConfig, load_dit
from diffusion.relay import relay_loss
from diffusion.sampling import EDMDenoiser, edm_loss
from diffusion.text_encoder import GLMTextEncoder
from glm.tokenizer import GLMTokenizer
from multimodal.checkpoint import NATIVE_CONFIG, read_native_config
from multimodal.drawing import pick_prompt
from multimodal.training.data import CachedTextEncoder
from multimodal.training.loop import LoopRecipe, LoopSettings, Run, TrainScenes, train
from multimodal.training.parallel import my_share, world
from multimodal.training.vlm import text_encoder_fingerprint
from multimodal.world import DRAWING
from vlm.convert import load_vlm

KIND = "diffusion-training"
PROMPT_DROPOUT = 0.1
# How the exported pipeline samples its relay stage: from close to the base image (sigma 0.3, not RDM's 0.9) and
# with no fresh noise on the way, so that it sharpens what the base stage drew rather than redrawing it; its
# training does not depend on these.
RELAY_SAMPLING = {"relay_start_sigma": 0.3, "s_noise": 0.0}


EMA_DECAY = 0.999
# ln(sigma) ~ N(P_MEAN, P_STD^2) for the base and single-stage losses. EDM's ImageNet setting (-1.2, 1.2) puts 16%
# of samples above sigma 1, where what is drawn gets decided, and the prompt went nearly unused for over a thousand
# steps (the logged prompt gap, README). (-0.4, 1.4) puts 39% there and keeps 9% below sigma 0.1.
P_MEAN, P_STD = -0.4, 1.4
RECIPE = LoopRecipe(base_batch=16, base_lr=5e-4, fast_batch=16)  # larger batches learned less per sample
WARMUP_SAMPLES = 3200  # the warmup, in samples so it means the same at any batch
# (patch size, heads of 32, layers) per stage; 64 image tokens each: 32x32 with patch 4, or 64x64 with patch 8. The
# base stage decides what is drawn, so it gets the depth. Every stage is as wide as its patch has numbers (8x8x3 =
# 192): a narrower token cannot express, so cannot remove, an arbitrary patch of noise. The relay and its
# single-stage baseline share one shape so that the relay claim compares methods, not networks.
STAGE_SHAPES = {"base": (4, 6, 6), "relay": (8, 6, 3), "single": (8, 6, 3)}


def world_dit_config(text_dim: int, patch_size: int, num_heads: int = 3, num_layers: int = 3) -> DiTConfig:
    return DiTConfig(patch_size=patch_size, in_channels=3, out_channels=3, num_layers=num_layers,
                     num_heads=num_heads, head_dim=32, text_dim=text_dim, time_embed_dim=128, condition_dim=16,
                     pooled_text=True, whitened_text=True)


def stage_configs(text_dim: int) -> dict[str, DiTConfig]:
    return {name: world_dit_config(text_dim, *shape) for name, shape in STAGE_SHAPES.items()}


def recorded_stage_configs(meta: dict) -> dict[str, DiTConfig]:
    """The stage shapes a run recorded in its config (so a run keeps them when the defaults change)."""
    return {name: DiTConfig.from_dict(config) for name, config in meta["stages"].items()}


class Stages(nn.Module):
    """The three denoisers trained together (one state dict for checkpoints)."""

    def __init__(self, configs: dict[str, DiTConfig]):
        super().__init__()
        self.base = DiT(configs["base"])
        self.relay = DiT(configs["relay"])
        self.single = DiT(configs["single"])


def draw_prompt(scene, rng: random.Random) -> str:
    if rng.random() < PROMPT_DROPOUT:
        return ""
    return pick_prompt(scene, rng).prompt


def frozen_text_encoder(text_encoder: str | Path, tokenizer: GLMTokenizer, device: str = "cpu"):
    """The VLM (frozen, on `device`) whose GLM core encodes prompts, and the encoder over it."""
    vlm = load_vlm(_vlm_checkpoint(Path(text_encoder))).to(device)
    for param in vlm.parameters():
        param.requires_grad_(False)
    return vlm, GLMTextEncoder.from_tokenizer(vlm, tokenizer)


def set_text_statistics(models, encoder, pool: TrainScenes, seed: int, count: int = 1024) -> None:
    """The text whitening of every denoiser in `models` from the states of `count` training prompts."""
    rng = random.Random(f"text-statistics-{seed}")
    prompts = [draw_prompt(pool.scene(s), rng) for s in pool.batch_seeds(rng, count)]
    chunks = [encoder(prompts[i:i + 64]) for i in range(0, count, 64)]
    width = max(states.shape[1] for states, _ in chunks)
    states = torch.cat([F.pad(s, (0, 0, width - s.shape[1], 0)) for s, _ in chunks])  # [count, T, text_dim]
    masks = [torch.ones(s.shape[:2], dtype=torch.bool) if m is None else m.bool() for s, m in chunks]
    mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for m in masks])  # [count, T], padding on the left
    for model in models:
        model.set_text_statistics(states.float(), mask)


def diffusion_step_loss(stages: Stages, encoder, pool: TrainScenes, relay_config: RelayConfig, seed: int,
                        batch_size: int, device: str = "cpu", gap_every: int = 10):
    """step -> (loss, components) for one batch of that step: the base, relay and single-stage losses, and every
    `gap_every` steps the prompt gap, (base loss with the batch's prompts shuffled) / (with its own prompts) - 1 at
    the same noise: how much the base stage uses its prompt (0: not at all)."""
    base, relay, single = (EDMDenoiser(m, relay_config.sigma_data) for m in (stages.base, stages.relay, stages.single))

    def step_loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        rng = random.Random(f"diffusion-{seed}-{step}")
        # each data-parallel process its own noise, and its share of the rows (`multimodal.training.parallel`)
        generator = torch.Generator().manual_seed(rng.randrange(2**63) + world()[0])
        seeds = pool.batch_seeds(rng, batch_size)
        prompts = [draw_prompt(pool.scene(s), rng) for s in seeds]
        seeds, prompts = my_share(seeds), my_share(prompts)
        states, mask = encoder(prompts)
        cond = {"text": states.to(device), "text_mask": mask.to(device)}
        images = pool.images(seeds).to(device)  # [B, 3, 64, 64] in [-1, 1]
        small = torch.nn.functional.avg_pool2d(images, relay_config.up_scale)  # [B, 3, 32, 32]
        gap_seed = generator.initial_seed() + 1
        parts = {
            "base": edm_loss(base, small, cond, P_MEAN, P_STD, generator=generator).mean(),
            "relay": relay_loss(relay, images, relay_config.blur, cond, block_scale=relay_config.s_block,
                                generator=generator).mean(),
            "single": edm_loss(single, images, cond, P_MEAN, P_STD, generator=generator).mean(),
        }
        logged = {name: value.item() for name, value in parts.items()}
        if step % gap_every == 0:
            logged["prompt_gap"] = prompt_gap(base, small, cond, gap_seed)
        return sum(parts.values()), logged

    return step_loss


@torch.no_grad()
def prompt_gap(denoiser: EDMDenoiser, images: torch.Tensor, cond: dict, seed: int) -> float:
    """(EDM loss with each image given another image's prompt) / (with its own) - 1, at the same sigmas and noise."""
    shuffled = {name: value.roll(1, dims=0) for name, value in cond.items()}
    own = edm_loss(denoiser, images, cond, P_MEAN, P_STD, generator=torch.Generator().manual_seed(seed)).mean()
    other = edm_loss(denoiser, images, shuffled, P_MEAN, P_STD, generator=torch.Generator().manual_seed(seed)).mean()
    return (other / own).item() - 1


def train_diffusion(
    out_dir: str | Path, tokenizer: GLMTokenizer, text_encoder: str | Path | None, seed: int = 0,
    steps: int = 3000, scenes: int = 20000, minutes: float | None = None, settings: LoopSettings | None = None,
    init: str | Path | None = None,
) -> Path:  # fmt: skip
    """Train the three denoisers; or, with `init` (a pipeline folder with base/, relay/ and single/, such as the
    shipped one), continue them from its weights and text whitening under a fresh optimizer and schedule."""
    if text_encoder is None:
        raise ValueError("Diffusion training needs --text-encoder: the VLM run (or checkpoint) whose GLM core it uses.")
    settings = settings or RECIPE.settings()
    device = settings.runtime.device
    torch.manual_seed(seed)
    vlm, encoder = frozen_text_encoder(text_encoder, tokenizer, device)
    if settings.cached:
        encoder = CachedTextEncoder(encoder)
    started = Path(out_dir) / "model"
    initial = None
    if init is not None:  # the pipeline's denoisers, whose text whitening belongs to the encoder they were trained on
        recorded = read_native_config(init, PIPELINE_KIND).get("text_encoder", {}).get("text_encoder_fingerprint")
        if recorded is not None and recorded != text_encoder_fingerprint(vlm):
            raise ValueError(f"{init} was trained on another text encoder than {text_encoder}.")
        initial = {name: load_dit(Path(init) / name) for name in ("base", "relay", "single")}
    if (started / NATIVE_CONFIG).exists():  # a run resumes with the shapes it started with
        configs = recorded_stage_configs(read_native_config(started, KIND))
    elif initial is not None:
        configs = {name: model.config for name, model in initial.items()}
    else:
        configs = stage_configs(vlm.config.hidden_size)
    stages = Stages(configs).to(device)
    pool = TrainScenes(scenes, 64, DRAWING, cached=settings.cached)
    if initial is not None:  # weights and whitening from `init`; a resumed run then loads its own checkpoint
        for name, model in initial.items():
            getattr(stages, name).load_state_dict(model.state_dict())
    else:  # (a resumed run then loads the statistics it started with)
        set_text_statistics([stages.base, stages.relay, stages.single], encoder, pool, seed)
    relay_config = RelayConfig()
    optimizer = torch.optim.AdamW(stages.parameters(), lr=settings.lr, weight_decay=0.01)
    run = Run(out_dir, KIND, {"seed": seed, "text_encoder_fingerprint": text_encoder_fingerprint(vlm),
                              "relay": relay_config.to_dict(),
                              "stages": {name: config.to_dict() for name, config in configs.items()}}
              | ({"init": str(init)} if init else {}))
    step_loss = diffusion_step_loss(stages, encoder, pool, relay_config, seed, settings.batch_size, device)
    train(run, stages, optimizer, settings.schedule(steps, WARMUP_SAMPLES), step_loss, minutes=minutes,
          ema_decay=EMA_DECAY, runtime=settings.runtime, batch_size=settings.batch_size)
    return run.model_dir


def _vlm_checkpoint(path: Path) -> Path:
    """A VLM checkpoint, or a VLM run folder's: its vision stage, or its language stage once that has finished
    (the core is final from then on)."""
    for candidate in (path / "model", path / "language" / "model", path):
        if (candidate / "config.json").exists():
            meta = read_native_config(candidate, "vlm")
            if meta.get("stage") == "language" and meta["step"] < meta["language_steps"]:
                raise ValueError(f"The VLM's language stage in {candidate} has not finished; wait for it.")
            return candidate
    raise FileNotFoundError(f"No VLM checkpoint in {path}; train the VLM's language stage first.")
