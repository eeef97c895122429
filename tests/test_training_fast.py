"""The fast training loop: cached scenes and text states equal fresh ones, a bf16 step's loss stays near the float32
step's on the same batch, the explicit attention path equals a float64 reference, and the run still resumes
exactly."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from diffusion.pipeline import RelayConfig
from diffusion.text_encoder import GLMTextEncoder
from glm.model import GLMConfig, GLMModel
from kernels.attention import attention, explicit_attention, use_explicit
from multimodal.training import diffusion
from multimodal.training.data import CachedTextEncoder, SceneCache, cache_key
from multimodal.training.loop import LoopRecipe, Runtime, TrainScenes, scaled_lr, scene_pixels
from multimodal.world import DRAWING, WorldConfig, make_scene, split_seeds


def test_cached_scenes_equal_fresh_renders(tmp_path):
    world = WorldConfig(max_entities=3)
    cache = SceneCache(world, "train", 48, 12, root=tmp_path)
    again = SceneCache(world, "train", 48, 12, root=tmp_path)  # the second run reads what the first wrote
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".npy"]
    for index, seed in enumerate(split_seeds("train", 12)):
        fresh = make_scene(seed, world)
        assert cache.scenes[index] == fresh and again.scenes[index] == fresh
        assert torch.equal(again.image(index), scene_pixels(fresh, 48))
    pool = TrainScenes(12, 48, world, cached=True)
    seeds = pool.batch_seeds(random.Random(1), 5)
    assert torch.equal(pool.images(seeds), TrainScenes(12, 48, world).images(seeds))


def test_cache_key_names_world_split_size_and_count():
    keys = {cache_key(WorldConfig(), "train", 64, 100), cache_key(DRAWING, "train", 64, 100),
            cache_key(WorldConfig(), "val", 64, 100), cache_key(WorldConfig(), "train", 32, 100),
            cache_key(WorldConfig(), "train", 64, 101)}
    assert len(keys) == 5


def _tiny_encoder(generator) -> GLMTextEncoder:
    config = GLMConfig(vocab_size=300, hidden_size=32, num_layers=3, num_heads=4, num_kv_groups=2, head_dim=8,
                       ffn_hidden_size=64)
    model = GLMModel(config).init_weights(generator=generator).eval()
    return GLMTextEncoder(model, lambda prompt: [3 + ord(c) % 290 for c in prompt], pad_id=0)


def test_cached_text_states_equal_the_encoders(generator):
    encoder = _tiny_encoder(generator)
    cached = CachedTextEncoder(encoder)
    first = ["a dog with a hat", "", "一只戴着帽子的狗 on a very long line of text that passes sixteen tokens"]
    cached(first)
    prompts = ["a cat", first[0], first[2], "", "a frog wearing a cap"]  # mixed: cached, new, longer padding
    states, mask = cached(prompts)
    expected_states, expected_mask = encoder(prompts)
    assert torch.equal(mask, expected_mask) and states.shape == expected_states.shape
    torch.testing.assert_close(states[mask], expected_states[mask], rtol=1e-5, atol=1e-5)
    assert not states[~mask].any()  # padding rows are zero, and masked everywhere downstream
    with pytest.raises(ValueError, match="masks its padding"):
        CachedTextEncoder(GLMTextEncoder(encoder.model, encoder.tokenize, 0, mask_padding=False))


def _slow_attention(q, k, v, mask):
    """float64, one head at a time, the textbook formula."""
    batch, heads, length, dim = q.shape
    out = torch.zeros(batch, heads, length, dim, dtype=torch.float64)
    group = heads // k.shape[1]
    for b in range(batch):
        for h in range(heads):
            scores = q[b, h].double() @ k[b, h // group].double().T / dim**0.5
            scores = scores.masked_fill(~mask[b, 0], float("-inf"))
            out[b, h] = scores.softmax(-1) @ v[b, h // group].double()
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_explicit_attention_equals_the_textbook_formula(generator, causal):
    q = torch.randn(2, 6, 11, 8, generator=generator)
    k, v = (torch.randn(2, 3, 11, 8, generator=generator) for _ in range(2))
    if causal:
        mask = torch.ones(11, 11, dtype=torch.bool).tril().expand(2, 1, 11, 11)
        out = explicit_attention(q, k, v, is_causal=True)
    else:
        mask = torch.rand(2, 1, 1, 11, generator=generator) > 0.3
        mask[:, :, :, 0] = True  # every query sees at least one key
        mask = mask.expand(2, 1, 11, 11)
        out = explicit_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out.double(), _slow_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)
    bf16 = explicit_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=mask, is_causal=causal)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.double(), _slow_attention(q, k, v, mask), rtol=0.05, atol=0.05)


def test_attention_dispatch_takes_the_explicit_path_only_for_short_cpu_bf16(generator):
    q = torch.randn(1, 2, 5, 8, generator=generator)
    k, v = torch.randn(1, 2, 5, 8, generator=generator), torch.randn(1, 2, 5, 8, generator=generator)
    assert not use_explicit(q, k)  # float32: torch's fused kernel
    assert use_explicit(q.bfloat16(), k.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert use_explicit(q, k)
    long_q = torch.randn(1, 2, 600, 8)
    assert not use_explicit(long_q.bfloat16(), long_q.bfloat16())
    # Both paths give SDPA's answer.
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(attention(q, k, v, is_causal=True), expected)
    torch.testing.assert_close(attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True).float(), expected,
                               rtol=0.03, atol=0.03)


def test_bf16_step_loss_is_near_the_float32_step_loss(tmp_path, generator):
    """One diffusion batch, the same weights, noise and prompts: the bf16 autocast loss is within 3% of float32's
    (bf16 keeps 8 bits of mantissa; the loss is a mean over 3 x 64 x 64 pixels, so the rounding mostly averages
    out)."""
    encoder = _tiny_encoder(generator)
    stages = diffusion.Stages(diffusion.stage_configs(encoder.hidden_size))
    pool = TrainScenes(8, 64, DRAWING)
    step_loss = diffusion.diffusion_step_loss(stages, CachedTextEncoder(encoder), pool, RelayConfig(), 0, 4)
    float_loss, float_parts = step_loss(7)
    with Runtime("cpu", torch.bfloat16).context():
        bf16_loss, bf16_parts = step_loss(7)
    assert float_parts.keys() == bf16_parts.keys() >= {"base", "relay", "single"}
    assert abs(bf16_loss.item() - float_loss.item()) <= 0.03 * float_loss.item()
    float_loss.backward()
    assert all(p.grad is not None for p in stages.parameters() if p.requires_grad)


def test_prompt_gap_is_zero_for_a_model_that_ignores_its_prompt(generator):
    """The prompt gap compares the loss under shuffled and true prompts at the same noise: for a denoiser that does
    not read its prompt the two losses are the same."""

    def blind(x, sigma, **cond):
        return x / (1 + sigma[:, None, None, None] ** 2)

    images = torch.rand(4, 3, 8, 8, generator=generator) * 2 - 1
    cond = {"text": torch.randn(4, 5, 6, generator=generator), "text_mask": torch.ones(4, 5, dtype=torch.bool)}
    assert diffusion.prompt_gap(blind, images, cond, seed=3) == pytest.approx(0, abs=1e-6)

    def reads_prompt(x, sigma, text, text_mask):
        return x / (1 + sigma[:, None, None, None] ** 2) + text.mean((1, 2))[:, None, None, None]

    assert diffusion.prompt_gap(reads_prompt, images, cond, seed=3) != pytest.approx(0, abs=1e-3)


def test_larger_batches_scale_the_learning_rate_linearly_and_keep_warmup_in_samples():
    recipe = LoopRecipe(base_batch=16, base_lr=1e-3, fast_batch=64)
    reference, fast = recipe.settings("reference"), recipe.settings("fast")
    assert reference.batch_size == 16 and reference.lr == 1e-3 and reference.runtime == Runtime()
    assert fast.batch_size == 64 and fast.lr == pytest.approx(4e-3) and fast.cached
    assert scaled_lr(1e-3, 16) == 1e-3
    assert reference.schedule(100, 3200).warmup == 200 and fast.schedule(100, 3200).warmup == 50
    with pytest.raises(ValueError, match="Unknown training loop"):
        recipe.settings("turbo")
