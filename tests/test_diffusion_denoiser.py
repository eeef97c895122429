"""The DiT against diffusers' CogView4Transformer2DModel with the same random weights, the strict key table, and
text padding that is masked out (from attention and from the pooled text conditioning)."""

import pytest
import torch

from diffusion.denoiser import DIFFUSERS_KEYS, DiT, config_from_diffusers, dit_config, patchify, unpatchify
from multimodal.checkpoint import CheckpointError, convert, load_into


@pytest.fixture(scope="module")
def pair():
    from diffusers import CogView4Transformer2DModel

    torch.manual_seed(0)
    theirs = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=12, time_embed_dim=16, condition_dim=4,
    ).eval()
    with torch.no_grad():  # non-zero everything, so every weight matters
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours = DiT(config_from_diffusers(dict(theirs.config))).eval()
    load_into(ours, convert(theirs.state_dict(), DIFFUSERS_KEYS))
    return theirs, ours


@pytest.mark.parametrize("size,text_len", [((8, 8), 5), ((6, 10), 16)])
def test_matches_diffusers_cogview4_transformer(pair, size, text_len):
    theirs, ours = pair
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *size, generator=g)
    text = torch.randn(2, text_len, 12, generator=g)
    timestep = torch.tensor([999.0, 123.0])
    original = torch.tensor([[64.0, 80.0], [48.0, 96.0]])
    crop = torch.tensor([[0.0, 0.0], [8.0, 16.0]])
    target = torch.tensor([[64.0, 80.0], [32.0, 48.0]])
    with torch.no_grad():
        expected = theirs(x, text, timestep, original, target, crop, return_dict=False)[0]
        got = ours(x, timestep, text, sizes=torch.cat([original, crop, target], dim=1))
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_every_weight_is_used(pair):
    theirs, ours = pair
    x, text = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 12)
    with torch.no_grad():
        before = ours(x, torch.tensor([500.0]), text)
        for name, param in ours.named_parameters():
            saved = param.clone()
            param.add_(torch.randn_like(param) * 0.5)  # random: a uniform shift is invisible after LayerNorm
            changed = (ours(x, torch.tensor([500.0]), text) - before).abs().max().item()
            param.copy_(saved)
            assert changed > 1e-6, name


def test_key_table_is_strict(pair):
    theirs, _ = pair
    state = dict(theirs.state_dict())
    del state["transformer_blocks.1.attn1.to_k.weight"]
    with pytest.raises(CheckpointError, match="to_k.weight"):
        convert(state, DIFFUSERS_KEYS)
    state = dict(theirs.state_dict(), **{"extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="extra.weight"):
        convert(state, DIFFUSERS_KEYS)


@pytest.mark.parametrize("pooled_text", [False, True])
def test_masked_text_padding_changes_nothing(pooled_text):
    torch.manual_seed(2)
    model = DiT(dit_config("tiny", pooled_text=pooled_text)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    x, text = torch.randn(1, 3, 8, 8), torch.randn(1, 5, 16)
    padded = torch.cat([torch.randn(1, 11, 16), text], dim=1)  # left padding with junk
    mask = torch.cat([torch.zeros(1, 11, dtype=torch.bool), torch.ones(1, 5, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        plain = model(x, torch.tensor([10.0]), text)
        masked = model(x, torch.tensor([10.0]), padded, text_mask=mask)
        unmasked = model(x, torch.tensor([10.0]), padded)
    torch.testing.assert_close(masked, plain, atol=1e-5, rtol=1e-5)
    assert (unmasked - plain).abs().max() > 1e-3
    if pooled_text:  # the pooled path is live: without it the same weights give another output
        with torch.no_grad():
            model.pooled_embed.linear_2.weight.zero_()
            model.pooled_embed.linear_2.bias.zero_()
            assert (model(x, torch.tensor([10.0]), text) - plain).abs().max() > 1e-3


def test_text_whitening_gives_identity_covariance_and_is_saved(tmp_path, generator):
    model = DiT(dit_config("tiny", pooled_text=True, whitened_text=True)).eval()
    rotation = torch.linalg.qr(torch.randn(16, 16, generator=generator))[0]
    mixing = torch.logspace(0, -1, 16)[:, None] * rotation  # loud and quiet directions, none below the floor
    states = 5 + torch.randn(40, 6, 16, generator=generator) @ mixing
    mask = torch.rand(40, 6, generator=generator) > 0.3
    model.set_text_statistics(states, mask)
    whitened = ((states[mask].double() - model.text_mean.double()) @ model.text_whitening.double())  # [N, 16]
    torch.testing.assert_close(torch.cov(whitened.T), torch.eye(16, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(whitened.mean(0), torch.zeros(16, dtype=torch.float64), atol=1e-5, rtol=0)
    x, text = torch.randn(1, 3, 8, 8, generator=generator), states[:1]
    plain = DiT(dit_config("tiny", pooled_text=True)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("text_")})
    by_hand = ((text.double() - model.text_mean.double()) @ model.text_whitening.double()).float()
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor([3.0]), text), plain(x, torch.tensor([3.0]), by_hand),
                                   atol=1e-4, rtol=1e-4)
    from diffusion.pipeline import load_dit
    from multimodal.checkpoint import save_native

    save_native(model.state_dict(), model.config.to_dict(), tmp_path, "dit")
    torch.testing.assert_close(load_dit(tmp_path).text_whitening, model.text_whitening)


def test_patchify_round_trip_and_fresh_model_is_adaln_zero():
    x = torch.randn(2, 3, 6, 10)
    assert torch.equal(unpatchify(patchify(x, 2), 2, 3, 5), x)
    model = DiT(dit_config("tiny"))
    out = model(torch.randn(1, 3, 8, 8), torch.tensor([1.0]), torch.randn(1, 2, 16))
    assert torch.equal(out, torch.zeros_like(out))  # zero output layer: training starts from the identity blocks
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 7, 8), torch.tensor([1.0]), torch.randn(1, 2, 16))


@pytest.mark.parametrize("pooled_text", [False, True])
def test_flop_count_matches_torch_flop_counter(monkeypatch, pooled_text):
    from torch.utils.flop_counter import FlopCounterMode

    # The explicit attention path is matmuls the counter can see (it does not count CPU SDPA).
    monkeypatch.setattr("kernels.attention.use_explicit", lambda q, k: True)
    model = DiT(dit_config("tiny", patch_size=2, num_layers=3, pooled_text=pooled_text))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 8, 12), torch.tensor([3.0]), torch.randn(1, 5, 16))
    assert model.flops_per_forward(8, 12, 5) == counter.get_total_flops()
