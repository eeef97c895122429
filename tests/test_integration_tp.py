"""`--tp 2` through the regular loaders: two gloo ranks spawned from the test load a saved tiny suite with
`Engine.load(tp=2)` and answer exactly like one process (greedy), read only their slices from disk and hold less
than the whole model; INT4 is applied after the cut; `multimodal ground` and `multimodal chat` run on both ranks,
the first one printing; a user error is printed once, while every rank returns the error code.

All checks share one launch (importing torch in each rank costs seconds); rank 0 writes every rank's findings to a
JSON file and the tests assert on them. A hang fails after TIMEOUT_S.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

WORLD = 2
TIMEOUT_S = 240
QUESTIONS = ("Where is the dog?", "Describe the image.")
MAX_NEW_TOKENS = 8
# Layers that fit no INT4 group size on the tiny suite, whole (88 / 72 input features) or as a rank's shard (the
# ViT's row-parallel layers keep 16 of their 32 input features).
INT4_EXCLUDE = ("*.down", "adapter.glu.down_proj", "vision.*")


def random_image(seed: int, size=(40, 30)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded noise in every parameter: the denoisers' zero-initialised output layers would hide sharding errors."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.1
            param.copy_(noise + 1 if "norm" in name and name.endswith("weight") else noise)


def _answers(engine, images) -> list[str]:
    from multimodal.engine import Sampling

    sampling = Sampling(max_new_tokens=MAX_NEW_TOKENS)
    return [engine.chat(image, question, sampling=sampling) for image in images for question in QUESTIONS]


def _logits(engine) -> torch.Tensor:
    model = engine.chat_model.model
    ids = torch.randint(0, model.vlm_config.text.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(ids)


def _relay_pixels(engine) -> np.ndarray:
    return np.asarray(engine.draw("a dog with a hat", seed=3).relay[0], dtype=np.int16)


def _cli(argv: list[str], stdin: str | None = None) -> dict:
    """Run one command in this rank, capturing what it prints."""
    from multimodal.cli import build_parser, main
    from multimodal.commands import chat

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv) if stdin is None else chat.run(build_parser().parse_args(argv), stdin=io.StringIO(stdin))
    return {"code": code, "out": out.getvalue(), "err": err.getvalue()}


@torch.no_grad()
def worker(rank: int, world: int, port: int, scratch: Path) -> None:
    import torch.distributed as dist

    from multimodal import tp
    from multimodal.checkpoint import LazyCheckpoint
    from multimodal.engine import Engine

    torch.set_num_threads(1)  # the ranks share two cores
    suite, images = scratch / "suite", [random_image(1), random_image(2, (24, 50))]
    image_path = scratch / "scene.png"
    found: dict = {"rank": rank}

    # The one-process references, loaded before the process group exists.
    single = Engine.load(suite)
    single_int4 = Engine.load(suite / "vlm", quant="int4", group_size=32, exclude=INT4_EXCLUDE)
    # Shards decode eagerly (torch's fused int4 kernel); the one-process C step rounds activations to int8 per group
    # (glm/cpu_decode.py), which may move a greedy token of these random weights, so the reference decodes eagerly.
    single_int4.chat_model.model.cpu_decoder = None
    reference = {"answers": _answers(single, images), "int4_answers": _answers(single_int4, images)}

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    LazyCheckpoint.__getitem__ = _no_full_reads  # in this process only: every read must go through get_slice
    sharded = Engine.load(suite, tp=world)
    found["answers"] = _answers(sharded, images)
    found["logits_max_diff"] = (_logits(sharded) - _logits(single)).abs().max().item()
    found["logits_scale"] = _logits(single).abs().max().item()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    found["image_embeds_max_diff"] = (sharded.chat_model.model.encode_image(pixels)
                                      - single.chat_model.model.encode_image(pixels)).abs().max().item()
    found["vlm_bytes_share"] = tp.weight_bytes(sharded.chat_model.model) / tp.weight_bytes(single.chat_model.model)
    found["dit_bytes_share"] = tp.weight_bytes(sharded.painter.base) / tp.weight_bytes(single.painter.base)
    found["relay_pixels_max_diff"] = int(np.abs(_relay_pixels(sharded) - _relay_pixels(single)).max())
    del sharded

    # INT4 quantizes each rank's shards (its denoisers fit no INT4 group, so this loads the lone VLM folder).
    int4 = Engine.load(suite / "vlm", quant="int4", group_size=32, exclude=INT4_EXCLUDE, tp=world)
    found["int4_answers_equal"] = _answers(int4, images) == reference["int4_answers"]
    found["int4_is_quantized"] = type(int4.chat_model.model.layers[0].attn.qkv).__name__
    del int4
    try:
        Engine.load(scratch / "int8-vlm", tp=world)
        found["quantized_checkpoint_error"] = ""
    except ValueError as error:
        found["quantized_checkpoint_error"] = str(error)

    if rank == 0:
        images[0].save(image_path)
    dist.barrier()
    model = ["--checkpoint", str(suite), "--tp", str(world), "--max-new-tokens", str(MAX_NEW_TOKENS)]
    found["ground"] = _cli(["ground", str(image_path), QUESTIONS[0], *model])
    # Only the first rank's input counts: the others get nothing to read and must still follow the conversation.
    found["chat"] = _cli(["chat", "--image", str(image_path), *model], stdin=f"{QUESTIONS[0]}\n\n" if rank == 0 else "")
    found["error"] = _cli(["ground", str(scratch / "missing.png"), "q", *model])

    everyone = [None] * world
    dist.all_gather_object(everyone, found)
    if rank == 0:
        (scratch / "found.json").write_text(json.dumps({"reference": reference, "ranks": everyone}, indent=1))
    dist.destroy_process_group()


def _no_full_reads(self, key):
    raise AssertionError(f"a tensor-parallel load read the whole tensor {key}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def found(tmp_path_factory) -> dict:
    from multimodal.cli import main
    from multimodal.engine import Engine

    torch.set_num_threads(1)
    scratch = tmp_path_factory.mktemp("tp-suite")
    engine = Engine.random_tiny(seed=21)
    randomize(engine.chat_model.model, 24)  # larger weights than the default init: answers that depend on the image
    randomize(engine.painter.base, 22)
    randomize(engine.painter.relay, 23)
    engine.save(scratch / "suite")
    assert main(["quantize", str(scratch / "suite" / "vlm"), str(scratch / "int8-vlm"), "--quant", "int8"]) == 0
    shutil.copy(scratch / "suite" / "vlm" / "tokenizer.json", scratch / "int8-vlm")

    context = mp.start_processes(worker, args=(WORLD, _free_port(), scratch), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        # join() returns False each time one rank exits while others still run; it raises if a rank failed.
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"The {WORLD} tensor-parallel ranks did not finish within {TIMEOUT_S} s (a hang?).")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return json.loads((scratch / "found.json").read_text())


def test_tp_engine_answers_like_one_process(found):
    answers = found["reference"]["answers"]
    assert len(set(answers)) == len(answers), "the images and questions must lead to different answers"
    for rank in found["ranks"]:
        assert rank["answers"] == found["reference"]["answers"], f"rank {rank['rank']}"
        assert rank["logits_max_diff"] <= 1e-5 and found["ranks"][0]["logits_scale"] > 0.5
        assert rank["image_embeds_max_diff"] <= 1e-5
        assert rank["relay_pixels_max_diff"] <= 1  # the summation order of the all-reduce may round a pixel


def test_each_rank_holds_its_share_and_quantizes_after_the_cut(found):
    for rank in found["ranks"]:
        assert rank["vlm_bytes_share"] < 0.75 and rank["dit_bytes_share"] < 0.75, rank
        assert rank["int4_is_quantized"] == "Int4WeightOnlyLinear"
        assert rank["int4_answers_equal"], f"rank {rank['rank']}: INT4 shards answer unlike TP=1 INT4"
        assert "already quantized" in rank["quantized_checkpoint_error"]


def test_commands_run_on_every_rank_and_the_first_prints(found):
    first, second = found["ranks"]
    expected = found["reference"]["answers"][0]
    assert first["ground"]["code"] == second["ground"]["code"] == 0
    assert first["ground"]["out"].startswith(expected + "\n") and second["ground"]["out"] == ""
    assert first["chat"]["code"] == second["chat"]["code"] == 0
    assert first["chat"]["out"].startswith(f"you> model> {expected}\nyou> ") and second["chat"]["out"] == ""


def test_a_user_error_is_printed_once_and_every_rank_fails(found):
    first, second = found["ranks"]
    assert first["error"]["code"] == second["error"]["code"] == 1
    assert first["error"]["err"].startswith("error: ") and first["error"]["err"].count("\n") == 1
    assert second["error"]["err"] == ""
