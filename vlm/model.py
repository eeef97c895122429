"""The vision-language model: image encoder + adapter + a GLM core whose layers may carry a visual expert.

Sequence: `[prefix..., boi, patches..., eoi, text...]`, the image embeddings coming from `encode_image`.

Visual expert (CogVLM, CogVLM2, the suite's own model): every layer holds a language and a vision copy of QKV, the
attention output projection and the SwiGLU MLP; norms, embeddings and the output layer are shared, and attention is
one joint causal attention over the whole sequence. A token takes the vision expert iff it is vision-typed and so is
the next token: boi and the patches do, eoi (the last vision-typed token) goes through the language expert.

Routing is by slicing the contiguous image span `[image_start, image_start + n - 1)` (n image embeddings, eoi
excluded); there is no boolean gather/scatter. Decode steps only ever see language tokens, so they run the plain GLM
path (`GLMModel.forward`), which this class inherits unchanged.

The language expert keeps GLM's parameter names (`layers.{n}.attn.qkv`, `layers.{n}.mlp.gate_up`, ...) and the vision
expert sits beside it (`layers.{n}.attn.vision_qkv`, `layers.{n}.attn.vision_dense`, `layers.{n}.vision_mlp`), so the
text-only model is a `GLMModel` over the same tensors: `VisionLanguageModel` subclasses it, and `language_model()`
returns a plain `GLMModel` sharing its modules.

Variants (presets below): CogVLM (Vicuna core: MHA, full-dim rotary), CogVLM2 (Llama-3 core: GQA 8, rotary base
500000, full-dim rotary), GLM-4V (GLM-4 core, no experts, 2x2 conv, scaled image embeddings), and the suite's own
(GLM core with experts). Checkpoints with NeoX-style rotary are converted to GLM's interleaved layout by permuting the
q/k rows once at import (`vlm/convert.py`); a full-dim rotary is selected by `rotary_dim = head_dim`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from glm.model import GLMBlock, GLMConfig, GLMModel, SwiGLU, attention, attention_mask_for, rotary_table
from vlm.adapter import Adapter, AdapterConfig
from vlm.vit import VIT_PRESETS, OpenClipTower, VisionTransformer, ViTConfig

LANGUAGE, VISION = 0, 1  # token types


@dataclass(frozen=True)
class VLMConfig:
    text: GLMConfig
    vision: ViTConfig
    adapter: AdapterConfig
    experts: bool = True  # visual expert in every layer (CogVLM, CogVLM2, suite); False for GLM-4V
    rotary_dim: int | None = None  # rotated dims per head; None = GLM's first half
    template: str = "suite"  # prompt template family, see vlm/processor.py
    # An open_clip vision tower instead of the EVA2-CLIP ViT: OpenClipTower's arguments ({"model_name": ...} or
    # {"vision_cfg": {...}}); `vision` must then state the tower's image size, patch size and width.
    open_clip: dict | None = None
    # CogVLM2's rotary (FastRotaryEmbedding, pos_idx_in_fp32=False) computes positions, angles, cos and sin in the
    # model's dtype; in a bf16 model that rounds positions past 256 and moves angles by up to 2 rad. Reproduced here,
    # since the checkpoint was run (and tuned) that way.
    rotary_in_model_dtype: bool = False

    def __post_init__(self):
        if self.adapter.vision_width != self.vision.width or self.adapter.hidden != self.text.hidden_size:
            raise ValueError("The adapter's widths must match the ViT width and the language model width.")
        if self.rotary_dim is not None and (self.rotary_dim % 2 or self.rotary_dim > self.text.head_dim):
            raise ValueError(f"rotary_dim {self.rotary_dim} must be even and at most head_dim {self.text.head_dim}.")

    @property
    def image_tokens(self) -> int:
        return self.adapter.num_tokens(self.vision.grid)

    @property
    def rotated_dims(self) -> int:
        return self.rotary_dim or self.text.rotary_dim

    def to_dict(self) -> dict:
        return {"text": self.text.to_dict(), "vision": asdict(self.vision), "adapter": asdict(self.adapter),
                "experts": self.experts, "rotary_dim": self.rotary_dim, "template": self.template,
                "open_clip": self.open_clip, "rotary_in_model_dtype": self.rotary_in_model_dtype}

    @classmethod
    def from_dict(cls, values: dict) -> VLMConfig:
        vision = dict(values["vision"])
        vision["mean"], vision["std"] = tuple(vision["mean"]), tuple(vision["std"])
        return cls(
            text=GLMConfig.from_dict(values["text"]),
            vision=ViTConfig(**vision),
            adapter=AdapterConfig(**values["adapter"]),
            experts=values["experts"],
            rotary_dim=values.get("rotary_dim"),
            template=values.get("template", "suite"),
            open_clip=values.get("open_clip"),
            rotary_in_model_dtype=values.get("rotary_in_model_dtype", False),
        )

    @classmethod
    def from_preset(cls, name: str) -> VLMConfig:
        if name not in PRESETS:
            raise ValueError(f"Unknown VLM preset {name!r}; known: {', '.join(sorted(PRESETS))}.")
        return PRESETS[name]


def rotary_table_in_dtype(rotary_dim: int, max_len: int, theta: float, dtype: torch.dtype,
                          device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_len, rotary_dim // 2] as CogVLM2 computes them in a low-precision model: the inverse
    frequencies in float32 then stored in `dtype`, the positions, their products, cos and sin all in `dtype`."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim)
    positions = torch.arange(max_len, device=device, dtype=dtype)  # [S]: past 256, bf16 rounds them
    angles = torch.outer(positions, inv_freq.to(dtype))  # [S, rot/2]
    return angles.cos(), angles.sin()


def _config(text: GLMConfig, vision: ViTConfig, ffn: int, conv_width=None, scaling=1.0, **kwargs) -> VLMConfig:
    adapter = AdapterConfig(vision_width=vision.width, hidden=text.hidden_size, ffn=ffn, conv_width=conv_width,
                            scaling_factor=scaling)
    return VLMConfig(text=text, vision=vision, adapter=adapter, **kwargs)


_VICUNA_7B = GLMConfig(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_groups=32,
                       head_dim=128, ffn_hidden_size=11008, norm_eps=1e-5, rope_ratio=1.0, max_seq_len=4096)
_LLAMA3_8B = GLMConfig(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_groups=8,
                       head_dim=128, ffn_hidden_size=14336, norm_eps=1e-5, rope_ratio=50.0, max_seq_len=8192)
_GLM4_9B = GLMConfig(vocab_size=151552, hidden_size=4096, num_layers=40, num_heads=32, num_kv_groups=2,
                     head_dim=128, ffn_hidden_size=13696, norm_eps=1.5625e-07, rope_ratio=1.0, max_seq_len=8192)
_TINY_TEXT = GLMConfig(vocab_size=320, hidden_size=64, num_layers=2, num_heads=4, num_kv_groups=2, head_dim=16,
                       ffn_hidden_size=88, norm_eps=1e-5, rope_ratio=1.0, max_seq_len=256)
_TINY_VIT = VIT_PRESETS["tiny"]

PRESETS: dict[str, VLMConfig] = {
    "cogvlm-chat": _config(_VICUNA_7B, VIT_PRESETS["eva2-clip-e-490"], 11008, rotary_dim=128, template="cogvlm-chat"),
    "cogvlm-grounding": _config(_VICUNA_7B, VIT_PRESETS["eva2-clip-e-490"], 11008, rotary_dim=128,
                                template="cogvlm-base"),
    "cogvlm2-llama3-chat": _config(_LLAMA3_8B, VIT_PRESETS["eva2-clip-e-1344"], 14336, conv_width=1792,
                                   rotary_dim=128, template="cogvlm2-chat", rotary_in_model_dtype=True),
    "glm-4v-9b": _config(_GLM4_9B, VIT_PRESETS["eva2-clip-e-1120"], 13696, conv_width=4096, scaling=8.0,
                         experts=False, template="glm-4v"),
    # Tiny shapes of each variant, for tests.
    "tiny": _config(_TINY_TEXT, _TINY_VIT, 72),
    "tiny-cogvlm": _config(replace(_TINY_TEXT, num_kv_groups=4), _TINY_VIT, 72, rotary_dim=16,
                           template="cogvlm-chat"),
    "tiny-cogvlm2": _config(replace(_TINY_TEXT, rope_ratio=50.0), _TINY_VIT, 72, conv_width=32, rotary_dim=16,
                            template="cogvlm2-chat", rotary_in_model_dtype=True),
    "tiny-glm4v": _config(replace(_TINY_TEXT, num_kv_groups=1), _TINY_VIT, 88, conv_width=64, scaling=8.0,
                          experts=False, template="glm-4v"),
    # The suite's own size class for 128x128 EmojiScenes images: 64 patches + boi/eoi.
    "small": _config(
        GLMConfig(vocab_size=8192, hidden_size=256, num_layers=6, num_heads=8, num_kv_groups=2, head_dim=32,
                  ffn_hidden_size=688, norm_eps=1e-5, rope_ratio=1.0, max_seq_len=512),
        VIT_PRESETS["small"], 688),
    # A few hundred million parameters, for CPU benchmarks.
    "bench-medium": _config(
        GLMConfig(vocab_size=32000, hidden_size=1024, num_layers=8, num_heads=16, num_kv_groups=2, head_dim=64,
                  ffn_hidden_size=2816, norm_eps=1e-5, rope_ratio=1.0, max_seq_len=1024),
        ViTConfig(image_size=224, patch_size=16, width=384, depth=6, heads=6, mlp_dim=1536), 2816),
}


class ExpertBlock(GLMBlock):
    """A GLM block with a visual expert beside the language one. `forward` (inherited) is the language-only path."""

    def __init__(self, config: GLMConfig):
        super().__init__(config)
        self.attn.vision_qkv = nn.Linear(config.hidden_size, config.qkv_size, bias=True)
        self.attn.vision_dense = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)
        self.vision_mlp = SwiGLU(config.hidden_size, config.ffn_hidden_size)

    def forward_image(self, x, start, end, cos, sin, cache=None, cache_start=0, mask=None) -> torch.Tensor:
        """x [B, T, C] whose tokens [start, end) take the vision expert (boi + patches); the rest the language one."""
        attn = self.attn
        q, k, v = attn.split_qkv(route_experts(attn.qkv, attn.vision_qkv, self.attn_norm(x), start, end))
        x = x + route_experts(attn.dense, attn.vision_dense, attention(q, k, v, cos, sin, cache, cache_start, mask),
                       start, end)
        return x + route_experts(self.mlp, self.vision_mlp, self.mlp_norm(x), start, end)


def route_experts(language: nn.Module, vision: nn.Module, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Apply `vision` to x[:, start:end] and `language` to the rest (one call on both language pieces)."""
    text = torch.cat([x[:, :start], x[:, end:]], dim=1)  # [B, T - (end - start), C]
    text_out = language(text)
    image_out = vision(x[:, start:end])  # [B, end - start, C']
    return torch.cat([text_out[:, :start], image_out, text_out[:, start:]], dim=1)  # [B, T, C']


class VisionLanguageModel(GLMModel):
    def __init__(self, config: VLMConfig):
        self.vlm_config = config  # read by reset_buffers, which GLMModel.__init__ calls
        super().__init__(config.text)
        if config.experts:
            self.layers = nn.ModuleList(ExpertBlock(config.text) for _ in range(config.text.num_layers))
        self.vision = OpenClipTower(**config.open_clip) if config.open_clip else VisionTransformer(config.vision)
        if config.open_clip and (self.vision.width, self.vision.patch_size) != (config.vision.width,
                                                                                config.vision.patch_size):
            raise ValueError(f"The open_clip tower has width {self.vision.width} and patch {self.vision.patch_size}; "
                             f"the config says {config.vision.width} and {config.vision.patch_size}.")
        self.adapter = Adapter(config.adapter)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.vlm_config.rotary_in_model_dtype and not self.embed.weight.is_meta:
            self.reset_buffers()  # a cast to another dtype recomputes the tables as that dtype computes them
        return self

    def reset_buffers(self) -> None:
        """Rotary tables for this variant's rotated dims (GLM's half head, or the full head for Llama cores)."""
        device = self.embed.weight.device
        device = torch.device("cpu") if device.type == "meta" else device
        text = self.config
        dtype = self.embed.weight.dtype
        if self.vlm_config.rotary_in_model_dtype and dtype in (torch.bfloat16, torch.float16):
            cos, sin = rotary_table_in_dtype(self.vlm_config.rotated_dims, text.max_seq_len, text.rope_theta, dtype,
                                            device)
        else:
            cos, sin = rotary_table(self.vlm_config.rotated_dims, text.max_seq_len, text.rope_theta, device)
        self.register_buffer("rope_cos", cos, persistent=False)  # [S, R/2]
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> VisionLanguageModel:
        """Random weights (std 0.02), unit norm scales and zero norm biases: for tests and benchmarks."""
        for name, param in self.named_parameters():
            if "norm" in name:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                param.normal_(0.0, std, generator=generator)
        return self

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] -> image embeddings [B, n, hidden] (boi, patches, eoi), ready to splice in."""
        return self.adapter(self.vision(pixels))

    def language_model(self) -> GLMModel:
        """A plain GLMModel over this model's own modules (no copy): the text encoder of the diffusion pipeline.

        Build it after quantizing or sharding, since it holds the modules present at this call.
        """
        if self.vlm_config.rotated_dims != self.config.rotary_dim:
            raise ValueError("This variant rotates the full head, which a plain GLMModel does not; use the VLM itself.")
        view = GLMModel.__new__(GLMModel)
        nn.Module.__init__(view)
        view.config = self.config
        view.embed, view.layers, view.final_norm, view.output = self.embed, self.layers, self.final_norm, self.output
        view.register_buffer("rope_cos", self.rope_cos, persistent=False)
        view.register_buffer("rope_sin", self.rope_sin, persistent=False)
        return view

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        image_embeds: torch.Tensor | None = None,
        image_start: int | None = None,
        input_embeds: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache=None,
        cache_start: int = 0,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        last_only: bool = False,
    ):
        """Logits [B, T, V] ([B, 1, V] with `last_only`), as `GLMModel.forward`, with an optional image.

        image_embeds [B, n, hidden] from `encode_image` replace the tokens input_ids[:, image_start:image_start + n]
        (their ids are ignored); every row's image starts at the same index (see vlm/processor.py's layout).
        positions [B, T]: from the processor (all patches share one position; padding does not advance).
        """
        common = dict(positions=positions, cache=cache, cache_start=cache_start, attention_mask=attention_mask,
                      output_hidden_states=output_hidden_states, last_only=last_only)
        if image_embeds is None:
            return super().forward(input_ids, input_embeds=input_embeds, **common)
        if input_ids is None or image_start is None:
            raise ValueError("An image needs input_ids and image_start.")
        count = image_embeds.shape[1]
        if image_start < 0 or image_start + count > input_ids.shape[1]:
            raise ValueError(f"The image span [{image_start}, {image_start + count}) does not fit in "
                             f"{input_ids.shape[1]} tokens.")
        tokens = self.embed(input_ids)  # [B, T, C]
        x = torch.cat([tokens[:, :image_start], image_embeds.to(tokens.dtype), tokens[:, image_start + count:]], 1)
        if not self.vlm_config.experts:
            return super().forward(input_embeds=x, **common)
        return self._forward_experts(x, image_start, image_start + count - 1, **common)

    def _forward_experts(self, x, start, end, positions, cache, cache_start, attention_mask, output_hidden_states,
                         last_only):
        batch, length, _ = x.shape
        if positions is None:
            raise ValueError("A sequence with an image needs explicit positions (see vlm.processor.position_ids).")
        cos, sin = self.rope(positions)
        mask = attention_mask_for(attention_mask, cache_start, length)
        hidden_states = [x] if output_hidden_states else None
        for index, layer in enumerate(self.layers):
            x = layer.forward_image(x, start, end, cos, sin, cache[index] if cache is not None else None,
                                    cache_start, mask)
            if output_hidden_states:
                hidden_states.append(x)
        x = self.final_norm(x[:, -1:] if last_only and not output_hidden_states else x)
        if not output_hidden_states:
            return self.output(x)
        hidden_states[-1] = x
        return self.output(x[:, -1:] if last_only else x), tuple(hidden_states)
