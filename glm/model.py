"""The GLM decoder (ChatGLM3-6B / GLM-4-9B family), all of it in this file.

Architecture: pre-norm RMSNorm blocks; one fused QKV projection with bias (the only bias in the model); multi-query
attention where `num_heads` query heads share `num_kv_groups` key/value groups; rotary embedding on the first half of
each head's dims, in adjacent interleaved pairs (x[2i], x[2i+1]), base 10000 x rope_ratio; a fused gate/up SwiGLU MLP
(gate first); a final RMSNorm and an untied output layer. The KV cache is static and preallocated.

How to build on this. Every projection is a plain `nn.Linear` attribute (`attn.qkv`, `attn.dense`, `mlp.gate_up`,
`mlp.down`, `output`), so quantization swaps modules and tensor parallelism slices weights without touching this file;
`GLMAttention.num_heads` / `num_kv_groups` are the per-rank counts a TP pass may lower. A block with other projections
(a visual expert) projects q, k, v itself and calls `attention(q, k, v, cos, sin, cache, cache_start, mask)`, the
shared core (rotary, cache write, SDPA, GQA); its positions come from `GLMModel.rope(positions)` and its mask from
`attention_mask_for(valid, cache_start, num_new)`. `GLMModel.forward` takes token ids or input embeddings (image
embeddings spliced in by the caller), explicit `positions` [B, T] (left-padded rows use [0]*pad + range(n), several
tokens may share one position), an optional cache from `allocate_cache` with the slot `cache_start` where the new
tokens are written, and a key-validity mask over all cache slots for left padding. `output_hidden_states=True` also
returns the embeddings plus every layer's output (the last entry final-normed), so `hidden_states[-2]` is the
penultimate layer's output, as in THUDM's and transformers' code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from kernels.attention import attention as dispatch_attention


@dataclass(frozen=True)
class GLMConfig:
    vocab_size: int = 65024  # padded vocabulary (ChatGLM3 65024, GLM-4 151552)
    hidden_size: int = 4096
    num_layers: int = 28
    num_heads: int = 32  # query heads
    num_kv_groups: int = 2  # key/value groups shared by num_heads // num_kv_groups query heads each
    head_dim: int = 128  # THUDM's kv_channels
    ffn_hidden_size: int = 13696  # width of each of gate and up
    norm_eps: float = 1e-5
    rope_ratio: float = 1.0  # rotary base = 10000 * rope_ratio
    max_seq_len: int = 8192  # rotary table length and default cache length
    # Layers a text encoder runs (its states are that layer's output); None: all but the last, CogView4's
    # second-to-last hidden states. A core grown after its text encoder was fixed keeps the count it was trained with.
    text_encoder_layers: int | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_groups:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_groups {self.num_kv_groups}.")
        if self.text_encoder_layers is not None and not 0 < self.text_encoder_layers < self.num_layers:
            raise ValueError(f"text_encoder_layers ({self.text_encoder_layers}) must be between 1 and "
                             f"num_layers - 1 ({self.num_layers - 1}).")
        if self.head_dim % 4:
            raise ValueError(f"head_dim ({self.head_dim}) must be a multiple of 4 (half of it is rotated in pairs).")

    @property
    def encoder_layers(self) -> int:
        """How many layers a text encoder over this core runs."""
        return self.text_encoder_layers or self.num_layers - 1

    @property
    def rope_theta(self) -> float:
        return 10000.0 * self.rope_ratio

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that are rotated: the first half."""
        return self.head_dim // 2

    @property
    def qkv_size(self) -> int:
        return (self.num_heads + 2 * self.num_kv_groups) * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> GLMConfig:
        """Build from a dict, ignoring keys that are not config fields (format version, kind)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GLMConfig:
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}.")
        return replace(PRESETS[name], **overrides)


PRESETS: dict[str, GLMConfig] = {
    "chatglm3-6b": GLMConfig(),
    "glm-4-9b": GLMConfig(
        vocab_size=151552, num_layers=40, norm_eps=1.5625e-07, rope_ratio=1.0, max_seq_len=8192
    ),
    "glm-4-9b-chat": GLMConfig(
        vocab_size=151552, num_layers=40, norm_eps=1.5625e-07, rope_ratio=500.0, max_seq_len=131072
    ),
    # Tiny shapes for tests: 2 KV groups as in the real models, odd-ish ffn width.
    "tiny": GLMConfig(
        vocab_size=320, hidden_size=64, num_layers=2, num_heads=4, num_kv_groups=2, head_dim=16,
        ffn_hidden_size=88, norm_eps=1e-5, rope_ratio=1.0, max_seq_len=256,
    ),
    "tiny-glm4": GLMConfig(
        vocab_size=384, hidden_size=64, num_layers=3, num_heads=4, num_kv_groups=1, head_dim=16,
        ffn_hidden_size=96, norm_eps=1.5625e-07, rope_ratio=500.0, max_seq_len=256,
    ),
    # About 190M parameters, for CPU benchmarks.
    "bench-200m": GLMConfig(
        vocab_size=32000, hidden_size=1024, num_layers=12, num_heads=16, num_kv_groups=2, head_dim=64,
        ffn_hidden_size=2816, norm_eps=1e-5, rope_ratio=1.0, max_seq_len=2048,
    ),
}


class RMSNorm(nn.Module):
    """x / rms(x) * weight; the statistics in float32, the result in the input dtype (as THUDM and transformers)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_table(rotary_dim: int, max_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_len, rotary_dim // 2] in float32; frequency i is theta^(-2i / rotary_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.int64).float() / rotary_dim)
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)  # [S, rot/2]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2 * cos.shape[-1] dims of x in adjacent pairs; the remaining dims pass through.

    x: [B, H, T, D]; cos, sin: [B, 1, T, R/2] (already gathered at each token's position), R <= D.
    """
    half = cos.shape[-1]
    rot, rest = x[..., : 2 * half], x[..., 2 * half :]
    x0, x1 = rot.unflatten(-1, (half, 2)).unbind(-1)  # [B, H, T, R/2] each: even and odd dims
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)  # [B, H, T, R]
    return torch.cat((rotated, rest), dim=-1)


class KVCache:
    """Static per-layer key/value storage [B, groups, max_len, head_dim], written at slot indices.

    It holds no position: the caller says at which slot the new tokens go (`start`) and the attention reads slots
    [0, start + T). Memory is allocated once; generation never changes a shape.
    """

    def __init__(self, batch_size: int, num_kv_groups: int, max_len: int, head_dim: int, dtype, device=None):
        shape = (batch_size, num_kv_groups, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, G, T, D] at slots start..start+T-1; return views of slots [0, start + T)."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"The KV cache holds {self.max_len} tokens; writing up to slot {end} overflows it.")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def attention_mask_for(valid: torch.Tensor | None, cache_start: int, num_new: int) -> torch.Tensor | None:
    """Boolean attention mask [B, 1, T, S] (True = may attend) for T new tokens at slots cache_start.. of a cache.

    `valid` [B, S] (S = cache_start + T) marks real tokens (False for left padding); None means no padding, and then
    None is returned and `attention` applies plain causality itself. Each token may always see itself, so padded
    query rows stay finite.
    """
    if valid is None:
        return None
    total = cache_start + num_new
    if valid.shape[-1] != total:
        raise ValueError(f"The attention mask covers {valid.shape[-1]} slots; expected cache_start + T = {total}.")
    query_slot = torch.arange(cache_start, total, device=valid.device)[:, None]  # [T, 1]
    key_slot = torch.arange(total, device=valid.device)[None, :]  # [1, S]
    causal = key_slot <= query_slot  # [T, S]
    mask = causal & valid.bool()[:, None, :]  # [B, T, S]
    mask = mask | (key_slot == query_slot)
    return mask[:, None]  # [B, 1, T, S]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: KVCache | None = None,
    cache_start: int = 0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The shared attention core: rotary on q and k, cache write, grouped scaled-dot-product attention.

    q: [B, H, T, D]; k, v: [B, G, T, D] (projected, before rotary); cos, sin: [B, 1, T, R/2] from `GLMModel.rope`;
    mask: from `attention_mask_for`, or None for plain causality. Returns [B, T, H * D].
    """
    batch, num_heads, num_new, head_dim = q.shape
    num_groups = k.shape[1]
    q = apply_rotary(q, cos, sin)
    k = apply_rotary(k, cos, sin)
    if cache is not None:
        k, v = cache.update(cache_start, k, v)  # [B, G, S, D]
    if num_new == 1:
        # One query per head: fold the heads of a group into the query axis, so K/V are never expanded.
        q = q.view(batch, num_groups, num_heads // num_groups, head_dim)  # [B, G, H/G, D]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, :, 0:1] if mask is not None else None)
    elif mask is None and k.shape[2] == num_new:
        out = dispatch_attention(q, k, v, is_causal=True)
    else:
        if mask is None:  # plain causality with an offset (chunked prefill)
            mask = attention_mask_for(torch.ones(batch, k.shape[2], dtype=torch.bool, device=q.device),
                                      cache_start, num_new)
        out = dispatch_attention(q, k, v, attn_mask=mask)
    return out.reshape(batch, num_heads, num_new, head_dim).transpose(1, 2).reshape(batch, num_new, -1)


class GLMAttention(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_groups = config.num_kv_groups
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, config.qkv_size, bias=True)
        self.dense = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, T, (H + 2G) * D] -> q [B, H, T, D], k and v [B, G, T, D]."""
        batch, length, _ = qkv.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_groups * self.head_dim
        q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.num_kv_groups, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.num_kv_groups, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(self, x, cos, sin, cache=None, cache_start=0, mask=None) -> torch.Tensor:
        q, k, v = self.split_qkv(self.qkv(x))
        return self.dense(attention(q, k, v, cos, sin, cache, cache_start, mask))


class SwiGLU(nn.Module):
    """down(silu(gate) * up) with gate and up fused in one projection, gate first (THUDM's dense_h_to_4h)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.gate_up = nn.Linear(hidden_size, 2 * ffn_hidden_size, bias=False)
        self.down = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = GLMAttention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.ffn_hidden_size)

    def forward(self, x, cos, sin, cache=None, cache_start=0, mask=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, cache_start, mask)
        return x + self.mlp(self.mlp_norm(x))


class GLMModel(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_layers))
        self.final_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)build the rotary tables; called after loading weights into a model built on the meta device."""
        device = self.embed.weight.device
        device = torch.device("cpu") if device.type == "meta" else device
        cos, sin = rotary_table(self.config.rotary_dim, self.config.max_seq_len, self.config.rope_theta, device)
        self.register_buffer("rope_cos", cos, persistent=False)  # [S, R/2]
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> GLMModel:
        """Random normal weights and biases (std 0.02) and unit norms: for tests and benchmarks."""
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=generator)
        return self

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def allocate_cache(self, batch_size: int, max_len: int | None = None, dtype=None, device=None) -> list[KVCache]:
        """One static KVCache per layer, sized from each layer's (possibly TP-local) KV group count."""
        max_len = max_len or self.config.max_seq_len
        if max_len > self.config.max_seq_len:
            raise ValueError(f"A cache of {max_len} tokens exceeds the model's context of {self.config.max_seq_len}.")
        dtype = dtype or self.embed.weight.dtype
        device = device or self.device
        return [
            KVCache(batch_size, layer.attn.num_kv_groups, max_len, layer.attn.head_dim, dtype, device)
            for layer in self.layers
        ]

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, T, R/2] at positions [B, T]."""
        if positions.max() >= self.config.max_seq_len:
            raise ValueError(f"Position {int(positions.max())} is beyond the context of {self.config.max_seq_len}.")
        return self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        input_embeds: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: list[KVCache] | None = None,
        cache_start: int = 0,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        last_only: bool = False,
    ):
        """Logits [B, T, V] (or [B, 1, V] with `last_only`), plus a tuple of hidden states when asked.

        input_ids [B, T] long, or input_embeds [B, T, hidden]. positions [B, T] long (default cache_start + range(T)).
        cache: from `allocate_cache`; the new tokens are written at slots cache_start..cache_start+T-1.
        attention_mask [B, cache_start + T]: 1/True for real tokens, 0/False for padding; None = no padding.
        """
        if (input_ids is None) == (input_embeds is None):
            raise ValueError("Pass exactly one of input_ids and input_embeds.")
        x = self.embed(input_ids) if input_embeds is None else input_embeds  # [B, T, C]
        batch, length, _ = x.shape
        if positions is None:
            positions = torch.arange(cache_start, cache_start + length, device=x.device).expand(batch, length)
        cos, sin = self.rope(positions)
        mask = attention_mask_for(attention_mask, cache_start, length)
        hidden_states = [x] if output_hidden_states else None
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache[index] if cache is not None else None, cache_start, mask)
            if output_hidden_states and index < len(self.layers) - 1:
                hidden_states.append(x)
        if output_hidden_states:
            x = self.final_norm(x)
            hidden_states.append(x)
            logits = self.output(x[:, -1:] if last_only else x)
            return logits, tuple(hidden_states)
        x = self.final_norm(x[:, -1:] if last_only else x)
        return self.output(x)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def param_count(config: GLMConfig) -> int:
    """Parameters of a model with this config, computed without building it."""
    per_layer = (
        2 * config.hidden_size
        + config.hidden_size * config.qkv_size + config.qkv_size
        + config.num_heads * config.head_dim * config.hidden_size
        + 3 * config.hidden_size * config.ffn_hidden_size
    )
    return 2 * config.vocab_size * config.hidden_size + config.num_layers * per_layer + config.hidden_size


__all__ = [
    "GLMConfig", "PRESETS", "RMSNorm", "rotary_table", "apply_rotary", "KVCache", "attention_mask_for", "attention",
    "GLMAttention", "SwiGLU", "GLMBlock", "GLMModel", "param_count",
]
