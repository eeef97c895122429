"""Batch captioning: many images -> one JSONL file, resumable, loses nothing.

Inputs are a folder (searched recursively), a glob, a text file listing one path per line, or single image files;
they are de-duplicated and sorted, so every run and every rank sees the same order. Images are captioned in batches;
after each batch its rows are appended to the output and flushed to disk, so a run killed at any moment keeps every
finished batch. `resume=True` reads what is already written (dropping a half-written last line) and skips those
images. An image that cannot be read becomes an error row and the run goes on; error rows count as done.

Under torchrun with N ranks (and tensor parallel degree T) there are N / T data shards: shard s takes every
(N / T)-th image starting at s, its first rank writes `OUT.part-s`, and after a barrier rank 0 merges the parts
into OUT in input order, keeping exactly one row per image.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from multimodal.engine import Sampling
from multimodal.image import ImageError, load_image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
LIST_SUFFIXES = frozenset({".txt", ".lst"})


class CaptionInputError(ValueError):
    """Inputs that cannot be turned into a list of images; the message is meant for the user."""


def collect_inputs(specs: Iterable[str]) -> list[str]:
    """Expand folders, globs and list files into a sorted, de-duplicated list of image paths."""
    found: set[str] = set()
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found.update(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            lines = path.read_text(encoding="utf-8").splitlines()
            # Relative entries are relative to the list file, so a list travels with its images.
            found.update(str(path.parent / line.strip()) for line in lines if line.strip() and not line.startswith("#"))
        elif path.is_file():
            found.add(str(path))
        elif glob.has_magic(spec):
            matches = [m for m in glob.glob(spec, recursive=True) if Path(m).is_file()]
            if not matches:
                raise CaptionInputError(f"The pattern '{spec}' matches no files.")
            found.update(matches)
        else:
            raise CaptionInputError(f"'{spec}' is not a folder, a file or a glob pattern that matches files.")
    if not found:
        raise CaptionInputError("No image files found in the given inputs.")
    return sorted(found)


def caption_rows(engine, paths: Sequence[str], grounded: bool, sampling: Sampling = Sampling()) -> list[dict]:
    """Caption one batch; every path gets exactly one row, unreadable images an `error` row."""
    rows: dict[int, dict] = {}
    images, positions = [], []
    for index, path in enumerate(paths):
        try:
            images.append(load_image(path))
            positions.append(index)
        except ImageError as error:
            rows[index] = {"image": path, "error": str(error)}
    if images:
        for index, answer in zip(positions, engine.caption_batch(images, grounded=grounded, sampling=sampling)):
            rows[index] = answer_row(paths[index], answer, grounded)
    return [rows[i] for i in range(len(paths))]


def answer_row(path: str, answer, grounded: bool) -> dict:
    row = {"image": path, "caption": answer.plain_text}
    if grounded:
        row["grounded_caption"] = answer.text
        row["boxes"] = [{"phrase": phrase, "box": [round(v, 1) for v in box]} for phrase, box in answer.boxes]
    return row


# ----------------------------------------------------------------------------------------------------------------
# The output file


def read_done(path: Path, repair: bool = False) -> dict[str, dict]:
    """Rows already written to a JSONL file, by image path. A half-written last line (a killed run) is ignored, and
    with `repair` cut off the file, so that appending starts on a fresh line; only the file's own writer repairs."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if repair and len(complete) != len(data):
        with open(path, "r+b") as file:
            file.truncate(len(complete))
    done = {}
    for line in complete.decode("utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            done[row["image"]] = row
    return done


def append_rows(file, rows: Sequence[dict]) -> None:
    """One write per batch, then flush and fsync: after this returns the batch survives a kill -9 or a power cut."""
    file.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    file.flush()
    os.fsync(file.fileno())


def part_paths(out: Path) -> list[Path]:
    return sorted(out.parent.glob(out.name + ".part-*"))


def merge_parts(out: Path, order: Sequence[str]) -> int:
    """Fold OUT and its shard parts into OUT, one row per image, in input order; return the number of rows."""
    merged = read_done(out)
    parts = part_paths(out)
    for part in parts:
        merged.update(read_done(part))
    position = {path: i for i, path in enumerate(order)}
    rows = sorted(merged.values(), key=lambda row: (position.get(row["image"], len(position)), row["image"]))
    temporary = out.with_name(out.name + ".merging")
    with open(temporary, "w", encoding="utf-8") as file:
        append_rows(file, rows)
    os.replace(temporary, out)  # atomic: a crash leaves either the old or the merged file, never half of one
    for part in parts:
        part.unlink()
    return len(rows)


# ----------------------------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class Shard:
    """Which slice of the inputs this process captions, and whether it writes."""

    index: int = 0
    count: int = 1
    writer: bool = True

    @classmethod
    def from_ranks(cls, rank: int, world_size: int, tp: int) -> Shard:
        if world_size % tp:
            raise CaptionInputError(f"The world size {world_size} is not a multiple of --tp {tp}.")
        return cls(index=rank // tp, count=world_size // tp, writer=rank % tp == 0)


@dataclass
class CaptionSummary:
    total: int  # images in the inputs
    skipped: int  # already done before this run (resume)
    captioned: int  # written by this process in this run
    errors: int  # error rows among those


def batches(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run(
    engine,
    paths: Sequence[str],
    out: str | Path,
    grounded: bool = False,
    batch_size: int = 8,
    resume: bool = False,
    shard: Shard = Shard(),
    progress: bool = True,
    sampling: Sampling = Sampling(),
) -> CaptionSummary:
    """Caption this shard's share of `paths` (from `collect_inputs`) into `out`, or into its part file when sharded.

    Merging the parts is the caller's job once every shard is finished (`merge_parts`)."""
    if batch_size < 1:
        raise CaptionInputError(f"--batch-size must be at least 1, not {batch_size}.")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    target = out if shard.count == 1 else out.with_name(f"{out.name}.part-{shard.index}")
    if not resume and (out.exists() or target.exists() or (shard.count == 1 and part_paths(out))):
        raise CaptionInputError(f"{out} already exists; pass --resume to continue it or choose another --out.")
    done: set[str] = set()
    if resume:
        for path in [out, *part_paths(out)]:
            done.update(read_done(path, repair=path == target and shard.writer))
    share = paths[shard.index :: shard.count]
    mine = [p for p in share if p not in done]
    captioned = errors = 0
    bar = tqdm(total=len(mine), unit="img", desc="captioning", disable=not (progress and shard.writer))
    with open(target, "a", encoding="utf-8") if shard.writer else contextlib.nullcontext() as file:
        for batch in batches(mine, batch_size):
            rows = caption_rows(engine, batch, grounded, sampling)
            if shard.writer:
                append_rows(file, rows)
            captioned += len(rows)
            errors += sum("error" in row for row in rows)
            bar.update(len(rows))
    bar.close()
    return CaptionSummary(total=len(paths), skipped=len(share) - len(mine), captioned=captioned, errors=errors)
