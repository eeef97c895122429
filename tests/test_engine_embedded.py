"""The embedded models end to end through the engine: known answers on held-out EmojiScenes scenes.

Skipped in an installation without the embedded models (they are trained by `multimodal train` and shipped in
multimodal/assets/). The bars here are looser than the measured ones in the README: these are smoke checks of the
whole path (load -> ask -> parse boxes -> pixels), not the evaluation (`multimodal eval`).
"""

from __future__ import annotations

import pytest
import torch

from multimodal.engine import EMBEDDED_DIR, VLM_FOLDER, Engine, Sampling
from multimodal.world import make_scene, referring_expression, render, split_seeds

pytestmark = pytest.mark.skipif(not (EMBEDDED_DIR / VLM_FOLDER / "config.json").exists(),
                                reason="the embedded models are not in this installation")


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.set_num_threads(1)
    return Engine.load()


def iou(a, b) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def test_grounding_finds_the_object_asked_about(engine):
    hits = total = 0
    for seed in split_seeds("test", 8):
        scene = make_scene(seed)
        image = render(scene)
        for index in scene.entities:
            answer = engine.ground(image, f"Where is {referring_expression(scene, index, 'en')}?",
                                   Sampling(max_new_tokens=24))
            total += 1
            hits += bool(answer.boxes) and iou(answer.boxes[0][1], scene.objects[index].box) >= 0.5
    assert hits / total >= 0.7, f"{hits} of {total} boxes overlap the object"


def test_drawing_a_dog_with_a_hat_gives_both_stages(engine):
    drawing = engine.draw("a dog with a hat", seed=0)
    height, width = engine.draw_sizes[0]
    assert drawing.relay[0].size == (width, height)
    assert drawing.base[0].size[0] < width
