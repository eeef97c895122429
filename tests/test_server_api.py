"""The OpenAI-compatible server, run by uvicorn on loopback and answered through the official openai client."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
import uvicorn
from PIL import Image
from scripted_models import BOX, colour_of, fingerprint, scripted_engine

from multimodal.server import create_app


@contextmanager
def running_server(app):
    """Serve `app` on a free loopback port in a thread; yield the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("The server did not start.")
        threading.Event().wait(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def user_message(question: str, image: Image.Image | None = None) -> dict:
    parts = [{"type": "text", "text": question}]
    if image is not None:
        parts.insert(0, {"type": "image_url", "image_url": {"url": data_url(image)}})
    return {"role": "user", "content": parts}


@pytest.fixture(scope="module")
def served():
    engine = scripted_engine(delay=0.01)
    with running_server(create_app(engine, max_batch=8)) as url:
        yield engine, url, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_are_listed(served):
    engine, _, client = served
    assert [m.id for m in client.models.list().data] == ["scripted"]
    assert client.models.retrieve("scripted").id == "scripted"


def test_chat_with_an_image_and_history(served):
    _, _, client = served
    image = Image.new("RGB", (40, 30), (200, 10, 90))
    reply = client.chat.completions.create(
        model="scripted",
        messages=[
            {"role": "system", "content": "You are helpful."},
            user_message("What is this?", image),
            {"role": "assistant", "content": "A red square."},
            {"role": "user", "content": "Where is the thing?"},
        ],
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].finish_reason == "stop"
    # The image sent in the first user turn reaches the model, and so do the two earlier turns.
    assert reply.choices[0].message.content == f"Where is the thing? -> the thing {BOX} (rgb 200 10 90, 3 turns)"


def test_streaming_sends_the_answer_in_pieces(served):
    _, _, client = served
    image = Image.new("RGB", (16, 16), (1, 2, 3))
    stream = client.chat.completions.create(model="scripted", messages=[user_message("Where?", image)], stream=True)
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(pieces) > 3
    assert "".join(pieces) == f"Where? -> the thing {BOX} (rgb 1 2 3, 1 turns)"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len({c.id for c in chunks}) == 1


def test_a_burst_of_concurrent_requests_is_answered_correctly_and_batched(served):
    engine, _, client = served
    engine.chat_model.batch_sizes.clear()
    colours = [(17 * i % 256, 101 * i % 256, 53 * i % 256) for i in range(24)]

    def ask(i: int) -> tuple[str, str]:
        image = Image.new("RGB", (24, 24), colours[i])
        if i % 4 == 3:  # a few streaming requests in the same burst
            stream = client.chat.completions.create(
                model="scripted", messages=[user_message(f"question {i}", image)], stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in stream)
        else:
            text = client.chat.completions.create(
                model="scripted", messages=[user_message(f"question {i}", image)]).choices[0].message.content
        return text, f"question {i} -> the thing {BOX} ({fingerprint(image)}, 1 turns)"

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(ask, range(len(colours))))
    for got, expected in results:
        assert got == expected
    sizes = engine.chat_model.batch_sizes
    assert sum(sizes) == 18  # every non-streaming request answered exactly once
    assert max(sizes) > 1  # requests that waited together ran as one batch


def test_image_generation_returns_png_of_the_requested_size(served):
    _, _, client = served
    result = client.images.generate(prompt="a dog with a hat", n=2, size="64x64", response_format="b64_json",
                                    extra_body={"seed": 5})
    assert len(result.data) == 2
    for i, item in enumerate(result.data):
        image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert image.format == "PNG" and image.size == (64, 64)
        assert image.getpixel((10, 10)) == colour_of("a dog with a hat", 5 + i)


def test_openai_client_sees_bad_requests_as_errors(served):
    _, _, client = served
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=[user_message("hi")])
    with pytest.raises(openai.BadRequestError, match="data: URL"):
        client.chat.completions.create(model="scripted", messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                                         {"type": "text", "text": "what?"}]}])
    with pytest.raises(openai.BadRequestError, match="size"):
        client.images.generate(prompt="a cat", size="1024x1024")


def _bad_image_url(payload: bytes) -> dict:
    return {"model": "scripted", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(payload).decode()}},
        {"type": "text", "text": "what?"}]}]}


MALFORMED = [
    ("chat: not JSON", "/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("chat: no messages", "/v1/chat/completions", {"model": "scripted"}, 400, "messages"),
    ("chat: empty messages", "/v1/chat/completions", {"model": "scripted", "messages": []}, 400, "messages"),
    ("chat: bad role", "/v1/chat/completions",
     {"model": "scripted", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("chat: unknown part type", "/v1/chat/completions",
     {"model": "scripted", "messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]}, 400, "content"),
    ("chat: last message from assistant", "/v1/chat/completions",
     {"model": "scripted", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "last message"),
    ("chat: empty question", "/v1/chat/completions",
     {"model": "scripted", "messages": [{"role": "user", "content": "  "}]}, 400, "no text"),
    ("chat: n=2", "/v1/chat/completions",
     {"model": "scripted", "n": 2, "messages": [{"role": "user", "content": "hi"}]}, 400, "n"),
    ("chat: negative temperature", "/v1/chat/completions",
     {"model": "scripted", "temperature": -1, "messages": [{"role": "user", "content": "hi"}]}, 400, "temperature"),
    ("chat: max_tokens 0", "/v1/chat/completions",
     {"model": "scripted", "max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}, 400, "max_tokens"),
    ("chat: not base64", "/v1/chat/completions",
     {"model": "scripted", "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}},
         {"type": "text", "text": "what?"}]}]}, 400, "invalid base64"),
    ("chat: not an image", "/v1/chat/completions", _bad_image_url(b"hello, not a picture"), 400, "not an image"),
    ("chat: truncated PNG", "/v1/chat/completions", None, 400, "truncated or corrupt"),
    ("chat: two images", "/v1/chat/completions", None, 400, "one image"),
    ("images: empty prompt", "/v1/images/generations", {"prompt": ""}, 400, "prompt"),
    ("images: n=9", "/v1/images/generations", {"prompt": "a cat", "n": 9}, 400, "n"),
    ("images: url format", "/v1/images/generations", {"prompt": "a cat", "response_format": "url"}, 400, "b64_json"),
    ("images: bad size", "/v1/images/generations", {"prompt": "a cat", "size": "big"}, 400, "size"),
    ("images: unknown model", "/v1/images/generations", {"prompt": "a cat", "model": "dall-e-3"}, 404, "dall-e-3"),
    ("unknown route", "/v1/embeddings", {"input": "x"}, 404, "Not Found"),
]


def _png(size=(20, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (9, 9, 9)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name,path,body,status,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_4xx_with_a_clear_message(served, name, path, body, status, message):
    _, url, _ = served
    if name == "chat: truncated PNG":
        body = _bad_image_url(_png()[:60])
    if name == "chat: two images":
        body = {"model": "scripted", "messages": [user_message("a", Image.new("RGB", (8, 8))),
                                                  {"role": "assistant", "content": "b"},
                                                  user_message("c", Image.new("RGB", (8, 8)))]}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message.lower() in error["message"].lower()
    assert error["message"].count("\n") == 0  # one sentence, no traceback


def test_wrong_method_and_oversized_bodies_are_refused(served):
    _, url, _ = served
    assert httpx.get(url + "/v1/chat/completions").status_code == 405
    small = create_app(scripted_engine(), max_body_bytes=1024 * 1024)
    with running_server(small) as small_url:
        big = {"model": "scripted", "messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]}
        response = httpx.post(small_url + "/v1/chat/completions", json=big, timeout=30)
    assert response.status_code == 413
    assert "larger than 1 MB" in response.json()["error"]["message"]


def test_a_failing_request_does_not_break_the_others(served):
    engine, _, client = served
    engine.chat_model.fail_on = "explode"
    try:
        with pytest.raises(openai.BadRequestError, match="Scripted failure"):
            client.chat.completions.create(model="scripted", messages=[user_message("explode")])
        stream = client.chat.completions.create(model="scripted", messages=[user_message("explode")], stream=True)
        with pytest.raises(openai.APIError, match="Scripted failure"):
            list(stream)
    finally:
        engine.chat_model.fail_on = None
    reply = client.chat.completions.create(model="scripted", messages=[user_message("still there?")])
    assert reply.choices[0].message.content.startswith("still there? -> the thing")


def test_the_tiny_suite_answers_a_concurrent_burst_exactly_as_one_by_one():
    """Real (random) models behind the server: batched answers equal the answers given one request at a time."""
    import torch

    from multimodal.engine import Engine, Sampling

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine
    try:
        engine = Engine.random_tiny(seed=1)
        batch_sizes = []
        answer_batch = engine.chat_model.answer_batch
        engine.chat_model.answer_batch = lambda images, *rest, **options: batch_sizes.append(len(images)) or (
            answer_batch(images, *rest, **options))
        images = [Image.new("RGB", (20 + i, 30), (40 * i, 255 - 30 * i, 7 * i)) for i in range(8)]
        questions = ["Where is the dog?", "Describe the image.", "a dog with a hat", "Where is the hat?"]
        expected = [engine.chat(image, questions[i % 4], sampling=Sampling(max_new_tokens=6, seed=i))
                    for i, image in enumerate(images)]
        with running_server(create_app(engine, max_batch=8)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)

            def ask(i: int) -> str:
                reply = client.chat.completions.create(
                    model="random-tiny", messages=[user_message(questions[i % 4], images[i])], max_tokens=6, seed=i,
                    stream=i == 5)
                if i == 5:
                    return "".join(chunk.choices[0].delta.content or "" for chunk in reply)
                return reply.choices[0].message.content

            with ThreadPoolExecutor(max_workers=8) as pool:
                answers = list(pool.map(ask, range(len(images))))
            burst_sizes = list(batch_sizes)
            sampled = [client.chat.completions.create(
                model="random-tiny", messages=[user_message("Describe the image.", images[0])], max_tokens=6,
                temperature=1.0, seed=5).choices[0].message.content for _ in range(2)]
            drawn = client.images.generate(model="random-tiny", prompt="a dog with a hat", size="16x16",
                                           extra_body={"seed": 3})
    finally:
        torch.set_num_threads(previous)
    assert answers == expected
    assert sampled == [engine.chat(images[0], "Describe the image.",
                                   sampling=Sampling(max_new_tokens=6, temperature=1.0, seed=5))] * 2
    assert sum(burst_sizes) == 7 and max(burst_sizes) > 1  # the non-streaming requests, several per batch
    image = Image.open(io.BytesIO(base64.b64decode(drawn.data[0].b64_json)))
    assert image.tobytes() == engine.draw("a dog with a hat", size=(16, 16), seed=3).relay[0].tobytes()


def test_finish_reason_says_length_when_max_tokens_cut_the_answer_and_usage_is_reported(served):
    engine, url, client = served
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    whole = client.chat.completions.create(model="glm-multimodal", messages=[user_message("Where?", image)])
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens > 2 and whole.usage.prompt_tokens >= 1
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    cut = client.chat.completions.create(model=engine.name, messages=[user_message("Where?", image)], max_tokens=2)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 2
    assert whole.choices[0].message.content.startswith(cut.choices[0].message.content)

    chunks = list(client.chat.completions.create(model="glm-multimodal", messages=[user_message("Where?", image)],
                                                 max_tokens=2, stream=True, stream_options={"include_usage": True}))
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2


def test_a_seed_too_large_for_a_generator_is_a_400(served):
    _, url, _ = served
    for path, body in (("/v1/chat/completions", {"model": "glm-multimodal", "seed": 2**70,
                                                 "messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/images/generations", {"prompt": "a dog", "seed": 2**64})):
        response = httpx.post(url + path, json=body, timeout=30)
        assert response.status_code == 400 and "seed" in response.json()["error"]["message"]
