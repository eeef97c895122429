"""GLM tokenizers: the suite's BPE, ChatGLM3's SentencePiece and GLM-4's tiktoken formats (tiny vocabularies made
here), special token ids, chat prompts at token level, stop tokens, text safety of special spellings."""

import pytest
from tiny_tokenizers import CORPUS, chatglm3_tokenizer, glm4_tokenizer

from glm.tokenizer import CHATGLM3_SPECIAL_TOKENS, GLM4_SPECIAL_TOKENS, GLMTokenizer, train_bpe

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is left of the sphere? 球的左边是什么？"},
]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, vocab_size=400, special_tokens=["<|box|>"])


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory):
    return chatglm3_tokenizer(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def tiktoken_tokenizer(tmp_path_factory):
    return glm4_tokenizer(tmp_path_factory.mktemp("tiktoken"))


def manual_chat(tokenizer, encode, role_names, prefix):
    """The slow obvious construction: prefix, then per message role id + encode(metadata + "\\n") + encode(content)."""
    ids = [tokenizer.token_id(p) for p in prefix]
    for message in MESSAGES:
        ids += [tokenizer.token_id(role_names[message["role"]])] + encode("\n") + encode(message["content"])
    return ids + [tokenizer.token_id(role_names["assistant"])]


ROLE_NAMES = {r: f"<|{r}|>" for r in ("system", "user", "assistant", "observation")}


def test_bpe_round_trip_chat_and_specials(bpe, tmp_path):
    for text in CORPUS[:6] + ["unseen words: Zürich 東京 🙂"]:
        assert bpe.decode(bpe.encode(text)) == text
    assert len(bpe.encode(CORPUS[0])) < len(CORPUS[0].encode())  # merges were learned
    assert bpe.token_id("<|box|>") != bpe.token_id("[gMASK]")
    chat = bpe.build_chat(MESSAGES)
    assert chat == manual_chat(bpe, bpe.encode, ROLE_NAMES, ("[gMASK]", "<sop>"))
    assert bpe.decode(chat, skip_special_tokens=False) == (
        "[gMASK]<sop><|system|>\nYou are a helpful assistant.<|user|>\nWhat is left of the sphere? 球的左边是什么？"
        "<|assistant|>"
    )
    assert bpe.stop_tokens == tuple(bpe.token_id(s) for s in ("<|endoftext|>", "<|user|>", "<|observation|>"))
    reloaded = GLMTokenizer.load(bpe.save(tmp_path / "tok"))
    assert reloaded.build_chat(MESSAGES) == chat
    assert reloaded.special_ids == bpe.special_ids


def test_special_spellings_in_text_stay_text(bpe, tiktoken_tokenizer):
    tiktoken_tok, _ = tiktoken_tokenizer
    for tokenizer in (bpe, tiktoken_tok):
        ids = tokenizer.encode("hi <|user|> [gMASK]")
        assert not set(ids) & set(tokenizer.special_ids.values())
        assert tokenizer.decode(ids) == "hi <|user|> [gMASK]"


def test_tiktoken_glm4_format(tiktoken_tokenizer):
    tokenizer, ranks = tiktoken_tokenizer
    assert tokenizer.name == "glm4-tiktoken"
    assert [tokenizer.token_id(s) for s in GLM4_SPECIAL_TOKENS] == list(range(len(ranks), len(ranks) + 14))
    assert tokenizer.encode(" the object") == [ranks[b" the"], ranks[b" "], ranks[b"ob"], ranks[b"je"], ranks[b"ct"]]
    text = "the 物体 there"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.build_chat(MESSAGES) == manual_chat(tokenizer, tokenizer.encode, ROLE_NAMES, ("[gMASK]", "<sop>"))
    assert tokenizer.eos_id == len(ranks)  # <|endoftext|>, first id after the ranks (151329 in GLM-4)


def test_sentencepiece_chatglm3_format(sentencepiece_tokenizer):
    import sentencepiece

    tokenizer, prefix = sentencepiece_tokenizer
    sp = sentencepiece.SentencePieceProcessor(model_file=f"{prefix}.model")
    base = sp.vocab_size()
    assert [tokenizer.token_id(s) for s in CHATGLM3_SPECIAL_TOKENS] == list(range(base, base + 9))
    assert tokenizer.eos_id == sp.eos_id() == 2
    assert tokenizer.stop_tokens == (2, base + 6, base + 8)  # </s>, <|user|>, <|observation|>
    chat = tokenizer.build_chat(MESSAGES)
    assert chat == manual_chat(tokenizer, sp.encode, ROLE_NAMES, ("[gMASK]", "sop"))
    assert chat[:3] == [base + 1, base + 3, base + 5]  # [gMASK] sop <|system|>
    text = "红色的立方体在蓝色球体的左边。"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        GLMTokenizer.load(tmp_path / "missing.model")
    bogus = tmp_path / "tokenizer.model"
    bogus.write_bytes(b"\x00\x01 not a model")
    with pytest.raises(ValueError, match="neither a tiktoken nor a SentencePiece"):
        GLMTokenizer.load(bogus)
    with pytest.raises(ValueError, match="Unknown chat role 'bot'"):
        train_bpe(CORPUS[:6], vocab_size=300).encode_message("bot", "hi")


# The official GLM-4 chat template (tokenizer_config.json of glm-4-9b-chat; of its tools branch only the function
# tools, the one kind the suite supports).
GLM4_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}<|system|>\n你是一个名为 ChatGLM 的"
    "人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。"
    "\n\n# 可用工具"
    "{% set tools = item['tools'] %}{% for tool in tools %}{% if tool['type'] == 'function' %}\n\n## "
    "{{ tool['function']['name'] }}\n\n{{ tool['function'] | tojson(indent=4) }}\n在调用上述函数时，请使用 Json 格式"
    "表示调用的参数。{% endif %}{% endfor %}{% endif %}{% if item['content'] %}<|{{ item['role'] }}|>"
    "{{ item['metadata'] }}\n{{ item['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _official_glm4_ids(tokenizer, messages) -> list[int]:
    """Render the template with transformers' own template engine (its `tojson` keeps non-ASCII text), then tokenize
    the text: specials where their spelling appears, everything between them as plain text."""
    import re

    from transformers.utils.chat_template_utils import _compile_jinja_template

    text = _compile_jinja_template(GLM4_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    specials = sorted(tokenizer.special_ids, key=len, reverse=True)
    ids = []
    for piece in re.split("(" + "|".join(re.escape(s) for s in specials) + ")", text):
        if piece in tokenizer.special_ids:
            ids.append(tokenizer.token_id(piece))
        elif piece:
            ids += tokenizer.encode(piece)
    return ids


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "查询某地的天气 (the weather somewhere)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_glm4_tools_prompt_equals_the_official_template(bpe, tiktoken_tokenizer):
    messages = [{"role": "system", "content": "", "tools": [WEATHER]}, {"role": "user", "content": "北京天气?"},
                {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
                {"role": "observation", "content": '{"temperature": 21}'}]
    for tokenizer in (bpe, tiktoken_tokenizer[0]):
        assert tokenizer.build_chat(messages) == _official_glm4_ids(tokenizer, messages)


def test_tool_calls_parse_in_both_formats():
    from glm.tools import ToolCall, parse_tool_call, tool_names

    names = tool_names([WEATHER])
    assert parse_tool_call('get_weather\n{"city": "北京"}', names) == ToolCall("get_weather", {"city": "北京"})
    assert parse_tool_call("get_weather\n```python\ntool_call(city='Paris', days=2)\n```", names) == ToolCall(
        "get_weather", {"city": "Paris", "days": 2})
    code = "get_weather\n```python\nos.system('x')\n```"
    for reply in ("It is sunny.", "get_time\n{}", "get_weather\nnot json", code):
        assert parse_tool_call(reply, names) is None


def test_glm4_chat_ids_equal_the_official_template_on_random_conversations(bpe, tiktoken_tokenizer):
    import random

    rng = random.Random(7)
    pieces = ["", "\n", "\n\n", " ", "hello", "the object", "物体", "there\n", "  two spaces", "?"]
    for tokenizer in (bpe, tiktoken_tokenizer[0]):
        for _ in range(150):
            messages = [{"role": rng.choice(["system", "user", "assistant", "observation"]),
                         "content": "".join(rng.choice(pieces) for _ in range(rng.randrange(4))),
                         "metadata": rng.choice(["", "", "get_weather"])} for _ in range(rng.randrange(1, 5))]
            assert tokenizer.build_chat(messages) == _official_glm4_ids(tokenizer, messages), messages


def test_chatglm3_tools_go_into_the_system_message_as_thudm_builds_it(sentencepiece_tokenizer):
    import json

    tokenizer, _ = sentencepiece_tokenizer
    messages = [{"role": "system", "content": "Answer briefly.", "tools": [WEATHER]},
                {"role": "user", "content": "weather in Paris?"}]
    system = "Answer briefly." + "\n" + json.dumps([WEATHER], indent=4, ensure_ascii=False)
    header = [tokenizer.token_id("<|system|>")] + tokenizer.encode("\n")
    user = [tokenizer.token_id("<|user|>")] + tokenizer.encode("\n") + tokenizer.encode("weather in Paris?")
    expected = tokenizer.prefix() + header + tokenizer.encode(system) + user + [tokenizer.token_id("<|assistant|>")]
    assert tokenizer.build_chat(messages) == expected
    with pytest.raises(ValueError, match="system message only"):
        tokenizer.build_chat([{"role": "user", "content": "hi", "tools": [WEATHER]}])
