"""CogView4 as its authors run it: flow matching on VAE latents, from a diffusers `CogView4Pipeline` folder.

`LatentFlowPipeline`: prompt -> GLM-4 text states (the second-to-last layer, pad tokens seen as ordinary tokens) ->
the DiT predicts a flow-matching velocity, sampled by `sample_flow_euler` on CogView4's shifted schedule with
classifier-free guidance -> diffusers' `AutoencoderKL` decodes the latents.

`load_cogview4(folder)` reads the folder `CogView4Pipeline.save_pretrained` writes (and THUDM publishes):
`model_index.json`, `transformer/` (`CogView4Transformer2DModel`, through our DiT's key table), `text_encoder/`
(transformers' `GlmModel`, as our encoder-only GLM), `tokenizer/` (`tokenizer.json`: prompts are encoded with its own
post-processor, as transformers adds special tokens, and padded with `tokenizer_config.json`'s pad token), `vae/` and
`scheduler/` (the shift parameters; any other schedule is refused in one sentence).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion.denoiser import DIFFUSERS_KEYS, DiT, config_from_diffusers
from diffusion.pipeline import DrawOutput, Progress, _prompts, _seeds, _StepCounter, _to_output
from diffusion.sampling import ClassifierFreeGuidance, StackedRandomGenerator, get_sigmas_cogview4, sample_flow_euler
from multimodal.checkpoint import NATIVE_CONFIG, CheckpointError, build_on_meta, convert, load_into, read_state_dict

DEFAULT_SIZE = (1024, 1024)  # CogView4-6B's; it draws any multiple of 32 per side up to 2048
DEFAULT_STEPS, DEFAULT_GUIDANCE = 50, 5.0  # diffusers' defaults for CogView4


@dataclass(frozen=True)
class FlowSchedule:
    """The scheduler's shift: mu = sqrt(image tokens / base_seq_len) * max_shift + base_shift."""

    base_seq_len: int = 256
    base_shift: float = 0.25
    max_shift: float = 0.75

    @classmethod
    def from_scheduler_config(cls, values: dict) -> FlowSchedule:
        """From diffusers' `FlowMatchEulerDiscreteScheduler` config as CogView4 sets it; anything else is refused."""
        if values.get("_class_name", "FlowMatchEulerDiscreteScheduler") != "FlowMatchEulerDiscreteScheduler":
            raise CheckpointError(f"The scheduler is {values['_class_name']}; CogView4 runs "
                                  "FlowMatchEulerDiscreteScheduler, the only one this pipeline reproduces.")
        if not values.get("use_dynamic_shifting", False) or values.get("time_shift_type", "exponential") != "linear":
            raise CheckpointError("The scheduler is not CogView4's (dynamic shifting with time_shift_type 'linear').")
        return cls(values.get("base_image_seq_len", 256), values.get("base_shift", 0.25),
                   values.get("max_shift", 0.75))


class LatentFlowPipeline:
    """CogView4: pipe(prompt, ...) -> DrawOutput (`base` holds the images; there is no relay stage).

    The text encoder should be a `GLMTextEncoder` with `mask_padding=False` (CogView4's convention).
    `prompt_embeds` / `negative_prompt_embeds` [B, T, D] may be given instead of prompts.
    """

    def __init__(self, text_encoder, transformer: DiT, vae, schedule: FlowSchedule = FlowSchedule()):
        self.text_encoder = text_encoder
        self.transformer = transformer.eval()
        self.vae = vae
        self.schedule = schedule
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.sizes = [DEFAULT_SIZE]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        height: int = DEFAULT_SIZE[0],
        width: int = DEFAULT_SIZE[1],
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        callback: Progress | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
    ) -> DrawOutput:
        model = self.transformer
        steps = num_inference_steps or DEFAULT_STEPS
        guidance_scale = DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        multiple = self.vae_scale * model.config.patch_size
        if height % multiple or width % multiple:
            raise ValueError(
                f"Size {width}x{height} cannot be drawn: height and width must be multiples of {multiple}."
            )
        if prompt_embeds is not None and guidance_scale > 1 and negative_prompt_embeds is None:
            raise ValueError("With prompt_embeds and guidance_scale > 1, negative_prompt_embeds must be given too.")
        if prompt_embeds is None:
            prompts, negatives = _prompts(prompt, negative_prompt, 1)
            prompt_embeds, _ = self.text_encoder(prompts)
            if guidance_scale > 1:
                negative_prompt_embeds, _ = self.text_encoder(negatives)
        count = prompt_embeds.shape[0] * num_images_per_prompt
        seeds = _seeds(count, seed, generator)
        noise = StackedRandomGenerator.from_seeds(seeds)
        sizes = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=device).expand(count, 6)

        def condition(embeds):
            return {"text": embeds.to(device, dtype).repeat_interleave(num_images_per_prompt, dim=0), "sizes": sizes}

        uncond = condition(negative_prompt_embeds) if guidance_scale > 1 else None
        guided = ClassifierFreeGuidance(model, guidance_scale)
        h, w = height // self.vae_scale, width // self.vae_scale
        latents = noise.randn((model.config.in_channels, h, w), torch.float32, device)  # [N, C, h, w]
        schedule = self.schedule
        sigmas, timesteps = get_sigmas_cogview4(steps, h * w // model.config.patch_size**2, schedule.base_seq_len,
                                                schedule.base_shift, schedule.max_shift)
        progress = _StepCounter(callback, steps)

        def velocity(x, t, **extra):
            return guided(x.to(dtype), t, **extra).float()

        latents = sample_flow_euler(
            velocity, latents, sigmas, timesteps, {"cond": condition(prompt_embeds), "uncond": uncond}, progress
        )
        decoded = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        images = _to_output(decoded.clamp(-1, 1), output_type)
        return DrawOutput(images=images, base=images, relay=[], seeds=seeds)


def load_diffusers_transformer(path: str | Path, device="cpu", dtype: torch.dtype | None = None) -> DiT:
    """A diffusers `CogView4Transformer2DModel` folder (config.json + safetensors) as our DiT, via the key table."""
    path = Path(path)
    config_path = path / NATIVE_CONFIG
    if not config_path.exists():
        raise CheckpointError(f"{path} has no {NATIVE_CONFIG}; a diffusers transformer folder needs one.")
    config = config_from_diffusers(json.loads(config_path.read_text()))
    model = build_on_meta(lambda: DiT(config))
    load_into(model, convert(read_state_dict(path), DIFFUSERS_KEYS), dtype=dtype)
    return model.to(device).eval()


def is_cogview4_folder(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").exists()


def load_cogview4(folder: str | Path, device="cpu", dtype: torch.dtype | None = None) -> LatentFlowPipeline:
    """The pipeline of a diffusers CogView4 folder (see the module docstring)."""
    from diffusers import AutoencoderKL
    from tokenizers import Tokenizer

    from diffusion.text_encoder import GLMTextEncoder
    from glm.convert import load_glm

    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    if index.get("_class_name") != "CogView4Pipeline":
        raise CheckpointError(f"{folder} holds a diffusers {index.get('_class_name')}, not a CogView4Pipeline.")
    missing = [part for part in ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
               if not (folder / part).is_dir()]
    if missing:
        raise CheckpointError(f"The CogView4 folder {folder} lacks {', '.join(missing)}.")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer" / "tokenizer.json"))
    settings_path = folder / "tokenizer" / "tokenizer_config.json"
    settings = json.loads(settings_path.read_text()) if settings_path.exists() else {}
    pad = settings.get("pad_token", "<|endoftext|>")
    pad_id = tokenizer.token_to_id(pad["content"] if isinstance(pad, dict) else pad)
    if pad_id is None:
        raise CheckpointError(f"The tokenizer in {folder} has no pad token {pad!r}.")

    def tokenize(prompt: str) -> list[int]:
        return tokenizer.encode(prompt, add_special_tokens=True).ids

    glm = load_glm(folder / "text_encoder", dtype=dtype, device=device)
    encoder = GLMTextEncoder(glm, tokenize, pad_id, mask_padding=False)
    transformer = load_diffusers_transformer(folder / "transformer", device, dtype)
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype or torch.float32).to(device).eval()
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return LatentFlowPipeline(encoder, transformer, vae, FlowSchedule.from_scheduler_config(scheduler))
