"""`multimodal bench gpu`: the GPU table in one prepared command (under 8 minutes on one H100 at the defaults).

On GLM-4-9B shapes with random weights, built directly on the device: the read-bandwidth floor of the device
(measured in the same run), then greedy decode tokens/s at each batch for our model in bf16, INT8 and INT4 (the
Triton kernels on CUDA) and for transformers' `GlmForCausalLM` with the same weights, eager and (with `--compile`)
compiled; each row's ratio to our bf16 and to transformers eager, and at batch 1 its share of the floor.
On the CPU with a small preset (`--preset tiny --device cpu`) the same code runs as a smoke test.
"""

from __future__ import annotations

import argparse
import copy
import time


def register(subparsers) -> None:
    parser = subparsers.add_parser("gpu", help="GLM-4-9B decode on a GPU: bf16/INT8/INT4 vs transformers, % of floor",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="glm-4-9b", help="model shape (a glm.model preset)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=128, help="INT4 group size")
    parser.add_argument("--compile", action="store_true", help="also time transformers under torch.compile")
    parser.add_argument("--bandwidth-mb", type=int, default=4096, help="size of the bandwidth measurement's read")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_speed(generate_n, batch: int, new_tokens: int, device: str, repeats: int = 3) -> float:
    """Decode tokens/s from the best of `repeats` full and one-token generations, after a warm-up; NaN when the
    difference is lost in the noise (tiny models)."""
    generate_n(2)
    best = {1: float("inf"), new_tokens: float("inf")}
    for _ in range(repeats):
        for n in best:
            _synchronize(device)
            start = time.perf_counter()
            generate_n(n)
            _synchronize(device)
            best[n] = min(best[n], time.perf_counter() - start)
    decode = best[new_tokens] - best[1]
    return batch * (new_tokens - 1) / decode if decode > 0 else float("nan")


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import GlmForCausalLM

    from glm.convert import HF_TABLE
    from glm.generate import SamplingConfig, generate
    from glm.model import GLMConfig, GLMModel, param_count
    from multimodal.benchmarks._bandwidth import floor_columns, read_bandwidth
    from multimodal.benchmarks.glm import hf_config_for
    from multimodal.benchmarks.quant import weight_bytes
    from multimodal.checkpoint import build_on_meta, convert, load_into
    from multimodal.quantize import QuantSpec, quantize_model

    if args.new_tokens < 2:
        raise ValueError("--new-tokens must be at least 2 to time decoding.")
    config = GLMConfig.from_preset(args.preset)
    dtype = torch.bfloat16
    bandwidth = read_bandwidth(args.device, args.bandwidth_mb << 20)
    torch.manual_seed(args.seed)
    with torch.device(args.device):  # random weights made where they run: a 9B model never passes through the CPU
        hf = GlmForCausalLM._from_config(hf_config_for(config), dtype=dtype).eval()
    ours = build_on_meta(lambda: GLMModel(config))
    load_into(ours, convert(hf.state_dict(), HF_TABLE))
    ours = ours.to(args.device).eval()
    print(f"GLM {args.preset}: {param_count(config) / 1e9:.2f}B parameters, bf16 activations, {args.device}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new greedy tokens; read bandwidth {bandwidth / 1e9:.0f} GB/s")

    generator = torch.Generator().manual_seed(args.seed + 1)
    prompts = {batch: torch.randint(1, config.vocab_size, (batch, args.prompt_len), generator=generator)
               for batch in args.batch_sizes}
    rows = []  # (name, batch, tok/s, read bytes per step)

    def ours_rows(name, model):
        read = weight_bytes(model)[1]
        for batch, prompt in prompts.items():
            speed = decode_speed(lambda n, m=model, p=prompt: generate(m, p.tolist(), SamplingConfig(max_new_tokens=n)),
                                 batch, args.new_tokens, args.device)
            rows.append((name, batch, speed, read))

    def hf_rows(name, model):
        read = weight_bytes(model)[1]
        for batch, prompt in prompts.items():
            ids = prompt.to(args.device)

            def hf_generate(n, ids=ids):
                with torch.inference_mode():
                    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                          min_new_tokens=n, do_sample=False)

            rows.append((name, batch, decode_speed(hf_generate, batch, args.new_tokens, args.device), read))

    ours_rows("ours bf16", ours)
    hf_rows("transformers eager", hf)
    if args.compile:
        try:
            hf.forward = torch.compile(hf.forward)
            hf.generation_config.cache_implementation = "static"
            hf_rows("transformers compiled", hf)
        except Exception as error:  # a compile failure is a row, not a crash of the whole table
            print(f"transformers compiled: failed ({type(error).__name__}: {str(error)[:120]})")
    del hf
    for scheme, spec in (("int8", QuantSpec("int8")), (f"int4 g{args.group_size}", QuantSpec("int4", args.group_size))):
        quantized = quantize_model(copy.deepcopy(ours), spec)
        ours_rows(f"ours {scheme}", quantized)
        del quantized

    speed = {(name, batch): value for name, batch, value, _ in rows}
    print(f"{'stack':<22} {'batch':>5} {'tok/s':>9} {'vs ours bf16':>12} {'vs hf eager':>11} {'GB/s':>7} "
          f"{'% floor':>7}")
    for name, batch, value, read in rows:
        achieved, percent = floor_columns(read, value / batch, bandwidth)
        print(f"{name:<22} {batch:>5} {value:>9.1f} {value / speed['ours bf16', batch]:>11.2f}x "
              f"{value / speed['transformers eager', batch]:>10.2f}x {achieved:>7.1f} {percent:>6.1f}%")
    return 0
