"""The engine over the random tiny suite: real models, so the checks are consistency ones (stream == whole answer,
batched == alone, saved == loaded, seeded drawing reproducible) plus the user-facing errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from multimodal.engine import ChatRequest, Engine, EngineError, GroundedAnswer, Sampling

SHORT = Sampling(max_new_tokens=8)


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.set_num_threads(1)  # module fixtures run before the per-test thread setting
    return Engine.random_tiny(seed=3)


def random_image(generator, size=(40, 30)) -> Image.Image:
    import numpy as np

    pixels = np.random.default_rng(int(generator.initial_seed())).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def test_streamed_deltas_join_into_the_whole_answer(engine, generator):
    image = random_image(generator)
    deltas = list(engine.chat_stream(image, "Where is the dog?", sampling=SHORT))
    assert len(deltas) >= 1 and all(deltas)
    assert "".join(deltas) == engine.chat(image, "Where is the dog?", sampling=SHORT)


def test_a_batch_of_requests_answers_like_each_request_alone(engine, generator):
    images = [random_image(generator, (40, 30)), Image.new("RGB", (17, 60), (250, 0, 0)), None]
    requests = [
        ChatRequest(images[0], "Where is the dog?", sampling=SHORT),
        ChatRequest(images[1], "Describe the image.", (("user", "hi"), ("assistant", "a cat")), SHORT),
        ChatRequest(images[2], "a dog with a hat", sampling=SHORT),
        ChatRequest(images[0], "Where is the dog?", sampling=Sampling(max_new_tokens=3)),
        ChatRequest(images[1], "Describe the image.", sampling=Sampling(max_new_tokens=8, temperature=1.0, seed=4)),
        ChatRequest(images[0], "Describe the image.", sampling=Sampling(max_new_tokens=8, temperature=1.0, seed=4)),
    ]
    alone = [engine.chat(r.image, r.question, r.history, r.sampling) for r in requests]
    assert engine.chat_batch(requests) == alone
    assert len(alone[3]) <= len(alone[0]) and alone[0].startswith(alone[3])


def test_captions_are_the_same_in_a_batch_and_alone(engine, generator):
    images = [random_image(generator), Image.new("RGB", (32, 32), (0, 90, 200))]
    batched = engine.caption_batch(images, grounded=True, sampling=SHORT)
    assert [a.text for a in batched] == [engine.caption_batch([i], grounded=True, sampling=SHORT)[0].text
                                         for i in images]


def test_grounded_answers_become_pixel_boxes_of_the_original_image():
    answer = GroundedAnswer.parse("a dog [[100,200,500,1000]], a hat [[0,0,10,10];[x]]", Image.new("RGB", (200, 50)))
    assert "[[" not in answer.plain_text and answer.plain_text.startswith("a dog")
    assert answer.boxes == [("a dog", (20.0, 10.0, 100.0, 49.95)), ("a hat", (0.0, 0.0, 2.0, 0.5))]
    assert len(answer.problems) == 1
    drawn = answer.drawn_on(Image.new("RGB", (200, 50), (0, 0, 0)))
    assert drawn.getpixel((20, 30)) != (0, 0, 0)


def test_drawing_is_seeded_per_image_and_reports_progress(engine):
    steps = []
    first = engine.draw("a dog with a hat", seed=11, progress=lambda done, total: steps.append((done, total)))
    assert [image.size for image in first.base] == [(16, 16)] and [image.size for image in first.relay] == [(32, 32)]
    assert steps[-1][0] == steps[-1][1] == len(steps)  # every denoiser step of both stages, in order
    pair = engine.draw("a dog with a hat", seed=10, num_images=2)  # images 0 and 1 use seeds 10 and 11
    assert pair.relay[1].tobytes() == first.relay[0].tobytes()  # an image depends on its seed, not its batch
    assert pair.relay[0].tobytes() != first.relay[0].tobytes()
    assert engine.draw("a cat", size=(16, 16)).relay[0].size == (16, 16)


@pytest.mark.parametrize("call,message", [
    (lambda e: e.draw("a dog", size=(48, 48)), "48x48 is not available; this model draws 32x32, 16x16"),
    (lambda e: e.draw("   "), "prompt is empty"),
    (lambda e: e.draw("a dog", num_images=9), "Between 1 and 8"),
    (lambda e: e.chat(None, ""), "question is empty"),
    (lambda e: e.chat(None, "hi", [("wizard", "x")]), "role 'wizard'"),
    (lambda e: Sampling(max_new_tokens=0), "at least 1"),
])
def test_bad_requests_get_one_clear_sentence(engine, call, message):
    with pytest.raises(EngineError, match=message):
        call(engine)


def test_a_saved_suite_loads_back_with_the_same_answers_and_quantizes(engine, tmp_path, generator):
    image = random_image(generator)
    engine.save(tmp_path / "suite")
    loaded = Engine.load(tmp_path / "suite")
    assert loaded.name == "suite"
    assert loaded.chat(image, "Where is the dog?", sampling=SHORT) == engine.chat(image, "Where is the dog?",
                                                                                 sampling=SHORT)
    assert loaded.draw("a dog", seed=5).relay[0].tobytes() == engine.draw("a dog", seed=5).relay[0].tobytes()
    int8 = Engine.load(tmp_path / "suite", quant="int8")
    assert isinstance(int8.chat(image, "Where is the dog?", sampling=SHORT), str)
    lone_vlm = Engine.load(tmp_path / "suite" / "vlm")
    with pytest.raises(EngineError, match="no text-to-image stage"):
        lone_vlm.draw("a dog")


def test_a_model_without_drawing_is_served_with_a_clear_4xx(engine, tmp_path):
    from fastapi.testclient import TestClient

    from multimodal.server import create_app

    engine.save(tmp_path / "suite")
    lone_vlm = Engine.load(tmp_path / "suite" / "vlm")
    with TestClient(create_app(lone_vlm)) as client:
        response = client.post("/v1/images/generations", json={"prompt": "a dog"})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "This model has no text-to-image stage."


def test_without_embedded_models_or_checkpoint_the_error_says_what_to_do(tmp_path, monkeypatch, capsys):
    import multimodal.engine
    from multimodal.cli import main

    monkeypatch.setattr(multimodal.engine, "EMBEDDED_DIR", tmp_path)
    with pytest.raises(EngineError, match="no embedded models yet; pass --checkpoint FOLDER"):
        Engine.load()
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert main(["caption", str(tmp_path / "a.png"), "--out", str(tmp_path / "out.jsonl"), "--no-progress"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: This installation has no embedded models yet") and "\n" not in error
    with pytest.raises(EngineError, match="does not exist"):
        Engine.load(tmp_path / "nowhere")
