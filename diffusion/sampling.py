"""Preconditioning, noise schedules and samplers, in k-diffusion's form.

Every sampler is a plain function `sample_X(model, x, sigmas, extra_args=None, callback=None, randn_like=None, ...)`
where `model(x, sigma, **extra_args)` returns the denoised image D(x; sigma) and `sigmas` is a decreasing schedule
ending in 0. `EDMDenoiser` turns a raw backbone into such a model (Karras et al. 2022, "Elucidating the design
space", Table 1); `ClassifierFreeGuidance` combines a conditional and an unconditional pass. Random numbers come from
`randn_like`; `StackedRandomGenerator` gives every image its own generator, so image i of a batch is the same image
whatever the batch size.

Real CogView4 weights predict a flow-matching velocity instead; `sample_flow_euler` and `get_sigmas_cogview4`
reproduce diffusers' CogView4 schedule (resolution-dependent linear time shift) and Euler step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from diffusion.relay import BlurSchedule, RandnLike, block_noise, patch_dct, patch_idct

Callback = Callable[[dict], None]


class StackedRandomGenerator:
    """One `torch.Generator` per image (drawn on the CPU, so results do not depend on the device)."""

    def __init__(self, generators: Sequence[torch.Generator]):
        self.generators = list(generators)

    @classmethod
    def from_seeds(cls, seeds: Sequence[int]) -> StackedRandomGenerator:
        return cls([torch.Generator().manual_seed(int(seed)) for seed in seeds])

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype=torch.float32, device=None) -> torch.Tensor:
        """[len(self), *shape]: image i drawn from generator i."""
        noise = torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in self.generators])
        return noise.to(dtype=dtype, device=device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.generators):
            raise ValueError(f"A batch of {x.shape[0]} images needs as many generators, got {len(self.generators)}.")
        return self.randn(x.shape[1:], dtype=x.dtype, device=x.device)


# ----------------------------------------------------------------------------------------------------------------
# Preconditioning and guidance


class EDMDenoiser(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) around any backbone F(x, noise_level, **cond).

    c_noise is EDM's ln(sigma)/4 times `noise_scale` (1000 by default) so that the backbone's sinusoidal
    timestep features see the spread of values they are designed for (diffusers timesteps span 0..1000).
    With `compute_dtype` (e.g. bfloat16) the backbone runs in it while the sampler keeps x in its own precision.
    """

    def __init__(
        self, backbone: nn.Module, sigma_data: float = 0.5, noise_scale: float = 1000.0,
        compute_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.sigma_data = sigma_data
        self.noise_scale = noise_scale
        self.compute_dtype = compute_dtype

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """c_skip, c_out, c_in, c_noise for noise levels sigma."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        c_noise = self.noise_scale * sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = (c.to(x.dtype)[:, None, None, None] for c in self.scalings(sigma))
        out = self.backbone((c_in * x).to(self.compute_dtype or x.dtype), c_noise.reshape(-1), **cond)
        return c_skip * x + c_out * out.to(x.dtype)


def edm_loss(
    denoiser: Callable[..., torch.Tensor],
    images: torch.Tensor,
    extra_args: dict | None = None,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    sigma_data: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """EDM's training loss for the base stage: ln sigma ~ N(p_mean, p_std^2), weight (sigma^2 + sd^2)/(sigma sd)^2;
    returns the per-image weighted mean squared error [B]."""
    b = images.shape[0]
    normal = torch.randn(b, generator=generator).to(images.device)
    sigma = (normal * p_std + p_mean).exp().to(images.dtype)  # [B]
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    if generator is None:
        noise = torch.randn_like(images)
    else:
        noise = torch.randn(images.shape, generator=generator, dtype=images.dtype).to(images.device)
    denoised = denoiser(images + sigma[:, None, None, None] * noise, sigma, **(extra_args or {}))
    return weight * ((denoised - images) ** 2).flatten(1).mean(dim=1)


class ClassifierFreeGuidance:
    """model(x, sigma, cond=..., uncond=...) = D_u + w (D_c - D_u), with two passes so that the conditional and the
    unconditional text may have different lengths. With w == 1 or no `uncond`, one conditional pass."""

    def __init__(self, model: Callable[..., torch.Tensor], guidance_scale: float):
        self.model = model
        self.guidance_scale = guidance_scale

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict, uncond: dict | None = None) -> torch.Tensor:
        conditional = self.model(x, sigma, **cond)
        if uncond is None or self.guidance_scale == 1:
            return conditional
        unconditional = self.model(x, sigma, **uncond)
        return unconditional + self.guidance_scale * (conditional - unconditional)


# ----------------------------------------------------------------------------------------------------------------
# Schedules (decreasing, float64, with a trailing zero)


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM's schedule: (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..n-1."""
    if n < 1:
        raise ValueError(f"The number of steps must be at least 1, got {n}.")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _append_zero((max_inv + ramp * (min_inv - max_inv)) ** rho)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Evenly spaced in log sigma."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp())


def truncate_sigmas(sigmas: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Drop the leading sigmas at or above max_sigma (RDM's truncated relay schedule); the trailing zero stays."""
    return sigmas[(sigmas < max_sigma).nonzero()[0, 0]:]


def get_sigmas_cogview4(
    n: int, image_seq_len: int, base_seq_len: int = 256, base_shift: float = 0.25, max_shift: float = 0.75
) -> tuple[torch.Tensor, torch.Tensor]:
    """CogView4's flow-matching schedule: (sigmas [n+1] ending in 0, timesteps [n] fed to the transformer).

    Timesteps are int(linspace(1000, 1, n)); sigmas are timesteps/1000 shifted by mu/(mu + 1/s - 1) with
    mu = sqrt(image_seq_len / base_seq_len) max_shift + base_shift. As in diffusers, the transformer sees the
    unshifted timesteps.
    """
    timesteps = torch.linspace(1000, 1, n, dtype=torch.float64).floor()
    mu = math.sqrt(image_seq_len / base_seq_len) * max_shift + base_shift
    base = (timesteps / 1000).float().double()
    sigmas = mu / (mu + (1 / base - 1))
    return _append_zero(sigmas.float().double()), timesteps


# ----------------------------------------------------------------------------------------------------------------
# Samplers


def to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's derivative dx/dsigma."""
    return (x - denoised) / sigma


def _sigma_batch(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)


def _churn(x, sigma, n_steps, randn_like, s_churn, s_tmin, s_tmax, s_noise):
    """EDM's stochastic step: raise the noise level from sigma to sigma_hat = sigma (1 + gamma)."""
    gamma = min(s_churn / n_steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (1 + gamma)
    if gamma > 0:
        x = x + randn_like(x) * s_noise * math.sqrt(sigma_hat**2 - sigma**2)
    return x, sigma_hat


@torch.no_grad()
def sample_euler(
    model, x, sigmas, extra_args=None, callback: Callback | None = None, randn_like: RandnLike | None = None,
    s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
):
    """Euler steps of the probability-flow ODE, with EDM's optional churn (Karras et al. 2022, Algorithm 2 without
    the second-order correction). x is the initial noise already scaled to sigmas[0]."""
    extra_args = extra_args or {}
    randn_like = randn_like or torch.randn_like
    sigmas = [float(s) for s in sigmas]
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas[i], len(sigmas) - 1, randn_like, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, _sigma_batch(x, sigma_hat), **extra_args)
        d = to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_heun(
    model, x, sigmas, extra_args=None, callback: Callback | None = None, randn_like: RandnLike | None = None,
    s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
):
    """Heun's method with EDM's optional churn (Karras et al. 2022, Algorithm 2); the last step to sigma = 0 is an
    Euler step, which returns the final denoised image."""
    extra_args = extra_args or {}
    randn_like = randn_like or torch.randn_like
    sigmas = [float(s) for s in sigmas]
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas[i], len(sigmas) - 1, randn_like, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, _sigma_batch(x, sigma_hat), **extra_args)
        d = to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
            continue
        x_euler = x + d * dt
        d_next = to_d(x_euler, sigmas[i + 1], model(x_euler, _sigma_batch(x, sigmas[i + 1]), **extra_args))
        x = x + (d + d_next) / 2 * dt
    return x


@torch.no_grad()
def sample_relay(
    model, image, sigmas, schedule: BlurSchedule, extra_args=None, callback: Callback | None = None,
    randn_like: RandnLike | None = None, s_block=0.15, s_noise=0.2,
):
    """RDM's relay sampler (blur_sampler): from an upsampled image to a sharp one.

    `image` [B, C, H, W] is the base output nearest-upsampled by schedule.patch_size (the fully blurred state);
    `sigmas` starts at the truncation point (see `truncate_sigmas`) and ends in 0. The start is
    x = image + sigma_0 (eps + s_block eps_block). Each step works in the patch DCT basis u, where the forward
    process is u = alpha(sigma) u_0 + sigma eps: with gamma = sqrt(1 - s_noise^2) sigma_next / sigma,
    u_next = (alpha_next + gamma - gamma alpha) u + sigma (gamma alpha - alpha_next) d, d = (u - DCT(D)) / sigma,
    plus fresh noise s_noise sigma_next (eps + s_block eps_block); then a Heun correction re-evaluates d at the new
    point and repeats the update with the mean of both d. The last step returns the denoised image. With no blur
    (alpha = 1) and s_noise = 0 this is exactly `sample_heun`.
    """
    extra_args = extra_args or {}
    randn_like = randn_like or torch.randn_like
    p = schedule.patch_size
    h, w = image.shape[-2:]
    sigmas = [float(s) for s in sigmas]

    def noise(x):
        fresh = randn_like(x)
        return fresh + s_block * block_noise(x, randn_like, p) if s_block > 0 else fresh

    def alpha(sigma):
        table = schedule.alpha(torch.tensor(sigma, dtype=torch.float64), h, w)  # [H, W]
        return table.to(dtype=image.dtype, device=image.device)

    def denoise(x, sigma):
        return model(x, _sigma_batch(x, sigma), **extra_args)

    x = image + sigmas[0] * noise(image)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if sigma_next == 0:
            return denoised
        alpha_cur, alpha_next = alpha(sigma), alpha(sigma_next)
        gamma = math.sqrt(1 - s_noise**2) * sigma_next / sigma
        keep = alpha_next + gamma - gamma * alpha_cur  # [H, W] factor on u
        step = sigma * (gamma * alpha_cur - alpha_next)  # [H, W] factor on d
        u = patch_dct(x, p)
        d = (u - patch_dct(denoised, p)) / sigma
        x_next = patch_idct(keep * u + step * d, p) + s_noise * sigma_next * noise(x)
        d_next = (patch_dct(x_next, p) - patch_dct(denoise(x_next, sigma_next), p)) / sigma_next
        x = patch_idct(keep * u + step * (d + d_next) / 2, p) + s_noise * sigma_next * noise(x)
    return x


@torch.no_grad()
def sample_flow_euler(model, x, sigmas, timesteps, extra_args=None, callback: Callback | None = None):
    """Flow-matching Euler steps (CogView4): `model(x, timestep, **extra_args)` returns the velocity v = eps - x_0,
    and x <- x + (sigma_next - sigma) v. x is pure noise at sigmas[0]."""
    extra_args = extra_args or {}
    sigmas = [float(s) for s in sigmas]
    for i in range(len(sigmas) - 1):
        velocity = model(x, _sigma_batch(x, float(timesteps[i])), **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": x - sigmas[i] * velocity})
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity
    return x
