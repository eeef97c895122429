"""The image encoder: an EVA2-CLIP-style vision transformer, or an open_clip vision tower.

EVA2-CLIP-E as CogVLM, CogVLM2 and GLM-4V use it:
- conv patch embedding (kernel = stride = patch, with bias), a CLS token, learned absolute position embeddings
  (bicubically interpolated when the input size differs from the trained one);
- post-sub-layer-norm blocks: `x = x + attn_norm(attn(x)); x = x + mlp_norm(mlp(x))` (the norm is applied to the
  sub-layer's output, not its input); full bidirectional attention, exact GELU, biases everywhere;
- no final norm; the CLS token is dropped at the output, so the result is `[B, grid*grid, width]`.

`OpenClipTower` wraps any open_clip vision transformer (built offline, no pretrained download) behind the same
interface, so a user's CLIP tower can feed the adapter instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.attention import attention
from multimodal.checkpoint import check_state_dict
from multimodal.image import CLIP_MEAN, CLIP_STD


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 490  # trained input side; other sizes interpolate the position table
    patch_size: int = 14
    width: int = 1792
    depth: int = 63
    heads: int = 16
    mlp_dim: int = 15360
    norm_eps: float = 1e-6
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    conv_stem: int = 0  # > 0: that many 3x3 stride-2 convs instead of the patchifying conv (patch = 2**conv_stem)

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}.")
        if self.conv_stem and 2**self.conv_stem != self.patch_size:
            raise ValueError(f"A {self.conv_stem}-conv stem makes {2**self.conv_stem}-pixel patches, "
                             f"not {self.patch_size}.")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by {self.heads} heads.")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid * self.grid + 1  # + CLS


_EVA2_CLIP_E = dict(patch_size=14, width=1792, depth=63, heads=16, mlp_dim=15360)
VIT_PRESETS: dict[str, ViTConfig] = {
    "eva2-clip-e-490": ViTConfig(image_size=490, **_EVA2_CLIP_E),  # CogVLM: 35x35 patches
    "eva2-clip-e-1344": ViTConfig(image_size=1344, **_EVA2_CLIP_E),  # CogVLM2: 96x96 patches
    "eva2-clip-e-1120": ViTConfig(image_size=1120, **_EVA2_CLIP_E),  # GLM-4V: 80x80 patches
    "small": ViTConfig(image_size=128, patch_size=16, width=192, depth=6, heads=3, mlp_dim=768),
    "tiny": ViTConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2, mlp_dim=64),
}


def vit_config(name: str) -> ViTConfig:
    if name not in VIT_PRESETS:
        raise ValueError(f"Unknown ViT preset '{name}'; choose one of {', '.join(VIT_PRESETS)}.")
    return VIT_PRESETS[name]


class ViTAttention(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width)  # q | k | v, each head-major
        self.dense = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads)  # [B, L, 3, H, D]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, D]
        out = attention(q, k, v)  # [B, H, L, D]
        return self.dense(out.transpose(1, 2).reshape(batch, length, width))


class ViTMLP(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.attn = ViTAttention(config)
        self.attn_norm = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.mlp = ViTMLP(config)
        self.mlp_norm = nn.LayerNorm(config.width, eps=config.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Post-sub-layer norm: the norm sees the sub-layer's output, the residual stream is never normalized.
        x = x + self.attn_norm(self.attn(x))
        return x + self.mlp_norm(self.mlp(x))


class ConvStem(nn.Module):
    """Early convolutions (Xiao et al. 2021, "Early Convolutions Help Transformers See Better") in place of the
    patchifying conv: 3x3 stride-2 convs with GELU, channels doubling up to the width, then a 1x1 projection. Same
    output grid, but each token starts from local features, which a small ViT trained from scratch learns far
    faster than from raw 8x8 pixel patches."""

    def __init__(self, layers: int, width: int):
        super().__init__()
        channels = [3] + [width // 2 ** (layers - i) for i in range(1, layers + 1)]  # e.g. 3, 32, 64, 128
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1) for c_in, c_out in zip(channels, channels[1:])
        )
        self.proj = nn.Conv2d(width, width, kernel_size=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels
        for conv in self.convs:
            x = F.gelu(conv(x))  # [B, C, S / 2^i, S / 2^i]
        return self.proj(x)  # [B, W, g, g]


class VisionTransformer(nn.Module):
    """pixels [B, 3, S, S] (S a multiple of the patch) -> patch features [B, (S/patch)^2, width], CLS dropped."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.patch_embed = (
            ConvStem(config.conv_stem, config.width) if config.conv_stem
            else nn.Conv2d(3, config.width, kernel_size=config.patch_size, stride=config.patch_size)
        )  # fmt: skip
        self.cls_token = nn.Parameter(torch.empty(1, config.width))
        self.pos_embed = nn.Embedding(config.num_positions, config.width)
        self.blocks = nn.ModuleList(ViTBlock(config) for _ in range(config.depth))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embed.weight, std=0.02)

    @property
    def width(self) -> int:
        return self.config.width

    def output_grid(self, image_size: int) -> int:
        return image_size // self.config.patch_size

    def positions(self, grid: int) -> torch.Tensor:
        """The position table for a grid x grid input: [1 + grid*grid, width], interpolated when grid differs."""
        table = self.pos_embed.weight
        trained = self.config.grid
        if grid == trained:
            return table
        patches = table[1:].float().view(1, trained, trained, -1).permute(0, 3, 1, 2)  # [1, W, g, g]
        patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
        patches = patches.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(table.dtype)  # [grid*grid, W]
        return torch.cat([table[:1], patches], dim=0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-1] != pixels.shape[-2] or pixels.shape[-1] % self.config.patch_size:
            raise ValueError(
                f"Images must be square with a side that is a multiple of {self.config.patch_size}; "
                f"got {pixels.shape[-2]}x{pixels.shape[-1]}."
            )
        x = self.patch_embed(pixels.to(self.pos_embed.weight.dtype))  # [B, W, g, g]
        grid = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)  # [B, g*g, W]
        cls = self.cls_token.expand(x.shape[0], 1, -1)  # [B, 1, W]
        x = torch.cat([cls, x], dim=1) + self.positions(grid)  # [B, 1 + g*g, W]
        for block in self.blocks:
            x = block(x)
        return x[:, 1:]  # [B, g*g, W]


class OpenClipTower(nn.Module):
    """An open_clip vision transformer (ViT or timm EVA config) used as the VLM's image encoder.

    Built from an open_clip model name (`"ViT-B-16"`, `"EVA02-B-16"`, ...) or from a `vision_cfg` dict with
    `pretrained=None` (nothing is downloaded). The output is the last block's patch tokens after the tower's final
    norm, CLS dropped: `[B, grid*grid, width]`.
    """

    def __init__(
        self,
        model_name: str | None = None,
        vision_cfg: Mapping | None = None,
        embed_dim: int = 512,
        mean: tuple[float, float, float] = CLIP_MEAN,  # the normalization the user's weights were trained with
        std: tuple[float, float, float] = CLIP_STD,
    ):
        super().__init__()
        import open_clip  # optional tower: importing open_clip (and timm) costs seconds
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        if (model_name is None) == (vision_cfg is None):
            raise ValueError("Give exactly one of an open_clip model name or a vision_cfg dict.")
        if model_name is not None:
            model_cfg = open_clip.get_model_config(model_name)
            if model_cfg is None:
                raise ValueError(f"open_clip has no model config named '{model_name}'.")
            vision_cfg, embed_dim = model_cfg["vision_cfg"], model_cfg["embed_dim"]
        fields = {k: v for k, v in dict(vision_cfg).items() if k != "timm_model_pretrained"}
        cfg = CLIPVisionCfg(**fields, timm_model_pretrained=False)
        self.visual = _build_vision_tower(embed_dim, cfg)
        self.image_size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        self.patch_size = self._patch_size()
        self.mean, self.std = tuple(mean), tuple(std)
        self.width = self._probe_width()

    def _patch_size(self) -> int:
        patch = getattr(self.visual, "patch_size", None)
        if patch is None:  # timm trunk
            patch = self.visual.trunk.patch_embed.patch_size
        return patch if isinstance(patch, int) else patch[0]

    def _probe_width(self) -> int:
        trunk = getattr(self.visual, "trunk", None)
        return trunk.embed_dim if trunk is not None else self.visual.transformer.width

    def output_grid(self, image_size: int) -> int:
        return image_size // self.patch_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.visual.forward_intermediates(
            pixels, indices=1, normalize_intermediates=True, intermediates_only=True, output_fmt="NLC"
        )
        return out["image_intermediates"][-1]  # [B, g*g, width]

    def load_open_clip_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Strictly load a user's open_clip weights: a whole CLIP state dict (`visual.*` keys are taken, a DDP
        `module.` prefix is stripped) or the vision tower's own."""
        keys = {k.removeprefix("module."): k for k in state}
        if any(k.startswith("visual.") for k in keys):
            tensors = {k.removeprefix("visual."): state[orig] for k, orig in keys.items() if k.startswith("visual.")}
        else:
            tensors = {k: state[orig] for k, orig in keys.items()}
        check_state_dict(self.visual, tensors)
        self.visual.load_state_dict(tensors, strict=True)

