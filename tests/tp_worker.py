"""The ranks of tests/test_tp_distributed.py (spawned by torch.multiprocessing; gloo over localhost).

Every rank builds the same seeded tiny models, runs them whole (the TP=1 reference) and sharded, and measures the
difference; rank 0 writes the worst value over all ranks of every metric to a JSON file and the test asserts on
them. All checks share one launch, so the process start (importing torch) is paid once.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from diffusion.denoiser import DiT, dit_config
from glm.generate import SamplingConfig, generate
from glm.model import GLMConfig, GLMModel
from multimodal import tp
from multimodal.checkpoint import LazyCheckpoint
from multimodal.quantize import QUANTIZED_LINEARS, QuantSpec, quantize_linear, quantize_model, set_backend
from vlm.adapter import Adapter, AdapterConfig
from vlm.glm4v import Glm4vConfig, Glm4vModel, TextConfig, VisionConfig
from vlm.model import VISION, VisionLanguageModel, VLMConfig
from vlm.processor import position_ids
from vlm.vit import VisionTransformer, ViTConfig


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn from a seeded normal (zero-initialised layers such as adaLN would hide errors); norm
    weights around 1 so activations keep their size."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.1
            param.copy_(noise + 1 if "norm" in name and name.endswith("weight") else noise)
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def check_glm(metrics: dict, path: Path, rank: int, world: int, group) -> None:
    config = GLMConfig.from_preset("tiny")
    reference = randomize(GLMModel(config), 1).eval()
    ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(2))
    expected = reference(ids)
    metrics["glm_logit_scale"] = -expected.abs().max().item()  # reported negated: the test wants it large
    sharded = tp.shard_model(copy.deepcopy(reference), rank, world, group=group)
    metrics["glm_logits"] = max_diff(sharded(ids), expected)
    metrics["glm_local_kv_groups"] = sharded.layers[0].attn.num_kv_groups  # 1 at both 2 and 4 ranks

    prompts = [[5, 17, 33, 2, 90, 41, 7], [250, 12, 3]]  # unequal lengths: left padding and masks
    sampling = SamplingConfig(max_new_tokens=8)
    expected_tokens, tokens = generate(reference, prompts, sampling), generate(sharded, prompts, sampling)
    metrics["glm_greedy_token_mismatches"] = float(tokens != expected_tokens)

    loaded = tp.load_sharded(path, lambda: GLMModel(config), rank, world, group=group)
    metrics["glm_loaded_logits"] = max_diff(loaded(ids), expected)
    report = tp.tp_weight_report(lambda: GLMModel(config), world)
    metrics["glm_rank_bytes_vs_report"] = abs(tp.weight_bytes(loaded) / report.rank_bytes[rank] - 1)
    metrics["glm_rank_bytes_over_ideal"] = tp.weight_bytes(loaded) / report.ideal_bytes


@torch.no_grad()
def check_vision(metrics: dict, rank: int, world: int, group) -> None:
    vit_config = ViTConfig(image_size=32, patch_size=8, width=32, depth=2, heads=4, mlp_dim=64)
    vit = randomize(VisionTransformer(vit_config), 3).eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    sharded = tp.shard_model(copy.deepcopy(vit), rank, world, group=group)
    metrics["vit_features"] = max_diff(sharded(pixels), vit(pixels))

    adapter = randomize(Adapter(AdapterConfig(vision_width=32, hidden=64, ffn=88)), 5).eval()
    features = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(6))
    sharded = tp.shard_model(copy.deepcopy(adapter), rank, world, group=group)
    metrics["adapter_embeddings"] = max_diff(sharded(features), adapter(features))


@torch.no_grad()
def check_dit(metrics: dict, rank: int, world: int, group) -> None:
    config = dit_config("tiny", num_heads=4)
    dit = randomize(DiT(config), 7).eval()
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 8, 8, generator=generator)
    text = torch.randn(2, 5, config.text_dim, generator=generator)
    text_mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    timestep = torch.tensor([3.0, 700.0])
    sharded = tp.shard_model(copy.deepcopy(dit), rank, world, group=group)
    metrics["dit_prediction"] = max_diff(sharded(x, timestep, text, text_mask), dit(x, timestep, text, text_mask))


@torch.no_grad()
def check_vlm(metrics: dict, rank: int, world: int, group) -> None:
    """Image encoding, an expert-routed prefill into the cache, then one cached decode step."""
    tiny = VLMConfig.from_preset("tiny")
    config = replace(tiny, vision=replace(tiny.vision, heads=4))  # 4 ViT heads, so 4 ranks split them too
    reference = randomize(VisionLanguageModel(config), 9).eval()
    sharded = tp.shard_model(copy.deepcopy(reference), rank, world, group=group)
    generator = torch.Generator().manual_seed(10)
    pixels = torch.randn(2, 3, 32, 32, generator=generator)
    image_tokens, image_start = config.image_tokens, 2
    ids = torch.randint(0, config.text.vocab_size, (2, image_start + image_tokens + 4), generator=generator)
    types = torch.zeros_like(ids)
    types[:, image_start:image_start + image_tokens] = VISION
    positions = position_ids(types)
    next_ids = torch.randint(0, config.text.vocab_size, (2, 1), generator=generator)
    next_positions = positions[:, -1:] + 1
    outputs = []
    for model in (reference, sharded):
        cache = model.allocate_cache(2, 64)
        image = model.encode_image(pixels)
        prefill = model(ids, image_embeds=image, image_start=image_start, positions=positions, cache=cache)
        decode = model(next_ids, positions=next_positions, cache=cache, cache_start=ids.shape[1])
        outputs.append((image, prefill, decode))
    (ref_image, ref_prefill, ref_decode), (image, prefill, decode) = outputs
    metrics["vlm_image_embeddings"] = max_diff(image, ref_image)
    metrics["vlm_prefill_logits"] = max_diff(prefill, ref_prefill)
    metrics["vlm_decode_logits"] = max_diff(decode, ref_decode)


@torch.no_grad()
def check_glm4v(metrics: dict, rank: int, world: int, group) -> None:
    """GLM-4.1V: a prefill with an image (3D positions) into the cache, then one cached decode step."""
    config = Glm4vConfig(
        text=TextConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                        num_kv_heads=2, mrope_section=(2, 1, 1), max_position_embeddings=256),
        vision=VisionConfig(depth=1, hidden_size=32, num_heads=4, intermediate_size=48, out_hidden_size=64,
                            image_size=56), image_token_id=290)
    reference = randomize(Glm4vModel(config), 13).eval()
    sharded = tp.shard_model(copy.deepcopy(reference), rank, world, group=group)
    generator = torch.Generator().manual_seed(14)
    pixels, grid = torch.randn(16, 3 * 2 * 14 * 14, generator=generator), torch.tensor([[1, 4, 4]])
    ids = torch.cat([torch.randint(0, 280, (1, 2), generator=generator), torch.full((1, 4), 290),
                     torch.randint(0, 280, (1, 3), generator=generator)], dim=1)
    outputs = []
    for model in (reference, sharded):
        cache = model.allocate_cache(1, 32)
        prefill = model(ids, pixels, grid, cache=cache)
        next_position = int(model.positions(ids, grid).max()) + 1
        decode = model(ids[:, -1:], positions=torch.full((3, 1, 1), next_position), cache=cache,
                       cache_start=ids.shape[1])
        outputs.append((prefill, decode))
    metrics["glm4v_prefill_logits"] = max_diff(outputs[1][0], outputs[0][0])
    metrics["glm4v_decode_logits"] = max_diff(outputs[1][1], outputs[0][1])


@torch.no_grad()
def check_quantized(metrics: dict, rank: int, world: int, group) -> None:
    """INT8 / INT4 shards against the same scheme applied to the unsharded model (its TP=1 twin)."""
    # 32 input features per shard of dense (4 heads x 32) and down (ffn 128) at 4 ranks: INT4 group size 32 fits.
    config = GLMConfig.from_preset("tiny", head_dim=32, ffn_hidden_size=128)
    reference = randomize(GLMModel(config), 11).eval()
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(12))
    expected_float = reference(ids)
    for scheme in ("int8", "int4"):
        spec = QuantSpec(scheme, group_size=32)
        twin = quantize_model(copy.deepcopy(reference), spec)
        sharded = tp.shard_model(copy.deepcopy(reference), rank, world, group=group,
                                 quantize=lambda linear, name: quantize_linear(linear, spec, name))
        assert any(isinstance(m, QUANTIZED_LINEARS) for m in sharded.modules())
        # The dequantizing reference on both sides: the cut is checked exactly, apart from the fused kernels' bf16
        # arithmetic (tests/test_kernels_quant.py checks those).
        twin, sharded = set_backend(twin, "reference"), set_backend(sharded, "reference")
        expected = twin(ids)
        metrics[f"{scheme}_vs_twin"] = max_diff(sharded(ids), expected)
        metrics[f"{scheme}_twin_vs_float"] = max_diff(expected, expected_float)


def run_checks(rank: int, world: int, group, scratch: Path) -> dict[str, float]:
    metrics: dict[str, float] = {}
    check_vision(metrics, rank, world, group)
    check_dit(metrics, rank, world, group)
    check_glm(metrics, scratch / "glm.safetensors", rank, world, group)
    check_vlm(metrics, rank, world, group)
    check_glm4v(metrics, rank, world, group)
    check_quantized(metrics, rank, world, group)
    return metrics


def worker(rank: int, world: int, port: int, out_path: Path, scratch: Path) -> None:
    """Rank `rank` of a `world`-process launch: every check runs at world/2 ranks (two independent TP groups side
    by side) and then at the full world."""
    torch.set_num_threads(1)  # the ranks share two cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    tp.maybe_init_distributed(tp=world)
    if rank == 0:
        config = GLMConfig.from_preset("tiny")
        state = randomize(GLMModel(config), 1).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(scratch / "glm.safetensors"))
    dist.barrier()
    LazyCheckpoint.__getitem__ = _no_full_reads  # in this process only: every read must go through get_slice

    half, _ = dist.new_subgroups(world // 2)
    metrics = {
        f"{world // 2} ranks: {k}": v for k, v in run_checks(rank % (world // 2), world // 2, half, scratch).items()
    }
    metrics |= {f"{world} ranks: {k}": v for k, v in run_checks(rank, world, dist.group.WORLD, scratch).items()}

    every_rank = [None] * world
    dist.all_gather_object(every_rank, metrics)
    if tp.is_main_process():
        worst = {key: max(m[key] for m in every_rank) for key in metrics}
        out_path.write_text(json.dumps(worst, indent=1))
    dist.destroy_process_group()


def _no_full_reads(self, key):
    raise AssertionError(f"load_sharded read the whole tensor {key}")
