"""A UNet base stage, as RDM's and CogView3's base stages are: diffusers' `UNet2DConditionModel` with
cross-attention to the GLM states, behind the DiT's call signature so that `EDMDenoiser`, the losses and the
samplers take either.

It conditions like the embedded DiT does: text states whitened by statistics fixed at training start
(`set_text_statistics`), cross-attention that never attends to padding, and the masked mean of the states added to
the timestep embedding through diffusers' "projection" class embedding (SD3's pooled projection in UNet form).
`multimodal bench denoiser` compares the two at equal CPU time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from diffusion.denoiser import masked_mean, whiten, whitening_statistics


@dataclass(frozen=True)
class UNetConfig:
    text_dim: int
    in_channels: int = 3
    out_channels: int = 3
    block_channels: tuple[int, ...] = (64, 128, 192)  # per resolution: 32, 16, 8 for the 32x32 base stage
    layers_per_block: int = 1
    head_dim: int = 32

    def to_dict(self) -> dict:
        return asdict(self) | {"block_channels": list(self.block_channels)}


class UNetBackbone(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        from diffusers import UNet2DConditionModel  # imported with the class: diffusers is slow to import

        self.config = config
        depth = len(config.block_channels)
        self.unet = UNet2DConditionModel(
            in_channels=config.in_channels, out_channels=config.out_channels,
            block_out_channels=config.block_channels, layers_per_block=config.layers_per_block,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (depth - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (depth - 1) + ("UpBlock2D",),
            cross_attention_dim=config.text_dim, attention_head_dim=config.head_dim,
            class_embed_type="projection", projection_class_embeddings_input_dim=config.text_dim,
            norm_num_groups=32,
        )  # fmt: skip
        # diffusers' explicit attention: torch's fused CPU kernel is several times slower at these short sequences
        from diffusers.models.attention_processor import AttnProcessor

        self.unet.set_attn_processor(AttnProcessor())
        self.register_buffer("text_mean", torch.zeros(config.text_dim))
        self.register_buffer("text_whitening", torch.eye(config.text_dim))

    @torch.no_grad()
    def set_text_statistics(self, states: torch.Tensor, mask: torch.Tensor) -> None:
        """As `DiT.set_text_statistics`: the whitening of the real tokens of training prompts."""
        mean, whitening = whitening_statistics(states, mask)
        self.text_mean.copy_(mean)
        self.text_whitening.copy_(whitening)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor | None = None, sizes: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W], timestep [B], text [B, T, text_dim], text_mask [B, T] -> [B, C, H, W]. `sizes` is
        accepted for the DiT's signature; a UNet of one resolution has no use for it."""
        text = whiten(text, self.text_mean, self.text_whitening)  # [B, T, text_dim]
        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(x.shape[0])
        return self.unet(x, timestep, encoder_hidden_states=text, class_labels=masked_mean(text, text_mask),
                         encoder_attention_mask=text_mask).sample
