"""Vision features -> language-model embeddings: optional 2x2 conv, the GLU projector, learned boi/eoi.

- CogVLM: GLU only.  CogVLM2: a 2x2 stride-2 conv (vision width -> vision width) first, 4x fewer tokens.
  GLM-4V: the conv maps straight to the LM width, and the whole output (boi/eoi included) is divided by
  `scaling_factor`.
- GLU: `linear_proj (no bias) -> LayerNorm -> GELU -> silu(gate_proj(x)) * dense_h_to_4h(x) -> dense_4h_to_h`.
- The output is `[boi, patches..., eoi]`: `[B, tokens + 2, hidden]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AdapterConfig:
    vision_width: int = 1792
    hidden: int = 4096  # language-model width
    ffn: int = 11008  # GLU inner width
    conv_width: int | None = None  # output channels of the 2x2 stride-2 conv; None = no conv
    scaling_factor: float = 1.0  # GLM-4V divides the image embeddings by this
    norm_eps: float = 1e-5

    @property
    def glu_in(self) -> int:
        return self.conv_width or self.vision_width

    def num_tokens(self, grid: int) -> int:
        """Image embeddings (boi + patches + eoi) for a ViT output grid of grid x grid patches."""
        side = grid // 2 if self.conv_width else grid
        return side * side + 2


class GLU(nn.Module):
    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.linear_proj = nn.Linear(config.glu_in, config.hidden, bias=False)
        self.norm = nn.LayerNorm(config.hidden, eps=config.norm_eps)
        self.gate_proj = nn.Linear(config.hidden, config.ffn, bias=False)
        self.up_proj = nn.Linear(config.hidden, config.ffn, bias=False)
        self.down_proj = nn.Linear(config.ffn, config.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm(self.linear_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Adapter(nn.Module):
    """patch features [B, g*g, vision_width] -> image embeddings [B, num_tokens(g), hidden]."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        self.conv = (
            nn.Conv2d(config.vision_width, config.conv_width, kernel_size=2, stride=2) if config.conv_width else None
        )
        self.glu = GLU(config)
        self.boi = nn.Parameter(torch.empty(1, 1, config.hidden))
        self.eoi = nn.Parameter(torch.empty(1, 1, config.hidden))
        nn.init.normal_(self.boi, std=0.02)
        nn.init.normal_(self.eoi, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, patches, width = features.shape
        if self.conv is not None:
            grid = round(patches**0.5)
            if grid * grid != patches or grid % 2:
                raise ValueError(f"The 2x2 conv needs an even square patch grid; got {patches} patches.")
            x = features.view(batch, grid, grid, width).permute(0, 3, 1, 2)  # [B, Wv, g, g]
            features = self.conv(x).flatten(2).transpose(1, 2)  # [B, (g/2)^2, conv_width]
        x = self.glu(features)  # [B, n, hidden]
        boi = self.boi.expand(batch, -1, -1).to(x.dtype)
        eoi = self.eoi.expand(batch, -1, -1).to(x.dtype)
        x = torch.cat([boi, x, eoi], dim=1)  # [B, n + 2, hidden]
        if self.config.scaling_factor != 1.0:
            x = x / self.config.scaling_factor
        return x
