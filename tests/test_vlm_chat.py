"""The high-level API and the CLI on a tiny random model: the image is encoded once per conversation, streaming
equals the one-shot answer, a batch equals its rows, and the commands run end to end."""

from __future__ import annotations

import io
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from glm.tokenizer import GLMTokenizer
from multimodal.cli import build_parser, main
from multimodal.commands import chat as chat_command
from vlm.chat import VLMChat, load_chat
from vlm.convert import save_vlm
from vlm.model import VisionLanguageModel, VLMConfig

TOKENIZER = Path(__file__).resolve().parent.parent / "multimodal" / "assets" / "tokenizer.json"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tokenizer = GLMTokenizer.load(TOKENIZER)
    tiny = VLMConfig.from_preset("tiny")
    config = replace(tiny, text=replace(tiny.text, vocab_size=tokenizer.vocab_size))
    model = VisionLanguageModel(config).init_weights(std=0.1, generator=torch.Generator().manual_seed(5))
    folder = tmp_path_factory.mktemp("vlm")
    save_vlm(model, folder)
    shutil.copy(TOKENIZER, folder / "tokenizer.json")
    return folder


def picture(seed: int, size=(48, 36)) -> Image.Image:
    values = torch.randint(0, 256, (size[1], size[0], 3), generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(values.to(torch.uint8).numpy())


def test_conversation_encodes_the_image_once_and_streams_the_same_answer(checkpoint):
    chat = load_chat(checkpoint)
    calls = []
    original = chat.model.encode_image
    chat.model.encode_image = lambda pixels: calls.append(1) or original(pixels)
    sampling = chat.sampling(max_new_tokens=6)
    conversation = chat.start(picture(1))
    first = "".join(conversation.ask("What is this?", sampling))
    second = "".join(conversation.ask("And the colour?", sampling))
    assert len(calls) == 1 and conversation.history == [("What is this?", first), ("And the colour?", second)]
    chat.model.encode_image = original
    assert chat.answer(picture(1), "What is this?", sampling=sampling) == first
    assert chat.answer(picture(1), "And the colour?", [("What is this?", first)], sampling=sampling) == second


def test_batch_answers_equal_single_answers(checkpoint):
    chat = load_chat(checkpoint)
    sampling = chat.sampling(max_new_tokens=5)
    images = [picture(2), picture(3, (20, 70))]
    turns = [[("user", "Describe.")], [("user", "Hi"), ("assistant", "Hello"), ("user", "Where is the cat?")]]
    batch = chat.answer_batch(images, turns, sampling)
    assert batch[0] == chat.answer(images[0], "Describe.", sampling=sampling)
    assert batch[1] == "".join(chat.stream(images[1], turns[1], sampling))
    assert chat.caption(images, "Describe.", sampling)[0] == batch[0]
    with pytest.raises(ValueError, match="end with the user"):
        chat.answer_batch(images[:1], [[("assistant", "x")]], sampling)


def test_cli_ground_and_chat_run(checkpoint, tmp_path, capsys):
    image_path = tmp_path / "scene.png"
    picture(4).save(image_path)
    drawn = tmp_path / "drawn.png"
    assert main(["ground", str(image_path), "Where is the dog?", "--checkpoint", str(checkpoint),
                 "--max-new-tokens", "4", "--save", str(drawn)]) == 0
    assert drawn.exists() and Image.open(drawn).size == (48, 36)
    assert main(["ground", str(tmp_path / "missing.png"), "q", "--checkpoint", str(checkpoint)]) == 1
    assert "does not exist" in capsys.readouterr().err
    args = build_parser().parse_args(["chat", "--image", str(image_path), "--checkpoint", str(checkpoint),
                                      "--max-new-tokens", "3"])
    assert chat_command.run(args, stdin=io.StringIO("Hello?\nMore?\n\n")) == 0
    assert capsys.readouterr().out.count("model> ") == 2


def test_without_a_checkpoint_the_missing_embedded_model_is_one_sentence(monkeypatch, tmp_path):
    monkeypatch.setattr("vlm.chat.EMBEDDED", tmp_path / "absent")
    with pytest.raises(ValueError, match="embedded VLM"):
        load_chat(None)
    assert isinstance(VLMChat, type)
