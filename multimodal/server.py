"""An OpenAI-compatible HTTP API over an `Engine` (FastAPI; run by uvicorn on 127.0.0.1 by default).

Endpoints:
- `GET /v1/models`: the one model this server runs.
- `POST /v1/chat/completions`: `messages` whose content is a string or a list of `text` and `image_url` parts; an
  image is given as a `data:` URL (base64), since the server never fetches from the network. One image per
  conversation (as CogVLM); earlier messages become the history; a VLM ignores system messages (it was not trained
  with one). With a GLM text model (ChatGLM3, GLM-4 chat), `tools` / `tool_choice` / `tool_calls` and `tool`
  messages map onto GLM's tool calling (`multimodal.openai_tools`); a reply that calls a tool comes back as
  `tool_calls` with finish_reason "tool_calls". `stream: true` answers with server-sent events
  (`chat.completion.chunk` objects, then `data: [DONE]`). Honoured: `max_tokens` / `max_completion_tokens`,
  `temperature` (0, the default, is greedy), `top_p`, `seed`, `stream_options.include_usage`; other fields are
  ignored. `finish_reason` is "length" when `max_tokens` cut the answer, else "stop"; every answer carries `usage`
  (prompt tokens count the image's). The model may be named by the id `/v1/models` lists or by "glm-multimodal".
- `POST /v1/images/generations`: `prompt`, `n`, `size` ("WxH", one of the model's sizes), `response_format`
  "b64_json" (PNG); extensions: `negative_prompt`, `seed`, `steps`, `guidance_scale`.

One worker thread owns the engine (models are not thread-safe, and parallel requests would only fight over the same
cores). Requests wait in a bounded queue (429 when full); non-streaming chat requests that are waiting together run
as one batch. Every malformed request gets a 4xx with an OpenAI-style error body naming the problem; a 500 means a
bug in the suite.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import queue
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from multimodal.engine import ChatRequest, EngineError, Sampling
from multimodal.image import ImageError, load_image
from multimodal.openai_tools import (
    FunctionTool,
    ToolCallBody,
    ToolCallStream,
    ToolChoice,
    call_from_message,
    engine_tool_choice,
    listed_names,
    reply_message,
    tool_call_entry,
)
from vlm.chat import Usage

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_TOKENS = 256
GENERIC_MODEL_NAME = "glm-multimodal"  # accepted for whatever model the server runs


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": None}})


# ----------------------------------------------------------------------------------------------------------------
# Request bodies (unknown fields are ignored, as OpenAI's clients send many optional ones)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Body):
    url: str


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None
    tool_calls: list[ToolCallBody] | None = None  # an assistant's earlier call


class StreamOptions(_Body):
    include_usage: bool = False


class ChatCompletionBody(_Body):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: ToolChoice | None = None


class ImageGenerationBody(_Body):
    prompt: str = Field(min_length=1, max_length=4000)
    model: str | None = None
    n: int = Field(default=1, ge=1, le=4)
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    negative_prompt: str = ""
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    steps: int | None = Field(default=None, ge=1, le=200)
    guidance_scale: float | None = Field(default=None, ge=0, le=30)


# ----------------------------------------------------------------------------------------------------------------
# Turning a chat body into an engine request


def decode_data_url(url: str, param: str):
    if not url.startswith("data:"):
        raise APIError(400, "image_url.url must be a data: URL (data:image/png;base64,...); this server does not "
                            "fetch images from the network.", param)
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise APIError(400, "image_url.url must be a base64 data: URL (data:image/png;base64,...).", param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "image_url.url holds invalid base64 data.", param) from None
    try:
        return load_image(data)
    except ImageError as error:
        raise APIError(400, str(error), param) from None


def chat_request(body: ChatCompletionBody, default_max_tokens: int) -> ChatRequest:
    image, turns = None, []
    for index, message in enumerate(body.messages):
        if message.role == "assistant" and message.tool_calls:
            try:
                turns.append(("assistant", call_from_message(message.tool_calls, f"messages[{index}].tool_calls")))
            except ValueError as error:
                raise APIError(400, str(error), f"messages[{index}].tool_calls") from None
            continue
        content = message.content or ""
        parts = [TextPart(type="text", text=content)] if isinstance(content, str) else content
        texts = []
        for part_index, part in enumerate(parts):
            if isinstance(part, TextPart):
                texts.append(part.text)
                continue
            param = f"messages[{index}].content[{part_index}].image_url"
            if message.role != "user":
                raise APIError(400, "Images can only be sent in user messages.", param)
            if image is not None:
                raise APIError(400, "Only one image per conversation is supported.", param)
            image = decode_data_url(part.image_url.url, param)
        turns.append(("observation" if message.role == "tool" else message.role, "\n".join(texts)))
    if not turns or turns[-1][0] not in ("user", "observation"):
        raise APIError(400, "The last message must come from the user (or be a tool's result).", "messages")
    role, question = turns[-1]
    if role == "user" and not question.strip():
        raise APIError(400, "The last user message has no text; ask a question.", "messages")
    sampling = Sampling(
        max_new_tokens=body.max_completion_tokens or body.max_tokens or default_max_tokens,
        temperature=body.temperature or 0.0,
        top_p=body.top_p,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**31),  # greedy answers ignore it
    )
    tools = tuple(tool.model_dump() for tool in body.tools or ())
    return ChatRequest(image=image, question=question, history=tuple(turns[:-1]), sampling=sampling, role=role,
                       tools=tools, tool_choice=engine_tool_choice(body.tool_choice))


def parse_size(size: str | None, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    if not sizes:
        raise APIError(400, "This model has no text-to-image stage.", "model")
    if size is None:
        return sizes[0]
    available = ", ".join(f"{w}x{h}" for h, w in sizes)
    width, sep, height = size.partition("x")
    if not (sep and width.isdigit() and height.isdigit()) or (int(height), int(width)) not in sizes:
        raise APIError(400, f"size '{size}' is not available; this model draws {available}.", "size")
    return int(height), int(width)


# ----------------------------------------------------------------------------------------------------------------
# The worker: one thread runs every model call


@dataclass
class ChatJob:
    request: ChatRequest
    future: Future = field(default_factory=Future)


@dataclass
class StreamJob:
    request: ChatRequest
    emit: Callable  # called from the worker thread with each text delta, then with None at the end
    fail: Callable  # called with the exception when the answer fails
    cancelled: threading.Event = field(default_factory=threading.Event)
    usage: Usage = field(default_factory=Usage)  # filled in by the engine when the answer ends


@dataclass
class DrawJob:
    arguments: dict
    future: Future = field(default_factory=Future)


class Worker:
    """Runs jobs one at a time in queue order; chat jobs waiting together are answered as one batch."""

    def __init__(self, engine, max_batch: int, max_queue: int):
        self.engine = engine
        self.max_batch = max_batch
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.thread = threading.Thread(target=self._loop, name="engine-worker", daemon=True)

    def submit(self, job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(429, "The server is busy; too many requests are waiting. Try again shortly.",
                           kind="rate_limit_error") from None

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _loop(self) -> None:
        held: deque = deque()  # jobs taken off the queue while filling a batch, run next in their order
        while True:
            job = held.popleft() if held else self.jobs.get()
            if job is None:
                return
            if isinstance(job, ChatJob):
                batch = [job]
                while len(batch) < self.max_batch:
                    try:
                        waiting = self.jobs.get_nowait()
                    except queue.Empty:
                        break
                    if waiting is None:
                        held.append(waiting)
                        break
                    (batch if isinstance(waiting, ChatJob) else held).append(waiting)
                self._run_chat(batch)
            elif isinstance(job, StreamJob):
                self._run_stream(job)
            else:
                self._run_draw(job)

    def _run_chat(self, batch: list[ChatJob]) -> None:
        usages = [Usage() for _ in batch]
        try:
            answers = self.engine.chat_batch([job.request for job in batch], usages)
        except Exception as error:  # handed to the waiting request, which turns it into a response
            for job in batch:
                job.future.set_exception(error)
            return
        for job, answer, usage in zip(batch, answers, usages):
            job.future.set_result((answer, usage))

    def _run_stream(self, job: StreamJob) -> None:
        try:
            request = job.request
            for delta in self.engine.chat_stream(request.image, request.question, request.history, request.sampling,
                                                 job.usage, role=request.role, tools=request.tools,
                                                 tool_choice=request.tool_choice):
                if job.cancelled.is_set():  # the client went away: stop decoding for nobody
                    break
                job.emit(delta)
        except Exception as error:  # handed to the waiting request
            job.fail(error)
            return
        job.emit(None)

    def _run_draw(self, job: DrawJob) -> None:
        try:
            job.future.set_result(self.engine.draw(**job.arguments))
        except Exception as error:  # handed to the waiting request
            job.future.set_exception(error)


def as_api_error(error: Exception) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, (EngineError, ImageError, ValueError)):
        return APIError(400, str(error))
    log.exception("request failed", exc_info=error)
    return APIError(500, "The server failed to answer this request.", kind="server_error")


# ----------------------------------------------------------------------------------------------------------------
# The app


def create_app(engine, max_batch: int = 8, max_queue: int = 64, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               default_max_tokens: int = DEFAULT_MAX_TOKENS) -> FastAPI:
    worker = Worker(engine, max_batch=max_batch, max_queue=max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        await asyncio.to_thread(worker.stop)

    app = FastAPI(title="glm-multimodal", lifespan=lifespan)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, error: APIError):
        return error_response(error.status, error.message, error.param, error.kind)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
        if first["type"] == "json_invalid":
            return error_response(400, "The request body is not valid JSON.")
        return error_response(400, f"{where}: {first['msg']}.", where)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, error: HTTPException):
        return error_response(error.status_code, str(error.detail))

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            return error_response(413, f"The request body is larger than {max_body_bytes // (1024 * 1024)} MB.")
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name is not None and name not in (engine.name, GENERIC_MODEL_NAME):
            raise APIError(404, f"The model '{name}' does not exist; this server runs '{engine.name}'.", "model",
                           kind="not_found_error")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(engine.name, created)]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        check_model(name)
        return _model_card(engine.name, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionBody, request: Request):
        check_model(body.model)
        chat = chat_request(body, default_max_tokens)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return await _stream_response(worker, chat, completion_id, engine.name, request, include_usage)
        job = ChatJob(chat)
        worker.submit(job)
        try:
            answer, usage = await asyncio.wrap_future(job.future)
        except Exception as error:
            raise as_api_error(error) from None
        message, finish_reason = reply_message(answer, listed_names(chat.tools, chat.tool_choice),
                                               usage.finish_reason)
        return {
            "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": engine.name,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
            "usage": _usage(usage),
        }

    @app.post("/v1/images/generations")
    async def images_generations(body: ImageGenerationBody):
        check_model(body.model)
        if body.response_format == "url":
            raise APIError(400, "response_format 'url' is not supported; this server returns b64_json only.",
                           "response_format")
        height, width = parse_size(body.size, engine.draw_sizes)
        job = DrawJob(dict(prompt=body.prompt, negative_prompt=body.negative_prompt, size=(height, width),
                           steps=body.steps, guidance_scale=body.guidance_scale, num_images=body.n,
                           seed=body.seed or 0))
        worker.submit(job)
        try:
            drawing = await asyncio.wrap_future(job.future)
        except Exception as error:
            raise as_api_error(error) from None
        return {"created": int(time.time()), "data": [{"b64_json": _png_base64(image)} for image in drawing.relay]}

    return app


def _usage(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "glm-multimodal"}


def _png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


async def _stream_response(worker: Worker, chat: ChatRequest, completion_id: str, model: str, request: Request,
                           include_usage: bool):
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue = asyncio.Queue()
    job = StreamJob(
        chat,
        emit=lambda delta: loop.call_soon_threadsafe(deltas.put_nowait, delta),
        fail=lambda error: loop.call_soon_threadsafe(deltas.put_nowait, error),
    )
    worker.submit(job)
    created = int(time.time())

    def chunk(delta: dict | None, finish_reason: str | None = None, usage: dict | None = None) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": choices}
        if include_usage:  # as OpenAI: null on every chunk but a last one with no choices
            payload["usage"] = usage
        return f"data: {_json(payload)}\n\n"

    async def events():
        split = ToolCallStream(listed_names(chat.tools, chat.tool_choice))
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                item = await deltas.get()
                if item is None:
                    break
                if isinstance(item, Exception):
                    # Headers are already sent, so the error travels as an event the client can read.
                    error = as_api_error(item)
                    yield f"data: {_json({'error': {'message': error.message, 'type': error.kind}})}\n\n"
                    return
                text = split.feed(item)
                if text:
                    yield chunk({"content": text})
            text, call = split.finish()
            if text:
                yield chunk({"content": text})
            if call is not None:
                yield chunk({"tool_calls": [tool_call_entry(call, index=0)]})
            yield chunk({}, "tool_calls" if call is not None else job.usage.finish_reason)
            if include_usage:
                yield chunk(None, usage=_usage(job.usage))
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _json(payload: dict) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def serve(engine, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Run the API until interrupted."""
    uvicorn.run(create_app(engine, **options), host=host, port=port, log_level="info")
