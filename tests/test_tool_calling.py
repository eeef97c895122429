"""Tool calling with GLM text models: OpenAI's `tools` / `tool_choice` / `tool_calls` through the official openai client
against the real server on loopback, onto the GLM-4 and ChatGLM3 tool formats.

The chat model is `GLMChat` with its real prompt building; only the reply text comes from a script, so each test sees
the exact prompt ids the model was given and checks them against the template (`GLMTokenizer.build_chat`, itself
checked against the official GLM-4 template in test_glm_tokenizer.py). A tiny random GLM checks the real decode path
and the choice of tool by the model's probabilities against the slow obvious computation.
"""

from __future__ import annotations

import io
import json

import openai
import pytest
import torch
from test_server_api import running_server
from tiny_tokenizers import chatglm3_tokenizer, glm4_tokenizer

from glm.chat import CHATGLM3_TOOL_SYSTEM, GLMChat
from glm.convert import save_glm
from glm.model import GLMConfig, GLMModel
from multimodal.cli import build_parser
from multimodal.commands import chat as chat_command
from multimodal.engine import ChatRequest, Engine, EngineError, Sampling
from multimodal.server import create_app

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def tiny_glm(vocab_size: int, seed: int = 0) -> GLMModel:
    config = GLMConfig(vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_groups=2,
                       head_dim=8, ffn_hidden_size=64, max_seq_len=1024)
    return GLMModel(config).init_weights(generator=torch.Generator().manual_seed(seed)).eval()


class ScriptedGLMChat(GLMChat):
    """`GLMChat` whose replies are scripted: records each prompt, then writes the next reply after any forced
    header, in pieces of 3 characters."""

    def __init__(self, tokenizer, replies: list[str]):
        super().__init__(tiny_glm(tokenizer.vocab_size), tokenizer)
        self.replies, self.prompts = list(replies), []

    def _stream(self, prompt, header, sampling, usage):
        self.prompts.append(prompt)
        text = header + self.replies.pop(0)
        if usage is not None:
            usage.record(len(prompt), self.tokenizer.encode(text), True)
        for start in range(0, len(text), 3):
            yield text[start : start + 3]


@pytest.fixture(scope="module")
def glm4(tmp_path_factory):
    return glm4_tokenizer(tmp_path_factory.mktemp("glm4"))[0]


@pytest.fixture(scope="module")
def chatglm3(tmp_path_factory):
    return chatglm3_tokenizer(tmp_path_factory.mktemp("chatglm3"))[0]


def serve(chat_model):
    engine = Engine.from_parts(chat_model, None, "scripted-glm")
    return running_server(create_app(engine))


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_a_glm4_tool_round_trip_through_the_openai_client(glm4):
    chat = ScriptedGLMChat(glm4, ['get_weather\n{"city": "北京"}', "It is 21 degrees in Beijing."])
    with serve(chat) as url:
        api = client(url)
        messages = [{"role": "user", "content": "What is the weather in Beijing?"}]
        first = api.chat.completions.create(model="glm-multimodal", messages=messages, tools=[WEATHER, TIME])
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "北京"}
        assert chat.prompts[0] == glm4.build_chat([{"role": "system", "content": "", "tools": [WEATHER, TIME]},
                                                   *messages])

        messages += [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
        second = api.chat.completions.create(model="glm-multimodal", messages=messages, tools=[WEATHER, TIME])
        assert second.choices[0].message.content == "It is 21 degrees in Beijing."
        assert second.choices[0].finish_reason == "stop" and not second.choices[0].message.tool_calls
        # the call goes back as the assistant wrote it, the result as GLM's observation turn
        assert chat.prompts[1] == glm4.build_chat([
            {"role": "system", "content": "", "tools": [WEATHER, TIME]}, messages[0],
            {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
            {"role": "observation", "content": '{"temperature": 21}'}])


def test_streamed_tool_calls_and_streamed_plain_answers(glm4):
    chat = ScriptedGLMChat(glm4, ['get_weather\n{"city": "Paris"}', "get weather yourself, please.",
                                  "get_weather\nnot json"])
    with serve(chat) as url:
        api = client(url)
        ask = [{"role": "user", "content": "Weather in Paris?"}]
        chunks = list(api.chat.completions.create(model="glm-multimodal", messages=ask, tools=[WEATHER],
                                                  stream=True))
        calls = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or ()]
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather",
                                                                                         {"city": "Paris"})]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        pieces = {}
        for expected in ("get weather yourself, please.", "get_weather\nnot json"):  # text, and a call that fails
            chunks = list(api.chat.completions.create(model="glm-multimodal", messages=ask, tools=[WEATHER],
                                                      stream=True))
            pieces[expected] = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
            assert "".join(pieces[expected]) == expected and chunks[-1].choices[0].finish_reason == "stop"
        # plain text is held back only while its first line could be a tool's name ("get"), then streams
        assert pieces["get weather yourself, please."][:2] == ["get we", "ath"]


def test_tool_choice_none_named_and_required(glm4):
    chat = ScriptedGLMChat(glm4, ['get_weather\n{"city": "Rome"}', '{"city": "Oslo"}', "{}"])
    with serve(chat) as url:
        api = client(url)
        ask = [{"role": "user", "content": "Weather in Rome?"}]
        none = api.chat.completions.create(model="glm-multimodal", messages=ask, tools=[WEATHER], tool_choice="none")
        assert none.choices[0].message.content.startswith("get_weather") and none.choices[0].finish_reason == "stop"
        assert chat.prompts[-1] == glm4.build_chat(ask)  # no tools shown, none parsed

        named = api.chat.completions.create(model="glm-multimodal", messages=ask, tools=[TIME, WEATHER],
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert named.choices[0].message.tool_calls[0].function.name == "get_weather"
        tools_prompt = glm4.build_chat([{"role": "system", "content": "", "tools": [TIME, WEATHER]}, *ask])
        assert chat.prompts[-1] == tools_prompt + glm4.encode("get_weather\n")  # the call's header is written

        required = api.chat.completions.create(model="glm-multimodal", messages=ask, tools=[TIME],
                                               tool_choice="required")
        assert required.choices[0].message.tool_calls[0].function.name == "get_time"

        with pytest.raises(openai.BadRequestError, match="not among the request's tools"):
            api.chat.completions.create(model="glm-multimodal", messages=ask, tools=[TIME],
                                        tool_choice={"type": "function", "function": {"name": "get_weather"}})
        with pytest.raises(openai.BadRequestError, match="lists no tools"):
            api.chat.completions.create(model="glm-multimodal", messages=ask, tool_choice="required")
        two_calls = {"role": "assistant", "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": "get_time", "arguments": "{}"}} for i in (1, 2)]}
        with pytest.raises(openai.BadRequestError, match="one tool per assistant turn"):
            api.chat.completions.create(model="glm-multimodal", messages=[*ask, two_calls], tools=[TIME])


def test_chatglm3_tools_join_the_system_message_and_its_code_block_calls_parse(chatglm3):
    chat = ScriptedGLMChat(chatglm3, ["get_weather\n```python\ntool_call(city='Beijing')\n```"])
    with serve(chat) as url:
        ask = [{"role": "user", "content": "Weather in Beijing?"}]
        reply = client(url).chat.completions.create(model="glm-multimodal", messages=ask, tools=[WEATHER])
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Beijing"}
    assert chat.prompts[0] == chatglm3.build_chat([{"role": "system", "content": CHATGLM3_TOOL_SYSTEM,
                                                    "tools": [WEATHER]}, *ask])
    history = chat.messages([("user", "hi"), ("assistant", call_of(call)), ("observation", "sunny"),
                             ("user", "thanks")], [WEATHER])
    assert history[2] == {"role": "assistant", "metadata": "get_weather",
                          "content": "```python\ntool_call(city='Beijing')\n```"}  # as THUDM's chat keeps it


def call_of(openai_call):
    from glm.tools import ToolCall

    return ToolCall(openai_call.function.name, json.loads(openai_call.function.arguments))


def test_the_likeliest_tool_is_the_one_whose_header_the_model_finds_most_probable(glm4):
    chat = GLMChat(tiny_glm(glm4.vocab_size, seed=3), glm4)
    turns = [("user", "What time is it, and the weather?")]
    tools = [WEATHER, TIME, {"type": "function", "function": {"name": "get_the_time"}}]
    prompt = chat.prompt_ids(turns, tools)

    def slow_score(name: str) -> float:  # one full forward per header token, no cache, no batching
        total = 0.0
        ids = list(prompt)
        for token in glm4.encode(f"{name}\n"):
            with torch.no_grad():
                logits = chat.model(torch.tensor([ids]))[0, -1].double()
            total += torch.log_softmax(logits, -1)[token].item()
            ids.append(token)
        return total

    scores = {tool["function"]["name"]: slow_score(tool["function"]["name"]) for tool in tools}
    assert chat.likeliest_tool(turns, tools) == max(scores, key=scores.get)


def test_a_glm_text_checkpoint_loads_as_a_chat_engine(glm4, tmp_path, capsys):
    """Engine.load of a native GLM folder: the real decode path, answers equal to generating from the template; the
    CLI's chat runs on it without an image."""
    from glm.generate import SamplingConfig, generate

    model = tiny_glm(glm4.vocab_size, seed=5)
    save_glm(model, tmp_path / "glm")
    glm4_tokenizer(tmp_path / "glm")  # the same vocabulary, written beside the weights
    engine = Engine.load(tmp_path / "glm")
    assert not engine.sees_images and engine.painter is None
    history = [("system", "Be brief."), ("user", "hi"), ("assistant", "hello")]
    answer = engine.chat(None, "the weather?", history, Sampling(max_new_tokens=12))
    prompt = glm4.build_chat([{"role": r, "content": c} for r, c in [*history, ("user", "the weather?")]])
    (ids,) = generate(model, [prompt], SamplingConfig(max_new_tokens=12, stop_tokens=glm4.stop_tokens))
    assert answer == glm4.decode(ids)
    with pytest.raises(EngineError, match="cannot see images"):
        engine.chat(engine_scene(), "what is this?")
    requests = [ChatRequest(None, question, sampling=Sampling(max_new_tokens=9)) for question in
                ("the weather in the north?", "hi", "the other one")]
    alone = [engine.chat(None, request.question, sampling=request.sampling) for request in requests]
    assert engine.chat_batch(requests) == alone  # text rows run as one left-padded batch

    args = build_parser().parse_args(["chat", "--checkpoint", str(tmp_path / "glm"), "--max-new-tokens", "5"])
    assert chat_command.run(args, stdin=io.StringIO("hi\nand then?\n\n")) == 0
    assert capsys.readouterr().out.count("model> ") == 2


def engine_scene():
    from PIL import Image

    return Image.new("RGB", (32, 32), "red")


def test_a_vlm_refuses_tools_with_one_sentence():
    engine = Engine.random_tiny()
    with pytest.raises(EngineError, match="does not call tools"):
        engine.chat(None, "hi", tools=[WEATHER])
