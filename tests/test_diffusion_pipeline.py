"""The pipelines end to end with tiny random models: relay pipeline outputs, per-seed reproducibility, save/load,
progress; the `draw` command."""

import pytest
import torch
from PIL import Image

from diffusion.denoiser import DiT, dit_config
from diffusion.pipeline import RelayConfig, RelayPipeline, load_relay_pipeline, save_relay_pipeline
from diffusion.text_encoder import GLMTextEncoder
from glm.model import GLMConfig, GLMModel


def tokenize(text: str) -> list[int]:
    return [3 + (ord(c) % 300) for c in text]


def random_dit(seed: int, **overrides) -> DiT:
    torch.manual_seed(seed)
    model = DiT(dit_config("tiny", text_dim=64, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def pipe():
    glm = GLMModel(GLMConfig.from_preset("tiny")).init_weights(generator=torch.Generator().manual_seed(0))
    encoder = GLMTextEncoder(glm, tokenize, pad_id=0)
    config = RelayConfig(sizes=((16, 16), (8, 16)), up_scale=2, base_steps=3, relay_steps=2, guidance_scale=2.0)
    return RelayPipeline(encoder, random_dit(1), random_dit(2, patch_size=4), config)


def test_relay_pipeline_runs_end_to_end(pipe):
    calls = []
    out = pipe("a dog with a hat", seed=5, callback=lambda done, total: calls.append((done, total)))
    assert len(out.images) == 1 and out.seeds == [5]
    assert isinstance(out.images[0], Image.Image) and out.images[0].size == (16, 16)
    assert out.base[0].size == (8, 8) and out.relay[0] is out.images[0]
    assert calls == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    wide = pipe("a cat", height=8, width=16, seed=1, output_type="pt")
    assert wide.images[0].shape == (3, 8, 16) and 0 <= wide.images[0].min() and wide.images[0].max() <= 1
    base_only = pipe("a cat", seed=1, use_relay=False, output_type="pt")
    assert base_only.images[0].shape == (3, 16, 16) and base_only.relay == []


def test_a_batch_of_seeds_equals_the_seeds_one_by_one(pipe):
    batch = pipe(["a dog", "a red hat"], num_images_per_prompt=2, seed=[3, 4, 5, 6], output_type="pt")
    for i, (prompt, seed) in enumerate([("a dog", 3), ("a dog", 4), ("a red hat", 5), ("a red hat", 6)]):
        single = pipe(prompt, seed=seed, output_type="pt")
        torch.testing.assert_close(batch.images[i], single.images[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(batch.base[i], single.base[0], atol=1e-4, rtol=1e-4)
    assert (batch.images[0] - batch.images[1]).abs().max() > 1e-2


def test_guidance_and_negative_prompt_matter(pipe):
    plain = pipe("a dog", seed=2, output_type="pt").images[0]
    assert (pipe("a dog", seed=2, negative_prompt="a cat", output_type="pt").images[0] - plain).abs().max() > 1e-3
    assert (pipe("a dog", seed=2, guidance_scale=1.0, output_type="pt").images[0] - plain).abs().max() > 1e-3


def test_bad_requests_are_one_sentence(pipe):
    with pytest.raises(ValueError, match="cannot be drawn"):
        pipe("a dog", height=10, width=16)
    with pytest.raises(ValueError, match="3 seeds were given for 2 images"):
        pipe("a dog", num_images_per_prompt=2, seed=[1, 2, 3])


def test_save_and_load_round_trip(pipe, tmp_path):
    save_relay_pipeline(tmp_path / "pipe", pipe.base, pipe.relay, pipe.config)
    loaded = load_relay_pipeline(tmp_path / "pipe", text_encoder=pipe.text_encoder)
    assert loaded.config == pipe.config
    for ours, theirs in ((pipe.base, loaded.base), (pipe.relay, loaded.relay)):
        assert ours.config == theirs.config
        saved = theirs.state_dict()
        assert all(torch.equal(value, saved[key]) for key, value in ours.state_dict().items())
    a = pipe("a dog", seed=9, output_type="pt").images[0]
    b = loaded("a dog", seed=9, output_type="pt").images[0]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # the same weights; memory layout may change the last bit


def test_draw_command_without_any_checkpoint_says_so(tmp_path, monkeypatch, capsys):
    import multimodal.assets
    from multimodal.cli import main

    monkeypatch.setattr(multimodal.assets, "ASSETS_DIR", tmp_path)  # an installation without the embedded model
    assert main(["draw", "a dog", "--out", str(tmp_path / "dog.png")]) == 1
    assert "not built yet" in capsys.readouterr().err


def test_draw_command_saves_base_and_relay_images_and_prints_seeds(tmp_path, capsys):
    from glm.convert import save_glm
    from glm.tokenizer import train_bpe
    from multimodal.cli import main

    tokenizer = train_bpe(["a dog with a hat", "a cat on a blue background"], vocab_size=300)
    glm = GLMModel(GLMConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size)).init_weights(
        generator=torch.Generator().manual_seed(0)
    )
    folder = tmp_path / "pipe"
    save_glm(glm, folder / "glm")
    tokenizer.save(folder / "tokenizer.json")
    config = RelayConfig(sizes=((16, 16),), base_steps=2, relay_steps=2)
    save_relay_pipeline(folder, random_dit(1), random_dit(2), config,
                        text_encoder={"checkpoint": "glm", "tokenizer": "tokenizer.json", "format": "glm"})
    out = tmp_path / "out" / "dog.png"
    assert main(["draw", "a dog with a hat", "--checkpoint", str(folder), "--out", str(out), "--seed", "3",
                 "--num-images", "2"]) == 0
    printed = capsys.readouterr().out
    assert "seed 3:" in printed and "seed 4:" in printed
    for name, size in [("dog-1.png", (16, 16)), ("dog-1.base.png", (8, 8)), ("dog-2.png", (16, 16))]:
        assert Image.open(tmp_path / "out" / name).size == size

    # A contact sheet: the same images, a row per prompt, after a rendered scene of the prompt where there is one.
    sheet = tmp_path / "sheet.png"
    assert main(["draw", "a dog with a hat", "a giraffe", "--checkpoint", str(folder), "--grid", str(sheet),
                 "--seed", "3", "--num-images", "2"]) == 0
    from multimodal.sheet import GAP, LABEL_HEIGHT

    grid = Image.open(sheet)
    first = Image.open(tmp_path / "out" / "dog-1.png").resize((128, 128), Image.Resampling.NEAREST)
    left, top = GAP + (128 + GAP), LABEL_HEIGHT + GAP + LABEL_HEIGHT  # row 0, column 1 (seed 3)
    assert grid.crop((left, top, left + 128, top + 128)).tobytes() == first.convert("RGB").tobytes()
    assert main(["draw", "a dog", "a cat", "--checkpoint", str(folder)]) == 1  # several prompts need --grid


def test_bench_draw_prints_both_modes(capsys):
    from multimodal.cli import main

    assert main(["bench", "draw", "--height", "16", "--width", "16", "--steps", "2", "--relay-steps", "1",
                 "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "base only" in printed and "base + relay" in printed
    ratio = float(printed.split("FLOPs ")[1].split("x")[0])
    assert 0 < ratio < 1  # at equal base steps the relay path spends fewer denoiser FLOPs


@pytest.mark.gpu
def test_pipeline_on_cuda_matches_cpu_and_runs_in_bfloat16(pipe):
    import copy

    def on(device, dtype):
        glm = copy.deepcopy(pipe.text_encoder.model).to(device)
        encoder = GLMTextEncoder(glm, tokenize, pad_id=0)
        base, relay = (copy.deepcopy(m).to(device, dtype) for m in (pipe.base, pipe.relay))
        return RelayPipeline(encoder, base, relay, pipe.config)

    cpu = pipe("a dog", seed=3, output_type="pt").images[0]
    cuda = on("cuda", torch.float32)("a dog", seed=3, output_type="pt").images[0].cpu()
    torch.testing.assert_close(cuda, cpu, atol=1e-3, rtol=1e-3)
    half = on("cuda", torch.bfloat16)("a dog", seed=3, output_type="pt").images[0]
    assert torch.isfinite(half).all()


def test_bfloat16_denoisers_stay_close_to_float32(pipe):
    half = RelayPipeline(pipe.text_encoder, random_dit(1).bfloat16(), random_dit(2, patch_size=4).bfloat16(),
                         pipe.config)
    full = pipe("a dog", seed=1, output_type="pt").images[0]
    low = half("a dog", seed=1, output_type="pt").images[0]
    assert low.dtype == torch.float32
    assert (low - full).abs().mean() < 0.02 and (low - full).abs().max() > 0  # bf16 really ran


def test_draw_command_reads_a_suite_folder_with_the_vlm_as_text_encoder(tmp_path, capsys):
    from multimodal.cli import main
    from multimodal.engine import Engine

    Engine.random_tiny(0).save(tmp_path / "suite")  # vlm/ (GLM core + tokenizer) beside diffusion/
    out = tmp_path / "cat.png"
    assert main(["draw", "a cat", "--checkpoint", str(tmp_path / "suite"), "--out", str(out), "--seed", "7"]) == 0
    assert "seed 7:" in capsys.readouterr().out
    assert Image.open(out).size == (32, 32) and Image.open(tmp_path / "cat.base.png").size == (16, 16)
