"""Generation with an image: an expert-routed prefill, then GLM's own decode step, sampling and stop rules.

Only the prefill differs from `glm/generate.py`: it splices the image embeddings in and routes the image span through
the visual expert. Every decode step feeds language tokens, so it is `glm.generate.decode_one_token` unchanged (the
language expert only). Image embeddings may be passed in, so a conversation encodes its image once.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from glm.generate import SamplingConfig, decode_steps
from vlm.model import LANGUAGE, VisionLanguageModel
from vlm.processor import VLMInputs


def prefill(model: VisionLanguageModel, inputs: VLMInputs, image_embeds: torch.Tensor | None, cache) -> torch.Tensor:
    """Run the prompts (with their image) once, filling cache slots [0, T); return the last logits [B, V]."""
    mask = inputs.attention_mask if inputs.padded else None
    logits = model(inputs.input_ids, image_embeds=image_embeds, image_start=inputs.image_start,
                   positions=inputs.positions, cache=cache, attention_mask=mask, last_only=True)
    return logits[:, -1].float()


@torch.inference_mode()
def generate_tokens(model: VisionLanguageModel, inputs: VLMInputs, config: SamplingConfig,
                    image_embeds: torch.Tensor | None = None) -> Iterator[list]:
    """Stream one list per step with every row's new token, None for rows that stopped (as glm.generate)."""
    inputs = inputs.to(model.device)
    if image_embeds is None and inputs.pixels is not None:
        image_embeds = model.encode_image(inputs.pixels)
    batch, width = inputs.input_ids.shape
    max_new = max(0, min(config.max_new_tokens, model.config.max_seq_len - width))
    if max_new == 0:
        return
    cache = model.allocate_cache(batch, width + max_new)
    valid = None
    if inputs.padded:
        valid = torch.cat([inputs.attention_mask, inputs.attention_mask.new_ones(batch, max_new)], dim=1)
    generators = None
    if not config.greedy:
        generators = [torch.Generator(model.device).manual_seed(config.seed + row) for row in range(batch)]
    seen = None
    if config.repetition_penalty != 1.0:
        seen = torch.zeros(batch, model.config.vocab_size, dtype=torch.bool, device=model.device)
        seen.scatter_(1, inputs.input_ids, inputs.attention_mask & (inputs.token_types == LANGUAGE))
    next_position = inputs.positions[:, -1] + 1  # [B]; every row ends at the last column
    logits = prefill(model, inputs, image_embeds, cache)
    yield from decode_steps(model, logits, config, generators, seen, next_position, width, cache, valid, max_new)


def generate(model: VisionLanguageModel, inputs: VLMInputs, config: SamplingConfig,
             image_embeds: torch.Tensor | None = None) -> list[list[int]]:
    """Generated token ids per row (stop tokens excluded)."""
    outputs: list[list[int]] = [[] for _ in range(inputs.input_ids.shape[0])]
    for step in generate_tokens(model, inputs, config, image_embeds):
        for row, token in enumerate(step):
            if token is not None:
                outputs[row].append(token)
    return outputs
