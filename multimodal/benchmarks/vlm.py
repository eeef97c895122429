"""`multimodal bench vlm`: time to first token and decode tokens/s (tiny and medium configs), and span routing
against boolean-mask routing (CogVLM's `out[mask] = expert(x[mask])`) as a ratio, all in one run."""

from __future__ import annotations

import time


def register(subparsers) -> None:
    parser = subparsers.add_parser("vlm", help="VLM prefill/decode speed; span vs boolean-mask expert routing")
    parser.add_argument("--presets", default="tiny,bench-medium", help="comma-separated VLM presets")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.set_defaults(func=run)


def _masked_layer(layer, x, mask, cos, sin):
    """One expert layer routed by a boolean mask, as the public CogVLM code does (the baseline)."""
    from glm.model import attention

    def routed(language, vision, h):
        out = language(h)
        out[mask] = vision(h[mask])
        return out

    attn = layer.attn
    q, k, v = attn.split_qkv(routed(attn.qkv, attn.vision_qkv, layer.attn_norm(x)))
    x = x + routed(attn.dense, attn.vision_dense, attention(q, k, v, cos, sin))
    return x + routed(layer.mlp, layer.vision_mlp, layer.mlp_norm(x))


def _best(fn, repeats: int) -> float:
    fn()  # warm-up: first calls pay for allocation and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run(args) -> int:
    import torch

    from glm.generate import SamplingConfig
    from vlm.generate import generate_tokens
    from vlm.model import VisionLanguageModel, VLMConfig
    from vlm.processor import VLMInputs, position_ids, vision_expert_span

    print(f"{'preset':<14}{'params':>9}{'img tok':>9}{'TTFT ms':>10}{'decode tok/s':>14}"
          f"{'span ms':>10}{'mask ms':>10}{'mask/span':>11}")
    for name in args.presets.split(","):
        config = VLMConfig.from_preset(name)
        model = VisionLanguageModel(config).init_weights(generator=torch.Generator().manual_seed(0)).eval()
        n = config.image_tokens
        length = 1 + n + args.text_tokens
        ids = torch.randint(0, config.text.vocab_size, (1, length))
        types = torch.zeros(1, length, dtype=torch.long)
        types[:, 1:1 + n] = 1
        positions = position_ids(types)
        pixels = torch.randn(1, 3, config.vision.image_size, config.vision.image_size)

        inputs = VLMInputs(ids, types, torch.ones(1, length, dtype=torch.bool), positions, None, 1, n, [])
        sampling = SamplingConfig(max_new_tokens=args.new_tokens)
        with torch.inference_mode():
            def first_token():
                next(generate_tokens(model, inputs, sampling, model.encode_image(pixels)))

            def all_tokens():
                for _ in generate_tokens(model, inputs, sampling, model.encode_image(pixels)):
                    pass

            ttft = _best(first_token, args.repeats)
            total = _best(all_tokens, args.repeats)
            decode_rate = (args.new_tokens - 1) / max(total - ttft, 1e-9)
            x = torch.randn(1, length, config.text.hidden_size)
            cos, sin = model.rope(positions)
            start, end = vision_expert_span(1, n)
            mask = torch.zeros(1, length, dtype=torch.bool)
            mask[:, start:end] = True
            if config.experts:
                span = _best(lambda: [layer.forward_image(x, start, end, cos, sin) for layer in model.layers],
                             args.repeats)
                masked = _best(lambda: [_masked_layer(layer, x, mask, cos, sin) for layer in model.layers],
                               args.repeats)
                routing = f"{span * 1e3:>10.1f}{masked * 1e3:>10.1f}{masked / span:>11.2f}"
            else:
                routing = f"{'-':>10}{'-':>10}{'-':>11}"
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name:<14}{params:>8.1f}M{n:>9}{ttft * 1e3:>10.1f}{decode_rate:>14.1f}{routing}")
    return 0
