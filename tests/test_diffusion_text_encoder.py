"""The text encoder against GLM's own hidden_states[-2], its padding rules, and weight sharing."""

import pytest
import torch

from diffusion.text_encoder import GLMTextEncoder
from glm.model import GLMConfig, GLMModel


@pytest.fixture(scope="module")
def glm():
    return GLMModel(GLMConfig.from_preset("tiny")).init_weights(std=0.2, generator=torch.Generator().manual_seed(0))


def tokenize(text: str) -> list[int]:
    return [3 + (ord(c) % 300) for c in text]


def test_states_are_the_penultimate_hidden_states_left_padded_to_16(glm):
    encoder = GLMTextEncoder(glm, tokenize, pad_id=0, mask_padding=False)
    states, mask = encoder(["a dog with a hat", "cat"])
    assert states.shape == (2, 16, 64) and mask is None
    ids = torch.zeros(2, 16, dtype=torch.long)
    ids[0] = torch.tensor(tokenize("a dog with a hat"))
    ids[1, 13:] = torch.tensor(tokenize("cat"))
    with torch.no_grad():
        _, hidden = glm(ids, output_hidden_states=True)
    torch.testing.assert_close(states, hidden[-2])
    assert (states - hidden[-1]).abs().max() > 1e-3  # not the last layer
    states, _ = encoder(["x" * 17])
    assert states.shape[1] == 32


def test_masked_padding_makes_a_prompt_independent_of_its_batch(glm):
    encoder = GLMTextEncoder(glm, tokenize, pad_id=0, mask_padding=True)
    alone, alone_mask = encoder(["a red hat"])
    batched, batched_mask = encoder(["a red hat", "a much longer prompt about a small dog"])
    n = len(tokenize("a red hat"))
    assert alone_mask[0].sum() == n and batched_mask[0].sum() == n
    torch.testing.assert_close(batched[0, batched_mask[0]], alone[0, alone_mask[0]], atol=1e-5, rtol=1e-5)
    # Unmasked padding does change the states (so the check above is meaningful).
    unmasked = GLMTextEncoder(glm, tokenize, pad_id=0, mask_padding=False)
    a, _ = unmasked(["a red hat"])
    b, _ = unmasked(["a red hat", "a much longer prompt about a small dog"])
    assert (a[0, -n:] - b[0, -n:]).abs().max() > 1e-3


def test_encoder_shares_the_model_weights(glm):
    before = {name: p.data_ptr() for name, p in glm.named_parameters()}
    encoder = GLMTextEncoder(glm, tokenize, pad_id=0)
    encoder(["a dog"])
    assert encoder.model is glm
    assert {name: p.data_ptr() for name, p in encoder.model.named_parameters()} == before


def test_too_long_prompt_is_one_clear_error(glm):
    encoder = GLMTextEncoder(glm, tokenize, pad_id=0, max_length=8)
    with pytest.raises(ValueError, match="more than the limit of 8"):
        encoder(["a prompt that is far too long"])
