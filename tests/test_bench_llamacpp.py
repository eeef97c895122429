"""The llama.cpp comparison's GGUF export against llama.cpp itself: the same greedy tokens and logits from the same
random weights (F32, so the arithmetic matches), and the benchmark's table at a tiny size. Needs the optional bench
extra (llama-cpp-python, gguf); skipped without it."""

import argparse

import pytest
import torch

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from glm.generate import SamplingConfig, generate  # noqa: E402
from glm.model import GLMConfig, GLMModel  # noqa: E402
from multimodal.benchmarks._llamacpp import LlamaCpp, read_bytes_per_token, run_llama_cpp, write_gguf  # noqa: E402


@pytest.mark.parametrize("preset", ["tiny", "tiny-glm4"])  # 2 KV groups / 1 KV group and rotary base 5e6
def test_llama_cpp_runs_our_gguf_export_to_the_same_greedy_tokens(tmp_path, preset):
    config = GLMConfig.from_preset(preset)
    model = GLMModel(config).init_weights(std=0.08, generator=torch.Generator().manual_seed(0)).eval()
    prompt = torch.randint(1, config.vocab_size, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    path = write_gguf(model, tmp_path / "tiny.gguf")
    peer = LlamaCpp(path, threads=1, context=64)
    theirs = peer.generate(prompt, 16)
    peer.close()
    ours = generate(model, [prompt], SamplingConfig(max_new_tokens=16))[0]
    assert theirs == ours
    embedding_row = config.hidden_size * 4
    assert read_bytes_per_token(path) == sum(p.numel() * 4 for p in model.parameters()) - model.embed.weight.nbytes \
        + embedding_row


def test_the_comparison_table_prints_every_pair(capsys):
    args = argparse.Namespace(preset="tiny-glm4", threads=1, seed=0, prompt_len=8, new_tokens=6, repeats=1,
                              device="cpu", bandwidth_mb=64, clock="wall", decode_step="c")
    assert run_llama_cpp(args) == 0
    out = capsys.readouterr().out
    for pair in ("float32 ", "F32", "bfloat16", "BF16", "int8", "Q8_0", "int4 g32", "Q4_0"):
        assert pair in out
