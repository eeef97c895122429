"""GLM model and checkpoint import: parity with transformers' GlmForCausalLM, THUDM-format import, cache, padding."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import GlmConfig as HFGlmConfig
from transformers import GlmForCausalLM

from glm.convert import load_glm, read_glm_checkpoint
from glm.model import PRESETS, GLMConfig, GLMModel, apply_rotary, param_count, rotary_table
from multimodal.checkpoint import CheckpointError

VOCAB, LAYERS, HEADS, GROUPS, HEAD_DIM, HIDDEN, FFN = 320, 3, 4, 2, 16, 64, 88


def make_hf_model(seed: int = 0, rope_theta: float = 5e6) -> GlmForCausalLM:
    torch.manual_seed(seed)
    config = HFGlmConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=GROUPS, head_dim=HEAD_DIM, rms_norm_eps=1e-5,
        max_position_embeddings=256, pad_token_id=0, eos_token_id=[1],
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": 0.5},
    )
    model = GlmForCausalLM(config).eval()
    with torch.no_grad():  # transformers initialises biases and norms to constants; make every tensor random
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def thudm_copy(hf: GlmForCausalLM, folder, rope_ratio: float) -> None:
    """Write the same weights in THUDM's layout and config (the slow obvious mapping, written out here)."""
    state = hf.state_dict()
    out = {
        "transformer.embedding.word_embeddings.weight": state["model.embed_tokens.weight"],
        "transformer.rotary_pos_emb.inv_freq": torch.ones(HEAD_DIM // 4),
        "transformer.encoder.final_layernorm.weight": state["model.norm.weight"],
        "transformer.output_layer.weight": state["lm_head.weight"],
    }
    for n in range(LAYERS):
        src, dst = f"model.layers.{n}.", f"transformer.encoder.layers.{n}."
        out[dst + "input_layernorm.weight"] = state[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "post_attention_layernorm.weight"]
        for kind in ("weight", "bias"):
            fused = torch.cat([state[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[dst + f"self_attention.query_key_value.{kind}"] = fused
        out[dst + "self_attention.dense.weight"] = state[src + "self_attn.o_proj.weight"]
        out[dst + "mlp.dense_h_to_4h.weight"] = state[src + "mlp.gate_up_proj.weight"]
        out[dst + "mlp.dense_4h_to_h.weight"] = state[src + "mlp.down_proj.weight"]
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in out.items()}, str(folder / "model.safetensors"))
    config = {
        "model_type": "chatglm", "padded_vocab_size": VOCAB, "hidden_size": HIDDEN, "num_layers": LAYERS,
        "num_attention_heads": HEADS, "multi_query_attention": True, "multi_query_group_num": GROUPS,
        "kv_channels": HEAD_DIM, "ffn_hidden_size": FFN, "layernorm_epsilon": 1e-5, "rope_ratio": rope_ratio,
        "seq_length": 256, "rmsnorm": True, "add_bias_linear": False, "add_qkv_bias": True, "original_rope": True,
        "post_layer_norm": True, "apply_residual_connection_post_layernorm": False,
    }
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A random transformers model saved with save_pretrained and our model loaded from that folder."""
    hf = make_hf_model()
    folder = tmp_path_factory.mktemp("hf") / "glm-hf"
    hf.save_pretrained(folder)
    return hf, load_glm(folder, dtype=torch.float32)


def test_logits_and_hidden_states_match_transformers(pair):
    hf, ours = pair
    assert ours.config.rope_theta == pytest.approx(5e6)
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids, output_hidden_states=True)
        logits, hidden = ours(ids, output_hidden_states=True)
    torch.testing.assert_close(logits, expected.logits, atol=1e-5, rtol=0)
    assert len(hidden) == len(expected.hidden_states) == LAYERS + 1
    torch.testing.assert_close(hidden[-2], expected.hidden_states[-2], atol=1e-5, rtol=0)


def test_left_padded_batch_matches_transformers(pair):
    hf, ours = pair
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(2, VOCAB, (3, 12), generator=gen)
    valid = torch.ones(3, 12, dtype=torch.long)
    valid[1, :5] = 0
    valid[2, :9] = 0
    positions = (valid.cumsum(-1) - 1).clamp(min=0)  # [0]*pad + range(len), as THUDM's tokenizer pads
    with torch.no_grad():
        expected = hf(ids, attention_mask=valid, position_ids=positions).logits
        logits = ours(ids, positions=positions, attention_mask=valid)
    real = valid.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=0)


def test_thudm_and_hf_copies_load_to_identical_tensors(pair, tmp_path):
    hf, ours = pair
    thudm_copy(hf, tmp_path / "thudm", rope_ratio=500)
    config, state, detected = read_glm_checkpoint(tmp_path / "thudm")
    assert detected == "thudm"
    assert config == ours.config
    reference = ours.state_dict()
    assert set(state) == set(reference)
    for key, tensor in state.items():
        assert torch.equal(tensor, reference[key]), key


def test_thudm_rope_ratio_sets_the_rotary_base(pair, tmp_path):
    hf, _ = pair
    thudm_copy(hf, tmp_path / "thudm", rope_ratio=1)  # same weights, 500x smaller base: logits must differ
    model = load_glm(tmp_path / "thudm")
    assert model.config.rope_theta == 10000.0
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() > 1e-3


def test_strict_import_names_missing_and_unexpected_keys(pair, tmp_path):
    hf, _ = pair
    folder = tmp_path / "broken"
    hf.save_pretrained(folder)
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.self_attn.k_proj.bias"]
    state["model.layers.0.extra.weight"] = torch.zeros(1)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys: model\.layers\.1\.self_attn\.k_proj\.bias") as error:
        load_glm(folder)
    assert "model.layers.0.extra.weight" in str(error.value)


def test_cached_decode_equals_full_forward():
    model = GLMModel(GLMConfig.from_preset("tiny-glm4")).init_weights(generator=torch.Generator().manual_seed(4))
    ids = torch.randint(0, model.config.vocab_size, (2, 14), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(2, 32)
        steps = [model(ids[:, :6], cache=cache, cache_start=0)]
        steps.append(model(ids[:, 6:9], cache=cache, cache_start=6))  # a chunk after a prefix: offset causality
        for t in range(9, 14):
            steps.append(model(ids[:, t : t + 1], cache=cache, cache_start=t))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_left_padded_cached_batch_equals_each_row_alone():
    model = GLMModel(GLMConfig.from_preset("tiny")).init_weights(generator=torch.Generator().manual_seed(6))
    gen = torch.Generator().manual_seed(7)
    rows = [torch.randint(0, 320, (n,), generator=gen) for n in (9, 4, 7)]
    width, extra = 9, 3
    ids = torch.zeros(3, width, dtype=torch.long)
    valid = torch.zeros(3, width + extra, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        valid[i, width - len(row) :] = True
    positions = (valid[:, :width].long().cumsum(-1) - 1).clamp(min=0)
    follow = torch.randint(0, 320, (3, extra), generator=gen)
    with torch.no_grad():
        cache = model.allocate_cache(3, 16)
        batch = [model(ids, positions=positions, cache=cache, attention_mask=valid[:, :width], last_only=True)]
        for t in range(extra):
            slot = width + t
            batch.append(model(follow[:, t : t + 1], positions=positions[:, -1:] + 1 + t, cache=cache,
                               cache_start=slot, attention_mask=valid[:, : slot + 1]))
        batch = torch.cat(batch, dim=1)  # [3, 1 + extra, V]
        for i, row in enumerate(rows):
            alone = model(torch.cat([row, follow[i]])[None])[:, len(row) - 1 :]
            torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-5, rtol=0)


def test_input_embeds_equal_input_ids():
    model = GLMModel(GLMConfig.from_preset("tiny")).init_weights(generator=torch.Generator().manual_seed(8))
    ids = torch.randint(0, 320, (2, 5), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(model(input_embeds=model.embed(ids)), model(ids), atol=0, rtol=0)
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, input_embeds=model.embed(ids))


def test_apply_rotary_matches_complex_rotation_in_float64():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 7, 16, dtype=torch.float64, generator=gen)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 9, 10, 11, 40]])
    cos, sin = rotary_table(8, 64, 5e6)
    out = apply_rotary(x, cos[positions].unsqueeze(1).double(), sin[positions].unsqueeze(1).double())
    theta = 5e6 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)  # [4]
    angle = positions[:, None, :, None].double() * theta  # [B, 1, T, 4]
    pairs = torch.complex(x[..., 0:8:2], x[..., 1:8:2]) * torch.polar(torch.ones_like(angle), angle)
    expected = torch.cat([torch.stack([pairs.real, pairs.imag], -1).flatten(-2), x[..., 8:]], dim=-1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)  # table is float32


def test_presets_and_parameter_counts():
    assert param_count(PRESETS["chatglm3-6b"]) == pytest.approx(6.244e9, rel=1e-3)
    assert param_count(PRESETS["glm-4-9b-chat"]) == pytest.approx(9.400e9, rel=1e-3)
    assert PRESETS["glm-4-9b-chat"].rope_theta == 5e6
    assert param_count(PRESETS["tiny"]) == GLMModel(PRESETS["tiny"]).num_parameters()
    with pytest.raises(ValueError, match="Unknown preset 'nope'; known: .*chatglm3-6b"):
        GLMConfig.from_preset("nope")


def test_convert_command_writes_our_native_format(pair, tmp_path, capsys):
    from multimodal.cli import main

    hf, ours = pair
    thudm_copy(hf, tmp_path / "thudm", rope_ratio=500)
    assert main(["convert", str(tmp_path / "thudm"), str(tmp_path / "native"), "--dtype", "bfloat16"]) == 0
    assert "thudm format" in capsys.readouterr().out
    native = load_glm(tmp_path / "native")
    assert native.config == ours.config
    assert native.embed.weight.dtype == torch.bfloat16
    for key, tensor in native.state_dict().items():
        assert torch.equal(tensor, ours.state_dict()[key].to(torch.bfloat16)), key
    assert main(["convert", str(tmp_path / "thudm"), str(tmp_path / "x"), "--format", "hf"]) == 1
    assert "model_type 'chatglm'; only 'glm' is supported" in capsys.readouterr().err
