"""`multimodal serve` and `multimodal demo` wiring: options reach the engine and the server/app; bad options fail
with one sentence. The servers themselves are tested in test_server_api.py and test_demo_browser.py."""

from __future__ import annotations

import pytest
import torch

import demos.app
import multimodal.server
from multimodal.cli import main
from multimodal.engine import Engine


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    torch.set_num_threads(1)
    return Engine.random_tiny(seed=2).save(tmp_path_factory.mktemp("cli") / "tiny-suite")


def test_serve_passes_its_options_on(suite, monkeypatch):
    calls = []
    monkeypatch.setattr(multimodal.server, "serve", lambda engine, **options: calls.append((engine, options)))
    assert main(["serve", "--checkpoint", str(suite), "--port", "8765", "--max-batch", "3", "--max-queue", "5",
                 "--max-tokens", "40", "--quant", "int8"]) == 0
    (engine, options), = calls
    assert engine.name == "tiny-suite" and engine.draw_sizes == [(32, 32), (16, 16)]
    assert options == {"host": "127.0.0.1", "port": 8765, "max_batch": 3, "max_queue": 5, "default_max_tokens": 40}
    assert "Int8" in type(engine.chat_model.model.layers[0].attn.qkv).__name__  # --quant reached the model


def test_demo_builds_the_app_over_the_loaded_engine(suite, monkeypatch):
    import gradio as gr

    launched = []
    monkeypatch.setattr(demos.app, "launch", lambda app, **options: launched.append((app, options)))
    assert main(["demo", "--checkpoint", str(suite), "--port", "7999"]) == 0
    (app, options), = launched
    assert isinstance(app, gr.Blocks) and options == {"host": "127.0.0.1", "port": 7999}


@pytest.mark.parametrize("argv,message", [
    (["serve", "--tp", "2"], "The server runs one process"),
    (["demo", "--tp", "2"], "The demo runs one process"),
    (["serve", "--checkpoint", "/nonexistent/suite"], "The checkpoint /nonexistent/suite does not exist."),
])
def test_bad_options_fail_with_one_sentence(argv, message, capsys):
    assert main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and "\n" not in error
