"""Tensor-parallel plans in one process: every rank's cut is applied to a copy and the ranks' partial outputs are
summed by hand (what the all-reduce does), so the sharding arithmetic is checked without spawning processes."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from diffusion.denoiser import DiT, dit_config
from glm.model import GLMConfig, GLMModel
from multimodal import tp
from multimodal.quantize import QuantSpec, quantize_linear

TINY = GLMConfig.from_preset("tiny")  # 4 heads, 2 KV groups, ffn 88


def _rank_copies(model: torch.nn.Module, world: int) -> list[torch.nn.Module]:
    copies = []
    for rank in range(world):
        shard = copy.deepcopy(model)
        tp.cut_parameters(shard, tp.plan_tp(shard, rank, world))
        copies.append(shard)
    return copies


@pytest.fixture
def glm(generator) -> GLMModel:
    return GLMModel(TINY).init_weights(std=0.1, generator=generator).eval()


@torch.no_grad()
@pytest.mark.parametrize("world", [2, 4])
def test_gate_up_is_split_half_by_half(glm, generator, world):
    mlp = glm.layers[0].mlp
    x = torch.randn(3, 5, TINY.hidden_size, generator=generator)
    shards = [model.layers[0].mlp for model in _rank_copies(glm, world)]
    summed = sum(shard(x) for shard in shards)
    torch.testing.assert_close(summed, mlp(x), rtol=0, atol=1e-6)

    # The trap: cutting the fused [gate | up] rows contiguously pairs gates with the wrong ups.
    naive = copy.deepcopy(mlp)
    rows = 2 * TINY.ffn_hidden_size // world
    naive.gate_up.weight = torch.nn.Parameter(mlp.gate_up.weight[:rows])
    naive.down.weight = torch.nn.Parameter(mlp.down.weight[:, : rows // 2])
    assert (naive(x) - shards[0](x)).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("world", [2, 4])
def test_attention_partials_sum_to_the_whole_with_kv_groups_split_or_replicated(glm, generator, world):
    x = torch.randn(2, 7, TINY.hidden_size, generator=generator)
    cos, sin = glm.rope(torch.arange(7).expand(2, 7))
    shards = _rank_copies(glm, world)
    summed = sum(model.layers[1].attn(x, cos, sin) for model in shards)
    torch.testing.assert_close(summed, glm.layers[1].attn(x, cos, sin), rtol=0, atol=1e-6)
    groups = [model.layers[1].attn.num_kv_groups for model in shards]
    assert groups == [1] * world  # 2 ranks: one group each; 4 ranks: each group held by two ranks

    # At 4 ranks rank r reads group r // 2: ranks 0 and 1 hold the same K rows, ranks 1 and 2 do not.
    k_rows = slice(TINY.num_heads // world * TINY.head_dim, None)
    keys = [model.layers[1].attn.qkv.weight[k_rows] for model in shards]
    if world == 4:
        assert torch.equal(keys[0], keys[1]) and not torch.equal(keys[1], keys[2])


def test_heads_that_do_not_divide_fail_naming_the_layer(glm):
    with pytest.raises(ValueError, match=r"layers\.0\.attn: 4 query heads cannot be split over 3 ranks"):
        tp.plan_tp(glm, 0, 3)
    with pytest.raises(ValueError, match="KV groups"):
        tp.plan_tp(GLMModel(replace(TINY, num_heads=6, num_kv_groups=3)), 0, 2)


def test_int4_group_size_that_does_not_divide_a_shard_names_layer_and_a_size_that_works(generator):
    # The attention output has 64 input features (4 heads x 16), 32 per rank at 2 ranks: group size 64 fits the
    # whole layer but not its shard.
    model = GLMModel(replace(TINY, ffn_hidden_size=128)).init_weights(generator=generator)
    spec = QuantSpec("int4", group_size=64)
    quantize = lambda linear, name: quantize_linear(linear, spec, name)  # noqa: E731
    tp.shard_model(copy.deepcopy(model), 0, 1, quantize=quantize)  # fine unsharded
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.dense.*group size 64.*32 input.*group size 32.*--tp 2"):
        tp.shard_model(model, 0, 2, quantize=quantize)


def test_image_side_modules_that_do_not_divide_stay_replicated():
    dit = DiT(dit_config("tiny"))  # 2 heads
    plan = tp.plan_tp(dit, 0, 4)
    assert "blocks.0" in plan.replicated_reason and not any(k.startswith("blocks.0.") for k in plan.params)
    assert "blocks.0.attn.qkv.weight" in tp.plan_tp(dit, 0, 2).params


def test_outside_torchrun_there_is_no_process_group_and_tp_asks_for_torchrun(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert tp.maybe_init_distributed() is None
    assert tp.maybe_init_distributed(tp=1) is None
    assert tp.is_main_process()
    with pytest.raises(ValueError, match="torchrun --standalone --nproc-per-node 2"):
        tp.maybe_init_distributed(tp=2)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_each_rank_holds_about_a_world_th_of_chatglm3(world):
    report = tp.tp_weight_report(lambda: GLMModel(GLMConfig.from_preset("chatglm3-6b")), world)
    assert report.total_bytes == 4 * 6_243_584_000  # fp32, THUDM's 6.24 B parameters
    assert len(set(report.rank_bytes)) == 1  # every rank holds the same amount
    assert report.replicated_bytes < 0.001 * report.total_bytes  # the norms
    # Beyond 2 ranks the 2 KV groups are held by several ranks each; that is the only excess over total / world.
    kv_weights = 28 * 2 * 2 * 128 * (4096 + 1) * 4  # layers x (k, v) x groups x head_dim x (hidden + bias) x fp32
    excess = kv_weights * (max(1, world // 2) - 1) / world
    assert report.rank_bytes[0] == pytest.approx(report.ideal_bytes + excess, rel=1e-6)


def test_bench_tp_prints_per_rank_bytes(capsys):
    from multimodal.cli import main

    assert main(["bench", "tp", "--models", "glm-4-9b", "--worlds", "2", "--quant", "int4", "--group-size", "32"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("glm-4-9b"))
    total, rank, share = map(float, row.split()[2:5])
    assert rank == pytest.approx(total / 2, rel=0.01) and share == pytest.approx(total / 2, rel=1e-3)


def test_load_sharded_reads_slices_and_refuses_quantized_checkpoints(glm, tmp_path):
    from multimodal.checkpoint import CheckpointError, save_native
    from multimodal.quantize import save_quantized

    save_native(glm.state_dict(), TINY.to_dict(), tmp_path / "float", kind="glm")
    shards = [tp.plan_tp(GLMModel(TINY), rank, 2) for rank in range(2)]
    assert [plan.params["layers.0.mlp.down.weight"].ranges for plan in shards] == [((0, 44),), ((44, 88),)]
    # World 1 through the same path: the whole model, equal to the original.
    loaded = tp.load_sharded(tmp_path / "float", lambda: GLMModel(TINY), 0, 1)
    ids = torch.arange(10)[None]
    torch.testing.assert_close(loaded(ids), glm(ids), rtol=0, atol=0)

    spec = QuantSpec("int8")
    save_quantized(tp.shard_model(copy.deepcopy(glm), 0, 1, quantize=lambda linear, name: quantize_linear(
        linear, spec, name)), spec, TINY.to_dict(), tmp_path / "int8", kind="glm")
    with pytest.raises(CheckpointError, match="already quantized.*--quant"):
        tp.load_sharded(tmp_path / "int8", lambda: GLMModel(TINY), 0, 2)
