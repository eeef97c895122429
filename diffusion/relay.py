"""Relay diffusion (RDM): block noise, the patch-wise DCT blurring forward process, and the relay training loss.

The relay stage starts from an upsampled low-resolution image. Its forward process blurs as it adds noise: in the
orthonormal DCT of every p x p patch (p = the upsampling factor), frequency (k, l) is attenuated by the heat
equation, A_kl = exp(-(f_k^2 + f_l^2) sigma_B^2 / 2) (1 - min_scale) + min_scale with f_k = pi k / p. The blur
strength sigma_B = sigma_B,max sin^2(pi u / 2) is tied to the noise level sigma through EDM's log-normal training
distribution, u = Phi((ln sigma - P_mean) / P_std) / prob_length. At full blur only the patch means survive, which is
exactly a nearest-upsampled low-resolution image, so sampling can start there (see `diffusion.sampling.sample_relay`).

Block noise follows RDM's code: a sliding s x s sum of circularly rolled white noise divided by s, so each pixel
keeps unit variance while neighbours at distance (dx, dy) correlate by (s - |dx|)(s - |dy|) / s^2 (0.75 for adjacent
pixels when s = 4, 0 from distance s on). It is added on top of white noise, unnormalised:
n = sigma (eps + b eps_block).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

RandnLike = Callable[[torch.Tensor], torch.Tensor]


def dct_matrix(size: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
    """The orthonormal DCT-II matrix C [size, size]: C[k, n] = s_k cos(pi (n + 1/2) k / size)."""
    n = torch.arange(size, dtype=torch.float64)
    k = n[:, None]
    matrix = torch.cos(math.pi * (n[None, :] + 0.5) * k / size) * math.sqrt(2.0 / size)
    matrix[0] /= math.sqrt(2.0)
    return matrix.to(dtype=dtype, device=device)


def _patch_transform(x: torch.Tensor, p: int, inverse: bool) -> torch.Tensor:
    *lead, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"Image size {h}x{w} is not a multiple of the DCT patch size {p}.")
    c = dct_matrix(p, x.dtype, x.device)
    c = c.T if inverse else c
    patches = x.reshape(*lead, h // p, p, w // p, p)  # [..., H/p, p, W/p, p]
    out = torch.einsum("kn,...injm,lm->...ikjl", c, patches, c)  # C X C^T per patch
    return out.reshape(*lead, h, w)


def patch_dct(x: torch.Tensor, p: int) -> torch.Tensor:
    """Orthonormal 2D DCT-II of every non-overlapping p x p patch of [..., H, W]; coefficient (k, l) of the patch
    at (i, j) is written to pixel (i p + k, j p + l)."""
    return _patch_transform(x, p, inverse=False)


def patch_idct(u: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of `patch_dct` (its transpose, since the transform is orthonormal)."""
    return _patch_transform(u, p, inverse=True)


def block_noise(x: torch.Tensor, randn_like: RandnLike, block_size: int) -> torch.Tensor:
    """Correlated noise shaped like x [..., H, W]: (1/s) sum over shifts (dy, dx) in [0, s)^2 of roll(g, (dy, dx))."""
    white = randn_like(x)
    total = torch.zeros_like(white)
    for dy in range(block_size):
        for dx in range(block_size):
            total += torch.roll(white, shifts=(dy, dx), dims=(-2, -1))
    return total / block_size


def normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


@dataclass(frozen=True)
class BlurSchedule:
    """The relay forward process: how much each DCT frequency of a p x p patch survives at noise level sigma."""

    patch_size: int = 4            # DCT patch side; equals the upsampling factor from the base stage
    blur_sigma_max: float = 3.0    # sigma_B at the top of the relay range (RDM: 3 on ImageNet, 2 on CelebA-HQ)
    min_scale: float = 0.001       # floor of every frequency's attenuation
    p_mean: float = -1.2           # EDM's log-normal training distribution of sigma ...
    p_std: float = 1.2
    prob_length: float = 0.93      # ... truncated to its lower prob_length mass (sigma <= 1.77)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def sigma_top(self) -> float:
        """The largest noise level the relay stage is trained on."""
        return math.exp(self.p_mean + self.p_std * statistics.NormalDist().inv_cdf(self.prob_length))

    def progress(self, sigma: torch.Tensor) -> torch.Tensor:
        """u in [0, 1]: the fraction of the relay range below sigma."""
        u = normal_cdf((torch.log(torch.as_tensor(sigma, dtype=torch.float64)) - self.p_mean) / self.p_std)
        return (u / self.prob_length).clamp(0.0, 1.0)

    def blur_sigma(self, u: torch.Tensor) -> torch.Tensor:
        return self.blur_sigma_max * torch.sin(u * math.pi / 2) ** 2

    def attenuation(self, blur_sigma: torch.Tensor) -> torch.Tensor:
        """[..., p, p]: the factor on DCT coefficient (k, l) for each blur strength in blur_sigma [...]."""
        freqs = math.pi * torch.arange(self.patch_size, dtype=torch.float64) / self.patch_size
        squared = freqs[:, None] ** 2 + freqs[None, :] ** 2  # [p, p]
        blur_sigma = torch.as_tensor(blur_sigma, dtype=torch.float64)[..., None, None]
        return torch.exp(-squared * blur_sigma**2 / 2) * (1 - self.min_scale) + self.min_scale

    def alpha(self, sigma: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """[..., H, W]: the attenuation table for noise levels sigma [...], tiled over an H x W image."""
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"Image size {height}x{width} is not a multiple of the DCT patch size {p}.")
        table = self.attenuation(self.blur_sigma(self.progress(sigma)))
        return table.repeat(*([1] * (table.dim() - 2)), height // p, width // p)

    def blur(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The noiseless forward process: x [B, C, H, W] blurred to the level of sigma [B] (or a scalar)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        alpha = self.alpha(sigma, x.shape[-2], x.shape[-1]).to(x.dtype).to(x.device)  # [B or 1, H, W]
        return patch_idct(patch_dct(x, self.patch_size) * alpha[:, None], self.patch_size)


def relay_loss(
    denoiser: Callable[..., torch.Tensor],
    images: torch.Tensor,
    schedule: BlurSchedule,
    extra_args: dict | None = None,
    block_scale: float = 0.15,
    sigma_data: float = 0.5,
    min_sigma: float = 7.5e-3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """RDM's BlurLoss: per-image weighted squared error [B] of the denoised sharp image.

    u ~ U[0, 1] gives both sigma = exp(P_mean + P_std Phi^-1(u prob_length)) and sigma_B; the input is
    blur(x0, sigma) + sigma (eps + block_scale eps_block), the target is the sharp x0, and the weight is EDM's
    (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, capped at 1e5. u is bounded below so that sigma >= min_sigma.
    `denoiser(x, sigma, **extra_args)` is the preconditioned model (e.g. `EDMDenoiser`). With a `generator`, all
    randomness is drawn from it (on the CPU) so a training step is reproducible.
    """
    b = images.shape[0]
    u_min = statistics.NormalDist(schedule.p_mean, schedule.p_std).cdf(math.log(min_sigma)) / schedule.prob_length
    u = torch.rand(b, dtype=torch.float64, generator=generator).clamp(min=u_min)  # [B]
    z = math.sqrt(2) * torch.erfinv(2 * u * schedule.prob_length - 1)
    sigma = torch.exp(schedule.p_mean + schedule.p_std * z)  # [B]
    weight = ((sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2).clamp(max=1e5)
    if generator is None:
        randn_like = torch.randn_like
    else:
        def randn_like(x):
            return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    noise = randn_like(images)
    if block_scale > 0:
        noise = noise + block_scale * block_noise(images, randn_like, schedule.patch_size)
    s = sigma.to(images.dtype).to(images.device)[:, None, None, None]
    noisy = schedule.blur(images, sigma) + s * noise
    denoised = denoiser(noisy, s.reshape(-1), **(extra_args or {}))
    error = ((denoised - images) ** 2).flatten(1).mean(dim=1)  # [B]
    return weight.to(error.dtype).to(error.device) * error
