"""Text -> image: the relay pipeline (the suite's own pixel-space models) and the CogView4 latent pipeline.

`RelayPipeline`: prompt -> GLM text states -> base DiT sampled by EDM Heun at low resolution -> nearest upsample by
`up_scale` -> relay DiT sampled by RDM's relay sampler from a truncated sigma -> images. Both stages use
classifier-free guidance with the negative prompt ("" by default, encoded like any prompt, as CogView4 does; train
with prompt dropout to ""). Pixels are in [-1, 1]; both denoisers are `EDMDenoiser`s with sigma_data 0.5 around a
`DiT` whose size conditions are the image's own size.

CogView4's latent flow-matching pipeline lives in `diffusion.cogview4`.

Randomness: one generator per image (`StackedRandomGenerator`), seeded `seed + i` for image i, so an image depends
on its seed only, never on the batch it was drawn in.

Files: a relay pipeline folder holds `config.json` (kind "relay-pipeline": the `RelayConfig`, and optionally where
its text encoder lives), `base/` and `relay/` (each a native DiT checkpoint, kind "dit"). The text encoder is not
copied into it: it is the GLM core of the VLM, passed in already built so that its weights exist once.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusion.denoiser import DiT, DiTConfig
from diffusion.relay import BlurSchedule
from diffusion.sampling import (
    ClassifierFreeGuidance,
    EDMDenoiser,
    StackedRandomGenerator,
    get_sigmas_karras,
    sample_heun,
    sample_relay,
)
from multimodal.checkpoint import (
    FORMAT_VERSION,
    NATIVE_CONFIG,
    CheckpointError,
    build_on_meta,
    load_into,
    read_native_config,
    read_state_dict,
    save_native,
)
from multimodal.image import from_tensor

PIPELINE_KIND = "relay-pipeline"
DIT_KIND = "dit"
Progress = Callable[[int, int], None]  # (steps done, total steps)


@dataclass(frozen=True)
class RelayConfig:
    sizes: tuple[tuple[int, int], ...] = ((64, 64),)  # (height, width) of the final images offered; first = default
    up_scale: int = 2                   # base -> relay upsampling factor, also the DCT patch size of the blur
    sigma_data: float = 0.5
    sigma_min: float = 0.002            # base stage schedule
    sigma_max: float = 80.0
    base_steps: int = 18                # Heun steps (2 evaluations each but the last)
    s_churn: float = 0.0
    relay_steps: int = 8
    relay_start_sigma: float = 0.9      # truncation point: the relay starts here from the upsampled image
    relay_sigma_min: float = 0.008
    s_block: float = 0.15               # block-noise weight in the relay noise
    s_noise: float = 0.2                # fraction of fresh noise per relay step
    blur_sigma_max: float = 3.0
    prob_length: float = 0.93
    min_scale: float = 0.001
    guidance_scale: float = 3.0

    @property
    def blur(self) -> BlurSchedule:
        return BlurSchedule(
            patch_size=self.up_scale, blur_sigma_max=self.blur_sigma_max, min_scale=self.min_scale,
            prob_length=self.prob_length,
        )

    def to_dict(self) -> dict:
        values = asdict(self)
        values["sizes"] = [list(size) for size in self.sizes]
        return values

    @classmethod
    def from_dict(cls, values: dict) -> RelayConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        if "sizes" in values:
            values["sizes"] = tuple(tuple(size) for size in values["sizes"])
        return cls(**values)


@dataclass
class DrawOutput:
    images: list  # the final images (relay stage, or base when there is no relay stage): PIL or tensors
    base: list  # the base-stage images
    relay: list  # the relay-stage images (empty when the relay stage did not run)
    seeds: list[int] = field(default_factory=list)


def _seeds(count: int, seed: int | Sequence[int] | None, generator) -> list[int]:
    """One seed per image: seed + i, an explicit list, or drawn from a given generator (or the OS) once."""
    if seed is not None and generator is not None:
        raise ValueError("Pass either seed or generator, not both.")
    if isinstance(generator, torch.Generator):
        return [int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) for _ in range(count)]
    if generator is not None:
        raise ValueError("generator must be one torch.Generator; for per-image control pass a list of seeds.")
    if seed is None:
        seed = secrets.randbelow(2**31 - 1)
    if isinstance(seed, int):
        return [seed + i for i in range(count)]
    seeds = [int(s) for s in seed]
    if len(seeds) != count:
        raise ValueError(f"{len(seeds)} seeds were given for {count} images.")
    return seeds


def _prompts(prompt: str | Sequence[str], negative_prompt, per_prompt: int) -> tuple[list[str], list[str]]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("No prompt was given.")
    if per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be at least 1, not {per_prompt}.")
    negative = negative_prompt if negative_prompt is not None else ""
    negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts were given for {len(prompts)} prompts.")
    return prompts, negatives


def _to_output(images: torch.Tensor, output_type: str) -> list:
    """[N, C, H, W] in [-1, 1] -> PIL images, or [C, H, W] tensors in [0, 1] ("pt")."""
    if output_type == "pil":
        return [from_tensor(image) for image in images]
    if output_type == "pt":
        return list(((images.float() + 1) / 2).clamp(0, 1))
    raise ValueError(f"Unknown output_type '{output_type}'; use 'pil' or 'pt'.")


class _StepCounter:
    """Turns the samplers' per-step callbacks into progress(done, total) across both stages."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self, info: dict) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)


class RelayPipeline:
    """pipe(prompt, ...) -> DrawOutput; see the module docstring."""

    def __init__(self, text_encoder, base: DiT, relay: DiT | None, config: RelayConfig = RelayConfig()):
        self.text_encoder = text_encoder
        self.base = base.eval()
        self.relay = relay.eval() if relay is not None else None
        self.config = config

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [tuple(size) for size in self.config.sizes]

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.base.parameters()).dtype

    def encode(self, prompts: list[str], per_prompt: int) -> dict:
        """Denoiser keyword arguments (text states and mask) for each image: prompts repeated per_prompt times."""
        states, mask = self.text_encoder(prompts)
        cond = {"text": states.to(device=self.device, dtype=self.dtype).repeat_interleave(per_prompt, dim=0)}
        cond["text_mask"] = None if mask is None else mask.to(self.device).repeat_interleave(per_prompt, dim=0)
        return cond

    def _check_size(self, height: int, width: int) -> tuple[int, int]:
        """The base-stage size for a final size, or one sentence saying why the size cannot be drawn."""
        up = self.config.up_scale
        base_h, base_w = height // up, width // up
        p = self.base.config.patch_size
        if height % up or width % up or base_h % p or base_w % p or base_h < p or base_w < p:
            raise ValueError(
                f"Size {width}x{height} cannot be drawn: height and width must be positive multiples of {up * p}."
            )
        if height % self.relay.config.patch_size or width % self.relay.config.patch_size:
            raise ValueError(
                f"Size {width}x{height} cannot be drawn: the relay stage needs multiples of "
                f"{self.relay.config.patch_size}."
            )
        return base_h, base_w

    def _check_size_base(self, height: int, width: int) -> tuple[int, int]:
        """The size check when only the base stage runs."""
        p = self.base.config.patch_size
        if height % p or width % p or height < p or width < p:
            raise ValueError(
                f"Size {width}x{height} cannot be drawn: height and width must be positive multiples of {p}."
            )
        return height, width

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        callback: Progress | None = None,
        relay_steps: int | None = None,
        use_relay: bool = True,
        output_type: str = "pil",
    ) -> DrawOutput:
        """Draw num_images_per_prompt images per prompt. `num_inference_steps` is the base stage's, `relay_steps`
        the relay stage's; `callback(done, total)` is called after every denoiser step of either stage."""
        cfg = self.config
        default_h, default_w = self.sizes[0]
        height, width = height or default_h, width or default_w
        use_relay = use_relay and self.relay is not None
        base_h, base_w = self._check_size(height, width) if use_relay else self._check_size_base(height, width)
        steps = num_inference_steps or cfg.base_steps
        relay_steps = relay_steps or cfg.relay_steps
        guidance = cfg.guidance_scale if guidance_scale is None else guidance_scale
        prompts, negatives = _prompts(prompt, negative_prompt, num_images_per_prompt)
        count = len(prompts) * num_images_per_prompt
        seeds = _seeds(count, seed, generator)
        noise = StackedRandomGenerator.from_seeds(seeds)

        cond = self.encode(prompts, num_images_per_prompt)
        uncond = self.encode(negatives, num_images_per_prompt) if guidance != 1 else None
        extra_args = {"cond": cond, "uncond": uncond}
        progress = _StepCounter(callback, steps + (relay_steps if use_relay else 0))

        # The samplers keep x in float32; the denoisers compute in the models' dtype.
        base_model = ClassifierFreeGuidance(EDMDenoiser(self.base, cfg.sigma_data, compute_dtype=self.dtype), guidance)
        x = noise.randn((self.base.config.in_channels, base_h, base_w), torch.float32, self.device) * cfg.sigma_max
        sigmas = get_sigmas_karras(steps, cfg.sigma_min, cfg.sigma_max)
        base = sample_heun(base_model, x, sigmas, extra_args, progress, noise.randn_like, s_churn=cfg.s_churn)
        base = base.clamp(-1, 1)  # [N, C, h, w]
        if not use_relay:
            images = _to_output(base, output_type)
            return DrawOutput(images=images, base=images, relay=[], seeds=seeds)

        relay_denoiser = EDMDenoiser(self.relay, cfg.sigma_data, compute_dtype=self.dtype)
        relay_model = ClassifierFreeGuidance(relay_denoiser, guidance)
        upsampled = F.interpolate(base, scale_factor=cfg.up_scale, mode="nearest")  # [N, C, H, W]
        sigmas = get_sigmas_karras(relay_steps, cfg.relay_sigma_min, cfg.relay_start_sigma)
        relay = sample_relay(
            relay_model, upsampled, sigmas, cfg.blur, extra_args, progress, noise.randn_like,
            s_block=cfg.s_block, s_noise=cfg.s_noise,
        ).clamp(-1, 1)
        relay_images = _to_output(relay, output_type)
        return DrawOutput(images=relay_images, base=_to_output(base, output_type), relay=relay_images, seeds=seeds)

    def flops(self, height: int, width: int, text_len: int, steps: int, relay_steps: int, use_relay=True) -> int:
        """Denoiser FLOPs of one image with guidance: 2 passes per evaluation, Heun's 2N - 1 evaluations."""
        base_h, base_w = self._check_size(height, width) if use_relay else self._check_size_base(height, width)
        passes = 2 if self.config.guidance_scale != 1 else 1
        total = passes * (2 * steps - 1) * self.base.flops_per_forward(base_h, base_w, text_len)
        if use_relay:
            total += passes * (2 * relay_steps - 1) * self.relay.flops_per_forward(height, width, text_len)
        return total


# ----------------------------------------------------------------------------------------------------------------
# Files


def save_dit(model: DiT, out_dir: str | Path) -> Path:
    return save_native(model.state_dict(), model.config.to_dict(), out_dir, kind=DIT_KIND)


def load_dit(path: str | Path, device="cpu", dtype: torch.dtype | None = None) -> DiT:
    """A native DiT checkpoint folder (kind "dit"), built on the meta device and loaded strictly."""
    config = DiTConfig.from_dict(read_native_config(path, kind=DIT_KIND))
    model = build_on_meta(lambda: DiT(config))
    load_into(model, read_state_dict(path), dtype=dtype)
    return model.to(device).eval()


def save_relay_pipeline(
    out_dir: str | Path, base: DiT, relay: DiT, config: RelayConfig, text_encoder: dict | None = None
) -> Path:
    """Write a pipeline folder. `text_encoder` optionally records where the encoder lives, as
    {"checkpoint": path, "tokenizer": path, "format": "vlm" | "glm"} with paths relative to out_dir."""
    out_dir = Path(out_dir)
    save_dit(base, out_dir / "base")
    save_dit(relay, out_dir / "relay")
    values = {"format_version": FORMAT_VERSION, "kind": PIPELINE_KIND, **config.to_dict()}
    if text_encoder is not None:
        values["text_encoder"] = text_encoder
    (out_dir / NATIVE_CONFIG).write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    return out_dir


def load_relay_pipeline(
    path: str | Path, text_encoder=None, device="cpu", dtype: torch.dtype | None = None
) -> RelayPipeline:
    """Load a pipeline folder. Pass the text encoder when one is already built (sharing the VLM's GLM); otherwise
    it is loaded from the location recorded in config.json."""
    path = Path(path)
    values = read_native_config(path, kind=PIPELINE_KIND)
    if text_encoder is None:
        text_encoder = _load_text_encoder(path, values.get("text_encoder"), device, dtype)
    base = load_dit(path / "base", device, dtype)
    relay = load_dit(path / "relay", device, dtype)
    return RelayPipeline(text_encoder, base, relay, RelayConfig.from_dict(values))


def _load_text_encoder(path: Path, where: dict | None, device, dtype):
    """The text encoder a pipeline folder points to; without a pointer, the VLM of the suite folder around it
    (`<suite>/vlm/` beside `<suite>/diffusion/`, the tokenizer in vlm/ or in the suite folder)."""
    from diffusion.text_encoder import GLMTextEncoder
    from glm.tokenizer import GLMTokenizer

    if where is None:
        suite = path.resolve().parent
        if not (suite / "vlm" / NATIVE_CONFIG).exists():
            raise CheckpointError(
                f"{path} does not say where its text encoder is and has no vlm/ beside it; pass a text encoder."
            )
        tokenizer = suite / "vlm" / "tokenizer.json"
        where = {"checkpoint": "../vlm", "format": "vlm", "tokenizer": str(tokenizer if tokenizer.exists() else
                                                                           suite / "tokenizer.json")}
    checkpoint, tokenizer = path / where["checkpoint"], path / where["tokenizer"]
    if where.get("format", "glm") == "vlm":
        from vlm.convert import load_vlm

        model = load_vlm(checkpoint, dtype=dtype, device=device)
    else:
        from glm.convert import load_glm

        model = load_glm(checkpoint, dtype=dtype, device=device)
    return GLMTextEncoder.from_tokenizer(model, GLMTokenizer.load(tokenizer))
