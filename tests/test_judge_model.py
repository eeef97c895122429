"""The judge: open_clip model round-trips through our checkpoint format; the Frechet distance and the presence
ranking against slow obvious references; evaluation helpers (IoU, caption F1, equal-compute steps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from multimodal.assets import load_world_tokenizer
from multimodal.checkpoint import save_native
from multimodal.evaluation import caption_f1, iou, normalise_answer
from multimodal.judge import EOS_TOKEN, VIEWS, Judge, JudgeConfig, build_judge, frechet_distance, load_judge


@pytest.fixture(scope="module")
def tokenizer():
    return load_world_tokenizer()


def _tiny(tokenizer) -> JudgeConfig:
    return JudgeConfig(vocab_size=tokenizer.vocab_size, eos_id=tokenizer.token_id(EOS_TOKEN), image_size=32,
                       vision_width=64, vision_layers=1, text_width=64, text_layers=1, head_width=32, embed_dim=16)


def test_saved_judge_loads_and_gives_the_same_features(tmp_path, tokenizer, generator):
    config = _tiny(tokenizer)
    torch.manual_seed(7)
    model = build_judge(config).eval()
    save_native(model.state_dict(), {"judge": config.__dict__}, tmp_path, "judge")
    loaded = load_judge(tmp_path, tokenizer)
    images = torch.rand(3, 3, 32, 32, generator=generator) * 2 - 1
    torch.testing.assert_close(loaded.image_features(images), Judge(model, tokenizer, config).image_features(images))
    texts = ["a dog with a hat", "一只戴着帽子的狗", ""]
    torch.testing.assert_close(loaded.text_features(texts), Judge(model, tokenizer, config).text_features(texts))
    scores = loaded.clip_score(images, texts)
    assert scores.shape == (3,) and (scores >= 0).all() and (scores <= 100).all()


def test_image_features_average_the_shifted_views(tokenizer, generator):
    config = _tiny(tokenizer)
    judge = Judge(build_judge(config), tokenizer, config)
    images = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    views = []
    for dx, dy in VIEWS:  # each view shows pixel (y + dy, x + dx), clamped to the edge
        rows = (torch.arange(32) + dy).clamp(0, 31)
        cols = (torch.arange(32) + dx).clamp(0, 31)
        views.append(judge.model.encode_image(images[:, :, rows][:, :, :, cols], normalize=True))
    expected = torch.stack(views).double().mean(0)
    expected = expected / expected.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(judge.image_features(images).double(), expected, atol=1e-5, rtol=1e-5)
    assert len(set(VIEWS)) == 5 and (0, 0) in VIEWS


def test_presence_is_top_k_ranking_of_single_object_prompts(tokenizer, generator):
    config = _tiny(tokenizer)
    judge = Judge(build_judge(config), tokenizer, config)
    pixels = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    from multimodal.world import VOCABULARY

    similarity = judge.image_features([image]) @ judge.text_features([c.with_article() for c in VOCABULARY]).T
    order = [VOCABULARY[i].name for i in similarity[0].argsort(descending=True).tolist()]
    (found,) = judge.presence([image], [[order[0], order[40]]])
    assert found == {order[0]: True, order[40]: False}
    (found,) = judge.presence([image], [[order[1], order[0], order[1]]])  # duplicates count once: k = 2
    assert found == {order[0]: True, order[1]: True}


def test_frechet_distance_matches_the_gaussian_formula():
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.normal(size=(4000, 3)))
    b = torch.from_numpy(rng.normal(size=(4000, 3)) * 2 + np.array([1.0, 0.0, -1.0]))
    # N(0, I) vs N(mu, 4I): |mu|^2 + tr(I + 4I - 2 * 2I) = 2 + 3
    assert frechet_distance(a, b) == pytest.approx(5.0, rel=0.08)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_evaluation_helpers():
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert caption_f1({"dog", "top hat"}, {"dog", "top hat", "apple"}) == pytest.approx(0.8)
    assert caption_f1(set(), {"dog"}) == 0.0
    assert normalise_answer(" Blue. ") == "blue" and normalise_answer("蓝色。") == "蓝色"


def test_single_stage_steps_match_relay_compute():
    from diffusion.denoiser import DiT
    from diffusion.pipeline import RelayConfig, RelayPipeline
    from multimodal.evaluation_draw import equal_compute_steps
    from multimodal.training.diffusion import stage_configs

    configs = stage_configs(32)
    base, relay, single = DiT(configs["base"]), DiT(configs["relay"]), DiT(configs["single"])
    pipeline = RelayPipeline(None, base, relay, RelayConfig(base_steps=10, relay_steps=5))
    steps = equal_compute_steps(pipeline, single, text_len=16)
    relay_flops = pipeline.flops(64, 64, 16, 10, 5)
    single_flops = RelayPipeline(None, single, None, pipeline.config).flops(64, 64, 16, steps, 0, use_relay=False)
    per_step = 2 * 2 * single.flops_per_forward(64, 64, 16)  # guidance doubles passes; Heun two evaluations a step
    assert abs(single_flops - relay_flops) <= per_step / 2


def test_grounding_misses_are_told_apart():
    from multimodal.evaluation import eval_tasks, evaluate_understanding, grounding_outcome
    from vlm.grounding import format_boxes

    def apart(scene, task):  # another object whose box does not touch the target's
        target = scene.box_per_mille(task.target)
        return next((i for i in range(len(scene.objects)) if iou(scene.box_per_mille(i), target) == 0), None)

    scene, task = next((s, t) for s, t in eval_tasks("refer", 40) if apart(s, t) is not None)
    x0, y0, x1, y1 = scene.box_per_mille(task.target)
    assert grounding_outcome(f"here {format_boxes([(x0 + 4, y0, x1 + 4, y1)])}", scene, task.target) == "hit"
    other = format_boxes([scene.box_per_mille(apart(scene, task))])
    assert grounding_outcome(other, scene, task.target) == "another object's box"
    assert grounding_outcome(format_boxes([(x0, y0, x0 + (x1 - x0) // 4, y1)]), scene, task.target) == "loose box"
    assert grounding_outcome("on the left", scene, task.target) == "no box"

    items = eval_tasks("refer", 6)
    true_boxes = [format_boxes([s.box_per_mille(t.target)]) for s, t in items]
    replies = true_boxes[:3] + ["no idea"] * 3
    result = evaluate_understanding("ground", lambda images, questions, limit: replies, 6)
    assert result.value == 0.5
    shares = {key: value for key, value in result.details.items() if key.endswith("share")}
    assert shares == {"another object's box share": 0.0, "loose box share": 0.0, "no box share": 0.5}
    region = [s.count(s.objects[t.target].name) > 1 for s, t in items]  # the slow way, item by item
    expected = {}
    for name, wanted in (("class-only Acc", False), ("with-region Acc", True)):
        hits = [index < 3 for index, flag in enumerate(region) if flag == wanted]
        if hits:
            expected[f"{name} ({len(hits)})"] = sum(hits) / len(hits)
    assert {key: value for key, value in result.details.items() if "Acc" in key} == expected


def test_vqa_accuracy_is_told_apart_by_topic():
    from multimodal.evaluation import eval_tasks, evaluate_understanding

    items = eval_tasks("vqa", 12)
    assert all(task.topic for _, task in items)
    replies = [task.answer if task.topic in ("count", "presence") else "zebra" for _, task in items]
    result = evaluate_understanding("vqa", lambda images, questions, limit: replies, 12)
    topics = sorted({task.topic for _, task in items})
    assert len(topics) >= 3
    for topic in topics:
        n = sum(task.topic == topic for _, task in items)
        assert result.details[f"{topic} Acc ({n})"] == (1.0 if topic in ("count", "presence") else 0.0)
    assert result.value == sum(task.topic in ("count", "presence") for _, task in items) / 12
