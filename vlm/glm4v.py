"""GLM-4.1V-Thinking and GLM-4.6V-Flash (transformers' `Glm4vForConditionalGeneration`), as their authors run them.

Vision: pixel patches (14x14, two frames per image: a still image is its own second frame) -> a linear patch
embedding -> RMSNorm -> + learned absolute positions resampled bicubically to the image's patch grid -> blocks with 2D
rotary attention inside each image -> RMSNorm -> a 2x2 merge (a stride-2 convolution) -> a SwiGLU merger into the
language model's width. Language: GLM-4 blocks with two extra norms (after attention and after the MLP, before each
residual add) and 3D rotary positions: each rotary frequency takes its angle from the temporal, height or width
position of the token (`mrope_section` frequencies each), where text tokens have all three equal and an image's tokens
their grid coordinates. The next text after an image continues at max(height, width) / 2 positions past its start.

`Glm4vConfig.from_transformers(config.json)` reads every size; `load_glm4v(folder)` loads a transformers folder
strictly (q/k/v are fused into one projection, names mapped by `KEYS`). Inputs are what transformers' processor
gives: `input_ids` with one image-token per merged patch, `pixel_values` [patches, 3 * 2 * 14 * 14] with the patches
of each 2x2 block consecutive, and `image_grid_thw` [images, 3].
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from glm.model import GLMAttention, GLMConfig, KVCache, RMSNorm, SwiGLU, attention_mask_for
from multimodal.checkpoint import CheckpointError, build_on_meta, load_into, read_state_dict


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 24
    hidden_size: int = 1536
    num_heads: int = 12
    intermediate_size: int = 13696  # the merger's SwiGLU width
    out_hidden_size: int = 4096  # the language model's width
    image_size: int = 336  # the learned position table covers (image_size / patch_size)^2 positions
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    attention_bias: bool = False
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_layers: int = 40
    num_heads: int = 32
    num_kv_heads: int = 2
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    mrope_section: tuple[int, ...] = (8, 12, 12)
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads  # as transformers' Glm4vTextAttention, whatever config.head_dim says

    def glm_config(self) -> GLMConfig:
        """The attention and MLP shapes in the GLM core's terms (its rope settings are unused here)."""
        return GLMConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
                         num_heads=self.num_heads, num_kv_groups=self.num_kv_heads, head_dim=self.head_dim,
                         ffn_hidden_size=self.intermediate_size, norm_eps=self.rms_norm_eps,
                         max_seq_len=self.max_position_embeddings)


@dataclass(frozen=True)
class Glm4vConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151343
    image_start_token_id: int = 151339
    image_end_token_id: int = 151340
    tie_word_embeddings: bool = False

    @classmethod
    def from_transformers(cls, values: dict) -> Glm4vConfig:
        """From a transformers `config.json` (model_type "glm4v" or "glm46v"); rope settings in transformers 5's
        `rope_parameters` or the older `rope_theta` / `partial_rotary_factor` / `rope_scaling`."""
        if values.get("model_type") not in ("glm4v", "glm46v"):
            raise CheckpointError(f"config.json has model_type {values.get('model_type')!r}; GLM-4.1V / 4.6V folders "
                                  "have 'glm4v' or 'glm46v'.")
        text, vision = values.get("text_config", {}), values.get("vision_config", {})
        rope = dict(text.get("rope_parameters") or {})
        for name in ("rope_theta", "partial_rotary_factor"):
            if name in text:
                rope.setdefault(name, text[name])
        rope.update({k: v for k, v in (text.get("rope_scaling") or {}).items() if k == "mrope_section"})
        if rope.get("rope_type", "default") != "default":
            raise CheckpointError(f"The language model's rope_type is {rope['rope_type']!r}; only 'default' is known.")
        vision_rope = vision.get("rope_parameters") or {}
        known_text = {f: text[f] for f in ("vocab_size", "hidden_size", "intermediate_size", "rms_norm_eps",
                                           "max_position_embeddings") if f in text}
        text_config = TextConfig(
            **known_text, num_layers=text.get("num_hidden_layers", 40), num_heads=text.get("num_attention_heads", 32),
            num_kv_heads=text.get("num_key_value_heads") or text.get("num_attention_heads", 32),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            partial_rotary_factor=float(rope.get("partial_rotary_factor", 1.0)),
            mrope_section=tuple(rope.get("mrope_section", (8, 12, 12))),
        )
        known_vision = {f: vision[f] for f in ("depth", "hidden_size", "num_heads", "intermediate_size",
                                               "out_hidden_size", "image_size", "patch_size", "temporal_patch_size",
                                               "spatial_merge_size", "in_channels", "attention_bias",
                                               "rms_norm_eps") if f in vision}
        vision_config = VisionConfig(**known_vision, rope_theta=float(vision_rope.get("rope_theta", 10000.0)))
        if vision.get("hidden_act", "silu") != "silu" or text.get("hidden_act", "silu") != "silu":
            raise CheckpointError("Only the SiLU activation of the published GLM-4.1V / 4.6V models is supported.")
        if vision_config.out_hidden_size != text_config.hidden_size:
            raise CheckpointError(f"The vision tower's out_hidden_size {vision_config.out_hidden_size} differs from "
                                  f"the language model's hidden_size {text_config.hidden_size}.")
        ids = {f: values[f] for f in ("image_token_id", "image_start_token_id", "image_end_token_id") if f in values}
        return cls(text_config, vision_config, **ids, tie_word_embeddings=values.get("tie_word_embeddings", False))


# ----------------------------------------------------------------------------------------------------------------
# Vision tower


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """x [N, C] (the patches of all images); attention stays inside each image (`lengths` patches each)."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(1)  # [N, H, D] each
        cos, sin = cos[:, None], sin[:, None]  # [N, 1, D]
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
        outputs = [F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in chunk))[0].transpose(0, 1)
                   for chunk in zip(q.split(lengths), k.split(lengths), v.split(lengths))]  # [n, H, D] per image
        return self.proj(torch.cat(outputs).flatten(1))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm2 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = VisionAttention(config)
        self.mlp = GatedMLP(config.hidden_size, config.out_hidden_size)

    def forward(self, x, cos, sin, lengths):
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with separate projections, as the vision tower stores them."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PatchMerger(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)
        self.post_projection_norm = nn.LayerNorm(dim)
        self.mlp = GatedMLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(F.gelu(self.post_projection_norm(self.proj(x))))


class VisionTower(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        grid = config.image_size // config.patch_size
        patch_dims = (config.hidden_size, config.in_channels, config.temporal_patch_size, config.patch_size,
                      config.patch_size)
        self.patch_weight = nn.Parameter(torch.empty(patch_dims))  # a Conv3d whose kernel is the patch: a matmul
        self.patch_bias = nn.Parameter(torch.empty(config.hidden_size))
        self.post_conv_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.position_embedding = nn.Embedding(grid * grid, config.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.post_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        merge = config.spatial_merge_size
        self.downsample = nn.Conv2d(config.hidden_size, config.out_hidden_size, merge, stride=merge)
        self.merger = PatchMerger(config.out_hidden_size, config.intermediate_size)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)build the rotary frequencies; called after loading weights into a model built on the meta device."""
        device = self.patch_bias.device if self.patch_bias.device.type != "meta" else torch.device("cpu")
        dim = self.config.hidden_size // self.config.num_heads // 2  # half the head for rows, half for columns
        inv_freq = 1.0 / self.config.rope_theta ** (torch.arange(0, dim, 2, device=device).float() / dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def patch_positions(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """(row, column) [N, 2] of every patch, in the processor's order: 2x2 merge blocks, each block's patches
        consecutive, repeated for each frame."""
        merge = self.config.spatial_merge_size
        positions = []
        for t, h, w in grid_thw.tolist():
            rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            blocks = (h // merge, merge, w // merge, merge)
            rows, cols = (a.reshape(blocks).transpose(1, 2).flatten() for a in (rows, cols))
            positions.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
        return torch.cat(positions).to(self.inv_freq.device)

    def resampled_positions(self, positions: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """The learned position table, sampled bicubically at each patch's centre on its image's grid [N, C]."""
        table = self.position_embedding.weight
        grid = int(table.shape[0] ** 0.5)
        image = table.view(grid, grid, -1).permute(2, 0, 1)[None].float()  # [1, C, grid, grid]
        centres = (positions.float() + 0.5) / sizes.float() * 2 - 1  # [N, 2] (row, column) in [-1, 1]
        where = centres.flip(-1)[None, :, None]  # [1, N, 1, 2] as (x, y)
        sampled = F.grid_sample(image, where, mode="bicubic", align_corners=False, padding_mode="border")
        return sampled[0, :, :, 0].T.to(table.dtype)  # [N, C]

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C * T * P * P], grid_thw [images, 3] -> merged embeddings [N / merge^2, out_hidden]."""
        x = F.linear(pixel_values.to(self.patch_weight.dtype), self.patch_weight.flatten(1), self.patch_bias)
        x = self.post_conv_layernorm(x)  # [N, C]
        positions = self.patch_positions(grid_thw)  # [N, 2]
        lengths = (grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).tolist()
        sizes = torch.repeat_interleave(grid_thw[:, 1:].to(positions.device), torch.tensor(lengths), dim=0)
        x = x + self.resampled_positions(positions, sizes)
        angles = positions[..., None].float() * self.inv_freq  # [N, 2, D/4]
        angles = torch.cat([angles[:, 0], angles[:, 1]], dim=-1).repeat(1, 2)  # [N, D]
        cos, sin = angles.cos(), angles.sin()
        for block in self.blocks:
            x = block(x, cos, sin, lengths)
        merge = self.config.spatial_merge_size
        x = self.post_layernorm(x).view(-1, merge, merge, x.shape[-1]).permute(0, 3, 1, 2)  # [N/m^2, C, m, m]
        return self.merger(self.downsample(x).flatten(1))


# ----------------------------------------------------------------------------------------------------------------
# Language model


class TextBlock(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        glm = config.glm_config()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = GLMAttention(glm)
        self.post_self_attn_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.post_mlp_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, cache=None, cache_start=0, mask=None):
        x = x + self.post_self_attn_layernorm(self.attn(self.input_layernorm(x), cos, sin, cache, cache_start, mask))
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class Glm4vModel(nn.Module):
    def __init__(self, config: Glm4vConfig):
        super().__init__()
        self.config = config
        text = config.text
        self.visual = VisionTower(config.vision)
        self.embed = nn.Embedding(text.vocab_size, text.hidden_size)
        self.layers = nn.ModuleList(TextBlock(text) for _ in range(text.num_layers))
        self.final_norm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.output = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        rotary = int(text.head_dim * text.partial_rotary_factor)
        if sum(text.mrope_section) != rotary // 2:
            raise CheckpointError(f"mrope_section {list(text.mrope_section)} does not add up to the {rotary // 2} "
                                  "rotary frequencies of a head.")
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)build the rotary frequencies; called after loading weights into a model built on the meta device."""
        text = self.config.text
        device = self.embed.weight.device if self.embed.weight.device.type != "meta" else torch.device("cpu")
        rotary = int(text.head_dim * text.partial_rotary_factor)
        inv_freq = 1.0 / text.rope_theta ** (torch.arange(0, rotary, 2, device=device).float() / rotary)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # frequency i takes its angle from one axis: the sections in order, cycling temporal, height, width
        axes = [torch.full((size,), i % 3, device=device) for i, size in enumerate(text.mrope_section)]
        self.register_buffer("frequency_axis", torch.cat(axes), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, T, R/2] for 3D positions [3, B, T]."""
        angles = positions[..., None].float() * self.inv_freq  # [3, B, T, R/2]
        index = self.frequency_axis.view(1, 1, 1, -1).expand(1, *angles.shape[1:])
        chosen = angles.gather(0, index)[0]  # [B, T, R/2]: each frequency at its own axis's position
        dtype = self.embed.weight.dtype  # transformers casts the table to the activations' dtype
        return chosen.cos().to(dtype)[:, None], chosen.sin().to(dtype)[:, None]

    def positions(self, input_ids: torch.Tensor, grid_thw: torch.Tensor | None,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """3D rotary positions [3, B, T]: text counts up on all axes; an image's tokens take (start, start + row,
        start + column), and the text after it continues at start + max(rows, columns). Left padding (0 in
        `attention_mask`) gets position 0 and is not counted."""
        merge = self.config.vision.spatial_merge_size
        grids = iter(grid_thw.tolist() if grid_thw is not None else [])
        result = []
        for row_index, row in enumerate(input_ids.tolist()):
            padding = 0 if attention_mask is None else int((attention_mask[row_index] == 0).sum())
            axes, current, index = [torch.zeros(3, padding, dtype=torch.long)], 0, padding
            while index < len(row):
                if row[index] != self.config.image_token_id:
                    axes.append(torch.full((3, 1), current))
                    current, index = current + 1, index + 1
                    continue
                t, h, w = next(grids)
                h, w = h // merge, w // merge
                grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
                axes.append(grid.reshape(3, -1) + current)
                current, index = current + max(h, w), index + t * h * w
            result.append(torch.cat(axes, dim=1))
        return torch.stack(result, dim=1).to(input_ids.device)  # [3, B, T]

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                     grid_thw: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with each image-token replaced by its merged patch embedding [B, T, C]."""
        x = self.embed(input_ids)
        if pixel_values is None:
            return x
        images = self.visual(pixel_values, grid_thw).to(x.dtype)  # [tokens, C]
        slots = input_ids == self.config.image_token_id
        if int(slots.sum()) != images.shape[0]:
            raise ValueError(f"The prompt has {int(slots.sum())} image tokens for {images.shape[0]} image patches.")
        return x.masked_scatter(slots[..., None], images)

    def allocate_cache(self, batch_size: int, max_len: int) -> list[KVCache]:
        """One static cache per layer, sized from each layer's (possibly tensor-parallel-local) KV groups."""
        return [KVCache(batch_size, layer.attn.num_kv_groups, max_len, layer.attn.head_dim, self.embed.weight.dtype,
                        self.device) for layer in self.layers]

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, *, input_embeds: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: list[KVCache] | None = None, cache_start: int = 0,
                attention_mask: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] (or [B, 1, V]). positions [3, B, T] default to `positions(input_ids, image_grid_thw)`;
        attention_mask [B, cache_start + T] marks real tokens (None: no padding)."""
        x = self.embed_inputs(input_ids, pixel_values, image_grid_thw) if input_embeds is None else input_embeds
        if positions is None:
            positions = self.positions(input_ids, image_grid_thw, attention_mask)
        cos, sin = self.rope(positions)
        mask = attention_mask_for(attention_mask, cache_start, x.shape[1])
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache[index] if cache is not None else None, cache_start, mask)
        x = self.final_norm(x[:, -1:] if last_only else x)
        return self.output(x)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


VISION_RENAMES = (("patch_embed.proj.weight", "patch_weight"), ("patch_embed.proj.bias", "patch_bias"),
                  ("embeddings.position_embedding", "position_embedding"), ("merger.gate_proj", "merger.mlp.gate_proj"),
                  ("merger.up_proj", "merger.mlp.up_proj"), ("merger.down_proj", "merger.mlp.down_proj"))
TEXT_RENAMES = (("embed_tokens", "embed"), ("self_attn.o_proj", "attn.dense"), ("mlp.gate_up_proj", "mlp.gate_up"),
                ("mlp.down_proj", "mlp.down"))


def convert_transformers_state(state) -> dict[str, torch.Tensor]:
    """A transformers `Glm4vForConditionalGeneration` state dict in our names, q/k/v fused into one projection."""
    out = {}
    for key in list(state.keys()):
        name = key.removeprefix("model.")
        if name.startswith("visual."):
            for old, new in VISION_RENAMES:
                name = name.replace(old, new)
            out[name] = state[key]
        elif name == "lm_head.weight":
            out["output.weight"] = state[key]
        elif name == "language_model.norm.weight":
            out["final_norm.weight"] = state[key]
        elif ".self_attn.q_proj." in name:
            prefix, suffix = key.split(".self_attn.q_proj.")
            fused = [state[f"{prefix}.self_attn.{part}_proj.{suffix}"] for part in "qkv"]
            layer = prefix.removeprefix("model.").removeprefix("language_model.")
            out[f"{layer}.attn.qkv.{suffix}"] = torch.cat(fused)
        elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue  # fused with q
        elif name.startswith("language_model."):
            name = name.removeprefix("language_model.")
            for old, new in TEXT_RENAMES:
                name = name.replace(old, new)
            out[name] = state[key]
        else:
            raise CheckpointError(f"Unexpected key {key!r} in a GLM-4.1V checkpoint.")
    return out


def read_glm4v_checkpoint(folder: str | Path) -> tuple[Glm4vConfig, dict[str, torch.Tensor]]:
    """(config, state dict in our names) of a transformers Glm4vForConditionalGeneration folder."""
    folder = Path(folder)
    config = Glm4vConfig.from_transformers(json.loads((folder / "config.json").read_text()))
    state = convert_transformers_state(read_state_dict(folder))
    if config.tie_word_embeddings and "output.weight" not in state:
        state["output.weight"] = state["embed.weight"]
    return config, state


def load_glm4v(folder: str | Path, dtype: torch.dtype | None = None, device="cpu") -> Glm4vModel:
    """A transformers Glm4vForConditionalGeneration folder, loaded strictly."""
    config, state = read_glm4v_checkpoint(folder)
    model = build_on_meta(lambda: Glm4vModel(config))
    load_into(model, state, dtype=dtype)
    return model.to(device).eval()


@torch.inference_mode()
def generate_glm4v(model: Glm4vModel, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                   image_grid_thw: torch.Tensor | None = None, max_new_tokens: int = 128,
                   stop_tokens: tuple[int, ...] = ()):
    """Greedy tokens for one prompt [1, T], yielded one at a time (a stop token ends it, unyielded): a prefill with
    3D positions, then each new token at one past the largest position so far, on all three axes."""
    positions = model.positions(input_ids, image_grid_thw)  # [3, 1, T]
    length = input_ids.shape[1]
    limit = min(max_new_tokens, model.config.text.max_position_embeddings - int(positions.max()) - 1)
    if limit <= 0:
        return
    cache = model.allocate_cache(1, length + limit)
    logits = model(input_ids, pixel_values, image_grid_thw, positions=positions, cache=cache, last_only=True)
    next_position = int(positions.max()) + 1
    for step in range(limit):
        token = int(logits[0, -1].argmax())
        if token in stop_tokens:
            return
        yield token
        if step + 1 == limit:
            return
        step_positions = torch.full((3, 1, 1), next_position + step, device=model.device)
        logits = model(torch.tensor([[token]], device=model.device), positions=step_positions, cache=cache,
                       cache_start=length + step)
