"""GLM generation: greedy parity with transformers' generate, cached vs recomputed decoding, batching with left
padding, per-row stop tokens, seeded sampling independent of batch size, logits processors, streaming text."""

import pytest
import torch
from transformers import GlmConfig as HFGlmConfig
from transformers import GlmForCausalLM
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from glm.convert import HF_TABLE
from glm.generate import (
    PackedLinear,
    SamplingConfig,
    generate,
    generate_tokens,
    pack_for_cpu,
    process_logits,
    sample,
    stream_text,
)
from glm.model import GLMConfig, GLMModel
from glm.tokenizer import train_bpe
from multimodal.checkpoint import convert


def make_hf_model(seed: int) -> GlmForCausalLM:
    torch.manual_seed(seed)
    config = HFGlmConfig(
        vocab_size=320, hidden_size=64, intermediate_size=88, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=256, pad_token_id=0,
        eos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5},
    )
    model = GlmForCausalLM(config).eval()
    with torch.no_grad():  # random biases and norms too, and larger weights so that tokens vary
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * (0.1 if name.endswith("bias") or "norm" in name else 0.2))
            if "norm" in name:
                param.add_(1.0)
    return model


def tiny_model(seed: int = 0, **overrides) -> GLMModel:
    config = GLMConfig.from_preset("tiny", **overrides)
    return GLMModel(config).init_weights(std=0.2, generator=torch.Generator().manual_seed(seed)).eval()


def random_prompts(lengths, vocab=320, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def pair():
    hf = make_hf_model(seed=3)
    hf.generation_config.pad_token_id = 0
    ours = GLMModel(GLMConfig(vocab_size=320, hidden_size=64, num_layers=3, num_heads=4, num_kv_groups=2, head_dim=16,
                              ffn_hidden_size=88, rope_ratio=500.0, max_seq_len=256))
    ours.load_state_dict(convert(hf.state_dict(), HF_TABLE))
    return hf, ours.eval()


def test_32_greedy_tokens_match_transformers_generate(pair):
    hf, ours = pair
    prompts = random_prompts([11, 4, 8], seed=1)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        expected_batch = hf.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False)[:, width:]
        expected_single = hf.generate(torch.tensor([prompts[0]]), max_new_tokens=32, do_sample=False)[:, width:]
    config = SamplingConfig(max_new_tokens=32)
    assert generate(ours, prompts[:1], config) == expected_single.tolist()
    assert generate(ours, prompts, config) == expected_batch.tolist()


def test_cached_generation_equals_recomputing_everything():
    model = tiny_model(seed=1)
    prompt = random_prompts([6], seed=2)[0]
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(12):  # the slow obvious way: full forward over everything each step
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    assert generate(model, [prompt], SamplingConfig(max_new_tokens=12))[0] == tokens[len(prompt) :]


def test_left_padded_batch_equals_each_row_alone_and_stops_per_row():
    model = tiny_model(seed=2)
    prompts = random_prompts([9, 3, 6, 1], seed=3)
    config = SamplingConfig(max_new_tokens=10)
    alone = [generate(model, [p], config)[0] for p in prompts]
    assert generate(model, prompts, config) == alone
    stop = alone[1][4]  # row 1 stops at its 5th token; rows that never produce it run to the end
    stopped = generate(model, prompts, SamplingConfig(max_new_tokens=10, stop_tokens=(stop,)))
    for row, tokens in zip(stopped, alone):
        assert row == (tokens[: tokens.index(stop)] if stop in tokens else tokens)


def test_same_seed_gives_same_sample_at_any_batch_size():
    model = tiny_model(seed=3)
    prompts = random_prompts([5, 8, 2], seed=4)
    config = SamplingConfig(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.2, seed=7)
    batched = generate(model, prompts, config)
    for row, prompt in enumerate(prompts):  # row i draws with seed + i
        alone = generate(model, [prompt], SamplingConfig(**{**config.__dict__, "seed": 7 + row}))
        assert alone[0] == batched[row]
    assert generate(model, prompts, config) == batched
    assert generate(model, prompts, SamplingConfig(**{**config.__dict__, "seed": 8})) != batched


def test_logits_processors_match_transformers():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 50, generator=gen) * 3
    previous = torch.randint(0, 50, (3, 12), generator=gen)
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, previous, True)
    config = SamplingConfig(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3)
    expected = logits.clone()
    for processor in (RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7), TopKLogitsWarper(20),
                      TopPLogitsWarper(0.8)):
        expected = processor(previous, expected)
    ours = process_logits(logits, seen, config)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    kept = ~torch.isinf(expected)
    torch.testing.assert_close(ours[kept], expected[kept])


def test_sampling_follows_the_softmax_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    probs = logits.softmax(-1)[0]
    generator = torch.Generator().manual_seed(0)
    config = SamplingConfig(temperature=1.0)
    draws = torch.stack([sample(logits, config, [generator]) for _ in range(4000)]).flatten()
    frequencies = torch.bincount(draws, minlength=5).float() / len(draws)
    torch.testing.assert_close(frequencies, probs, atol=0.025, rtol=0)


def test_streaming_yields_the_same_text():
    tokenizer = train_bpe(["the red cube 红色立方体 left of the sphere 球体"] * 10, vocab_size=300)
    model = tiny_model(seed=4, vocab_size=tokenizer.vocab_size)
    prompt = tokenizer.build_chat([{"role": "user", "content": "红色的 cube?"}])
    config = SamplingConfig(max_new_tokens=40, temperature=1.0, seed=3, stop_tokens=tokenizer.stop_tokens)
    pieces = list(stream_text(model, tokenizer, prompt, config))
    assert len(pieces) > 1
    assert "".join(pieces) == tokenizer.decode(generate(model, [prompt], config)[0])
    steps = list(generate_tokens(model, [prompt], config))
    assert [s[0] for s in steps] == generate(model, [prompt], config)[0]


def test_prompt_longer_than_context_is_a_clear_error():
    model = tiny_model(max_seq_len=16)
    with pytest.raises(ValueError, match="A prompt of 16 tokens does not fit the model's context of 16 tokens"):
        generate(model, [list(range(2, 18))], SamplingConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[5], []], SamplingConfig(max_new_tokens=4))
    # a prompt that fits generates only up to the end of the context
    assert len(generate(model, [list(range(2, 14))], SamplingConfig(max_new_tokens=10))[0]) == 4


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_packed_cpu_linears_match_plain_model():
    import copy

    model = tiny_model(seed=5)
    packed = pack_for_cpu(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == 4 * 2 + 1
    prompts = random_prompts([7, 3], seed=6)
    ids = torch.tensor(prompts[0])[None]
    with torch.no_grad():
        torch.testing.assert_close(packed(ids), model(ids), atol=1e-4, rtol=1e-5)
    config = SamplingConfig(max_new_tokens=12)
    assert generate(packed, prompts, config) == generate(model, prompts, config)
    # one row per step: the decode kernel where it builds
    assert generate(packed, prompts[:1], config) == generate(model, prompts[:1], config)
    plain = torch.nn.Linear(37, 21)
    for rows in ((1, 1, 37), (4, 37)):  # the decode kernel, then oneDNN
        x = torch.randn(rows)
        with torch.no_grad():
            expected = x.double() @ plain.weight.double().T + plain.bias.double()
            torch.testing.assert_close(PackedLinear(plain)(x).double(), expected, rtol=1e-5, atol=1e-5)
    # bfloat16 weights pack too: the same logits to bfloat16's rounding of the output
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    packed_bf16 = pack_for_cpu(copy.deepcopy(bf16))
    assert sum(isinstance(m, PackedLinear) for m in packed_bf16.modules()) == 4 * 2 + 1
    with torch.no_grad():
        expected = bf16(ids).float()
        error = (packed_bf16(ids).float() - expected).norm() / expected.norm()
    assert error < 1e-2


def test_bench_glm_runs_and_prints_ratios(capsys):
    from multimodal.cli import main

    args = ["bench", "glm", "--vs", "transformers", "--preset", "tiny", "--batch-sizes", "1", "3", "--prompt-len", "5",
            "--new-tokens", "4", "--repeats", "1", "--threads", "1", "--plain", "--bandwidth-mb", "64"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "measured read bandwidth" in out and "batch-1 decode is at most" in out
    for batch, total in ((1, 4), (3, 12)):
        assert f"(greedy tokens equal: {total}/{total})" in out.split(f"\n    {batch} | ours ratio")[1].split("\n")[0]
    assert out.count("ratio") == 4
