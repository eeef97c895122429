"""The UNet base-stage candidate behind the DiT's signature: padding is never attended to, the text is whitened as
the DiT whitens it, and the prompt reaches the output."""

from __future__ import annotations

import torch

from diffusion.sampling import EDMDenoiser, edm_loss
from diffusion.unet import UNetBackbone, UNetConfig


def _tiny() -> UNetBackbone:
    torch.manual_seed(0)
    model = UNetBackbone(UNetConfig(text_dim=16, block_channels=(32, 32), head_dim=16)).eval()
    with torch.no_grad():
        for param in model.unet.parameters():
            param.add_(torch.randn_like(param) * 0.05)  # the zero-initialised output layers too
    return model


def test_padding_changes_nothing_and_the_prompt_matters(generator):
    model = _tiny()
    x, text = torch.randn(2, 3, 16, 16, generator=generator), torch.randn(2, 5, 16, generator=generator)
    padded = torch.cat([torch.randn(2, 3, 16, generator=generator), text], dim=1)  # left padding with junk
    mask = torch.cat([torch.zeros(2, 3, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        plain = model(x, torch.tensor([5.0, -20.0]), text)
        masked = model(x, torch.tensor([5.0, -20.0]), padded, text_mask=mask)
        other = model(x, torch.tensor([5.0, -20.0]), text.flip(0))
    torch.testing.assert_close(masked, plain, atol=1e-5, rtol=1e-5)
    assert (other - plain).abs().max() > 1e-3


def test_whitening_is_the_dits_and_trains_under_edm(generator):
    from diffusion.denoiser import whitening_statistics

    model = _tiny()
    states = 6 + torch.randn(8, 5, 16, generator=generator)
    mask = torch.rand(8, 5, generator=generator) > 0.2
    model.set_text_statistics(states, mask)
    mean, whitening = whitening_statistics(states, mask)
    torch.testing.assert_close(model.text_mean, mean)
    torch.testing.assert_close(model.text_whitening, whitening.float())
    model.train()
    images = torch.rand(8, 3, 16, 16, generator=generator) * 2 - 1
    loss = edm_loss(EDMDenoiser(model), images, {"text": states, "text_mask": mask}, generator=generator).mean()
    loss.backward()
    assert torch.isfinite(loss) and model.unet.conv_in.weight.grad.abs().sum() > 0
