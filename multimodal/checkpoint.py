"""Checkpoint input/output: safetensors reading, key tables from foreign formats, strict loading, our native format.

Every converter in the suite is a `KeyTable`: a list of `Rule`s mapping foreign key patterns onto our names, with
optional fusion (several foreign tensors concatenated into one of ours) or splitting (one foreign tensor cut into
several of ours). `{n}` in a pattern stands for a layer index. The table is strict in both directions: a foreign key
that no rule consumes (and no ignore pattern drops) is "unexpected", a rule whose sources are absent is "missing".
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT_VERSION = 1
NATIVE_WEIGHTS = "model.safetensors"
NATIVE_CONFIG = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one sentence per problem."""


# ----------------------------------------------------------------------------------------------------------------
# Reading


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    index = path / SAFETENSORS_INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"No safetensors weights found in {path} (expected {NATIVE_WEIGHTS} or {SAFETENSORS_INDEX})."
        )
    return files


class LazyCheckpoint(Mapping[str, torch.Tensor]):
    """A read-only mapping over one or more safetensors files; tensors are read (memory-mapped) on access.

    `get_slice(key)` returns safetensors' slice object so a tensor-parallel rank reads only its rows or columns.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"Checkpoint path {self.path} does not exist.")
        self._handles = {}
        self._where: dict[str, Path] = {}
        for file in _safetensors_files(self.path):
            _check_suffix(file)
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as error:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{file} is not a readable safetensors file ({error}).") from None
            self._handles[file] = handle
            for key in handle.keys():
                self._where[key] = file

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._handles[self._where[key]].get_tensor(key)

    def get_slice(self, key: str):
        return self._handles[self._where[key]].get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.get_slice(key).get_shape())

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _check_suffix(file: Path) -> None:
    if file.suffix != ".safetensors":
        raise CheckpointError(f"{file} is not a safetensors file.")


def read_state_dict(path: str | Path) -> Mapping[str, torch.Tensor]:
    """Open a checkpoint: a safetensors file or folder (single or sharded), or a `.bin`/`.pt` file read with
    `weights_only=True`. Any other file kind is refused, since unpickling arbitrary files runs code."""
    path = Path(path)
    if path.is_file() and path.suffix in (".bin", ".pt", ".pth"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:
            raise CheckpointError(
                f"{path} could not be read as a weights-only PyTorch file; files that need arbitrary unpickling "
                f"are refused ({type(error).__name__})."
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path} does not hold a flat mapping of names to tensors.")
        return state
    if path.is_file() and path.suffix != ".safetensors":
        raise CheckpointError(
            f"{path} has an unsupported format '{path.suffix}'; use safetensors (or a weights-only .bin/.pt)."
        )
    if path.is_dir() and not list(path.glob("*.safetensors")):
        bins = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
        if len(bins) == 1:
            return read_state_dict(bins[0])
    return LazyCheckpoint(path)


# ----------------------------------------------------------------------------------------------------------------
# Key tables


@dataclass(frozen=True)
class Rule:
    """One row of a key table.

    `ours` and every entry of `theirs` are patterns in which `{n}` matches a layer index.
    - one source, one target: a rename.
    - several sources, one target: the sources are concatenated along `dim` (e.g. q/k/v -> fused qkv).
    - use `split=(size, ...)` with one source and several targets in `ours_split` for the opposite direction.
    `transform` (optional) is applied to the tensor after fusion, e.g. a transpose.
    """

    ours: str
    theirs: tuple[str, ...]
    dim: int = 0
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class SplitRule:
    """One foreign tensor cut along `dim` into several of ours (e.g. a fused tensor we keep separate)."""

    ours: tuple[str, ...]
    theirs: str
    sizes: Callable[[Mapping[str, int]], tuple[int, ...]] | tuple[int, ...]
    dim: int = 0


@dataclass
class KeyTable:
    name: str
    rules: list[Rule | SplitRule]
    ignore: tuple[str, ...] = ()  # regexes of foreign keys to drop (e.g. rotary inv_freq buffers)
    context: dict[str, int] = field(default_factory=dict)  # config values a SplitRule's `sizes` may need


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{n}"), r"(?P<n>\d+)") + "$")


def convert(foreign: Mapping[str, torch.Tensor], table: KeyTable) -> dict[str, torch.Tensor]:
    """Apply a key table strictly; raise CheckpointError naming missing and unexpected foreign keys."""
    keys = list(foreign.keys())
    consumed: set[str] = set()
    missing: list[str] = []
    out: dict[str, torch.Tensor] = {}
    ignore = [re.compile(p) for p in table.ignore]

    def layer_indices(template: str) -> list[str | None]:
        if "{n}" not in template:
            return [None]
        pattern = _pattern(template)
        return sorted({m.group("n") for k in keys if (m := pattern.match(k))}, key=int)

    for rule in table.rules:
        first = rule.theirs[0] if isinstance(rule, Rule) else rule.theirs
        for n in layer_indices(first):
            def fill(template: str) -> str:
                return template if n is None else template.replace("{n}", n)

            if isinstance(rule, Rule):
                sources = [fill(t) for t in rule.theirs]
                absent = [s for s in sources if s not in foreign]
                if absent:
                    missing.extend(absent)
                    continue
                tensors = [foreign[s] for s in sources]
                tensor = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=rule.dim)
                if rule.transform is not None:
                    tensor = rule.transform(tensor)
                out[fill(rule.ours)] = tensor
                consumed.update(sources)
            else:
                source = fill(rule.theirs)
                if source not in foreign:
                    missing.append(source)
                    continue
                sizes = rule.sizes(table.context) if callable(rule.sizes) else rule.sizes
                tensor = foreign[source]
                if sum(sizes) != tensor.shape[rule.dim]:
                    raise CheckpointError(
                        f"{table.name}: {source} has {tensor.shape[rule.dim]} entries along dim {rule.dim}, "
                        f"expected {sum(sizes)} to split into {', '.join(fill(o) for o in rule.ours)}."
                    )
                for target, part in zip(rule.ours, torch.split(tensor, list(sizes), dim=rule.dim)):
                    out[fill(target)] = part
                consumed.add(source)

    unexpected = [k for k in keys if k not in consumed and not any(p.search(k) for p in ignore)]
    problems = []
    if missing:
        problems.append(f"{table.name}: missing keys: {_shorten(missing)}.")
    if unexpected:
        problems.append(f"{table.name}: unexpected keys: {_shorten(unexpected)}.")
    if problems:
        raise CheckpointError(" ".join(problems))
    return out


def _shorten(names: Iterable[str], limit: int = 8) -> str:
    names = list(names)
    head = ", ".join(names[:limit])
    return head + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ----------------------------------------------------------------------------------------------------------------
# Loading into a model


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Raise one sentence per kind of problem: missing keys, unexpected keys, keys with the wrong shape."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} {tuple(state[k].shape)} != {expected[k]}"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"Missing keys: {_shorten(missing)}.")
    if unexpected:
        problems.append(f"Unexpected keys: {_shorten(unexpected)}.")
    if misshaped:
        problems.append(f"Mis-shaped keys: {_shorten(misshaped)}.")
    if problems:
        raise CheckpointError(" ".join(problems))


def load_into(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """Strictly load `state` into `model` (typically built on the meta device) with assign, so no weight exists twice.

    Floating tensors are cast to `dtype` when given; integer tensors (quantized weights) keep theirs.
    Non-persistent buffers left on the meta device (rotary tables) are rebuilt by the module's `reset_buffers()`.
    """
    check_state_dict(model, state)
    tensors = {}
    for key, value in state.items():
        tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[key] = tensor
    model.load_state_dict(tensors, strict=True, assign=True)
    for module in model.modules():
        reset = getattr(module, "reset_buffers", None)
        if callable(reset):
            reset()
    return model


def build_on_meta(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Construct a model without allocating its weights."""
    with torch.device("meta"):
        return factory()


# ----------------------------------------------------------------------------------------------------------------
# Native format: a folder with model.safetensors and config.json


def save_native(state: Mapping[str, torch.Tensor], config: dict, out_dir: str | Path, kind: str) -> Path:
    """Write our native format: `model.safetensors` plus `config.json` carrying `kind` and the format version."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(out_dir / NATIVE_WEIGHTS), metadata={"format_version": str(FORMAT_VERSION), "kind": kind})
    meta = {"format_version": FORMAT_VERSION, "kind": kind, **config}
    (out_dir / NATIVE_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out_dir


def read_native_config(path: str | Path, kind: str | None = None) -> dict:
    """Read `config.json` of a native checkpoint, checking the format version and (optionally) the kind."""
    config_path = Path(path) / NATIVE_CONFIG
    if not config_path.exists():
        raise CheckpointError(f"{path} has no {NATIVE_CONFIG}; is it a native checkpoint (see `multimodal convert`)?")
    config = json.loads(config_path.read_text())
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{config_path} has format version {version}; this suite reads version {FORMAT_VERSION}.")
    if kind is not None and config.get("kind") != kind:
        raise CheckpointError(f"{path} holds a '{config.get('kind')}' checkpoint, not a '{kind}' one.")
    return config
