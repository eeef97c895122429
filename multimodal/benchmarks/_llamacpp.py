"""`multimodal bench glm --vs llama.cpp`: batch-1 greedy decode of one random GLM in our stack and in llama.cpp.

The same weights are written to GGUF with the `gguf` package under llama.cpp's name for this architecture,
"chatglm" (ChatGLM3 / GLM-4-9B: fused q/k/v with bias, rotary on the first half of each head in adjacent pairs,
SwiGLU with gate and up fused, gate first), with no vocabulary (the benchmark feeds token ids). llama.cpp's own
quantizer makes Q8_0 and Q4_0 from the float file (`pure`: every matrix, the output layer and the embedding
table included, in the named type). llama.cpp runs through `llama-cpp-python`'s low-level API (built from PyPI: the
optional `bench` extra), so no sampling code of its Python wrapper is timed: greedy is an argmax over the logits.

Rows (ours, llama.cpp): float32 / F32, bfloat16 / BF16 (ours with its linears prepacked for oneDNN,
`glm.generate.pack_for_cpu`), INT8 / Q8_0 and INT4 g32 / Q4_0 (ours blocked where the CPU has AVX512_VNNI; llama.cpp's
blocks are 32 weights). Decode tokens/s is (new - 1) / (time of a `--new-tokens` generation - time of a 1-token
one), best of `--repeats`, the stacks taking turns (`--clock cpu`: the process's CPU time, which counts llama.cpp's
threads too); % floor is read/token x tokens/s against the read bandwidth the same run measures. The greedy tokens
of the two stacks are compared where the arithmetic is the same (F32).
"""

from __future__ import annotations

import ctypes
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from glm.model import GLMModel

ARCH = "chatglm"
RENAMES = {"attn_norm": "attn_norm", "attn.qkv": "attn_qkv", "attn.dense": "attn_output", "mlp_norm": "ffn_norm",
           "mlp.gate_up": "ffn_up", "mlp.down": "ffn_down"}


def _missing_extra() -> ImportError:
    return ImportError("The llama.cpp comparison needs the bench extra: pip install -e '.[bench]' (it builds "
                       "llama-cpp-python from source).")


def gguf_tensors(model: GLMModel) -> dict[str, np.ndarray]:
    """Our state dict under llama.cpp's chatglm tensor names (float32 arrays, PyTorch's [out, in] layout)."""
    out = {}
    for key, value in model.state_dict().items():
        array = value.detach().float().cpu().numpy()
        if key == "embed.weight":
            out["token_embd.weight"] = array
        elif key == "final_norm.weight":
            out["output_norm.weight"] = array
        elif key == "output.weight":
            out["output.weight"] = array
        else:
            _, index, rest = key.split(".", 2)  # layers.N.<module>.<weight|bias>
            module, kind = rest.rsplit(".", 1)
            out[f"blk.{index}.{RENAMES[module]}.{kind}"] = array
    return out


def write_gguf(model: GLMModel, path: str | Path, dtype: str = "f32") -> Path:
    """The model as a chatglm GGUF file; matrices in F32 or BF16 (`dtype`), norms and biases in F32."""
    try:
        import gguf
    except ImportError:
        raise _missing_extra() from None
    import torch

    config = model.config
    if config.num_heads * config.head_dim != config.hidden_size:
        raise ValueError("llama.cpp's chatglm needs heads x head_dim == hidden size.")
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.ffn_hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_groups)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_dimension_count(config.rotary_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if dtype == "bf16" else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("no_vocab")
    writer.add_vocab_size(config.vocab_size)
    for name, array in gguf_tensors(model).items():
        if dtype == "bf16" and array.ndim == 2:
            bits = torch.from_numpy(array).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            writer.add_tensor(name, bits, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def _llama_cpp():
    """The llama_cpp module with its logging silenced (it writes every load to stderr otherwise)."""
    global _QUIET
    try:
        import llama_cpp
    except ImportError:
        raise _missing_extra() from None
    if _QUIET is None:  # a C callback must outlive every call that may use it: kept for the process
        _QUIET = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))
    return llama_cpp


_QUIET = None


def quantize_gguf(source: Path, target: Path, kind: str, threads: int) -> Path:
    """llama.cpp's quantizer: every matrix in Q8_0 or Q4_0 (`pure`)."""
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
    params.nthread = threads
    params.pure = True
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {kind}.")
    return target


class LlamaCpp:
    """One model and context of llama.cpp (batch 1), driven token by token through the C API."""

    def __init__(self, path: Path, threads: int, context: int):
        self.api = llama_cpp = _llama_cpp()
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}.")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = context, context, context
        params.n_threads = params.n_threads_batch = threads
        self.context = llama_cpp.llama_init_from_model(self.model, params)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))

    def _decode(self, tokens: list[int]) -> int:
        """Feed tokens; the argmax of the last position's logits."""
        array = (self.api.llama_token * len(tokens))(*tokens)
        if self.api.llama_decode(self.context, self.api.llama_batch_get_one(array, len(tokens))) != 0:
            raise RuntimeError("llama_decode failed.")
        logits = self.api.llama_get_logits_ith(self.context, -1)
        return int(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def generate(self, prompt: list[int], new_tokens: int) -> list[int]:
        """Greedy tokens after `prompt`, the cache cleared first."""
        self.api.llama_memory_clear(self.api.llama_get_memory(self.context), True)
        tokens = [self._decode(prompt)]
        while len(tokens) < new_tokens:
            tokens.append(self._decode([tokens[-1]]))
        return tokens

    def close(self) -> None:
        self.api.llama_free(self.context)
        self.api.llama_model_free(self.model)


def read_bytes_per_token(path: Path) -> int:
    """What one decode step of a GGUF model reads: every tensor, the embedding table as one row."""
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    total = sum(int(t.n_bytes) for t in tensors)
    embedding = next(t for t in tensors if t.name == "token_embd.weight")
    return total - int(embedding.n_bytes) + int(embedding.n_bytes) // int(embedding.shape[-1])


def run_llama_cpp(args) -> int:
    import copy

    import torch

    from glm.generate import SamplingConfig, generate, pack_for_cpu
    from glm.model import GLMConfig, GLMModel, param_count
    from multimodal.benchmarks._bandwidth import floor_columns, read_bandwidth
    from multimodal.benchmarks.glm import measure
    from multimodal.benchmarks.quant import prepare_decode_steps, weight_bytes
    from multimodal.quantize import QuantSpec, quantize_model

    torch.set_num_threads(args.threads)
    config = GLMConfig.from_preset(args.preset)
    generator = torch.Generator().manual_seed(args.seed)
    float_model = GLMModel(config).init_weights(generator=generator).eval()
    prompt = torch.randint(1, config.vocab_size, (args.prompt_len,), generator=generator).tolist()
    print(f"GLM {args.preset}: {param_count(config) / 1e6:.0f}M parameters, batch 1, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, greedy, {args.threads} threads, best of {args.repeats}, {args.clock} clock")
    bandwidth = read_bandwidth(args.device, args.bandwidth_mb << 20)
    print(f"measured read bandwidth: {bandwidth / 1e9:.1f} GB/s")
    bf16_model = copy.deepcopy(float_model).to(torch.bfloat16)
    ours = {"float32": copy.deepcopy(float_model),  # the original is written to GGUF below
            "int8": quantize_model(copy.deepcopy(bf16_model), QuantSpec("int8")),
            "int4 g32": quantize_model(copy.deepcopy(bf16_model), QuantSpec("int4", 32)), "bfloat16": bf16_model}
    read = {name: weight_bytes(model)[1] for name, model in ours.items()}  # packed weights leave the state dict
    if args.device == "cpu":  # our CPU path: float linears prepacked, INT8 and INT4 blocked where the CPU has VNNI
        ours = {name: pack_for_cpu(model) for name, model in ours.items()}
    prepare_decode_steps(ours, args)
    header = (f"{'ours':<9} | {'read MB':>7} | {'tok/s':>7} | {'% floor':>7} | {'llama.cpp':<9} | {'read MB':>7} | "
              f"{'tok/s':>7} | {'% floor':>7} | {'ours / llama.cpp':>16} | greedy tokens equal")
    rows = [header, "-" * len(header)]
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        files = {"F32": write_gguf(float_model, folder / "f32.gguf"),
                 "BF16": write_gguf(float_model, folder / "bf16.gguf", "bf16")}
        files["Q8_0"] = quantize_gguf(files["F32"], folder / "q8_0.gguf", "q8_0", args.threads)
        files["Q4_0"] = quantize_gguf(files["F32"], folder / "q4_0.gguf", "q4_0", args.threads)
        for our_name, their_name in [("float32", "F32"), ("bfloat16", "BF16"), ("int8", "Q8_0"), ("int4 g32", "Q4_0")]:
            model, peer = ours[our_name], LlamaCpp(files[their_name], args.threads, args.prompt_len + args.new_tokens)
            runners = {"ours": lambda n, m=model: generate(m, [prompt], SamplingConfig(max_new_tokens=n))[0],
                       "llama.cpp": lambda n, p=peer: p.generate(prompt, n)}
            for run in runners.values():
                run(2)  # warm-up: allocators, thread pools
            results = measure(runners, 1, args.prompt_len, args.new_tokens, args.repeats,
                              time.process_time if args.clock == "cpu" else time.perf_counter)
            peer.close()
            speeds = {name: result["decode"] for name, result in results.items()}
            tokens = {name: result["tokens"] for name, result in results.items()}
            read_ours, read_theirs = read[our_name], read_bytes_per_token(files[their_name])
            _, ours_floor = floor_columns(read_ours, speeds["ours"], bandwidth)
            _, their_floor = floor_columns(read_theirs, speeds["llama.cpp"], bandwidth)
            same = sum(a == b for a, b in zip(tokens["ours"], tokens["llama.cpp"]))
            rows.append(f"{our_name:<9} | {read_ours / 1e6:>7.1f} | {speeds['ours']:>7.1f} | {ours_floor:>6.1f}% | "
                        f"{their_name:<9} | {read_theirs / 1e6:>7.1f} | {speeds['llama.cpp']:>7.1f} | "
                        f"{their_floor:>6.1f}% | {speeds['ours'] / speeds['llama.cpp']:>15.2f}x | "
                        f"{same}/{len(tokens['ours'])}")
    print("\n".join(rows))
    return 0
