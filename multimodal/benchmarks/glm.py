"""`multimodal bench glm --vs transformers`: greedy decode speed of our GLM against transformers' GlmForCausalLM
(`--vs llama.cpp`: against llama.cpp at batch 1, in `multimodal.benchmarks._llamacpp`).

Both models hold the same random weights (transformers' model is built first; ours is imported from its state dict
through the same key table as a real checkpoint). For each batch size both run a greedy generation of `--new-tokens`
tokens after a `--prompt-len` prompt, and a 1-token generation; prefill tokens/s is prompt tokens / time of the
1-token run, decode tokens/s is B * (new - 1) / (time of the full run - time of the 1-token run). Every measurement
is the best of `--repeats`, the stacks taking turns so a change in machine load hits all of them. `--clock cpu`
times this process's CPU time instead of wall time: with `--threads 1` that is robust on a shared, busy machine.
The generated tokens of the stacks are compared, so a speed-up cannot come from computing something else.
Our model runs with its CPU linears prepacked for oneDNN (`glm.generate.pack_for_cpu`) and each batch-1 to 4 decode
step in one C call (`glm/cpu_decode.py`; `--decode-step eager` keeps PyTorch operators); `--plain` adds a row without
either.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import TYPE_CHECKING

from multimodal.benchmarks.quant import add_decode_step_option

if TYPE_CHECKING:  # imported when a benchmark runs, so `multimodal --help` stays fast
    import torch

    from glm.model import GLMConfig


def register(subparsers) -> None:
    parser = subparsers.add_parser("glm", help="GLM greedy decode tokens/s, ours vs transformers, on the same weights")
    parser.add_argument("--vs", choices=["transformers", "llama.cpp"], default="transformers",
                        help="the peer: transformers (batch sizes, float), or llama.cpp (batch 1, float / INT8 / "
                             "INT4 against F32 / BF16 / Q8_0 / Q4_0; needs the bench extra)")
    parser.add_argument("--preset", default="bench-200m", help="model shape (a glm.model preset)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    add_decode_step_option(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or this process's CPU time (use with --threads 1 on a busy machine)")
    parser.add_argument("--plain", action="store_true",
                        help="also time our model with plain F.linear (no oneDNN weight prepacking)")
    parser.add_argument("--bandwidth-mb", type=int, default=1024, help="size of the bandwidth measurement's read")
    parser.set_defaults(func=run)


def hf_config_for(config: GLMConfig):
    """transformers' `GlmConfig` with our config's shapes."""
    from transformers import GlmConfig as HFGlmConfig

    return HFGlmConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_groups, head_dim=config.head_dim, rms_norm_eps=config.norm_eps,
        max_position_embeddings=config.max_seq_len, pad_token_id=0, eos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta, "partial_rotary_factor": 0.5},
    )


def hf_model_for(config: GLMConfig, dtype: torch.dtype, device: str, seed: int):
    import torch
    from transformers import GlmForCausalLM

    torch.manual_seed(seed)
    return GlmForCausalLM(hf_config_for(config)).to(device=device, dtype=dtype).eval()


def measure(runners: dict, batch: int, prompt_len: int, new_tokens: int, repeats: int, clock) -> dict:
    """Best-of-`repeats` times of a 1-token and a full generation per stack, the stacks taking turns."""
    best: dict = {}
    tokens: dict = {}
    for _ in range(repeats):
        for name, fn in runners.items():
            for n in (1, new_tokens):
                start = clock()
                out = fn(n)
                best[name, n] = min(best.get((name, n), float("inf")), clock() - start)
                tokens[name] = out
    return {
        name: {
            "prefill": batch * prompt_len / best[name, 1],
            "decode": batch * (new_tokens - 1) / max(best[name, new_tokens] - best[name, 1], 1e-9),
            "tokens": tokens[name],
        }
        for name in runners
    }


def run(args: argparse.Namespace) -> int:
    import torch

    if args.vs == "llama.cpp":
        from multimodal.benchmarks._llamacpp import run_llama_cpp

        return run_llama_cpp(args)

    from glm.convert import HF_TABLE
    from glm.generate import SamplingConfig, generate, pack_for_cpu
    from glm.model import GLMConfig, GLMModel, param_count
    from multimodal.benchmarks._bandwidth import floor_columns, read_bandwidth
    from multimodal.benchmarks.quant import prepare_decode_steps, weight_bytes
    from multimodal.checkpoint import build_on_meta, convert, load_into

    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    dtype = getattr(torch, args.dtype)
    config = GLMConfig.from_preset(args.preset)
    if args.prompt_len + args.new_tokens > config.max_seq_len:
        raise ValueError(f"prompt + new tokens exceed the preset's context of {config.max_seq_len}.")
    hf = hf_model_for(config, dtype, args.device, args.seed)
    plain = build_on_meta(lambda: GLMModel(config))
    load_into(plain, convert(hf.state_dict(), HF_TABLE))
    plain = plain.to(args.device).eval()
    stacks = {"ours": pack_for_cpu(copy.deepcopy(plain)) if args.device == "cpu" else plain}
    if args.plain:
        stacks["ours-plain"] = plain
    print(f"GLM {args.preset}: {param_count(config) / 1e6:.0f}M parameters, {args.dtype}, {args.device}, "
          f"{args.threads} threads, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, "
          f"best of {args.repeats}, {args.clock} clock")
    prepare_decode_steps({"ours": stacks["ours"]}, args)

    bandwidth = read_bandwidth(args.device, args.bandwidth_mb << 20)
    read_per_step = weight_bytes(plain)[1]  # every weight once per decode step (an embedding: one row)
    print(f"weights read per decode step {read_per_step / 1e6:.1f} MB; measured read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s, so batch-1 decode is at most {bandwidth / read_per_step:.1f} tok/s")
    header = (f"{'batch':>5} | {'stack':<16} | {'prefill tok/s':>13} | {'decode tok/s':>12} | {'GB/s':>6} | "
              f"{'% floor':>7}")
    rows = [header, "-" * len(header)]
    gen = torch.Generator().manual_seed(args.seed + 1)
    for batch in args.batch_sizes:
        prompts = torch.randint(1, config.vocab_size, (batch, args.prompt_len), generator=gen)

        def hf_fn(n, prompts=prompts):
            with torch.inference_mode():
                out = hf.generate(prompts.to(args.device), attention_mask=torch.ones_like(prompts).to(args.device),
                                  max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return out[:, args.prompt_len :].tolist()

        runners = {name: (lambda n, m=model, p=prompts: generate(m, p.tolist(), SamplingConfig(max_new_tokens=n)))
                   for name, model in stacks.items()}
        runners["transformers"] = hf_fn
        for fn in runners.values():
            fn(2)  # warm-up (allocator, thread pools)
        results = measure(runners, batch, args.prompt_len, args.new_tokens, args.repeats, clock)
        theirs = results["transformers"]
        total = sum(len(x) for x in theirs["tokens"])
        for name, result in results.items():
            achieved, percent = floor_columns(read_per_step, result["decode"] / batch, bandwidth)
            rows.append(f"{batch:>5} | {name:<16} | {result['prefill']:>13.1f} | {result['decode']:>12.1f} | "
                        f"{achieved:>6.1f} | {percent:>6.1f}%")
        for name, result in results.items():
            if name == "transformers":
                continue
            same = sum(a == b for x, y in zip(result["tokens"], theirs["tokens"]) for a, b in zip(x, y))
            rows.append(f"{batch:>5} | {name + ' ratio':<16} | {result['prefill'] / theirs['prefill']:>12.2f}x | "
                        f"{result['decode'] / theirs['decode']:>11.2f}x   (greedy tokens equal: {same}/{total})")
    print("\n".join(rows))
    return 0
