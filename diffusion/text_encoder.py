"""Prompts -> text states for the denoiser, from the GLM language core (as CogView4 uses GLM-4-9B).

The states are the output of the second-to-last GLM layer (transformers' `hidden_states[-2]`), or of layer
`config.text_encoder_layers` where a core was grown after its text encoder was fixed; only the layers up to there
run, never the vocabulary projection. Token ids are left-padded to a multiple of 16.

The encoder holds a reference to a `GLMModel` and copies nothing, so a process that also runs the VLM passes the
VLM's own model (`VisionLanguageModel` is a `GLMModel`; its expert layers take the language path for text) and the
GLM weights exist once.

Two padding conventions:
- `mask_padding=True` (the suite's own models): padding is invisible to GLM (attention mask, positions counted from
  the first real token) and the returned mask hides it from the denoiser too, so a prompt encodes the same whatever
  it is batched with.
- `mask_padding=False` (real CogView4 weights): as diffusers' CogView4 pipeline, the pad tokens are ordinary tokens
  for GLM and for the denoiser; the returned mask is None.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from glm.model import GLMModel, attention_mask_for


class GLMTextEncoder:
    def __init__(
        self,
        model: GLMModel,
        tokenize: Callable[[str], list[int]],
        pad_id: int,
        max_length: int = 1024,
        pad_multiple: int = 16,
        mask_padding: bool = True,
    ):
        self.model = model
        self.tokenize = tokenize
        self.tokenizer = None  # the tokenizer behind `tokenize`, where one was given (`from_tokenizer`)
        self.pad_id = pad_id
        self.max_length = max_length
        self.pad_multiple = pad_multiple
        self.mask_padding = mask_padding

    @classmethod
    def from_tokenizer(cls, model: GLMModel, tokenizer, **options) -> GLMTextEncoder:
        """With a `glm.tokenizer.GLMTokenizer`: prompts become its prefix ([gMASK] <sop>) + the plain-text ids, as
        transformers' GLM tokenizer does with special tokens on; padding uses its pad id."""
        prefix = list(tokenizer.prefix())

        def tokenize(prompt: str) -> list[int]:
            return prefix + tokenizer.encode(prompt)

        encoder = cls(model, tokenize, tokenizer.pad_id, **options)
        encoder.tokenizer = tokenizer
        return encoder

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def __call__(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """states [B, T, hidden] and mask [B, T] (True for real tokens; None when padding is not masked)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = [list(self.tokenize(prompt)) for prompt in prompts]
        for prompt, row in zip(prompts, ids):
            if len(row) > self.max_length:
                raise ValueError(
                    f"The prompt '{prompt[:40]}...' has {len(row)} tokens, more than the limit of {self.max_length}."
                )
        return self.encode_ids(ids)

    @torch.no_grad()
    def encode_ids(self, ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode token id lists (each already complete, special tokens included)."""
        longest = max(len(row) for row in ids)
        length = max(self.pad_multiple, -(-longest // self.pad_multiple) * self.pad_multiple)
        device = self.model.device
        tokens = torch.full((len(ids), length), self.pad_id, dtype=torch.long, device=device)  # [B, T]
        valid = torch.zeros(len(ids), length, dtype=torch.bool, device=device)
        for row, row_ids in enumerate(ids):
            if row_ids:
                tokens[row, length - len(row_ids):] = torch.tensor(list(row_ids), dtype=torch.long)
                valid[row, length - len(row_ids):] = True
        if self.mask_padding:
            positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)  # [0]*pad + range(n)
            mask = attention_mask_for(valid, 0, length)
        else:
            positions = torch.arange(length, device=device).expand(len(ids), length)
            mask = None
        cos, sin = self.model.rope(positions)
        x = self.model.embed(tokens)  # [B, T, hidden]
        for layer in self.model.layers[: self.model.config.encoder_layers]:
            x = layer(x, cos, sin, None, 0, mask)
        return x, (valid if self.mask_padding else None)
