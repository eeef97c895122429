"""Samplers against the exact denoiser of a Gaussian data distribution, the relay sampler against plain Heun,
per-seed reproducibility, preconditioning and schedules against their formulas (and diffusers' CogView4 schedule)."""

import math

import pytest
import torch

from diffusion.denoiser import DiT, dit_config
from diffusion.relay import BlurSchedule, block_noise
from diffusion.sampling import (
    ClassifierFreeGuidance,
    EDMDenoiser,
    StackedRandomGenerator,
    get_sigmas_cogview4,
    get_sigmas_exponential,
    get_sigmas_karras,
    sample_euler,
    sample_heun,
    sample_relay,
    truncate_sigmas,
)

MU, STD = 0.3, 0.5  # the data distribution N(MU, STD^2) per pixel


def gaussian_denoiser(x, sigma):
    """E[x0 | x0 + sigma n] for x0 ~ N(MU, STD^2): exact, in float64."""
    s2 = sigma.double()[:, None, None, None] ** 2
    return (MU + STD**2 / (STD**2 + s2) * (x.double() - MU)).to(x.dtype)


def start_noise(n, sigma_max, seed):
    """Samples of the exact marginal at sigma_max, N(MU, STD^2 + sigma_max^2)."""
    g = torch.Generator().manual_seed(seed)
    return MU + math.sqrt(STD**2 + sigma_max**2) * torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)


@pytest.mark.parametrize(
    "sampler,steps,kwargs",
    [
        (sample_euler, 200, {}),
        (sample_heun, 30, {}),
        (sample_heun, 40, {"s_churn": 10.0, "s_tmin": 0.05, "s_tmax": 50.0}),
        (sample_euler, 500, {"s_churn": 20.0}),
    ],
)
def test_samplers_reproduce_a_gaussian(sampler, steps, kwargs):
    sigmas = get_sigmas_karras(steps, 0.002, 80.0)
    x = start_noise(500, 80.0, seed=0)  # 32k values
    g = torch.Generator().manual_seed(1)
    samples = sampler(
        gaussian_denoiser, x, sigmas, randn_like=lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype), **kwargs
    )
    assert samples.mean().item() == pytest.approx(MU, abs=0.02)
    assert samples.std().item() == pytest.approx(STD, rel=0.03)


def test_a_sampler_that_ignores_the_denoiser_fails_the_gaussian_check():
    # The same check on a wrong denoiser (data std 1 instead of 0.5) must fail: the test can tell.
    sigmas = get_sigmas_karras(30, 0.002, 80.0)

    def wrong_denoiser(x, sigma):
        return MU + 1 / (1 + sigma.double()[:, None, None, None] ** 2) * (x - MU)

    wrong = sample_heun(wrong_denoiser, start_noise(500, 80, 0), sigmas)
    assert abs(wrong.std().item() - STD) > 0.1


def test_schedules_follow_their_formulas():
    sigmas = get_sigmas_karras(5, 0.002, 80.0, rho=7.0)
    for i in range(5):
        expected = (80 ** (1 / 7) + i / 4 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
        assert sigmas[i].item() == pytest.approx(expected, rel=1e-12)
    assert sigmas[-1].item() == 0 and len(sigmas) == 6
    exp = get_sigmas_exponential(4, 0.1, 10.0)
    torch.testing.assert_close(exp[:-1].log().diff(), torch.full((3,), math.log(0.1 / 10) / 3, dtype=torch.float64))
    truncated = truncate_sigmas(get_sigmas_karras(18, 0.002, 80.0), 0.9)
    assert truncated[0] < 0.9 <= get_sigmas_karras(18, 0.002, 80.0)[18 - len(truncated)]
    assert truncated[-1] == 0


@pytest.mark.parametrize("steps,seq_len", [(4, 64), (7, 4096)])
def test_cogview4_schedule_equals_diffusers(steps, seq_len):
    np = pytest.importorskip("numpy")
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(
        base_shift=0.25, max_shift=0.75, base_image_seq_len=256, use_dynamic_shifting=True, time_shift_type="linear"
    )
    timesteps = np.linspace(1000, 1.0, steps).astype(np.int64).astype(np.float32)
    mu = math.sqrt(seq_len / 256) * 0.75 + 0.25
    scheduler.set_timesteps(steps, timesteps=timesteps, sigmas=timesteps / 1000, mu=mu)
    sigmas, ours_t = get_sigmas_cogview4(steps, seq_len)
    torch.testing.assert_close(sigmas.float(), scheduler.sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_t.float(), scheduler.timesteps, rtol=0, atol=0)


def test_edm_preconditioning_matches_its_formula():
    seen = {}

    def backbone(x, noise, scale):
        seen["x"], seen["noise"] = x, noise
        return x * scale - 0.1

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.5, 20.0], dtype=torch.float64)
    out = EDMDenoiser(backbone, sigma_data=0.5)(x, sigma, scale=2.0)
    for i, s in enumerate(sigma.tolist()):
        c_in = 1 / math.sqrt(s**2 + 0.25)
        c_skip, c_out = 0.25 / (s**2 + 0.25), s * 0.5 / math.sqrt(s**2 + 0.25)
        torch.testing.assert_close(seen["x"][i], c_in * x[i])
        assert seen["noise"][i].item() == pytest.approx(1000 * math.log(s) / 4, rel=1e-6)
        torch.testing.assert_close(out[i], c_skip * x[i] + c_out * (c_in * x[i] * 2.0 - 0.1))


def test_classifier_free_guidance_combines_two_passes():
    def model(x, sigma, shift):
        return x + shift

    x = torch.randn(2, 1, 2, 2)
    guided = ClassifierFreeGuidance(model, 3.0)(x, torch.ones(2), cond={"shift": 1.0}, uncond={"shift": -0.5})
    torch.testing.assert_close(guided, (x - 0.5) + 3.0 * 1.5)
    assert torch.equal(ClassifierFreeGuidance(model, 1.0)(x, torch.ones(2), {"shift": 1.0}, {"shift": 9.0}), x + 1)


def tiny_edm_model(seed=0):
    torch.manual_seed(seed)
    dit = DiT(dit_config("tiny"))
    with torch.no_grad():  # adaLN-zero starts as the identity: randomise everything so the test sees the network
        for p in dit.parameters():
            p.normal_(0, 0.3)
    return EDMDenoiser(dit.eval())


def test_relay_sampler_without_blur_equals_the_truncated_heun_sampler():
    model = tiny_edm_model()
    text = torch.randn(2, 3, 16)
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    sigmas = truncate_sigmas(get_sigmas_karras(12, 0.008, 80.0), 0.9)
    schedule = BlurSchedule(patch_size=2, blur_sigma_max=0.0)
    relay = sample_relay(
        model, image, sigmas, schedule, extra_args={"text": text},
        randn_like=StackedRandomGenerator.from_seeds([1, 2]).randn_like, s_block=0.15, s_noise=0.0,
    )
    gen = StackedRandomGenerator.from_seeds([1, 2])
    start = image + sigmas[0].item() * (gen.randn_like(image) + 0.15 * block_noise(image, gen.randn_like, 2))
    heun = sample_heun(model, start, sigmas, extra_args={"text": text})
    torch.testing.assert_close(relay, heun, atol=1e-5, rtol=1e-5)
    # With blur on, the result is different (the test can tell the two apart).
    blurred = sample_relay(
        model, image, sigmas, BlurSchedule(patch_size=2), extra_args={"text": text},
        randn_like=StackedRandomGenerator.from_seeds([1, 2]).randn_like, s_noise=0.0,
    )
    assert (blurred - heun).abs().max() > 1e-2


def test_a_batch_of_seeds_equals_the_same_seeds_one_by_one():
    model = tiny_edm_model(1)
    text = torch.randn(1, 3, 16).expand(3, 3, 16)
    seeds = [11, 12, 13]

    def run(batch_seeds):
        gen = StackedRandomGenerator.from_seeds(batch_seeds)
        n = len(batch_seeds)
        x = gen.randn((3, 4, 4)) * 80.0
        base = sample_heun(model, x, get_sigmas_karras(4, 0.002, 80.0), {"text": text[:n]}, randn_like=gen.randn_like,
                           s_churn=5.0)
        up = torch.nn.functional.interpolate(base.clamp(-1, 1), scale_factor=2, mode="nearest")
        return sample_relay(model, up, get_sigmas_karras(3, 0.008, 0.9), BlurSchedule(patch_size=2),
                            {"text": text[:n]}, randn_like=gen.randn_like)

    batch = run(seeds)
    single = torch.cat([run([s]) for s in seeds])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-5)
    assert (batch[0] - batch[1]).abs().max() > 1e-2
