"""What a new user hit at the command line: a device the machine lacks, output piped into `head`, a box string with
a stray separator (in test_vlm_grounding), draw options out of range."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from multimodal.cli import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps", "tpu"])
def test_a_missing_device_is_one_sentence(device, capsys):
    assert main(["ground", "missing.png", "Where is the dog?", "--device", device]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --device {device}:") and err.count("\n") == 1 and "Traceback" not in err


def test_output_piped_into_head_ends_quietly():
    command = f"{sys.executable} -m multimodal.cli --help | head -n 1"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("usage: multimodal")
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr


@pytest.mark.parametrize("option,value", [("--height", "0"), ("--steps", "0"), ("--width", "-64"),
                                          ("--relay-steps", "0"), ("--guidance", "-1")])
def test_draw_refuses_values_out_of_range(option, value, capsys):
    with pytest.raises(SystemExit):
        main(["draw", "a dog with a hat", option, value])
    assert option in capsys.readouterr().err


def test_help_and_a_bad_image_do_not_load_torch(tmp_path):
    """`multimodal --help` and an unreadable image answer before torch is imported (2 s and 650 MB on its own)."""
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    probe = ("import sys\nfrom multimodal.cli import build_parser, main\nbuild_parser()\n"
             f"code = main(['ground', {str(bad)!r}, 'Where is the dog?'])\n"
             "print(code, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["1", "False"], result.stderr
    assert "is not an image file" in result.stderr


def test_the_cli_and_the_demo_say_what_the_embedded_models_know(capsys):
    from scripted_models import scripted_engine

    from demos.app import build_app
    from multimodal.engine import EMBEDDED_NAME

    with pytest.raises(SystemExit):
        main(["ground", "--help"])
    assert "not for photos" in capsys.readouterr().out
    engine = scripted_engine()
    shown = json.dumps(build_app(engine).config, ensure_ascii=False, default=str)
    assert "not for photos" not in shown  # a real checkpoint is not limited to the world
    engine.name = EMBEDDED_NAME
    assert "not for photos" in json.dumps(build_app(engine).config, ensure_ascii=False, default=str)


def test_train_passes_its_scene_pool_size_and_refuses_an_empty_one(monkeypatch, tmp_path, capsys):
    from multimodal.training import judge

    seen = {}
    monkeypatch.setattr(judge, "train_judge", lambda out, tokenizer, **kwargs: seen.update(kwargs) or out)
    assert main(["train", "judge", "--out", str(tmp_path / "judge"), "--steps", "3", "--scenes", "50000"]) == 0
    assert seen["scenes"] == 50000 and seen["steps"] == 3
    assert main(["train", "judge", "--out", str(tmp_path / "judge"), "--scenes", "0"]) == 1
    assert "--scenes must be at least 1" in capsys.readouterr().err
