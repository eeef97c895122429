"""Weight-only INT8 / INT4 quantization of `nn.Linear` layers, as a pass over a built model.

Schemes (the activations stay in float; only weights are quantized):
- int8: symmetric, one scale per output channel: `q = round(w / s)` in [-127, 127], `s = max|w_row| / 127`.
- int4: asymmetric, group-wise along the input dimension (group size 32, 64 or 128): per group
  `scale = (max - min) / 15`, `zero = min + 8 * scale`, `q = round((w - zero) / scale) + 8` in [0, 15], so that
  `w ~ (q - 8) * scale + zero` (torch's tinygemm convention). Scales and zeros are stored in bfloat16 and the
  integers are rounded against the stored values.
Biases stay in float and are added after the fused matmul.

The two halves, as in gpt-fast:
- `quantize_state_dict` (offline, or while loading a float checkpoint) turns float Linear weights into the
  canonical, device-independent tensors of `kernels/int8.py` / `kernels/int4.py`;
- `convert_for_runtime` swaps the Linear modules of a (meta) model for `Int8WeightOnlyLinear` /
  `Int4WeightOnlyLinear`, whose state dict keys are exactly those tensors, so `load_into` loads strictly.
`quantize_model` does both on a model that already holds float weights. `load_weights` is the one call that loading
code needs for `--quant` and for checkpoints written by `multimodal quantize`. Which layers are quantized is chosen
by name: every plain `nn.Linear` except those matching an `exclude` glob (for instance `output` to keep the LM head
in float, or `vit.*`).

Tensor parallelism: shard first, then quantize each shard with `quantize_linear`, which checks that the group size
divides the shard's input features and names the layer and a group size that works when it does not.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kernels.dispatch import BACKENDS, CANONICAL, CPU_TILED, int4_linear, int8_linear
from kernels.int4 import cpu_int4pack_supported, from_cpu_int4pack, pack_int4, to_cpu_int4pack
from kernels.int8 import INT8_CPU_K_MULTIPLE, cpu_int8pack_supported
from multimodal.checkpoint import CheckpointError, load_into, save_native

QUANT_FORMAT_VERSION = 1
SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
SCALE_DTYPE = torch.bfloat16
INT8_MAX = 127
INT4_LEVELS = 15
INT4_OFFSET = 8


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize and how; `group_size` only matters for int4."""

    scheme: str
    group_size: int = 64
    exclude: tuple[str, ...] = ()  # glob patterns of module names kept in float, e.g. ("output",)

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"Unknown quantization scheme {self.scheme!r}; choose int8 or int4.")
        if self.scheme == "int4" and self.group_size not in GROUP_SIZES:
            raise ValueError(f"INT4 group size must be one of 32, 64, 128, not {self.group_size}.")
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def to_config(self) -> dict:
        config = {"format_version": QUANT_FORMAT_VERSION, "scheme": self.scheme, "exclude": list(self.exclude)}
        if self.scheme == "int4":
            config["group_size"] = self.group_size
        return config

    @classmethod
    def from_config(cls, config: Mapping) -> QuantSpec:
        version = config.get("format_version")
        if version != QUANT_FORMAT_VERSION:
            raise CheckpointError(
                f"Quantized checkpoint has quantization format version {version}; this suite reads "
                f"version {QUANT_FORMAT_VERSION}."
            )
        return cls(config["scheme"], config.get("group_size", 64), tuple(config.get("exclude", ())))


# ----------------------------------------------------------------------------------------------------------------
# Plain helpers on tensors


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (int8 [N, K], scales [N] in bfloat16)."""
    absmax = weight.to(torch.float32).abs().amax(dim=1)  # [N]
    scales = (absmax / INT8_MAX).clamp(min=1e-10).to(SCALE_DTYPE)  # an all-zero row keeps a usable scale
    quantized = torch.round(weight.to(torch.float32) / scales.to(torch.float32)[:, None])
    return quantized.clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scales


def quantize_int4_groupwise(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (uint8 [N, K / 2] canonical packing, scales_and_zeros [K / G, N, 2] in bfloat16)."""
    out_features, in_features = weight.shape
    check_group_size(in_features, group_size, "weight")
    groups = weight.to(torch.float32).reshape(out_features, in_features // group_size, group_size)  # [N, K/G, G]
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [N, K/G]
    scales = ((high - low) / INT4_LEVELS).clamp(min=1e-6).to(SCALE_DTYPE)  # [N, K/G]
    zeros = (low + INT4_OFFSET * scales.to(torch.float32)).to(SCALE_DTYPE)  # [N, K/G]
    # Round against the stored (bfloat16) scale and zero, so dequantization lands on the nearest level.
    levels = (groups - zeros.to(torch.float32)[..., None]) / scales.to(torch.float32)[..., None] + INT4_OFFSET
    quantized = torch.round(levels).clamp(0, INT4_LEVELS).reshape(out_features, in_features)  # [N, K]
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # [K/G, N, 2]
    return pack_int4(quantized), scales_and_zeros


def suggest_group_size(in_features: int) -> int | None:
    """The largest supported group size dividing `in_features`, or None."""
    fitting = [size for size in GROUP_SIZES if in_features % size == 0]
    return max(fitting) if fitting else None


def check_group_size(in_features: int, group_size: int, name: str) -> None:
    """Raise a ValueError naming the layer and a group size that works when `group_size` does not divide K."""
    if in_features % group_size == 0:
        return
    fitting = suggest_group_size(in_features)
    hint = (
        f"use group size {fitting}" if fitting
        else "no supported group size (32, 64, 128) divides it, so use int8 or keep the layer in float"
    )
    raise ValueError(f"Layer {name}: INT4 group size {group_size} does not divide its {in_features} input features; "
                     f"{hint}.")


# ----------------------------------------------------------------------------------------------------------------
# Modules


class Int8WeightOnlyLinear(nn.Module):
    """A Linear with int8 weights [N, K] and per-output-channel scales [N]; the bias (if any) stays in float.

    The state dict always holds [N, K]. On the CPU, a K that is not a multiple of 16 (which torch's fused kernel
    cannot read) is padded once with zero columns, and the input with zeros per call, so every width takes the
    fused kernel; the padding never reaches a checkpoint.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.backend = "auto"  # see kernels.dispatch; tests force a path with `set_backend`
        self.padded = False
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=SCALE_DTYPE, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.register_state_dict_post_hook(_int8_state_dict_unpadded)
        self.register_load_state_dict_pre_hook(_int8_unpad_before_load)
        self.register_load_state_dict_post_hook(_reset_after_load)

    def reset_buffers(self) -> None:
        """Pad the weight where the device's fused kernel needs it (`load_into` calls this)."""
        if self.weight.is_meta:
            return
        wanted = self.weight.device.type == "cpu" and not cpu_int8pack_supported(self.in_features)
        if wanted and not self.padded:
            width = -(-self.in_features // INT8_CPU_K_MULTIPLE) * INT8_CPU_K_MULTIPLE
            self.weight = F.pad(self.weight, (0, width - self.in_features))  # [N, K padded]
        elif self.padded and not wanted:
            self.weight = self.weight[:, : self.in_features].contiguous()
        self.padded = wanted

    def _apply(self, fn, recurse=True):
        # A move to another device goes through the unpadded weight; the new device then pads if it needs to.
        if self.padded:
            self.weight, self.padded = self.weight[:, : self.in_features].contiguous(), False
        super()._apply(fn, recurse)
        self.reset_buffers()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padded:
            x = F.pad(x, (0, self.weight.shape[1] - self.in_features))  # [..., K padded]
        out = int8_linear(x, self.weight, self.scales, self.backend)  # [..., N]
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _int8_state_dict_unpadded(module, state_dict, prefix, local_metadata) -> None:
    if module.padded:
        state_dict[prefix + "weight"] = module.weight[:, : module.in_features].contiguous()


def _int8_unpad_before_load(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    if module.padded and prefix + "weight" in state_dict:
        module.weight, module.padded = module.weight[:, : module.in_features].contiguous(), False


def _reset_after_load(module, incompatible_keys) -> None:
    module.reset_buffers()


class Int4WeightOnlyLinear(nn.Module):
    """A Linear with group-wise int4 weights; the bias (if any) stays in float.

    The state dict always holds the canonical layout (uint8 [N, K / 2] + scales_and_zeros [K / G, N, 2]). On the CPU
    the module keeps its weight in torch's tiled layout instead (repacked after loading and after every move), so
    the fused kernel needs no conversion per call and the weight is held once.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 64,
                 device=None, dtype=None):
        super().__init__()
        check_group_size(in_features, group_size, "Int4WeightOnlyLinear")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.backend = "auto"
        self.layout = CANONICAL
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer(
            "scales_and_zeros",
            torch.empty(in_features // group_size, out_features, 2, dtype=SCALE_DTYPE, device=device),
        )
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.register_state_dict_post_hook(_int4_state_dict_in_canonical_layout)
        self.register_load_state_dict_pre_hook(_int4_incoming_weight_is_canonical)
        self.register_load_state_dict_post_hook(_reset_after_load)

    def reset_buffers(self) -> None:
        """Put the weight in the layout of the fastest kernel for its device (`load_into` calls this)."""
        if self.weight.is_meta:
            return
        on_cpu = self.weight.device.type == "cpu"
        wanted = CPU_TILED if on_cpu and cpu_int4pack_supported(self.out_features, self.in_features,
                                                                self.group_size) else CANONICAL
        if wanted != self.layout:
            self.weight = to_cpu_int4pack(self.weight) if wanted == CPU_TILED else from_cpu_int4pack(self.weight)
            self.layout = wanted

    def _apply(self, fn, recurse=True):
        # A move to another device goes through the canonical layout; the new device then picks its own.
        if self.layout == CPU_TILED:
            self.weight, self.layout = from_cpu_int4pack(self.weight), CANONICAL
        super()._apply(fn, recurse)
        self.reset_buffers()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = int4_linear(x, self.weight, self.scales_and_zeros, self.group_size, self.layout, self.backend)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}")


def _int4_state_dict_in_canonical_layout(module, state_dict, prefix, local_metadata) -> None:
    if module.layout == CPU_TILED:
        state_dict[prefix + "weight"] = from_cpu_int4pack(module.weight)


def _int4_incoming_weight_is_canonical(module, state_dict, prefix, local_metadata, strict, missing, unexpected,
                                       errors) -> None:
    if prefix + "weight" in state_dict:
        module.layout = CANONICAL


QUANTIZED_LINEARS = (Int8WeightOnlyLinear, Int4WeightOnlyLinear)


# ----------------------------------------------------------------------------------------------------------------
# One layer (also one tensor-parallel shard)


@torch.no_grad()
def quantize_linear(linear: nn.Linear, spec: QuantSpec, name: str = "linear") -> nn.Module:
    """A quantized copy of one Linear; for tensor parallelism call it on the already-sharded Linear.

    Raises a ValueError naming `name` and a group size that works when the INT4 group size does not divide the
    (local) input features.
    """
    module = empty_quantized_linear(linear, spec, name)
    tensors = quantize_weight(linear.weight.detach(), spec)
    for key, value in tensors.items():
        setattr(module, key, value.to(linear.weight.device))
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach().clone())
    module.reset_buffers()
    return module


def empty_quantized_linear(linear: nn.Linear, spec: QuantSpec, name: str) -> nn.Module:
    """A quantized module with the shapes of `linear` and uninitialised (or meta) tensors, to load into."""
    device, dtype = linear.weight.device, linear.weight.dtype
    has_bias = linear.bias is not None
    if spec.scheme == "int8":
        return Int8WeightOnlyLinear(linear.in_features, linear.out_features, has_bias, device=device, dtype=dtype)
    check_group_size(linear.in_features, spec.group_size, name)
    return Int4WeightOnlyLinear(linear.in_features, linear.out_features, has_bias, spec.group_size, device, dtype)


def quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """float [N, K] -> the canonical tensors of one quantized Linear, keyed by their state dict names."""
    if spec.scheme == "int8":
        quantized, scales = quantize_int8_per_channel(weight)
        return {"weight": quantized, "scales": scales}
    packed, scales_and_zeros = quantize_int4_groupwise(weight, spec.group_size)
    return {"weight": packed, "scales_and_zeros": scales_and_zeros}


# ----------------------------------------------------------------------------------------------------------------
# Whole models


def selected_linears(model: nn.Module, exclude: Iterable[str] = ()) -> list[tuple[str, nn.Linear]]:
    """Every plain `nn.Linear` whose name matches no `exclude` glob, in module order.

    Subclasses are left alone on purpose: e.g. `nn.MultiheadAttention` reads its `out_proj.weight` directly.
    """
    exclude = tuple(exclude)
    return [
        (name, module) for name, module in model.named_modules()
        if type(module) is nn.Linear and not any(fnmatchcase(name, pattern) for pattern in exclude)
    ]


def _check_model(model: nn.Module, spec: QuantSpec) -> list[tuple[str, nn.Linear]]:
    """The selected layers that the scheme fits. An INT4 layer whose input width the group size does not divide
    (the embedded DiTs' 48-wide patch embedding, say) stays in float, with one warning naming them all; the rule
    depends only on shapes, so a checkpoint written this way loads back the same way."""
    linears = selected_linears(model, spec.exclude)
    unfit = [(name, linear) for name, linear in linears if not fits(linear, spec)]
    if unfit:
        warn_kept_in_float(unfit, spec)
    return [(name, linear) for name, linear in linears if fits(linear, spec)]


def fits(linear: nn.Linear, spec: QuantSpec) -> bool:
    """Whether the scheme can hold this layer: INT4 needs the group size to divide its input features."""
    return spec.scheme != "int4" or linear.in_features % spec.group_size == 0


def warn_kept_in_float(unfit: Iterable[tuple[str, nn.Linear]], spec: QuantSpec) -> None:
    names = ", ".join(f"{name} ({linear.in_features})" for name, linear in unfit)
    warnings.warn(f"INT4 group size {spec.group_size} does not divide the input features of {names}; kept in float.",
                  stacklevel=4)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def convert_for_runtime(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Swap the selected Linears for empty quantized modules (typically on the meta device), in place."""
    for name, linear in _check_model(model, spec):
        _replace(model, name, empty_quantized_linear(linear, spec, name))
    return model


@torch.no_grad()
def quantize_model(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Quantize the selected Linears of a model that holds float weights, in place, one layer at a time."""
    for name, linear in _check_model(model, spec):
        _replace(model, name, quantize_linear(linear, spec, name))
    return model


@torch.no_grad()
def quantize_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module, spec: QuantSpec) -> dict:
    """Float state dict of `model` (which may live on the meta device) -> the state dict of its quantized twin.

    Tensors are read one at a time, so loading a float checkpoint this way holds only one float weight at once.
    """
    weight_keys = {f"{name}.weight" for name, _ in _check_model(model, spec)}
    out = {}
    for key in state.keys():
        if key in weight_keys:
            prefix = key[: -len("weight")]
            out.update({prefix + name: tensor for name, tensor in quantize_weight(state[key], spec).items()})
        else:
            out[key] = state[key]
    return out


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Force one kernel path (see kernels.dispatch) in every quantized module; "auto" restores the default."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    for module in model.modules():
        if isinstance(module, QUANTIZED_LINEARS):
            module.backend = backend
    return model


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def spec_from_checkpoint_config(config: Mapping) -> QuantSpec | None:
    """The quantization a native checkpoint was written with (its config's "quant" entry), or None for float."""
    quant = config.get("quant")
    return None if quant is None else QuantSpec.from_config(quant)


def save_quantized(model: nn.Module, spec: QuantSpec, config: dict, out_dir: str | Path, kind: str) -> Path:
    """Write a quantized model in the native format; config.json gets a "quant" entry with version and group size."""
    return save_native(model.state_dict(), {**config, "quant": spec.to_config()}, out_dir, kind)


def load_weights(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    checkpoint_config: Mapping,
    quant: str = "none",
    group_size: int = 64,
    dtype: torch.dtype | None = None,
    exclude: Iterable[str] = (),
) -> nn.Module:
    """Load a float or quantized checkpoint into `model` (built on the meta device), quantized as asked.

    - A checkpoint written by `multimodal quantize` loads as stored; `quant` must be "none" or the same scheme.
    - A float checkpoint with `quant` "int8" / "int4" is quantized while it is read, one weight at a time.
    `dtype` is the compute dtype of the float tensors (norms, embeddings, biases, scales).
    """
    stored = spec_from_checkpoint_config(checkpoint_config)
    if stored is not None:
        if quant not in ("none", stored.scheme):
            raise ValueError(f"The checkpoint is already quantized to {stored.scheme}; drop --quant or pass "
                             f"--quant {stored.scheme}.")
        convert_for_runtime(model, stored)
        return load_into(model, state, dtype=dtype)
    if quant == "none":
        return load_into(model, state, dtype=dtype)
    spec = QuantSpec(quant, group_size, tuple(exclude))
    quantized_state = quantize_state_dict(state, model, spec)
    convert_for_runtime(model, spec)
    return load_into(model, quantized_state, dtype=dtype)
