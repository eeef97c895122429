"""Relay-diffusion pieces against scipy and float64 formulas: patch DCT, block noise statistics, the blur table,
and the relay loss rebuilt by hand."""

import math

import numpy as np
import pytest
import torch
from scipy.fft import dctn, idctn
from scipy.stats import norm

from diffusion.relay import BlurSchedule, block_noise, dct_matrix, patch_dct, patch_idct, relay_loss


@pytest.mark.parametrize("p", [2, 4, 8])
def test_dct_matrix_is_orthonormal(p):
    c = dct_matrix(p, torch.float64)
    torch.testing.assert_close(c @ c.T, torch.eye(p, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("p", [2, 4])
def test_patch_dct_equals_scipy_per_patch(p):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 3 * p, 5 * p))  # non-square on purpose
    ours = patch_dct(torch.from_numpy(x), p).numpy()
    expected = np.empty_like(x)
    for i in range(3):
        for j in range(5):
            patch = x[..., i * p:(i + 1) * p, j * p:(j + 1) * p]
            expected[..., i * p:(i + 1) * p, j * p:(j + 1) * p] = dctn(patch, axes=(-2, -1), norm="ortho")
    np.testing.assert_allclose(ours, expected, atol=1e-12)
    back = patch_idct(torch.from_numpy(expected), p).numpy()
    np.testing.assert_allclose(back, x, atol=1e-12)
    # And idct is scipy's inverse too.
    np.testing.assert_allclose(
        patch_idct(torch.from_numpy(x), p).numpy()[..., :p, :p], idctn(x[..., :p, :p], axes=(-2, -1), norm="ortho"),
        atol=1e-12,
    )


def test_patch_dct_rejects_sizes_off_the_grid():
    with pytest.raises(ValueError, match="multiple of the DCT patch size"):
        patch_dct(torch.randn(1, 1, 6, 8), 4)


@pytest.mark.parametrize("s", [2, 4])
def test_block_noise_variance_and_neighbour_correlations(s):
    generator = torch.Generator().manual_seed(1)

    def randn_like(x):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype)

    noise = block_noise(torch.empty(64, 1, 64, 64, dtype=torch.float64), randn_like, s)  # 262k pixels
    assert noise.var().item() == pytest.approx(1.0, abs=0.03)

    def corr(dy, dx):
        shifted = torch.roll(noise, shifts=(dy, dx), dims=(-2, -1))
        return (noise * shifted).mean().item() / noise.var().item()

    for dy, dx in [(0, 1), (1, 0), (1, 1), (0, s - 1), (s - 1, 1)]:
        expected = (s - abs(dy)) * (s - abs(dx)) / s**2
        assert corr(dy, dx) == pytest.approx(expected, abs=0.03), (dy, dx)
    assert corr(0, s) == pytest.approx(0.0, abs=0.03)
    assert corr(s, s) == pytest.approx(0.0, abs=0.03)


def test_attenuation_table_matches_the_formula_and_worked_values():
    schedule = BlurSchedule(patch_size=4, blur_sigma_max=3.0, prob_length=0.93)
    for sigma in (0.02, 0.2, 0.5, 0.9, 1.7):
        u = 0.5 * (1 + math.erf((math.log(sigma) + 1.2) / (1.2 * math.sqrt(2)))) / 0.93
        blur_sigma = 3.0 * math.sin(math.pi * u / 2) ** 2
        table = schedule.attenuation(schedule.blur_sigma(schedule.progress(torch.tensor(sigma, dtype=torch.float64))))
        for k in range(4):
            for m in range(4):
                lam = (math.pi * k / 4) ** 2 + (math.pi * m / 4) ** 2
                expected = math.exp(-lam * blur_sigma**2 / 2) * 0.999 + 0.001
                assert table[k, m].item() == pytest.approx(expected, rel=1e-9)
        assert table[0, 0].item() == pytest.approx(1.0)
    # RDM's worked values at the relay start (sigma 0.9): A(0,1) ~ 0.076, A(1,1) ~ 0.007, A(3,3) ~ 0.001.
    table = schedule.attenuation(schedule.blur_sigma(schedule.progress(torch.tensor(0.9))))
    assert table[0, 1].item() == pytest.approx(0.076, abs=0.002)
    assert table[1, 1].item() == pytest.approx(0.007, abs=0.001)
    assert table[3, 3].item() == pytest.approx(0.001, abs=0.0005)
    assert schedule.sigma_top == pytest.approx(1.77, abs=0.01)


@pytest.mark.parametrize("p,h,w", [(2, 6, 10), (4, 8, 16)])
def test_alpha_tiles_the_table_for_any_resolution(p, h, w):
    schedule = BlurSchedule(patch_size=p, blur_sigma_max=2.0)
    sigma = torch.tensor([0.3, 0.7])
    alpha = schedule.alpha(sigma, h, w)
    assert alpha.shape == (2, h, w)
    table = schedule.attenuation(schedule.blur_sigma(schedule.progress(sigma)))  # [2, p, p]
    for i in range(h):
        for j in range(w):
            torch.testing.assert_close(alpha[:, i, j], table[:, i % p, j % p])


def test_full_blur_keeps_only_patch_means():
    schedule = BlurSchedule(patch_size=4, blur_sigma_max=50.0, min_scale=0.0)
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    blurred = schedule.blur(x, torch.tensor([1.5, 1.5]))
    means = torch.nn.functional.avg_pool2d(x, 4)
    expected = torch.nn.functional.interpolate(means, scale_factor=4, mode="nearest")
    torch.testing.assert_close(blurred, expected, atol=1e-9, rtol=0)
    # And almost no blur at a tiny sigma.
    torch.testing.assert_close(schedule.blur(x, torch.tensor([1e-4, 1e-4])), x, atol=1e-6, rtol=0)


def test_relay_loss_matches_a_hand_built_version():
    schedule = BlurSchedule(patch_size=2, blur_sigma_max=3.0)
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
    seen = {}

    def denoiser(x, sigma, scale):
        seen["x"], seen["sigma"] = x, sigma
        return x * scale

    losses = relay_loss(
        denoiser, images, schedule, extra_args={"scale": 0.7}, block_scale=0.15,
        generator=torch.Generator().manual_seed(9),
    )

    # Rebuild from the same random stream in the documented order: u, white noise, block noise.
    g = torch.Generator().manual_seed(9)
    u = torch.rand(3, dtype=torch.float64, generator=g).clamp(min=norm.cdf((math.log(7.5e-3) + 1.2) / 1.2) / 0.93)
    sigma = torch.tensor([math.exp(-1.2 + 1.2 * norm.ppf(v * 0.93)) for v in u.tolist()], dtype=torch.float64)
    white = torch.randn(images.shape, generator=g, dtype=images.dtype)
    base = torch.randn(images.shape, generator=g, dtype=images.dtype)
    blocky = sum(torch.roll(base, (dy, dx), (-2, -1)) for dy in range(2) for dx in range(2)) / 2
    table = schedule.attenuation(schedule.blur_sigma(schedule.progress(sigma)))  # [3, 2, 2]
    blurred = patch_idct(patch_dct(images, 2) * table.repeat(1, 4, 4)[:, None], 2)
    noisy = blurred + sigma.to(images.dtype)[:, None, None, None] * (white + 0.15 * blocky)
    torch.testing.assert_close(seen["x"], noisy)
    torch.testing.assert_close(seen["sigma"].double(), sigma.double())
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    expected = weight * ((noisy * 0.7 - images) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(losses, expected.to(losses.dtype))
