"""Batch captioning in one process: inputs, order, batching, error rows, resume after a torn write, shard merging."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from scripted_models import BOX, fingerprint, scripted_engine

from multimodal.captioning import CaptionInputError, Shard, collect_inputs, merge_parts, run


def make_images(folder: Path, count: int, generator) -> list[Path]:
    """`count` PNGs of random colours and sizes spread over two folders, plus one truncated PNG and one text file
    with an image suffix."""
    paths = []
    for i in range(count):
        sub = folder / "a" if i % 2 else folder / "b" / "deeper"
        sub.mkdir(parents=True, exist_ok=True)
        size = (8 + int(generator.integers(0, 40)), 8 + int(generator.integers(0, 40)))
        colour = tuple(int(v) for v in generator.integers(0, 256, 3))
        path = sub / f"img{i:03d}.png"
        Image.new("RGB", size, colour).save(path)
        paths.append(path)
    broken = folder / "a" / "broken.png"
    broken.write_bytes(paths[0].read_bytes()[:50])
    text = folder / "b" / "notes.jpg"
    text.write_text("not a picture")
    return paths + [broken, text]


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(7)


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_inputs_are_folders_globs_and_lists_sorted_without_duplicates(tmp_path, rng):
    paths = make_images(tmp_path / "pics", 6, rng)
    listing = tmp_path / "pics" / "list.txt"
    listing.write_text("# two images, relative to the list\na/img001.png\nb/deeper/img000.png\n")
    everything = collect_inputs([str(tmp_path / "pics"), str(tmp_path / "pics" / "a" / "*.png"), str(listing)])
    assert everything == sorted(str(p) for p in paths)
    assert collect_inputs([str(listing)]) == sorted([str(paths[1]), str(paths[0])])
    with pytest.raises(CaptionInputError, match="matches no files"):
        collect_inputs([str(tmp_path / "*.tiff")])
    with pytest.raises(CaptionInputError, match="is not a folder, a file or a glob"):
        collect_inputs([str(tmp_path / "missing")])


def test_every_image_gets_one_row_in_order_and_bad_files_become_error_rows(tmp_path, rng):
    make_images(tmp_path / "pics", 9, rng)
    engine = scripted_engine()
    paths = collect_inputs([str(tmp_path / "pics")])
    out = tmp_path / "captions.jsonl"
    summary = run(engine, paths, out, grounded=True, batch_size=4, progress=False)
    rows = rows_of(out)
    assert [row["image"] for row in rows] == paths
    assert summary.captioned == 11 and summary.errors == 2 and summary.skipped == 0
    assert engine.chat_model.batch_sizes == [3, 4, 2]  # 4 per batch minus the unreadable files, no empty batch
    errors = {Path(row["image"]).name: row["error"] for row in rows if "error" in row}
    assert "truncated or corrupt" in errors["broken.png"]
    assert "not an image file" in errors["notes.jpg"]
    for row in rows:
        if "error" in row:
            continue
        image = Image.open(row["image"])
        assert row["grounded_caption"] == f"Describe the image with boxes. -> the thing {BOX} " \
                                          f"({fingerprint(image.convert('RGB'))}, 1 turns)"
        assert row["caption"] == row["grounded_caption"].replace(f" {BOX}", "")
        width, height = image.size  # [[250,250,750,750]] in the image's own pixels
        assert row["boxes"] == [{"phrase": "-> the thing",
                                 "box": [round(v, 1) for v in (width / 4, height / 4, width * 3 / 4, height * 3 / 4)]}]
    with pytest.raises(CaptionInputError, match="already exists"):
        run(engine, paths, out, progress=False)


def test_resume_skips_done_images_and_repairs_a_torn_last_line(tmp_path, rng):
    make_images(tmp_path / "pics", 10, rng)
    paths = collect_inputs([str(tmp_path / "pics")])
    out = tmp_path / "captions.jsonl"
    run(scripted_engine(), paths[:5], out, batch_size=2, progress=False)
    with open(out, "a") as file:  # a run killed in the middle of writing a line
        file.write('{"image": "' + paths[5])
    engine = scripted_engine()
    summary = run(engine, paths, out, batch_size=2, resume=True, progress=False)
    assert summary.skipped == 5 and summary.captioned == 7
    rows = rows_of(out)
    assert [row["image"] for row in rows] == paths
    readable = [p for p in paths[5:] if Path(p).name.startswith("img")]
    assert sum(engine.chat_model.batch_sizes) == len(readable)  # only the images not done before ran


def test_shards_merge_into_the_same_rows_as_one_run(tmp_path, rng):
    make_images(tmp_path / "pics", 7, rng)
    paths = collect_inputs([str(tmp_path / "pics")])
    single = tmp_path / "single.jsonl"
    run(scripted_engine(), paths, single, batch_size=3, progress=False)
    sharded = tmp_path / "sharded.jsonl"
    for index in (1, 0):
        run(scripted_engine(), paths, sharded, batch_size=3, shard=Shard(index, 2), progress=False)
    assert sorted(p.name for p in tmp_path.glob("sharded.jsonl.part-*")) == ["sharded.jsonl.part-0",
                                                                             "sharded.jsonl.part-1"]
    assert merge_parts(sharded, paths) == len(paths)
    assert sharded.read_text() == single.read_text()
    assert not list(tmp_path.glob("sharded.jsonl.part-*"))
    assert Shard.from_ranks(3, 4, 2) == Shard(index=1, count=2, writer=False)
