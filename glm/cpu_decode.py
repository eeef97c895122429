"""A whole decode step of a GLM core in one C call on the CPU (`kernels/csrc/decode.c`): one row of a float model, up
to MAX_ROWS rows of a quantized one.

An eager decode step runs about 50 small operators per block besides its four matmuls; on a 198M-parameter model
they cost about as much as reading the int8 weights. `CpuDecoder` hands the C code pointers to every weight once, and
each step then costs one call: embedding, blocks, final norm and logits, activations in float32 (see decode.c).

Build it with `prepare_cpu_decode(model)` after the model is final (loaded, quantized, packed): it keeps references to
the weights it read, so a later `.to()` or quantization is not seen. `glm.generate.decode_one_token` uses it whenever
the rows, device and cache allow, and the eager path otherwise. It reads float32 and bfloat16 linears (plain or
`PackedLinear` with its plain weight), INT8 linears on the "auto" or "gemv" backend, INT4 linears in torch's CPU tile
layout where the kernels are the AVX2 build (activations rounded to int8 per group, as llama.cpp's Q8 blocks), and
both in the blocked layouts of `glm/cpu_linears.py`; a model with any other layer (tensor-parallel shards, a forced
kernel) gets no decoder and keeps the eager path.
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, c_float, c_int, c_int64, c_void_p

import torch
from torch import nn

from glm.model import GLMAttention, GLMBlock, GLMModel, KVCache, RMSNorm, SwiGLU
from kernels import cpu_gemv

MAX_ROWS = 4  # quantized models, and bfloat16 ones where the kernels multiply in bfloat16 (AVX512_BF16)
# A float32 linear, or a bfloat16 one where the kernel widens to float, takes one row only: widening costs
# instructions per weight and row, so from two rows oneDNN's prepacked matmul is the faster one, and such models
# decode batches on the eager path. `multimodal bench quant --threads 1 --batch-size 2|4 --decode-step c|eager`
# (tok/s, this Zen 5): bfloat16 154.8 / 69.7 at 2 rows, 174.0 / 176.3 at 4; INT8 188.2 / 133.6 and 190.6 / 158.7;
# INT4 256.5 / 126.4 and 269.4 / 190.1.
KIND_INT8, KIND_BF16, KIND_F32, KIND_INT4, KIND_BF16_BLOCKED, KIND_INT8_BLOCKED, KIND_INT4_BLOCKED = range(7)


class _Linear(ctypes.Structure):
    _fields_ = [("weight", c_void_p), ("scales", c_void_p), ("bias", c_void_p), ("kind", c_int64),
                ("out_features", c_int64), ("in_features", c_int64), ("stride", c_int64), ("group_size", c_int64),
                ("block", c_int64)]


class _Block(ctypes.Structure):
    _fields_ = [("qkv", _Linear), ("dense", _Linear), ("gate_up", _Linear), ("down", _Linear),
                ("attn_norm", c_void_p), ("mlp_norm", c_void_p), ("keys", c_void_p), ("values", c_void_p)]


class _Decoder(ctypes.Structure):
    _fields_ = [(name, c_int64) for name in ("hidden", "heads", "groups", "head_dim", "rotary_half", "ffn",
                                             "cache_len", "vocab", "table_len", "num_blocks", "cache_bf16",
                                             "embed_bf16")] + [
        ("eps", c_float), ("rope_cos", c_void_p), ("rope_sin", c_void_p), ("embed", c_void_p),
        ("final_norm", c_void_p), ("output", _Linear), ("blocks", POINTER(_Block))]


class Unsupported(Exception):
    """A layer the C step cannot run; the model keeps the eager path."""


class CpuDecoder:
    def __init__(self, model: GLMModel, lib: ctypes.CDLL | None = None):
        lib = lib or cpu_gemv.library()
        if lib is None:
            raise Unsupported("no decode kernels")
        self._step = lib.glm_decode_step
        self._step.argtypes = [POINTER(_Decoder), c_void_p, c_void_p, c_int64, c_void_p, c_int64, c_int64, c_void_p,
                               c_int]
        self._step.restype = c_int
        self.integer_paths = lib.gemv_integer_paths() == 1  # int4 layers need the AVX2 build
        self.bf16_rows = lib.gemv_bf16_rows()  # > 0 where bfloat16 weights multiply in bfloat16
        if not model.layers:
            raise Unsupported("a model without blocks")
        self._keep: list[torch.Tensor] = []  # every tensor a pointer refers to stays alive with the decoder
        layers = list(model.layers)
        first = layers[0]
        if not all(isinstance(layer, GLMBlock) and type(layer.attn_norm) is RMSNorm and type(layer.mlp_norm) is
                   RMSNorm and isinstance(layer.attn, GLMAttention) and type(layer.mlp) is SwiGLU for layer in layers):
            raise Unsupported("a block that is not a GLM block")
        if not (model.embed.weight.is_cpu and model.embed.weight.dtype in (torch.float32, torch.bfloat16)):
            raise Unsupported("an embedding that is not float on the CPU")
        shape = lambda layer: (layer.attn.num_heads, layer.attn.num_kv_groups, layer.attn.head_dim,  # noqa: E731
                               layer.mlp.down.in_features, layer.attn_norm.eps, layer.mlp_norm.eps)
        if len({shape(layer) for layer in layers} | {shape(first)[:4] + (model.final_norm.eps,) * 2}) != 1:
            raise Unsupported("blocks or norms of different shapes")
        self.blocks = (_Block * len(layers))()
        for block, layer in zip(self.blocks, layers):
            block.qkv, block.dense = self._linear(layer.attn.qkv), self._linear(layer.attn.dense)
            block.gate_up, block.down = self._linear(layer.mlp.gate_up), self._linear(layer.mlp.down)
            block.attn_norm, block.mlp_norm = self._floats(layer.attn_norm.weight), self._floats(layer.mlp_norm.weight)
        attn, embed = first.attn, model.embed.weight
        self.decoder = _Decoder(
            hidden=embed.shape[1], heads=attn.num_heads, groups=attn.num_kv_groups, head_dim=attn.head_dim,
            rotary_half=model.rope_cos.shape[1], ffn=first.mlp.down.in_features, cache_len=0, vocab=embed.shape[0],
            table_len=model.rope_cos.shape[0], num_blocks=len(layers), cache_bf16=0,
            embed_bf16=int(embed.dtype == torch.bfloat16), eps=first.attn_norm.eps,
            rope_cos=self._floats(model.rope_cos), rope_sin=self._floats(model.rope_sin), embed=self._pointer(embed),
            final_norm=self._floats(model.final_norm.weight), output=self._linear(model.output), blocks=self.blocks)
        if self.decoder.output.out_features != self.decoder.vocab:
            raise Unsupported("an output layer narrower or wider than the vocabulary")
        linears = [self.decoder.output] + [getattr(block, name) for block in self.blocks
                                           for name in ("qkv", "dense", "gate_up", "down")]
        limits = {KIND_F32: 1, KIND_BF16: MAX_ROWS if self.bf16_rows >= MAX_ROWS else 1, KIND_INT8: MAX_ROWS,
                  KIND_INT4: MAX_ROWS, KIND_BF16_BLOCKED: cpu_gemv.BLOCKED_ROWS, KIND_INT8_BLOCKED: MAX_ROWS,
                  KIND_INT4_BLOCKED: MAX_ROWS}
        self.max_rows = min(limits[linear.kind] for linear in linears)
        self._cache_key: tuple | None = None

    def _pointer(self, tensor: torch.Tensor) -> int:
        tensor = tensor.detach()
        if not tensor.is_contiguous():
            raise Unsupported("a non-contiguous weight")
        self._keep.append(tensor)
        return tensor.data_ptr()

    def _floats(self, tensor: torch.Tensor) -> int:
        return self._pointer(tensor.to(torch.float32).contiguous())

    def _linear(self, module: nn.Module) -> _Linear:
        from glm.cpu_linears import BlockedInt4Linear, BlockedInt8Linear
        from glm.generate import PackedLinear
        from kernels.dispatch import CPU_TILED
        from kernels.int4 import cpu_int4pack_block, cpu_int4pack_supported
        from multimodal.quantize import Int4WeightOnlyLinear, Int8WeightOnlyLinear

        bias = getattr(module, "bias", None)
        bias = self._floats(bias) if bias is not None else None
        if isinstance(module, PackedLinear) and module.blocked is not None:
            return _Linear(self._pointer(module.blocked), None, bias, KIND_BF16_BLOCKED, module.out_features,
                           module.in_features, module.in_features)
        if isinstance(module, BlockedInt8Linear):
            return _Linear(self._pointer(module.blocked), self._pointer(module.scales), bias, KIND_INT8_BLOCKED,
                           module.out_features, module.in_features, module.in_features)
        if isinstance(module, BlockedInt4Linear):
            return _Linear(self._pointer(module.blocked), None, bias, KIND_INT4_BLOCKED, module.out_features,
                           module.in_features, module.in_features, module.group_size)
        if type(module) is nn.Linear or isinstance(module, PackedLinear):
            weight = module.weight if type(module) is nn.Linear else module.plain
            if weight is None or not weight.is_cpu or weight.dtype not in (torch.float32, torch.bfloat16):
                raise Unsupported("a float linear without a plain CPU weight")
            kind = KIND_BF16 if weight.dtype == torch.bfloat16 else KIND_F32
            return _Linear(self._pointer(weight), None, bias, kind, module.out_features, module.in_features,
                           module.in_features)
        if type(module) is Int8WeightOnlyLinear and module.backend in ("auto", "gemv") and module.weight.is_cpu:
            return _Linear(self._pointer(module.weight), self._floats(module.scales), bias, KIND_INT8,
                           module.out_features, module.in_features, module.weight.shape[1])
        if (type(module) is Int4WeightOnlyLinear and module.backend == "auto" and module.layout == CPU_TILED
                and self.integer_paths and module.group_size % 2 == 0
                and cpu_int4pack_supported(module.out_features, module.in_features, module.group_size)):
            table = self._pointer(module.scales_and_zeros.to(torch.bfloat16).contiguous())
            return _Linear(self._pointer(module.weight), table, bias, KIND_INT4, module.out_features,
                           module.in_features, module.in_features, module.group_size, cpu_int4pack_block())
        raise Unsupported(f"a {type(module).__name__} layer")

    def accepts(self, tokens: torch.Tensor, cache: list[KVCache]) -> bool:
        k = cache[0].k
        return (tokens.shape[0] <= self.max_rows and tokens.device.type == "cpu" and k.device.type == "cpu"
                and k.dtype in (torch.float32, torch.bfloat16) and k.is_contiguous() and len(cache) == len(self.blocks)
                and k.shape[0] == tokens.shape[0])

    def _bind(self, cache: list[KVCache]) -> None:
        key = tuple(layer.k.data_ptr() for layer in cache)
        if key == self._cache_key:
            return
        for block, layer in zip(self.blocks, cache):
            block.keys, block.values = layer.k.data_ptr(), layer.v.data_ptr()
        self.decoder.cache_len = cache[0].max_len
        self.decoder.cache_bf16 = int(cache[0].k.dtype == torch.bfloat16)
        self._cache_key, self._cache = key, cache  # the cache stays alive while bound

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, slot: int, cache: list[KVCache],
             valid: torch.Tensor | None) -> torch.Tensor:
        """Logits [B, V] float32 for tokens [B] at rotary positions [B], written to cache slot `slot`; `valid`
        [B, >= slot + 1] marks the cache slots each row may attend to (None: all of them)."""
        self._bind(cache)
        tokens = tokens.to(torch.int64).contiguous()
        positions = positions.to(torch.int64).contiguous()
        rows = tokens.shape[0]
        mask, stride = None, 0
        if valid is not None:
            mask = valid.to(torch.uint8).contiguous()  # [B, S]
            stride = mask.shape[1]
        logits = torch.empty(rows, self.decoder.vocab, dtype=torch.float32)
        status = self._step(ctypes.byref(self.decoder), tokens.data_ptr(), positions.data_ptr(), slot,
                            mask.data_ptr() if mask is not None else None, stride, rows, logits.data_ptr(),
                            torch.get_num_threads())
        if status == -2:
            raise ValueError(f"A token, position or cache slot ({slot}) is out of range for this model and cache.")
        if status != 0:
            raise MemoryError("The decode step could not allocate its buffers.")
        return logits


def prepare_cpu_decode(model: GLMModel) -> GLMModel:
    """Attach a `CpuDecoder` as `model.cpu_decoder` where every layer allows it (None otherwise); returns the model."""
    try:
        decoder = CpuDecoder(model)
    except Unsupported:
        decoder = None
    model.cpu_decoder = decoder
    return model
