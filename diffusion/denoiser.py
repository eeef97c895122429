"""A CogView4-style diffusion transformer (DiT): one class for the base stage, the relay stage and real CogView4.

The network sees a noisy image (pixels for the embedded models, VAE latents for CogView4) and the text encoder's
hidden states, and returns an image-shaped prediction. Its parts, in the order of the data:

- text whitening (`whitened_text`, the embedded models only): the text states centred and whitened by statistics of
  training prompts, fixed before training and stored with the weights (`whitening_statistics`);
- patch embedding: p x p patches -> one linear layer; the text states get their own linear projection;
- timestep + condition embedding: sinusoidal features of the timestep and of the SDXL-style size conditions
  (original size, crop corner, target size), each through a two-layer MLP, summed, then SiLU; with `pooled_text`
  (the embedded models only; CogView4 has none) the masked mean of the text states joins the sum through its own
  MLP, as SD3's pooled projection does, so that every block's modulation knows what is asked for;
- blocks: adaLN-zero modulation (12 vectors: shift/scale/gate for attention and MLP, separately for text and image),
  joint attention over [text; image] with LayerNorm on queries and keys and 2D rotary embeddings on the image
  tokens, one GELU MLP shared by both streams;
- output: adaptive LayerNorm (scale, shift; no SiLU before its linear layer) and a linear layer back to patches.

The arithmetic is that of diffusers' `CogView4Transformer2DModel`, so its weights load through `DIFFUSERS_KEYS`
(a strict key table; q/k/v are fused into one matrix here). What the network predicts (EDM's F, or a flow-matching
velocity) is decided by the wrapper around it in `diffusion.sampling`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from kernels.attention import attention
from multimodal.checkpoint import KeyTable, Rule


@dataclass(frozen=True)
class DiTConfig:
    patch_size: int = 2                 # side of the square patch that becomes one token
    in_channels: int = 16               # 3 for pixels, the VAE's latent channels otherwise
    out_channels: int = 16
    num_layers: int = 30
    num_heads: int = 64
    head_dim: int = 40                  # a multiple of 4: half for the row rotary, half for the column rotary
    text_dim: int = 4096                # hidden size of the text encoder
    time_embed_dim: int = 512           # width of the conditioning vector that drives adaLN
    condition_dim: int = 256            # sinusoidal features per size number (6 numbers)
    rope_axes: tuple[int, int] = (256, 256)  # token rows/columns are rescaled onto this many rotary positions
    size_scale: int = 1                 # pixels per input cell, for default size conditions (8 for VAE latents)
    pooled_text: bool = False           # add the mean text state to the adaLN conditioning vector
    whitened_text: bool = False         # whiten the text states with statistics fixed at training start

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    def to_dict(self) -> dict:
        config = asdict(self)
        config["rope_axes"] = list(self.rope_axes)
        return config

    @classmethod
    def from_dict(cls, config: dict) -> DiTConfig:
        fields = {k: v for k, v in config.items() if k in cls.__dataclass_fields__}
        if "rope_axes" in fields:
            fields["rope_axes"] = tuple(fields["rope_axes"])
        return cls(**fields)


PRESETS: dict[str, DiTConfig] = {
    # THUDM's CogView4-6B transformer (16-channel latents of an f=8 VAE, GLM-4-9B text states).
    "cogview4-6b": DiTConfig(num_layers=28, num_heads=32, head_dim=128, size_scale=8),
    # Tests.
    "tiny": DiTConfig(
        patch_size=2, in_channels=3, out_channels=3, num_layers=2, num_heads=2, head_dim=8,
        text_dim=16, time_embed_dim=16, condition_dim=4,
    ),
}


def dit_config(preset: str, **overrides) -> DiTConfig:
    """A named preset with some fields replaced (e.g. `text_dim` to match the text encoder)."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown DiT preset '{preset}'; choose one of {', '.join(sorted(PRESETS))}.")
    return replace(PRESETS[preset], **overrides)


def timestep_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [cos | sin] of real numbers, frequencies from 1 down to 1/max_period."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half
    angles = values.float()[:, None] * torch.exp(exponent)[None, :]  # [N, half]
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(features, (0, dim % 2))


class MLP(nn.Module):
    """Linear -> activation -> linear."""

    def __init__(self, dim_in: int, dim_hidden: int, dim_out: int, activation: nn.Module):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim_hidden)
        self.act = activation
        self.linear_2 = nn.Linear(dim_hidden, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class PatchEmbed(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.image = nn.Linear(config.in_channels * config.patch_size**2, config.dim)
        self.text = nn.Linear(config.text_dim, config.dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(patchify(x, self.patch_size)), self.text(text)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/p * W/p, C*p*p], tokens in row-major order, features ordered (channel, row, column)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # [B, H/p, W/p, C, p, p]
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """The inverse of `patchify` for an output of h x w tokens."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h, w, -1, p, p).permute(0, 3, 1, 4, 2, 5)  # [B, C, h, p, w, p]
    return x.reshape(b, -1, h * p, w * p)


class TimeConditionEmbed(nn.Module):
    """Timestep and size conditions -> one conditioning vector per image."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.timestep_dim = config.dim
        self.condition_dim = config.condition_dim
        self.timestep = MLP(config.dim, config.time_embed_dim, config.time_embed_dim, nn.SiLU())
        self.condition = MLP(6 * config.condition_dim, config.time_embed_dim, config.time_embed_dim, nn.SiLU())

    def forward(self, timestep: torch.Tensor, sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # sizes: [B, 6] = original (h, w), crop (top, left), target (h, w)
        b = sizes.shape[0]
        size_features = timestep_embedding(sizes.reshape(-1), self.condition_dim).reshape(b, -1)  # [B, 6*cond]
        time_features = timestep_embedding(timestep, self.timestep_dim)  # [B, dim]
        return self.timestep(time_features.to(dtype)) + self.condition(size_features.to(dtype))


def whitening_statistics(states: torch.Tensor, mask: torch.Tensor, floor: float = 1e-4):
    """(mean [D], W [D, D]) so that (x - mean) @ W has identity covariance over the real tokens (`mask` [B, T]) of
    `states` [B, T, D]; eigenvalues below `floor` x the largest are raised to it. A small frozen text encoder's
    states vary mostly along a few directions (language, position), where "a dog" and "a car" look alike; whitened,
    the directions that tell prompts apart reach the denoiser at full scale."""
    real = states[mask.bool()].double()  # [tokens, D]
    mean = real.mean(0)
    eigenvalues, vectors = torch.linalg.eigh(torch.cov((real - mean).T))
    scale = eigenvalues.clamp(min=eigenvalues.max().item() * floor).rsqrt()
    return mean.float(), (vectors * scale) @ vectors.T


def whiten(text: torch.Tensor, mean: torch.Tensor, whitening: torch.Tensor) -> torch.Tensor:
    return (text - mean.to(text.dtype)) @ whitening.to(text.dtype)


def masked_mean(states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, T, D] states, [B, T] mask (True = a real token) -> [B, D] mean over the real tokens."""
    if mask is None:
        return states.mean(dim=1)
    weights = mask.to(states.dtype)[:, :, None]  # [B, T, 1]
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def rotary_tables(config: DiTConfig, rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each [rows*cols, head_dim]: the first quarter of frequencies encodes the row, the second the column.

    Token coordinates are rescaled onto `rope_axes` positions (index * axis // count), so every grid spans the
    same rotary range whatever its size.
    """
    quarter = config.head_dim // 4
    inv_freq = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float32, device=device) * 2 / (2 * quarter))
    row_pos = torch.arange(rows, device=device) * config.rope_axes[0] // rows
    col_pos = torch.arange(cols, device=device) * config.rope_axes[1] // cols
    row_freqs = torch.outer(row_pos.float(), inv_freq)[:, None, :].expand(rows, cols, quarter)
    col_freqs = torch.outer(col_pos.float(), inv_freq)[None, :, :].expand(rows, cols, quarter)
    freqs = torch.cat([row_freqs, col_freqs], dim=-1).reshape(rows * cols, 2 * quarter)  # [N, head_dim/2]
    freqs = torch.cat([freqs, freqs], dim=-1)  # [N, head_dim]
    return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + head_dim/2) of [B, heads, N, head_dim] by the angles in cos/sin [N, head_dim]."""
    first, second = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


class JointAttention(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.out = nn.Linear(config.dim, config.dim)

    def forward(
        self,
        text: torch.Tensor,
        image: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, text_len, _ = text.shape
        x = torch.cat([text, image], dim=1)  # [B, T+N, dim]
        q, k, v = self.qkv(x).reshape(b, x.shape[1], 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = F.layer_norm(q, (self.head_dim,), eps=1e-5)  # [B, heads, T+N, head_dim]
        k = F.layer_norm(k, (self.head_dim,), eps=1e-5)
        cos, sin = rotary
        # Rotary positions apply to image tokens only; text tokens carry no position here.
        q = torch.cat([q[:, :, :text_len], apply_rotary(q[:, :, text_len:], cos, sin)], dim=2)
        k = torch.cat([k[:, :, :text_len], apply_rotary(k[:, :, text_len:], cos, sin)], dim=2)
        out = attention(q, k, v, attn_mask=key_mask)  # [B, heads, T+N, head_dim]
        out = self.out(out.transpose(1, 2).reshape(b, x.shape[1], -1))
        return out[:, :text_len], out[:, text_len:]


class DiTBlock(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.dim = config.dim
        self.adaln = nn.Linear(config.time_embed_dim, 12 * config.dim)
        self.attn = JointAttention(config)
        self.mlp = nn.Module()
        self.mlp.up = nn.Linear(config.dim, 4 * config.dim)
        self.mlp.down = nn.Linear(4 * config.dim, config.dim)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.down(F.gelu(self.mlp.up(x), approximate="tanh"))

    def forward(
        self,
        text: torch.Tensor,
        image: torch.Tensor,
        cond: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Twelve [B, 1, dim] vectors; the text ("c_") and image streams are modulated separately.
        (shift_a, c_shift_a, scale_a, c_scale_a, gate_a, c_gate_a,
         shift_m, c_shift_m, scale_m, c_scale_m, gate_m, c_gate_m) = self.adaln(cond)[:, None, :].chunk(12, dim=-1)

        def norm(x):
            return F.layer_norm(x, (self.dim,), eps=1e-5)

        attn_text, attn_image = self.attn(
            norm(text) * (1 + c_scale_a) + c_shift_a, norm(image) * (1 + scale_a) + shift_a, rotary, key_mask
        )
        image = image + gate_a * attn_image
        text = text + c_gate_a * attn_text
        image = image + gate_m * self.feed_forward(norm(image) * (1 + scale_m) + shift_m)
        text = text + c_gate_m * self.feed_forward(norm(text) * (1 + c_scale_m) + c_shift_m)
        return text, image


class DiT(nn.Module):
    """The denoiser backbone: `forward(x, timestep, text, ...)` -> an image-shaped prediction."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        if config.head_dim % 4:
            raise ValueError(f"head_dim must be a multiple of 4 for the 2D rotary embedding, got {config.head_dim}.")
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.time_embed = TimeConditionEmbed(config)
        if config.pooled_text:
            self.pooled_embed = MLP(config.text_dim, config.time_embed_dim, config.time_embed_dim, nn.SiLU())
        if config.whitened_text:
            self.register_buffer("text_mean", torch.zeros(config.text_dim))
            self.register_buffer("text_whitening", torch.eye(config.text_dim))
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.num_layers))
        self.final_adaln = nn.Linear(config.time_embed_dim, 2 * config.dim)
        self.proj_out = nn.Linear(config.dim, config.patch_size**2 * config.out_channels)
        self.init_weights()

    def init_weights(self) -> None:
        """Training start: Xavier linears, and adaLN-zero (modulation and output layers at zero, so every block
        starts as the identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for linear in [block.adaln for block in self.blocks] + [self.final_adaln, self.proj_out]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    @torch.no_grad()
    def set_text_statistics(self, states: torch.Tensor, mask: torch.Tensor) -> None:
        """Fix the whitening from text states [B, T, text_dim] of training prompts (real tokens only, `mask` [B, T])."""
        mean, whitening = whitening_statistics(states, mask)
        self.text_mean.copy_(mean)
        self.text_whitening.copy_(whitening)

    def default_sizes(self, x: torch.Tensor) -> torch.Tensor:
        """Size conditions [B, 6] for an uncropped image whose original size is its size."""
        h, w = x.shape[-2] * self.config.size_scale, x.shape[-1] * self.config.size_scale
        return torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32, device=x.device).expand(x.shape[0], 6)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        x:         [B, C, H, W], H and W multiples of patch_size
        timestep:  [B] (or a scalar), on the scale the network was trained with (0..1000 for CogView4)
        text:      [B, T, text_dim] text encoder states
        text_mask: [B, T] bool, False for padding tokens, which are then never attended to; None attends to all
        sizes:     [B, 6] original (h, w), crop (top, left), target (h, w); None gives `default_sizes(x)`
        """
        b, _, h, w = x.shape
        p = self.config.patch_size
        if h % p or w % p:
            raise ValueError(f"Image size {h}x{w} is not a multiple of the patch size {p}.")
        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(b)
        if self.config.whitened_text:
            text = whiten(text, self.text_mean, self.text_whitening)  # [B, T, text_dim]
        sizes = self.default_sizes(x) if sizes is None else sizes
        cond = self.time_embed(timestep, sizes, x.dtype)  # [B, time_embed_dim]
        if self.config.pooled_text:
            cond = cond + self.pooled_embed(masked_mean(text, text_mask))
        cond = F.silu(cond)
        image, text = self.patch_embed(x, text)  # [B, N, dim], [B, T, dim]
        rotary = rotary_tables(self.config, h // p, w // p, x.device)
        key_mask = None
        if text_mask is not None:
            image_mask = torch.ones(b, image.shape[1], dtype=torch.bool, device=x.device)
            key_mask = torch.cat([text_mask.bool(), image_mask], dim=1)[:, None, None, :]  # [B, 1, 1, T+N]
        for block in self.blocks:
            text, image = block(text, image, cond, rotary, key_mask)
        scale, shift = self.final_adaln(cond)[:, None, :].chunk(2, dim=-1)
        image = F.layer_norm(image, (self.config.dim,), eps=1e-5) * (1 + scale) + shift
        return unpatchify(self.proj_out(image), p, h // p, w // p)  # [B, out_channels, H, W]

    def flops_per_forward(self, height: int, width: int, text_len: int) -> int:
        """FLOPs (2 x multiply-adds) of one forward on one image: every linear layer and both attention products."""
        cfg = self.config
        n = (height // cfg.patch_size) * (width // cfg.patch_size)
        tokens = n + text_len
        per_block = tokens * 12 * cfg.dim * cfg.dim  # qkv 3, out 1, MLP 4 + 4
        per_block += 2 * tokens * tokens * cfg.dim  # scores and weighted values
        per_block += cfg.time_embed_dim * 12 * cfg.dim  # adaLN modulation (once per image)
        embed = n * cfg.in_channels * cfg.patch_size**2 * cfg.dim + text_len * cfg.text_dim * cfg.dim
        conditioning = (cfg.dim + 6 * cfg.condition_dim + 2 * cfg.time_embed_dim) * cfg.time_embed_dim
        if cfg.pooled_text:
            conditioning += (cfg.text_dim + cfg.time_embed_dim) * cfg.time_embed_dim
        head = cfg.time_embed_dim * 2 * cfg.dim + n * cfg.dim * cfg.patch_size**2 * cfg.out_channels
        return 2 * (cfg.num_layers * per_block + embed + conditioning + head)


def _diffusers_rules() -> list[Rule]:
    rules = []
    for param in ("weight", "bias"):
        rules += [
            Rule(f"patch_embed.image.{param}", (f"patch_embed.proj.{param}",)),
            Rule(f"patch_embed.text.{param}", (f"patch_embed.text_proj.{param}",)),
            Rule(f"final_adaln.{param}", (f"norm_out.linear.{param}",)),
            Rule(f"proj_out.{param}", (f"proj_out.{param}",)),
            Rule(f"blocks.{{n}}.adaln.{param}", (f"transformer_blocks.{{n}}.norm1.linear.{param}",)),
            Rule(
                f"blocks.{{n}}.attn.qkv.{param}",
                tuple(f"transformer_blocks.{{n}}.attn1.to_{x}.{param}" for x in "qkv"),
            ),
            Rule(f"blocks.{{n}}.attn.out.{param}", (f"transformer_blocks.{{n}}.attn1.to_out.0.{param}",)),
            Rule(f"blocks.{{n}}.mlp.up.{param}", (f"transformer_blocks.{{n}}.ff.net.0.proj.{param}",)),
            Rule(f"blocks.{{n}}.mlp.down.{param}", (f"transformer_blocks.{{n}}.ff.net.2.{param}",)),
        ]
        for ours, theirs in (("timestep", "timestep_embedder"), ("condition", "condition_embedder")):
            for layer in ("linear_1", "linear_2"):
                rules.append(
                    Rule(f"time_embed.{ours}.{layer}.{param}", (f"time_condition_embed.{theirs}.{layer}.{param}",))
                )
    return rules


# diffusers' CogView4Transformer2DModel state dict -> ours (strict in both directions).
DIFFUSERS_KEYS = KeyTable(name="diffusers CogView4 transformer", rules=_diffusers_rules())


def config_from_diffusers(config: dict) -> DiTConfig:
    """Our config from the `config.json` of a diffusers CogView4Transformer2DModel."""
    return DiTConfig(
        patch_size=config.get("patch_size", 2),
        in_channels=config.get("in_channels", 16),
        out_channels=config.get("out_channels", 16),
        num_layers=config.get("num_layers", 30),
        num_heads=config.get("num_attention_heads", 64),
        head_dim=config.get("attention_head_dim", 40),
        text_dim=config.get("text_embed_dim", 4096),
        time_embed_dim=config.get("time_embed_dim", 512),
        condition_dim=config.get("condition_dim", 256),
        rope_axes=tuple(config.get("rope_axes_dim", (256, 256))),
        size_scale=8,
    )
