"""Training the embedded text-to-image models: a base DiT at 32x32, a relay DiT at 64x64, and a single-stage DiT at
64x64 that exists only as the equal-compute baseline of the relay claim (`multimodal eval draw`).

Prompts are encoded by the VLM's GLM core, frozen (CogView4 uses GLM-4 the same way): the states of its
second-to-last layer. Those weights are final once the VLM's language stage is done, so this can train beside the
VLM's vision stage; the run records their fingerprint and the export checks the shipped VLM has the same one.

Data: scenes of the drawing world (`world.DRAWING`: one or two entities) from the train split, each with one of its
drawing prompts in English or Chinese ("a dog with a hat", "一只戴着帽子的狗"); 10% of prompts are dropped to ""
so classifier-free guidance has an unconditional model. Losses: EDM's for the base and the single-stage model,
RDM's blurring loss with block noise for the relay model. One optimizer steps all three on the same batch; the
export ships an exponential moving average of the weights (`EMA_DECAY`), which smooths out the noise of batch-16
steps.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import nn

from diffusion.denoiser import DiT, DiTConfig
from diffusion.pipeline import RelayConfig
from diffusion.relay import relay_loss
from diffusion.sampling import EDMDenoiser, edm_loss
from diffusion.text_encoder import GLMTextEncoder
from glm.tokenizer import GLMTokenizer
from multimodal.checkpoint import NATIVE_CONFIG, read_native_config
from multimodal.training.loop import Run, Schedule, TrainScenes, train
from multimodal.training.vlm import text_encoder_fingerprint
from multimodal.world import DRAWING, scene_tasks
from vlm.convert import load_vlm

KIND = "diffusion-training"
PROMPT_DROPOUT = 0.1
# How the exported pipeline samples its relay stage: from close to the base image (sigma 0.3, not RDM's 0.9) and
# with no fresh noise on the way, so that it sharpens what the base stage drew rather than redrawing it; its
# training does not depend on these.
RELAY_SAMPLING = {"relay_start_sigma": 0.3, "s_noise": 0.0}


EMA_DECAY = 0.999
# (patch size, heads of 32, layers) per stage; 64 image tokens each: 32x32 with patch 4, or 64x64 with patch 8. The
# base stage decides what is drawn, so it gets the depth. Every stage is as wide as its patch has numbers (8x8x3 =
# 192): a narrower token cannot express, so cannot remove, an arbitrary patch of noise. The relay and its
# single-stage baseline share one shape so that the relay claim compares methods, not networks.
STAGE_SHAPES = {"base": (4, 6, 6), "relay": (8, 6, 3), "single": (8, 6, 3)}


def world_dit_config(text_dim: int, patch_size: int, num_heads: int = 3, num_layers: int = 3) -> DiTConfig:
    return DiTConfig(patch_size=patch_size, in_channels=3, out_channels=3, num_layers=num_layers,
                     num_heads=num_heads, head_dim=32, text_dim=text_dim, time_embed_dim=128, condition_dim=16,
                     pooled_text=True)


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
    return rng.choice([t.prompt for t in scene_tasks(scene) if t.kind == "draw"])


def train_diffusion(
    out_dir: str | Path, tokenizer: GLMTokenizer, text_encoder: str | Path | None, seed: int = 0,
    steps: int = 3000, batch_size: int = 16, lr: float = 5e-4, scenes: int = 20000, minutes: float | None = None,
) -> Path:  # fmt: skip
    if text_encoder is None:
        raise ValueError("Diffusion training needs --text-encoder: the VLM run (or checkpoint) whose GLM core it uses.")
    torch.manual_seed(seed)
    vlm = load_vlm(_vlm_checkpoint(Path(text_encoder)))
    for param in vlm.parameters():
        param.requires_grad_(False)
    encoder = GLMTextEncoder.from_tokenizer(vlm, tokenizer)
    started = Path(out_dir) / "model"
    if (started / NATIVE_CONFIG).exists():  # a run resumes with the shapes it started with
        configs = recorded_stage_configs(read_native_config(started, KIND))
    else:
        configs = stage_configs(vlm.config.hidden_size)
    stages = Stages(configs)
    relay_config = RelayConfig()
    optimizer = torch.optim.AdamW(stages.parameters(), lr=lr, weight_decay=0.01)
    pool = TrainScenes(scenes, 64, DRAWING)
    run = Run(out_dir, KIND, {"seed": seed, "text_encoder_fingerprint": text_encoder_fingerprint(vlm),
                              "relay": relay_config.to_dict(),
                              "stages": {name: config.to_dict() for name, config in configs.items()}})
    base, relay, single = (EDMDenoiser(m, relay_config.sigma_data) for m in (stages.base, stages.relay, stages.single))

    def step_loss(step: int) -> torch.Tensor:
        rng = random.Random(f"diffusion-{seed}-{step}")
        generator = torch.Generator().manual_seed(rng.randrange(2**63))
        seeds = pool.batch_seeds(rng, batch_size)
        prompts = [draw_prompt(pool.scene(s), rng) for s in seeds]
        states, mask = encoder(prompts)
        cond = {"text": states, "text_mask": mask}
        images = pool.images(seeds)  # [B, 3, 64, 64] in [-1, 1]
        small = torch.nn.functional.avg_pool2d(images, relay_config.up_scale)  # [B, 3, 32, 32]
        losses = (
            edm_loss(base, small, cond, generator=generator).mean()
            + relay_loss(relay, images, relay_config.blur, cond, block_scale=relay_config.s_block,
                         generator=generator).mean()
            + edm_loss(single, images, cond, generator=generator).mean()
        )  # fmt: skip
        return losses

    train(run, stages, optimizer, Schedule(steps, lr), step_loss, minutes=minutes, ema_decay=EMA_DECAY)
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
