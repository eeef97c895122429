"""Decode-time matrix-vector products on the CPU (`kernels/csrc/gemv.c`, and for weights reordered into blocks of 16
output rows `bf16_blocked.c`, `int8_blocked.c` and `int4_blocked.c`), built on first use with the C compiler,
together with the whole decode step that calls them (`kernels/csrc/decode.c`, driven by `glm/cpu_decode.py`).

At batch 1 every decode step reads each weight once, and torch's CPU kernels read them at a fraction of the memory
bandwidth. On one Zen 5 core, with the eager decode step around them, `multimodal bench quant --threads 1
--decode-step eager [--float-kernel onednn --int8-kernel cpu]` measures whole steps reading 6.8 GB/s of int8
weights with torch's fused kernel and 11.8 with these, 11.9 GB/s of bfloat16 weights with prepacked oneDNN and 16.4
with these (README), against a read floor of 21-22 GB/s; with the whole step in C (`glm/cpu_decode.py`) int8 and
int4 steps read at about 80% of the floor.

The library is compiled once per source, compiler and target into `~/.cache/glm-multimodal/kernels` (or
$GLM_MULTIMODAL_CACHE/kernels) with `-march=native`, and loaded with ctypes: no Python headers, no build step at
install. Where no C compiler works, `library()` is None after one warning and the callers keep torch's kernels.
GLM_MULTIMODAL_GEMV=0 turns it off. `build(march)` makes the library for another target (the tests build the AVX2
and the plain x86-64 code this CPU does not pick, and check each against float64).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCES = tuple(Path(__file__).parent / "csrc" / name
                for name in ("gemv.c", "bf16_blocked.c", "int8_blocked.c", "int4_blocked.c", "decode.c"))
HEADERS = (Path(__file__).parent / "csrc" / "bf16.h",)  # part of the cache key, not of the command line
NATIVE = "native"
BLOCKED_ROWS = 8  # rows up to which the blocked bfloat16 kernel runs (`PackedLinear.blocked`); oneDNN's matmul above


def cache_dir() -> Path:
    root = os.environ.get("GLM_MULTIMODAL_CACHE") or Path.home() / ".cache" / "glm-multimodal"
    return Path(root) / "kernels"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _flag_sets(march: str) -> list[list[str]]:
    """Compiler flags to try in order: the target with OpenMP, then without (single-threaded)."""
    on_arm = platform.machine().lower() in ("arm64", "aarch64")
    target = "-mcpu=native" if on_arm and march == NATIVE else f"-march={march}"  # GCC on ARM has no -march=native
    base = ["-O3", "-shared", "-fPIC", "-Wno-psabi", target]
    return [base + ["-fopenmp"], base]


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    pointer, size, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.gemv_int8.argtypes = [pointer, flag, pointer, pointer, flag, pointer, size, size, size, ctypes.c_int]
    lib.gemv_int8.restype = ctypes.c_int
    for name in ("gemv_bf16", "gemv_f32"):
        getattr(lib, name).argtypes = [pointer, pointer, pointer, size, size, size, ctypes.c_int]
        getattr(lib, name).restype = None
    lib.gemv_bf16_blocked.argtypes = [pointer, pointer, pointer, size, size, size, ctypes.c_int]
    lib.gemv_bf16_blocked.restype = ctypes.c_int
    lib.gemv_bf16_block.restype = ctypes.c_int
    lib.gemv_int8_blocked.argtypes = [pointer, pointer, pointer, pointer, size, size, size, ctypes.c_int]
    lib.gemv_int8_blocked.restype = ctypes.c_int
    lib.gemv_int8_block.restype = ctypes.c_int
    lib.gemv_vnni_blocks.restype = ctypes.c_int
    lib.gemv_int4_blocked.argtypes = [pointer, pointer, pointer, size, size, size, size, ctypes.c_int]
    lib.gemv_int4_blocked.restype = ctypes.c_int
    lib.gemv_int4_block.restype = ctypes.c_int
    lib.gemv_int4_tiled.argtypes = [pointer, flag, pointer, pointer, pointer, size, size, size, size, ctypes.c_int]
    lib.gemv_int4_tiled.restype = ctypes.c_int
    lib.gemv_integer_paths.restype = ctypes.c_int
    lib.gemv_bf16_rows.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=None)
def build(march: str = NATIVE) -> ctypes.CDLL | None:
    """The kernels compiled for `march` (a -march value; "native": this CPU), from the cache when built before;
    None when no flag set compiles."""
    compiler = _compiler()
    if compiler is None:
        return None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    for flags in _flag_sets(march):
        source = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
        key = hashlib.sha1(source + " ".join([compiler, version, *flags]).encode()).hexdigest()[:16]
        path = cache_dir() / f"gemv-{march}-{key}.so"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as scratch:  # then one atomic rename: safe in parallel
                built = Path(scratch) / path.name
                done = subprocess.run([compiler, *flags, "-o", str(built), *map(str, SOURCES), "-lm"],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    continue
                os.replace(built, path)
        return _declare(ctypes.CDLL(str(path)))
    return None


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """This CPU's kernels, or None (disabled, or no working C compiler: one warning)."""
    if os.environ.get("GLM_MULTIMODAL_GEMV", "1") == "0":
        return None
    try:
        lib = build(NATIVE)
    except OSError as error:  # a cache folder that cannot be written, a library that cannot be loaded
        lib, reason = None, str(error)
    else:
        reason = "no C compiler could build kernels/csrc/gemv.c"
    if lib is None:
        warnings.warn(f"Decode kernels unavailable ({reason}); using torch's CPU kernels.", stacklevel=2)
    return lib


def available() -> bool:
    return library() is not None


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()


def _as_read(values: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Values the int8 kernel reads as they are (float32 or bfloat16, contiguous), and whether they are bfloat16."""
    if values.dtype not in (torch.float32, torch.bfloat16):
        values = values.to(torch.float32)
    return values.contiguous(), values.dtype == torch.bfloat16


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, lib: ctypes.CDLL | None = None
              ) -> torch.Tensor:
    """x [M, K] float @ (weight int8 [N, K] * scales [N]).T -> [M, N] float32; meant for a few rows."""
    lib = lib or library()
    (rows, rows_bf16), (scales, scales_bf16) = _as_read(x), _as_read(scales)  # [M, K], [N]
    weight = weight.contiguous()
    out = torch.empty(rows.shape[0], weight.shape[0], dtype=torch.float32)  # [M, N]
    status = lib.gemv_int8(rows.data_ptr(), rows_bf16, weight.data_ptr(), scales.data_ptr(), scales_bf16,
                           out.data_ptr(), rows.shape[0], weight.shape[0], rows.shape[1], torch.get_num_threads())
    if status != 0:
        raise MemoryError("The int8 decode kernel could not allocate its buffers.")
    return out


def float_gemv(x: torch.Tensor, weight: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [M, K] float @ weight [N, K].T (bfloat16 or float32) -> [M, N] float32; meant for one row."""
    lib = lib or library()
    if weight.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"The decode kernel reads bfloat16 or float32 weights, not {weight.dtype}.")
    rows = _rows(x)  # [M, K]
    weight = weight.contiguous()
    out = torch.empty(rows.shape[0], weight.shape[0], dtype=torch.float32)  # [M, N]
    kernel = lib.gemv_bf16 if weight.dtype == torch.bfloat16 else lib.gemv_f32
    kernel(rows.data_ptr(), weight.data_ptr(), out.data_ptr(), rows.shape[0], weight.shape[0], rows.shape[1],
           torch.get_num_threads())
    return out


def bf16_blocked_available(lib: ctypes.CDLL | None = None) -> bool:
    """Whether this CPU's build multiplies bfloat16 in bfloat16 (AVX512_BF16), where the blocked layout pays."""
    lib = lib or library()
    return lib is not None and lib.gemv_bf16_rows() > 0


def block_bf16(weight: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """A bfloat16 weight [N, K] (K even) in the blocked layout of `kernels/csrc/bf16_blocked.c`: [ceil(N / B), K / 2,
    B, 2] for blocks of B output rows, the rows past N zeros."""
    lib = lib or library()
    block = lib.gemv_bf16_block()
    rows, cols = weight.shape
    if weight.dtype != torch.bfloat16 or cols % 2:
        raise ValueError(f"The blocked layout takes bfloat16 weights with an even number of columns, not {cols} "
                         f"{weight.dtype}.")
    padded = torch.zeros(-(-rows // block) * block, cols, dtype=torch.bfloat16)
    padded[:rows] = weight.detach()
    return padded.reshape(-1, block, cols // 2, 2).transpose(1, 2).contiguous()  # [N / B, K / 2, B, 2]


def bf16_blocked_gemv(x: torch.Tensor, blocked: torch.Tensor, out_features: int, lib: ctypes.CDLL | None = None
                      ) -> torch.Tensor:
    """x [M, K] float @ the blocked bfloat16 weight (`block_bf16`) of `out_features` rows -> [M, N] float32, the
    activations rounded to bfloat16; meant for up to eight rows."""
    lib = lib or library()
    rows = _rows(x)  # [M, K]
    out = torch.empty(rows.shape[0], out_features, dtype=torch.float32)  # [M, N]
    if lib.gemv_bf16_blocked(rows.data_ptr(), blocked.data_ptr(), out.data_ptr(), rows.shape[0], out_features,
                             rows.shape[1], torch.get_num_threads()) != 0:
        raise MemoryError("The bfloat16 decode kernel could not allocate its buffers.")
    return out


def vnni_blocks_available(lib: ctypes.CDLL | None = None) -> bool:
    """Whether this CPU's build multiplies int8 and int4 blocks with AVX512_VNNI, where the blocked layouts pay."""
    lib = lib or library()
    return lib is not None and lib.gemv_vnni_blocks() > 0


def block_int8(weight: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """An int8 weight [N, K] in the blocked layout of `kernels/csrc/int8_blocked.c`: [ceil(N / B), K2 / 2, B, 2] for
    blocks of B output rows and K2 = K rounded up to even, the rows and the column past the weight zeros."""
    lib = lib or library()
    block = lib.gemv_int8_block()
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"The blocked int8 layout takes an int8 matrix, not a {weight.dtype} tensor of shape "
                         f"{tuple(weight.shape)}.")
    rows, cols = weight.shape
    padded = torch.zeros(-(-rows // block) * block, cols + cols % 2, dtype=torch.int8)
    padded[:rows, :cols] = weight.detach()
    return padded.reshape(-1, block, padded.shape[1] // 2, 2).transpose(1, 2).contiguous()  # [N / B, K2 / 2, B, 2]


def unblock_int8(blocked: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The row-major int8 weight [N, K] back from `block_int8`'s layout."""
    blocks, pairs, block, _ = blocked.shape
    return blocked.transpose(1, 2).reshape(blocks * block, pairs * 2)[:out_features, :in_features].contiguous()


def int8_blocked_gemv(x: torch.Tensor, blocked: torch.Tensor, scales: torch.Tensor, out_features: int,
                      lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [M, K] float @ (the blocked int8 weight (`block_int8`) * scales [N]).T -> [M, N] float32, each activation
    row rounded to int16 as `int8_gemv` rounds it; any number of rows."""
    lib = lib or library()
    rows = _rows(x)  # [M, K]
    scales = scales.to(torch.float32).contiguous()  # [N]
    out = torch.empty(rows.shape[0], out_features, dtype=torch.float32)  # [M, N]
    if lib.gemv_int8_blocked(rows.data_ptr(), blocked.data_ptr(), scales.data_ptr(), out.data_ptr(), rows.shape[0],
                             out_features, rows.shape[1], torch.get_num_threads()) != 0:
        raise MemoryError("The int8 decode kernel could not allocate its buffers.")
    return out


def block_int4(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
               lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """A canonical int4 weight (uint8 [N, K / 2], scales and zeros [K / G, N, 2]) in the blocked layout of
    `kernels/csrc/int4_blocked.c`: uint8 [ceil(N / B), K / G, 8 G + 64], one record per block of B rows and group:
    G / 8 chunks of B rows x 4 bytes (columns 8j + t in the low nibbles, 8j + 4 + t in the high), then the group's
    bfloat16 scales and zeros of the block; the rows past N zeros."""
    from kernels.int4 import unpack_int4

    block = (lib or library()).gemv_int4_block()
    rows, columns = packed.shape[0], packed.shape[1] * 2
    if group_size % 8 or columns % group_size:
        raise ValueError(f"The blocked int4 layout takes groups of a multiple of 8 columns that divide the "
                         f"{columns} columns, not {group_size}.")
    blocks, groups = -(-rows // block), columns // group_size
    values = torch.zeros(blocks * block, columns, dtype=torch.uint8)
    values[:rows] = unpack_int4(packed)
    values = values.view(blocks, block, groups, group_size // 8, 2, 4)  # column = 8j + 4h + t
    nibbles = (values[..., 0, :] | values[..., 1, :] << 4).permute(0, 2, 3, 1, 4)  # [blocks, groups, G / 8, B, 4]
    table = torch.zeros(groups, blocks * block, 2, dtype=torch.bfloat16)
    table[:, :rows] = scales_and_zeros.to(torch.bfloat16)
    table = table.view(groups, blocks, block, 2).permute(1, 0, 3, 2).contiguous()  # [blocks, groups, 2, B]
    return torch.cat([nibbles.reshape(blocks, groups, -1), table.view(torch.uint8).reshape(blocks, groups, -1)],
                     dim=-1).contiguous()  # [blocks, groups, 8 G + 64]


def _int4_blocks(blocked: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The values q [blocks, groups, G / 8, B, 2, 4] (column 8j + 4h + t of row i at [.., j, i, h, t]) and the
    bfloat16 scales and zeros [blocks, groups, 2, B] of a blocked int4 weight (`block_int4`)."""
    blocks, groups, record = blocked.shape
    block = (record - 8 * group_size) // 4  # the scales and zeros: 2 x B bfloat16 values
    nibbles = blocked[..., : 8 * group_size].reshape(blocks, groups, group_size // 8, block, 4)
    table = blocked[..., 8 * group_size:].contiguous().view(torch.bfloat16).view(blocks, groups, 2, block)
    return torch.stack([nibbles & 0x0F, nibbles >> 4], dim=-2), table


def _rows_of_blocks(values: torch.Tensor, out_features: int) -> torch.Tensor:
    """[blocks, groups, G / 8, B, 2, 4] -> [N, K], row-major."""
    blocks, groups, chunks, block = values.shape[:4]
    return values.permute(0, 3, 1, 2, 4, 5).reshape(blocks * block, groups * chunks * 8)[:out_features]


def unblock_int4(blocked: torch.Tensor, out_features: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The canonical (packed uint8 [N, K / 2], bfloat16 scales and zeros [K / G, N, 2]) back from `block_int4`."""
    from kernels.int4 import pack_int4

    values, table = _int4_blocks(blocked, group_size)
    blocks, groups, _, block = table.shape
    table = table.permute(1, 0, 3, 2).reshape(groups, blocks * block, 2)[:, :out_features]
    return pack_int4(_rows_of_blocks(values, out_features)), table.contiguous()


def dequantize_int4_blocked(blocked: torch.Tensor, out_features: int, group_size: int) -> torch.Tensor:
    """The bfloat16 weight [N, K] of a blocked int4 weight (`block_int4`), w = (q - 8) * scale + zero."""
    values, table = _int4_blocks(blocked, group_size)
    scale = table[:, :, 0, None, :, None, None].float()  # [blocks, groups, 1, B, 1, 1]
    zero = table[:, :, 1, None, :, None, None].float()
    return _rows_of_blocks(values.float() * scale + (zero - 8 * scale), out_features).to(torch.bfloat16)


def int4_blocked_gemv(x: torch.Tensor, blocked: torch.Tensor, out_features: int, group_size: int,
                      lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [M, K] float @ the blocked int4 weight (`block_int4`) -> [M, N] float32, each activation row rounded to
    int8 per group as `int4_gemv` rounds it; meant for a few rows."""
    lib = lib or library()
    rows = _rows(x)  # [M, K]
    out = torch.empty(rows.shape[0], out_features, dtype=torch.float32)  # [M, N]
    if lib.gemv_int4_blocked(rows.data_ptr(), blocked.data_ptr(), out.data_ptr(), rows.shape[0], out_features,
                             rows.shape[1], group_size, torch.get_num_threads()) != 0:
        raise ValueError(f"The blocked int4 kernel does not take groups of {group_size} of {rows.shape[1]} columns "
                         f"(or could not allocate its buffers).")
    return out


def int4_gemv(x: torch.Tensor, cpu_packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, block: int,
              lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [M, K] float @ the int4 weight in torch's CPU tile layout of `block` rows (`kernels.int4`), one row at a
    time, the activations rounded to int8 per group -> [M, N] float32. AVX2 builds only (`gemv_integer_paths`);
    the decode step of `glm/cpu_decode.py` calls the same kernel."""
    lib = lib or library()
    rows, rows_bf16 = _as_read(x)  # [M, K]
    packed, table = cpu_packed.contiguous(), scales_and_zeros.to(torch.bfloat16).contiguous()  # [N, K/2], [K/G, N, 2]
    out = torch.empty(rows.shape[0], packed.shape[0], dtype=torch.float32)  # [M, N]
    step_in, step_out = rows.shape[1] * rows.element_size(), out.shape[1] * out.element_size()
    for row in range(rows.shape[0]):
        status = lib.gemv_int4_tiled(rows.data_ptr() + row * step_in, rows_bf16, packed.data_ptr(), table.data_ptr(),
                                     out.data_ptr() + row * step_out, packed.shape[0], rows.shape[1], group_size,
                                     block, torch.get_num_threads())
        if status != 0:
            raise ValueError(f"The int4 decode kernel does not take {packed.shape[0]} x {rows.shape[1]} weights in "
                             f"groups of {group_size} and tiles of {block} rows on this build.")
    return out
