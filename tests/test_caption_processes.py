"""`multimodal caption` as real processes over a saved random tiny suite: kill -9 in the middle of a run and
--resume; two gloo ranks (torchrun's environment) give the same rows as one process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from multimodal.captioning import collect_inputs, run
from multimodal.cli import main
from multimodal.engine import Engine, Sampling

MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny suite, 24 images and a broken file, and the rows one in-process run writes for them."""
    import numpy as np

    torch.set_num_threads(1)  # module fixtures run before the per-test thread setting
    root = tmp_path_factory.mktemp("captioning")
    engine = Engine.random_tiny(seed=5)
    engine.save(root / "suite")
    rng = np.random.default_rng(5)
    images = root / "images"
    images.mkdir()
    for i in range(16):
        width, height = (int(v) for v in rng.integers(12, 48, 2))
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").save(images / f"{i:02d}.png")
    (images / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    paths = collect_inputs([str(root / "images")])
    reference = root / "reference.jsonl"
    run(Engine.load(root / "suite"), paths, reference, batch_size=4, progress=False,
        sampling=Sampling(max_new_tokens=MAX_NEW_TOKENS))
    return root, paths, reference.read_text().splitlines()


def caption_command(root: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "multimodal.cli", "caption", str(root / "images"), "--out", str(out), "--checkpoint",
            str(root / "suite"), "--max-new-tokens", str(MAX_NEW_TOKENS), "--no-progress", *extra]


def quiet_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_kill_9_then_resume_captions_every_image_exactly_once(workspace, capsys):
    root, paths, reference = workspace
    out = root / "killed.jsonl"
    process = subprocess.Popen([sys.executable, *caption_command(root, out, "--batch-size", "2")], env=quiet_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text().count("\n") >= 4):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the run wrote nothing in 120 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    written = out.read_text().count("\n")
    assert 4 <= written < len(paths), "the kill should land in the middle of the run"

    # The resume runs in this process, through the same command-line entry point.
    assert main(caption_command(root, out, "--batch-size", "2", "--resume")[2:]) == 0
    assert f"skipped {written} already done" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert Counter(row["image"] for row in rows) == Counter(paths)  # every image, exactly once
    assert [r for r in rows if "error" in r] == [{"image": paths[-1], "error": f"'{paths[-1]}' is not an image "
                                                  "file Pillow can read."}]
    assert sorted(out.read_text().splitlines()) == sorted(reference)  # the same rows as an uninterrupted run


def test_two_gloo_ranks_write_the_same_rows_as_one_process(workspace):
    root, paths, reference = workspace
    out = root / "ranks.jsonl"
    # The environment `torchrun --standalone --nproc-per-node 2` gives its workers, without the launcher process.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ranks = [
        subprocess.Popen(
            [sys.executable, *caption_command(root, out, "--batch-size", "3")],
            env={**quiet_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
                 "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in range(2)
    ]
    results = [rank.communicate(timeout=300) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    summary = f"captioned {len(paths)} images (1 unreadable), skipped 0 already done; {len(paths)} rows"
    assert summary in results[0][0] and results[1][0] == ""  # only rank 0 reports
    assert out.read_text().splitlines() == reference  # merged in input order, no duplicates
    assert not list(root.glob("ranks.jsonl.part-*"))
