"""Text generation for GLMModel: prefill + decode with a static KV cache, sampling, stop tokens, streaming, batching.

The pieces are free functions in the order they run: `prepare_batch` left-pads prompts (positions [0]*pad +
range(n), pads masked), `prefill` runs the prompts once and fills the cache, `decode_one_token` advances every row by
one token, `process_logits` applies repetition penalty, temperature, top-k and top-p (transformers' order), `sample`
picks a token per row. `generate_tokens` is the streaming iterator they make together; `generate` collects it and
`stream_text` turns it into text deltas. Sampling draws from one `torch.Generator` per row, seeded `seed + row`, with
the exponential-race trick, so a row's text depends on its seed only, not on the batch it runs in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from glm.model import GLMModel, KVCache


class PackedLinear(nn.Module):
    """Inference-only CPU linear for float32 or bfloat16 weights: oneDNN's prepacked matmul for many rows, the decode
    kernels of `kernels/cpu_gemv.py` for few.

    MKL's sgemm (PyTorch's default CPU path for float32 `F.linear`) is slow on some CPUs (AMD, batch > 1); oneDNN
    with a weight reordered once into its blocked layout is several times faster there for prefill and batched
    decode. A single row (decode at batch 1) is a stream of weight bytes, which the gemv kernel reads faster: bfloat16
    decode 1.55x oneDNN's tokens/s on one Zen 5 core (`multimodal bench quant --float-kernel auto|onednn`, README);
    so a second copy of the weight is kept beside the packed one where that kernel builds, at twice the weight memory:
    the plain weight [N, K] (float32, and bfloat16 on CPUs without AVX512_BF16), for one row; or, for bfloat16 where
    the CPU multiplies it natively, the blocked layout of `kernels/csrc/bf16_blocked.c`, for up to
    `BLOCKED_ROWS` rows. Results differ from `F.linear` only by summation order (and, in the blocked
    kernel, float32 rather than bfloat16 outputs before the final rounding).
    """

    def __init__(self, linear: nn.Linear, decode_kernel: bool = True):
        super().__init__()
        from kernels import cpu_gemv

        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)  # not a parameter
        keep = decode_kernel and cpu_gemv.available()
        blocked = keep and weight.dtype == torch.bfloat16 and weight.shape[1] % 2 == 0 and (
            cpu_gemv.bf16_blocked_available())
        self.blocked = cpu_gemv.block_bf16(weight) if blocked else None  # [N / 16, K / 2, 16, 2]
        self.plain = weight if keep and not blocked else None  # [N, K], for single rows
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from kernels import cpu_gemv

        rows = x.numel() // self.in_features
        if self.blocked is not None and rows <= cpu_gemv.BLOCKED_ROWS:
            out = cpu_gemv.bf16_blocked_gemv(x, self.blocked, self.out_features)  # [M, N] float32
        elif self.plain is not None and rows == 1:
            out = cpu_gemv.float_gemv(x, self.plain)  # [1, N] float32
        else:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def pack_for_cpu(model: nn.Module, decode_kernel: bool = True) -> nn.Module:
    """Swap every float32 or bfloat16 CPU `nn.Linear` for a `PackedLinear`, and where the CPU has AVX512_VNNI every
    CPU INT8 and INT4 layer on the "auto" backend for its blocked twin (`glm.cpu_linears.block_for_cpu`; in place,
    inference only, not saveable); `decode_kernel=False` keeps single float rows on oneDNN and quantized layers as
    they are.

    Float layers stay as they are where oneDNN is unavailable; apply it after quantization or TP passes, never before.
    """
    if torch.backends.mkldnn.is_available():
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if (isinstance(child, nn.Linear) and child.weight.dtype in (torch.float32, torch.bfloat16)
                        and child.weight.is_cpu):
                    setattr(module, name, PackedLinear(child, decode_kernel))
    if not decode_kernel:
        return model
    from glm.cpu_linears import block_for_cpu

    return block_for_cpu(model)


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output
    stop_tokens: tuple[int, ...] = ()  # generation of a row ends at the first of these (not included)
    seed: int = 0  # row i samples with a generator seeded seed + i

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}.")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Batch:
    """Left-padded prompts and the bookkeeping decode needs."""

    ids: torch.Tensor  # [B, W] prompt tokens, left-padded with 0
    positions: torch.Tensor  # [B, W] [0]*pad + range(len)
    valid: torch.Tensor  # [B, W + max_new] key validity over all cache slots; new slots become True as written
    lengths: torch.Tensor  # [B] prompt lengths
    padded: bool  # any padding at all (otherwise no mask is needed)


def prepare_batch(prompts: Sequence[Sequence[int]], max_new_tokens: int, context: int, device=None) -> Batch:
    """Left-pad token lists; raise a clear error for empty prompts or prompts that do not fit the context."""
    if not prompts:
        raise ValueError("No prompts given.")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError("A prompt is empty; every prompt needs at least one token.")
    width = max(lengths)
    if width >= context:
        raise ValueError(f"A prompt of {width} tokens does not fit the model's context of {context} tokens.")
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    valid = torch.zeros(len(prompts), width + max_new_tokens, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
        valid[row, width - len(prompt) :] = True  # prompt slots and every future slot
    positions = (valid[:, :width].long().cumsum(-1) - 1).clamp(min=0)
    return Batch(ids.to(device), positions.to(device), valid.to(device), torch.as_tensor(lengths, device=device),
                 padded=min(lengths) != width)


def process_logits(logits: torch.Tensor, seen: torch.Tensor | None, config: SamplingConfig) -> torch.Tensor:
    """Repetition penalty, temperature, top-k, top-p on logits [B, V] (float32); removed tokens become -inf."""
    if config.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits < 0, logits * config.repetition_penalty, logits / config.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if config.greedy:
        return logits
    logits = logits / config.temperature
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
        drop_sorted = before > config.top_p  # keep the smallest prefix reaching top_p (always the first token)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, config: SamplingConfig, generators: list[torch.Generator] | None) -> torch.Tensor:
    """One token per row [B] from processed logits [B, V]: argmax when greedy, else an exponential race per row."""
    if config.greedy:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    race = torch.stack([torch.empty_like(probs[0]).exponential_(1.0, generator=g) for g in generators])  # [B, V]
    return (probs / race).argmax(-1)


def prefill(model: GLMModel, batch: Batch, cache: list[KVCache]) -> torch.Tensor:
    """Run the prompts, fill the cache slots [0, W); return the last position's logits [B, V]."""
    width = batch.ids.shape[1]
    mask = batch.valid[:, :width] if batch.padded else None
    logits = model(batch.ids, positions=batch.positions, cache=cache, attention_mask=mask, last_only=True)
    return logits[:, -1].float()


def decode_one_token(model: GLMModel, tokens: torch.Tensor, positions: torch.Tensor, slot: int,
                     cache: list[KVCache], valid: torch.Tensor | None) -> torch.Tensor:
    """Feed tokens [B] at positions [B] into cache slot `slot`; return the next logits [B, V].

    A model prepared by `glm.cpu_decode.prepare_cpu_decode` runs the whole step in one C call where it can.
    """
    decoder = getattr(model, "cpu_decoder", None)
    if decoder is not None and decoder.accepts(tokens, cache):
        return decoder.step(tokens, positions, slot, cache, valid)
    mask = valid[:, : slot + 1] if valid is not None else None
    logits = model(tokens[:, None], positions=positions[:, None], cache=cache, cache_start=slot, attention_mask=mask)
    return logits[:, -1].float()


@torch.inference_mode()
def generate_tokens(model: GLMModel, prompts: Sequence[Sequence[int]], config: SamplingConfig) -> Iterator[list]:
    """Stream: yield one list per step with the new token of every row, or None for rows already stopped.

    A row stops at a stop token (not yielded) or after max_new_tokens; generation also ends at the model's context.
    """
    context = model.config.max_seq_len
    width = max(len(p) for p in prompts) if prompts else 0
    max_new = max(0, min(config.max_new_tokens, context - width))
    batch = prepare_batch(prompts, max_new, context, model.device)
    size = batch.ids.shape[0]
    cache = model.allocate_cache(size, width + max_new)
    generators = None
    if not config.greedy:
        generators = [torch.Generator(model.device).manual_seed(config.seed + row) for row in range(size)]
    seen = None
    if config.repetition_penalty != 1.0:
        seen = torch.zeros(size, model.config.vocab_size, dtype=torch.bool, device=model.device)
        seen.scatter_(1, batch.ids, batch.valid[:, :width])
    valid = batch.valid if batch.padded else None
    if max_new == 0:
        return
    logits = prefill(model, batch, cache)
    yield from decode_steps(model, logits, config, generators, seen, batch.lengths, width, cache, valid, max_new)


def decode_steps(model: GLMModel, logits: torch.Tensor, config: SamplingConfig, generators, seen, next_positions,
                 width: int, cache, valid, max_new: int) -> Iterator[list]:
    """The decode loop after any prefill (text or image prompts): sample, stop rows, feed each token back.

    `logits` [B, V] are the prefill's last logits, `next_positions` [B] the rotary position of each row's first new
    token and `width` the cache slot it is written to.
    """
    stops = torch.as_tensor(config.stop_tokens, dtype=torch.long, device=model.device)
    alive = torch.ones(logits.shape[0], dtype=torch.bool, device=model.device)
    for step in range(max_new):
        tokens = sample(process_logits(logits, seen, config), config, generators)  # [B]
        alive &= ~torch.isin(tokens, stops)
        if not alive.any():
            return
        yield [int(t) if a else None for t, a in zip(tokens.tolist(), alive.tolist())]
        if step + 1 == max_new:
            return
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        logits = decode_one_token(model, tokens, next_positions + step, width + step, cache, valid)


def generate(model: GLMModel, prompts: Sequence[Sequence[int]], config: SamplingConfig) -> list[list[int]]:
    """Generated token ids per prompt (stop tokens excluded)."""
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in generate_tokens(model, prompts, config):
        for row, token in enumerate(step):
            if token is not None:
                outputs[row].append(token)
    return outputs


class TextDeltas:
    """Token ids in, text deltas out: the text grows by what `decode(ids so far)` adds, and a delta that ends inside an
    incomplete UTF-8 character is held back until the character is complete (or the stream ends: `flush`)."""

    def __init__(self, decode: Callable[[list[int]], str], final_decode: Callable[[list[int]], str] | None = None):
        self.decode, self.final_decode = decode, final_decode or decode
        self.tokens: list[int] = []
        self.emitted = ""

    def _advance(self, text: str) -> str:
        if text.startswith(self.emitted) and len(text) > len(self.emitted):
            delta, self.emitted = text[len(self.emitted) :], text
            return delta
        return ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.decode(self.tokens)
        return "" if text.endswith("\ufffd") else self._advance(text)

    def flush(self) -> str:
        return self._advance(self.final_decode(self.tokens))


def stream_text(model: GLMModel, tokenizer, prompt: Sequence[int], config: SamplingConfig) -> Iterator[str]:
    """Yield text deltas for one prompt; a delta is held back while it ends inside an incomplete UTF-8 character."""
    deltas = TextDeltas(tokenizer.decode)
    for step in generate_tokens(model, [prompt], config):
        if delta := deltas.push(step[0]):
            yield delta
    if delta := deltas.flush():
        yield delta
