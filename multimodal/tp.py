"""Tensor-parallel inference over torch.distributed (torchrun; gloo on CPU, NCCL on GPU), as a pass over a built model.

Entry points:
- `maybe_init_distributed(tp, device)`: under `torchrun --nproc-per-node N` joins the process group and returns a
  `DistContext(rank, world, device)`; outside torchrun it returns None (and refuses `tp > 1` with the exact command).
- `is_main_process()`: True on rank 0 or without torch.distributed; only the main process prints, writes or serves.
- `shard_model(model, rank, world, quantize=None)`: shards an already built model in place; `quantize(linear, name)`
  (optional, e.g. `multimodal.quantize.quantize_linear` with a spec) turns every plain Linear into a quantized
  module *after* it is cut, then communication is added (quantizing a sharded model afterwards would drop it).
- `load_sharded(source, build_fn, rank, world, ...)`: builds the model on the meta device, shards it there, then
  reads only this rank's slices from a native safetensors checkpoint (no rank ever holds the full model).
- `plan_tp(model, rank, world)`: the plan itself (which rows/columns of each parameter a rank keeps, which module
  outputs are summed or gathered); `weight_bytes` / `tp_weight_report` measure what a rank holds.

The Megatron pattern, per model (the module classes are recognised by type; other modules stay replicated):
- GLM: fused QKV column-parallel by heads, cut as separate q, k and v blocks; when the world exceeds the KV groups
  each rank keeps one group, rank r using group r // (world / groups) (the groups are replicated, vLLM style). The
  fused gate/up weight is cut half by half (a rank keeps the same slice of gate and of up, so SwiGLU stays local).
  `dense` and `down` are row-parallel with one all-reduce each. Embedding and output layer are vocab-parallel (masked
  lookup + all-reduce; logits all-gathered) when the vocabulary divides by the world, replicated otherwise.
- VLM visual experts: cut exactly like their language twins (the same pattern applies to every expert's QKV, dense
  and gate/up/down). ViT: qkv by heads, fc1 column, dense and fc2 row. Adapter GLU: gate/up column, down row.
- DiT: joint-attention qkv by heads, out row; MLP up column, down row; each block's adaLN modulation column-parallel
  per modulation vector and all-gathered (it is a large share of the weights). Embeddings and heads are replicated.
  An image-side module whose heads or widths do not divide by the world stays whole on every rank (e.g. a 6-head
  DiT at 4 ranks); the language model instead fails with an error naming the layer.
A row-parallel bias is added once: ranks other than 0 hold zeros in its place, so the all-reduce sums it once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from diffusion.denoiser import DiTBlock
from glm.model import GLMAttention, GLMModel, SwiGLU
from multimodal.checkpoint import NATIVE_CONFIG, CheckpointError, LazyCheckpoint, build_on_meta, load_into
from multimodal.quantize import QuantSpec, convert_for_runtime, empty_quantized_linear
from vlm.adapter import GLU
from vlm.vit import ViTAttention, ViTMLP

# ----------------------------------------------------------------------------------------------------------------
# Process group


@dataclass(frozen=True)
class DistContext:
    rank: int
    world: int
    device: torch.device  # this rank's device (cuda:LOCAL_RANK on GPUs)


def maybe_init_distributed(tp: int | None = None, device: str | torch.device = "cpu") -> DistContext | None:
    """Join the torchrun process group (NCCL for CUDA devices, gloo otherwise); None outside torchrun.

    `tp` is the user's --tp: it must equal torchrun's WORLD_SIZE, so a mismatch fails here with the command to run.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp is not None and tp != world:
        raise ValueError(
            f"--tp {tp} needs {tp} processes but this run has {world}; start it with "
            f"`torchrun --standalone --nproc-per-node {tp} -m multimodal.cli ... --tp {tp}`."
        )
    if world == 1:
        return None
    rank = int(os.environ["RANK"])
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world, device)


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _rank_and_world(rank: int | None, world: int | None) -> tuple[int, int]:
    if rank is not None and world is not None:
        return rank, world
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ----------------------------------------------------------------------------------------------------------------
# Collectives. The c10d calls (in place, blocking) rather than the functional ones: their first use costs seconds
# of imports, and torch.compile rewrites these into functional collectives anyway.


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(x, group=group)  # x is a fresh module output, so summing in place is safe
    return x


def _all_gather_segments(x: torch.Tensor, segments: int, group, world: int) -> torch.Tensor:
    """All-gather the last dim block by block: [..., segments * n] per rank -> [..., segments * world * n].

    Each rank holds its piece of every one of `segments` equal blocks (e.g. the 12 adaLN vectors), so the full
    output is block 0 of ranks 0..world-1, then block 1 of ranks 0..world-1, and so on.
    """
    x = x.contiguous()
    gathered = x.new_empty(world * x.shape[0], *x.shape[1:])  # [world * d0, ..., local]
    dist.all_gather_single(gathered, x, group=group)
    gathered = gathered.view(world, *x.shape[:-1], segments, x.shape[-1] // segments)
    return gathered.movedim(0, -2).flatten(-3)  # [..., segments * world * n]


# ----------------------------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class ParamShard:
    """How a rank's tensor is cut from the full one: pieces [start, stop) along `dim`, concatenated in order.

    `zeros`: the full shape filled with zeros (a row-parallel bias on ranks other than 0).
    """

    dim: int = 0
    ranges: tuple[tuple[int, int], ...] = ()
    zeros: bool = False

    def cut(self, full: torch.Tensor) -> torch.Tensor:
        if self.zeros:
            return torch.zeros_like(full)
        return torch.cat([full.narrow(self.dim, start, stop - start) for start, stop in self.ranges], self.dim)

    def local_shape(self, full_shape: torch.Size) -> torch.Size:
        if self.zeros:
            return full_shape
        shape = list(full_shape)
        shape[self.dim] = sum(stop - start for start, stop in self.ranges)
        return torch.Size(shape)


@dataclass
class TPPlan:
    rank: int
    world: int
    params: dict[str, ParamShard] = field(default_factory=dict)  # parameter name -> this rank's cut
    reduce: list[str] = field(default_factory=list)  # modules whose output is summed over ranks
    gather: dict[str, int] = field(default_factory=dict)  # modules whose output is all-gathered -> segment count
    vocab_embeddings: dict[str, int] = field(default_factory=dict)  # nn.Embedding name -> first vocab id held
    vit_attention: dict[str, tuple[int, int]] = field(default_factory=dict)  # ViTAttention -> (local heads, head dim)
    attributes: list[tuple[str, str, int]] = field(default_factory=list)  # (module, attribute, per-rank value)
    linears: list[str] = field(default_factory=list)  # cut Linear layers (their in/out_features follow the cut)
    replicated_reason: dict[str, str] = field(default_factory=dict)  # module -> why it stays whole


def _split(size: int, world: int, rank: int, what: str) -> tuple[int, int]:
    if size % world:
        raise ValueError(f"{what}: {size} cannot be split evenly over {world} ranks.")
    step = size // world
    return rank * step, (rank + 1) * step


class _Planner:
    def __init__(self, rank: int, world: int):
        self.plan = TPPlan(rank, world)
        self.rank, self.world = rank, world

    def column(self, name: str, linear: nn.Module, segments: list[int]) -> None:
        """Output features cut segment by segment (q | k | v, gate | up, ...): a rank keeps its part of each."""
        ranges, offset = [], 0
        for index, size in enumerate(segments):
            start, stop = _split(size, self.world, self.rank, f"{name} (output block {index})")
            ranges.append((offset + start, offset + stop))
            offset += size
        self._cut(name, linear, ParamShard(0, tuple(ranges)), bias_shard=ParamShard(0, tuple(ranges)))

    def row(self, name: str, linear: nn.Module, ranges: tuple[tuple[int, int], ...] | None = None) -> None:
        """Input features cut; the partial outputs are summed by one all-reduce."""
        if ranges is None:
            ranges = (_split(linear.in_features, self.world, self.rank, f"{name} (input features)"),)
        bias = ParamShard(zeros=True) if self.rank else None  # rank 0 keeps the bias whole: it is added once
        self._cut(name, linear, ParamShard(1, ranges), bias_shard=bias)
        self.plan.reduce.append(name)

    def _cut(self, name: str, linear: nn.Module, weight: ParamShard, bias_shard: ParamShard | None) -> None:
        self.plan.params[f"{name}.weight"] = weight
        if getattr(linear, "bias", None) is not None and bias_shard is not None:
            self.plan.params[f"{name}.bias"] = bias_shard
        self.plan.linears.append(name)

    def optional(self, name: str, plan_module: Callable[[], None]) -> None:
        """Plan a module of the image side (ViT, adapter, DiT); when its shapes do not split over the world it
        stays whole on every rank (it is small next to the language model) and the reason is recorded."""
        outer, self.plan = self.plan, TPPlan(self.rank, self.world)
        try:
            plan_module()
        except ValueError as error:
            outer.replicated_reason[name] = str(error)
            self.plan = outer
            return
        inner, self.plan = self.plan, outer
        outer.params |= inner.params
        outer.reduce += inner.reduce
        outer.gather |= inner.gather
        outer.vit_attention |= inner.vit_attention
        outer.attributes += inner.attributes
        outer.linears += inner.linears

    def set(self, name: str, attribute: str, value: int) -> None:
        self.plan.attributes.append((name, attribute, value))

    # -- per module type ---------------------------------------------------------------------------------------

    def glm_attention(self, name: str, attn: nn.Module, qkv=("qkv",), dense=("dense",)) -> None:
        """GLM multi-query attention; `qkv` / `dense` name every expert's projections (a VLM has two of each)."""
        heads, groups, head_dim = attn.num_heads, attn.num_kv_groups, attn.head_dim
        if heads % self.world:
            raise ValueError(f"{name}: {heads} query heads cannot be split over {self.world} ranks.")
        if groups % self.world and self.world % groups:
            raise ValueError(
                f"{name}: {groups} KV groups over {self.world} ranks: the world must divide the groups or be a "
                f"multiple of them."
            )
        local_heads = heads // self.world
        q_start = self.rank * local_heads * head_dim
        q_range = (q_start, q_start + local_heads * head_dim)
        if self.world <= groups:
            local_groups = groups // self.world
            first_group = self.rank * local_groups
        else:  # more ranks than groups: each rank keeps the one group its query heads read
            local_groups = 1
            first_group = self.rank // (self.world // groups)
        kv_start = first_group * head_dim
        kv_stop = kv_start + local_groups * head_dim
        q_size, kv_size = heads * head_dim, groups * head_dim
        v_start = q_size + kv_size
        ranges = (q_range, (q_size + kv_start, q_size + kv_stop), (v_start + kv_start, v_start + kv_stop))  # q, k, v
        for projection in qkv:
            linear = attn.get_submodule(projection)
            self._cut(f"{name}.{projection}", linear, ParamShard(0, ranges), bias_shard=ParamShard(0, ranges))
        for projection in dense:
            self.row(f"{name}.{projection}", attn.get_submodule(projection), (q_range,))
        self.set(name, "num_heads", local_heads)
        self.set(name, "num_kv_groups", local_groups)

    def swiglu(self, name: str, gate_up: tuple[str, ...], down: tuple[str, ...], mlp: nn.Module) -> None:
        for projection in gate_up:
            linear = mlp.get_submodule(projection)
            self.column(f"{name}.{projection}", linear, [linear.out_features // 2] * 2)
        for projection in down:
            self.row(f"{name}.{projection}", mlp.get_submodule(projection))

    def mlp(self, name: str, up: tuple[str, ...], down: str, mlp: nn.Module) -> None:
        """Separate up projection(s) column-parallel, the down projection row-parallel."""
        for projection in up:
            linear = mlp.get_submodule(projection)
            self.column(f"{name}.{projection}", linear, [linear.out_features])
        self.row(f"{name}.{down}", mlp.get_submodule(down))

    def vocab(self, name: str, model: nn.Module) -> None:
        vocab = model.embed.num_embeddings
        if vocab % self.world:
            self.plan.replicated_reason[f"{name}embed"] = f"vocabulary {vocab} does not divide by {self.world}"
            return
        start, stop = _split(vocab, self.world, self.rank, f"{name}embed")
        self.plan.params[f"{name}embed.weight"] = ParamShard(0, ((start, stop),))
        self.plan.vocab_embeddings[f"{name}embed"] = start
        self.plan.params[f"{name}output.weight"] = ParamShard(0, ((start, stop),))
        self.plan.linears.append(f"{name}output")
        self.plan.gather[f"{name}output"] = 1

    def vit_attention(self, name: str, attn: ViTAttention) -> None:
        if attn.heads % self.world:
            raise ValueError(f"{name}: {attn.heads} heads cannot be split over {self.world} ranks.")
        width = attn.dense.in_features
        self.column(f"{name}.qkv", attn.qkv, [width] * 3)
        self.row(f"{name}.dense", attn.dense)
        self.plan.vit_attention[name] = (attn.heads // self.world, width // attn.heads)

    def dit_block(self, name: str, block: DiTBlock) -> None:
        attn = block.attn
        if attn.num_heads % self.world:
            raise ValueError(f"{name}.attn: {attn.num_heads} heads cannot be split over {self.world} ranks.")
        dim = attn.num_heads * attn.head_dim
        self.column(f"{name}.attn.qkv", attn.qkv, [dim] * 3)
        self.row(f"{name}.attn.out", attn.out)
        self.set(f"{name}.attn", "num_heads", attn.num_heads // self.world)
        self.column(f"{name}.mlp.up", block.mlp.up, [block.mlp.up.out_features])
        self.row(f"{name}.mlp.down", block.mlp.down)
        self.column(f"{name}.adaln", block.adaln, [dim] * 12)
        self.plan.gather[f"{name}.adaln"] = 12


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def plan_tp(model: nn.Module, rank: int, world: int) -> TPPlan:
    """What rank `rank` of `world` keeps of every parameter, and where communication goes.

    Raises a ValueError naming the layer when a shape of the language model cannot be split; image-side modules
    that cannot be split stay replicated (`plan.replicated_reason`).
    """
    planner = _Planner(rank, world)
    for name, module in model.named_modules():
        if isinstance(module, GLMAttention):  # with a visual expert, its projections sit beside the language ones
            qkv = tuple(p for p in ("qkv", "vision_qkv") if hasattr(module, p))
            dense = tuple(p for p in ("dense", "vision_dense") if hasattr(module, p))
            planner.glm_attention(name, module, qkv, dense)
        elif isinstance(module, SwiGLU):
            planner.swiglu(name, ("gate_up",), ("down",), module)
        elif isinstance(module, GLMModel):
            planner.vocab(_prefix(name), module)
        elif isinstance(module, ViTAttention):
            planner.optional(name, lambda: planner.vit_attention(name, module))
        elif isinstance(module, ViTMLP):
            planner.optional(name, lambda: planner.mlp(name, ("fc1",), "fc2", module))
        elif isinstance(module, GLU):
            planner.optional(name, lambda: planner.mlp(name, ("gate_proj", "up_proj"), "down_proj", module))
        elif isinstance(module, DiTBlock):
            planner.optional(name, lambda: planner.dit_block(name, module))
    return planner.plan


# ----------------------------------------------------------------------------------------------------------------
# Applying a plan


def _set_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    owner_name, _, attribute = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    setattr(owner, attribute, nn.Parameter(tensor, requires_grad=False))


def cut_parameters(model: nn.Module, plan: TPPlan) -> None:
    """Replace every planned parameter by this rank's cut (meta parameters get meta cuts of the local shape)."""
    params = dict(model.named_parameters())
    for key, shard in plan.params.items():
        full = params[key]
        if full.is_meta:
            local = torch.empty(shard.local_shape(full.shape), dtype=full.dtype, device="meta")
        else:
            local = shard.cut(full.detach()).clone()  # a copy, so the full tensor can be freed
        _set_tensor(model, key, local)
    for name, attribute, value in plan.attributes:
        setattr(model.get_submodule(name), attribute, value)
    for name in plan.linears:  # keep nn.Linear's bookkeeping true to the local shapes
        linear = model.get_submodule(name)
        if isinstance(linear, nn.Linear):
            linear.out_features, linear.in_features = linear.weight.shape
    for name in plan.vocab_embeddings:
        embedding = model.get_submodule(name)
        embedding.num_embeddings = embedding.weight.shape[0]


class VocabParallelEmbedding(nn.Module):
    """A slice [vocab_start, vocab_start + rows) of an embedding table: ids outside it give zeros, the all-reduce
    fills them in from the rank that holds them."""

    def __init__(self, weight: nn.Parameter, vocab_start: int, group):
        super().__init__()
        self.weight = weight  # [local vocab, hidden]
        self.vocab_start = vocab_start
        self.group = group

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # [..., hidden]
        return _all_reduce(out.masked_fill(outside[..., None], 0.0), self.group)


class ShardedViTAttention(nn.Module):
    """ViT self-attention over this rank's heads; the output projection's partial sums are all-reduced by a hook.

    (`ViTAttention` derives the head size from the full width of its input, which a shard does not have.)
    """

    def __init__(self, qkv: nn.Module, dense: nn.Module, heads: int, head_dim: int):
        super().__init__()
        self.qkv, self.dense = qkv, dense
        self.heads, self.head_dim = heads, head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, self.head_dim)  # [B, L, 3, H_local, D]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H_local, L, D]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.dense(out.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim))


def _replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    owner_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(owner_name), attribute, module)


def _add_communication(model: nn.Module, plan: TPPlan, group) -> None:
    """Swap in the vocab-parallel embeddings and sharded ViT attentions, then hook the collectives onto the
    (possibly quantized) projection modules."""
    for name, vocab_start in plan.vocab_embeddings.items():
        _replace_module(model, name, VocabParallelEmbedding(model.get_submodule(name).weight, vocab_start, group))
    for name, (local_heads, head_dim) in plan.vit_attention.items():
        attn = model.get_submodule(name)
        _replace_module(model, name, ShardedViTAttention(attn.qkv, attn.dense, local_heads, head_dim))
    for name in plan.reduce:
        model.get_submodule(name).register_forward_hook(lambda module, args, out: _all_reduce(out, group))
    for name, segments in plan.gather.items():
        model.get_submodule(name).register_forward_hook(
            lambda module, args, out, segments=segments: _all_gather_segments(out, segments, group, plan.world)
        )


def shard_model(
    model: nn.Module,
    rank: int | None = None,
    world: int | None = None,
    *,
    quantize: Callable[[nn.Module, str], nn.Module] | None = None,
    group=None,
) -> nn.Module:
    """Shard a built model in place for `rank` of `world` (default: the initialized process group) and return it.

    `quantize(linear, name) -> module` is applied to every plain Linear after the cut, before the collectives are
    attached; an INT4 group size that does not divide a shard fails naming the layer and a group size that works.
    """
    rank, world = _rank_and_world(rank, world)
    plan = plan_tp(model, rank, world)
    if world > 1:
        cut_parameters(model, plan)
    _finish(model, plan, quantize, group)
    return model


def _finish(model: nn.Module, plan: TPPlan, quantize, group, communicate: bool = True) -> None:
    """Quantize every plain Linear (cut or replicated, as a whole-model quantization pass would, so TP=1 is the
    exact twin), then attach the collectives to whatever module now sits at each name."""
    if quantize is not None:
        for name, module in list(model.named_modules()):
            if type(module) is nn.Linear:
                _replace_module(model, name, _quantize_shard(quantize, module, name, plan))
    if plan.world > 1 and communicate:
        _add_communication(model, plan, group or dist.group.WORLD)


def _quantize_shard(quantize, linear: nn.Linear, name: str, plan: TPPlan) -> nn.Module:
    try:
        return quantize(linear, name)
    except ValueError as error:
        if plan.world == 1 or f"{name}.weight" not in plan.params:
            raise
        raise ValueError(f"{error} (This is rank {plan.rank}'s shard of {name} at --tp {plan.world}: it has "
                         f"{linear.in_features} of the layer's input features.)") from None


# ----------------------------------------------------------------------------------------------------------------
# Loading only this rank's slices


def _read(source, key: str, shard: ParamShard | None) -> torch.Tensor:
    """This rank's part of `key`; from a safetensors checkpoint only the needed rows/columns are read."""
    if not hasattr(source, "get_slice"):
        return source[key] if shard is None else shard.cut(source[key])
    view = source.get_slice(key)
    if shard is None or shard.zeros:
        full = view[:]
        return full if shard is None else shard.cut(full)
    index = (slice(None),) * shard.dim
    return torch.cat([view[index + (slice(start, stop),)] for start, stop in shard.ranges], shard.dim)


def load_sharded(
    source: str | Path | Mapping[str, torch.Tensor],
    build_fn: Callable[[], nn.Module],
    rank: int | None = None,
    world: int | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    quantize: Callable[[nn.Module, str], nn.Module] | None = None,
    group=None,
) -> nn.Module:
    """Build `build_fn()` on the meta device, shard it, and fill it with this rank's slices of `source`.

    `source`: a native-format safetensors file or folder (our key names; convert foreign checkpoints first with
    `multimodal convert`), or an in-memory state dict. `quantize` as in `shard_model`.
    """
    rank, world = _rank_and_world(rank, world)
    if isinstance(source, (str, Path)):
        config_path = Path(source) / NATIVE_CONFIG
        if config_path.exists() and "quant" in json.loads(config_path.read_text()):
            raise CheckpointError(
                f"{source} is already quantized; tensor parallel shards first and quantizes each shard, so load "
                f"the float checkpoint with --quant instead."
            )
        source = LazyCheckpoint(source)
    model = build_on_meta(build_fn)
    plan = plan_tp(model, rank, world)
    if world > 1:
        cut_parameters(model, plan)
    expected = model.state_dict()
    available = set(source.keys())  # not `key in source`: a Mapping's __contains__ reads the whole tensor
    missing = [key for key in expected if key not in available]
    if missing:
        raise CheckpointError(f"The checkpoint lacks {len(missing)} keys the model needs, e.g. {missing[0]}.")
    state = {key: _read(source, key, plan.params.get(key)).to(device) for key in expected}
    load_into(model, state, dtype)
    _finish(model, plan, quantize, group)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Measuring what a rank holds


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and persistent buffers (works on meta models too)."""
    tensors = list(model.parameters()) + [b for name, b in model.named_buffers() if name in model.state_dict()]
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class RankWeights:
    world: int
    total_bytes: int  # the unsharded model
    rank_bytes: tuple[int, ...]  # what each rank holds
    replicated_bytes: int  # held whole by every rank (norms, replicated embeddings, row-parallel biases, ...)

    @property
    def ideal_bytes(self) -> float:
        """total / world plus the replicated part counted in full on each rank."""
        return (self.total_bytes - self.replicated_bytes) / self.world + self.replicated_bytes


def tp_weight_report(build_fn: Callable[[], nn.Module], world: int, quant: QuantSpec | None = None) -> RankWeights:
    """Per-rank weight bytes of `build_fn()` sharded over `world` ranks, computed on the meta device; with `quant`,
    of the weight-only quantized shards (a ValueError when an INT4 group size does not divide a shard)."""
    full = build_on_meta(build_fn)
    if quant is not None:
        convert_for_runtime(full, quant)
    total = weight_bytes(full)
    rank_bytes, replicated = [], 0
    for rank in range(world):
        model = build_on_meta(build_fn)
        plan = plan_tp(model, rank, world)
        if world > 1:
            cut_parameters(model, plan)
        if quant is not None:
            _finish(model, plan, lambda linear, name: empty_quantized_linear(linear, quant, name), group=None,
                    communicate=False)
        if rank == 0:
            cut = {key.rpartition(".")[0] for key, shard in plan.params.items() if not shard.zeros}
            replicated = sum(t.numel() * t.element_size() for key, t in model.state_dict().items()
                             if key.rpartition(".")[0] not in cut)
        rank_bytes.append(weight_bytes(model))
    return RankWeights(world, total, tuple(rank_bytes), replicated)
