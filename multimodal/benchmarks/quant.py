"""`multimodal bench quant`: weight bytes and greedy decode tokens/s of one GLM in float, INT8 and INT4, in one run.

All three variants are the same random-weight model: the float one in `--dtype` (on the CPU with its linears
prepacked for oneDNN and single rows on the decode kernel, `glm.generate.pack_for_cpu`, our float path there), the
others quantized from it with the output layer included (unless `--exclude` says otherwise) and run with `--dtype`
activations on the default kernel path (`kernels.dispatch`: on the CPU the decode kernel for up to four rows and
torch's fused kernels or the planes path above; Triton on CUDA), INT8 and INT4 on the CPU in the blocked layouts of
`glm/cpu_linears.py` where the CPU has AVX512_VNNI. `--float-kernel onednn`, `--int8-kernel gemv` (the row-major
decode kernel), `--int8-kernel cpu`, `--int4-kernel tiled` (the decode kernel on torch's tiles) and `--int4-kernel
cpu` give the other paths, for a comparison in one run. Reported per variant:
- weights MB: every tensor of the state dict;
- read/token MB: what one decode step reads, the embedding table counted as one row (a lookup reads one row);
- decode tok/s: B * (new - 1) / (time of a `--new-tokens` generation - time of a 1-token one), best of `--repeats`,
  the variants taking turns so that load from other processes is shared fairly;
- prefill tok/s: B * prompt length / time of the 1-token generation (the prompt's forward and one sampling step);
  `--prompt-len 256` measures it where it matters;
- GB/s and % floor: read/token x tok/s, and that against the read bandwidth measured in the same run (batch 1
  decode cannot beat it; see `_bandwidth.py`);
- logits rel. err: relative L2 distance of the prompt's logits from the float model's.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when a benchmark runs, so `multimodal --help` stays fast
    from torch import nn

    from glm.model import GLMModel

DTYPES = ("float32", "bfloat16", "float16")


def register(subparsers) -> None:
    parser = subparsers.add_parser("quant", help="weight bytes and decode tokens/s: float vs INT8 vs INT4")
    parser.add_argument("--preset", default="bench-200m", help="model shape (a glm.model preset)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="float weights and activations")
    parser.add_argument("--group-size", type=int, default=64, help="INT4 group size: 32, 64 or 128")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="Linear layers kept in float")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--float-kernel", default="auto", choices=("auto", "onednn"),
                        help="the float variant's CPU path (onednn: prepacked oneDNN at every batch; auto: the decode "
                             "kernel for single rows)")
    parser.add_argument("--int8-kernel", default="auto", choices=("auto", "cpu", "gemv", "planes", "dequantized",
                                                                  "reference", "triton"),
                        help="the int8 variant's kernel path (kernels.dispatch; cpu: the fused kernel at every batch)")
    parser.add_argument("--int4-kernel", default="auto",
                        choices=("auto", "tiled", "cpu", "dequantized", "reference", "triton"),
                        help="the int4 variant's kernel path (auto: blocked where the CPU has AVX512_VNNI; tiled: the "
                             "decode kernel on torch's tiles; cpu: the fused kernel at every batch)")
    add_decode_step_option(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bandwidth-mb", type=int, default=1024, help="size of the bandwidth measurement's read")
    parser.set_defaults(func=run)


def add_decode_step_option(parser) -> None:
    parser.add_argument("--decode-step", default="c", choices=("c", "eager"),
                        help="c: each decode step in one C call where the model allows (glm/cpu_decode.py); eager: "
                             "PyTorch operators")


def prepare_decode_steps(models: dict[str, nn.Module], args) -> None:
    """Attach the C decode step to the CPU models that allow it, as asked, and print which run on it."""
    from glm.cpu_decode import prepare_cpu_decode

    if args.device != "cpu" or args.decode_step != "c":
        return
    for model in models.values():
        prepare_cpu_decode(model)
    names = [name for name, model in models.items() if model.cpu_decoder is not None]
    others = [name for name in models if name not in names]
    print(f"decode step in one C call: {', '.join(names) or 'none'}" + (f"; eager: {', '.join(others)}" if others
                                                                           else ""))


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the state dict, bytes one decode step reads): an embedding lookup reads one row of its table."""
    from torch import nn

    stored = sum(tensor.nbytes for tensor in model.state_dict().values())
    unread = sum(m.weight.nbytes - m.weight[0].nbytes for m in model.modules() if isinstance(m, nn.Embedding))
    return stored, stored - unread


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def tokens_per_second(models: dict[str, GLMModel], prompts: list[list[int]], new_tokens: int,
                      repeats: int) -> dict[str, tuple[float, float]]:
    """Best-of-`repeats` (prefill, decode) tokens/s of each model; the models take turns, so load from other
    processes on a shared machine spreads over all of them instead of landing on one."""
    from glm.generate import SamplingConfig, generate

    def generation(model: GLMModel, n: int):
        return lambda: generate(model, prompts, SamplingConfig(max_new_tokens=n))

    for model in models.values():
        generation(model, 2)()  # warm-up: allocator, thread pools
    best = {name: (float("inf"), float("inf")) for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            first, full = _seconds(generation(model, 1)), _seconds(generation(model, new_tokens))
            best[name] = (min(best[name][0], first), min(best[name][1], full))
    prompt_tokens = sum(len(prompt) for prompt in prompts)
    return {name: (prompt_tokens / first, len(prompts) * (new_tokens - 1) / max(full - first, 1e-9))
            for name, (first, full) in best.items()}


def run(args: argparse.Namespace) -> int:
    import torch

    from glm.cpu_linears import block_for_cpu
    from glm.generate import pack_for_cpu
    from glm.model import GLMConfig, GLMModel, param_count
    from multimodal.benchmarks._bandwidth import floor_columns, read_bandwidth
    from multimodal.quantize import QuantSpec, quantize_model, set_backend

    if args.new_tokens < 2:
        raise ValueError("--new-tokens must be at least 2 to time decoding.")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    config = GLMConfig.from_preset(args.preset)
    if args.prompt_len + args.new_tokens > config.max_seq_len:
        raise ValueError(f"Prompt plus new tokens exceed the preset's context of {config.max_seq_len}.")
    generator = torch.Generator().manual_seed(args.seed)
    float_model = GLMModel(config).init_weights(generator=generator).to(device=args.device, dtype=dtype).eval()
    prompts = torch.randint(1, config.vocab_size, (args.batch_size, args.prompt_len), generator=generator)
    int4_name = f"int4 g{args.group_size}"
    variants = [
        ("float", None),
        ("int8", QuantSpec("int8", exclude=tuple(args.exclude))),
        (int4_name, QuantSpec("int4", args.group_size, tuple(args.exclude))),
    ]
    print(f"GLM {args.preset}: {param_count(config) / 1e6:.0f}M parameters, {args.dtype} activations, {args.device}, "
          f"{args.threads} threads, batch {args.batch_size}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"float kernel {args.float_kernel}, int8 kernel {args.int8_kernel}, int4 kernel {args.int4_kernel}, "
          f"decode step {args.decode_step}, "
          f"greedy, best of {args.repeats}; excluded from quantization: {', '.join(args.exclude) or 'nothing'}")
    bandwidth = read_bandwidth(args.device, args.bandwidth_mb << 20)
    print(f"measured read bandwidth: {bandwidth / 1e9:.1f} GB/s")
    header = (f"{'variant':<9} | {'weights MB':>10} | {'read/token MB':>13} | {'vs float':>8} | "
              f"{'prefill tok/s':>13} | {'vs float':>8} | {'decode tok/s':>12} | {'vs float':>8} | {'GB/s':>6} | "
              f"{'% floor':>7} | {'logits rel. err':>15}")
    rows = [header, "-" * len(header)]
    models = {name: float_model if spec is None else quantize_model(copy.deepcopy(float_model), spec)
              for name, spec in variants}
    set_backend(models["int8"], args.int8_kernel)
    set_backend(models[int4_name], "auto" if args.int4_kernel == "tiled" else args.int4_kernel)  # tiled: not blocked
    sizes = {name: weight_bytes(model) for name, model in models.items()}  # packed weights leave the state dict
    if args.device == "cpu":  # the float model runs our CPU float path: linears prepacked for oneDNN
        models["float"] = pack_for_cpu(copy.deepcopy(float_model), decode_kernel=args.float_kernel == "auto")
        for name, kernel in (("int8", args.int8_kernel), (int4_name, args.int4_kernel)):
            if kernel == "auto":  # and the quantized ones ours: blocked where the CPU has AVX512_VNNI
                models[name] = block_for_cpu(models[name])
    prepare_decode_steps(models, args)
    speeds = tokens_per_second(models, prompts.tolist(), args.new_tokens, args.repeats)
    with torch.inference_mode():
        reference_logits = float_model(prompts.to(args.device)).float()
        for name, model in models.items():
            stored, read = sizes[name]
            logits = model(prompts.to(args.device)).float()
            error = ((logits - reference_logits).norm() / reference_logits.norm()).item()
            prefill, decode = speeds[name]
            if name == "float":
                float_read, float_prefill, float_decode = read, prefill, decode
            achieved, percent = floor_columns(read, decode / args.batch_size, bandwidth)
            rows.append(f"{name:<9} | {stored / 1e6:>10.1f} | {read / 1e6:>13.1f} | {read / float_read:>7.1%} | "
                        f"{prefill:>13.1f} | {prefill / float_prefill:>7.2f}x | {decode:>12.2f} | "
                        f"{decode / float_decode:>7.2f}x | {achieved:>6.1f} | {percent:>6.1f}% | {error:>15.4f}")
    print("\n".join(rows))
    return 0
