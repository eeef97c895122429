"""Training the judge: symmetric contrastive loss (CLIP) on rendered train scenes and their texts.

The judge scores drawings, so it learns from the drawing world (`multimodal.drawing`: one large entity or two),
the scenes the draw evaluation scores generated images against. Each image is paired with one of its texts, drawn
per step: one of its drawing prompts ("a dog with a hat on a blue background", the texts R-precision ranks), its
English or Chinese caption, or "a {name}" for one of its objects (the single-object prompts the zero-shot presence
test ranks). Only rendered scenes are used, never generated images.

A second contrastive term ranks every image against the single-object prompts of the drawing classes, its own
objects being the positives: the zero-shot presence test, trained for directly (the prompts as class
prototypes, as CLIP's zero-shot classifier uses them).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

from glm.tokenizer import GLMTokenizer
from multimodal.drawing import DRAWING_CLASSES, pick_prompt
from multimodal.judge import EOS_TOKEN, Judge, JudgeConfig, build_judge, text_batch
from multimodal.language import scene_tasks
from multimodal.training.loop import LoopRecipe, LoopSettings, Run, TrainScenes, ValidationScenes, train
from multimodal.world import CLASSES, DRAWING, make_scene, split_seeds


def judge_text(scene, rng: random.Random) -> str:
    choice = rng.random()
    if choice < 0.3:
        return CLASSES[rng.choice(scene.objects).name].with_article()
    if choice < 0.4:
        return rng.choice([t.answer for t in scene_tasks(scene) if t.kind == "caption"])
    return pick_prompt(scene, rng).prompt


def presence_accuracy(judge: Judge, split: str = "val", count: int = 200) -> float:
    """Fraction of rendered drawing scenes in which every object is found present among the drawing classes (the
    ceiling for generated images)."""
    from multimodal.training.loop import scene_image

    scenes = [make_scene(seed, DRAWING) for seed in split_seeds(split, count)]
    images = [scene_image(scene, judge.config.image_size) for scene in scenes]
    found = judge.presence(images, [[o.name for o in scene.objects] for scene in scenes], classes=DRAWING_CLASSES)
    return sum(all(result.values()) for result in found) / len(found)


RECIPE = LoopRecipe(base_batch=64, base_lr=1e-3, fast_batch=64)
WARMUP_SAMPLES = 12800


def judge_config(tokenizer: GLMTokenizer) -> JudgeConfig:
    return JudgeConfig(vocab_size=tokenizer.vocab_size, eos_id=tokenizer.token_id(EOS_TOKEN))


def judge_pool(count: int, image_size: int, cached: bool = False, validation: bool = False):
    """The drawing-world scenes batches come from."""
    if validation:
        return ValidationScenes(count, image_size, DRAWING)
    return TrainScenes(count, image_size, DRAWING, cached=cached)


def judge_step_loss(model, config: JudgeConfig, tokenizer: GLMTokenizer, pool, seed: int, batch_size: int,
                    device: str = "cpu"):
    """step -> (loss, components): the pair loss and the presence loss on that step's batch."""
    class_ids = text_batch(tokenizer, [CLASSES[name].with_article() for name in DRAWING_CLASSES],
                           config.context_length, config.eos_id).to(device)
    class_index = {name: i for i, name in enumerate(DRAWING_CLASSES)}

    def step_loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        rng = random.Random(f"judge-{seed}-{step}")
        seeds = pool.batch_seeds(rng, batch_size)
        scenes = [pool.scene(s) for s in seeds]
        texts = [judge_text(scene, rng) for scene in scenes]
        images = pool.images(seeds).to(device)  # [B, 3, S, S]
        ids = text_batch(tokenizer, texts, config.context_length, config.eos_id).to(device)  # [B, L]
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(ids, normalize=True)
        logits = model.logit_scale.exp().clamp(max=100) * image_features @ text_features.T  # [B, B]
        # Identical texts in a batch are all positives for each other's images.
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float, device=device)
        targets = same / same.sum(1, keepdim=True)
        pairs = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        class_features = model.encode_text(class_ids, normalize=True)  # [C, D]
        class_logits = model.logit_scale.exp().clamp(max=100) * image_features @ class_features.T  # [B, C]
        present = torch.zeros(class_logits.shape, device=device)  # float32 targets under autocast too
        for row, scene in enumerate(scenes):
            for obj in scene.objects:
                present[row, class_index[obj.name]] = 1.0
        presence = F.cross_entropy(class_logits, present / present.sum(1, keepdim=True))
        return pairs + presence, {"pairs": pairs.item(), "presence": presence.item()}

    return step_loss


def train_judge(
    out_dir: str | Path, tokenizer: GLMTokenizer, seed: int = 0, steps: int = 3000, scenes: int = 20000,
    minutes: float | None = None, settings: LoopSettings | None = None,
) -> Path:  # fmt: skip
    settings = settings or RECIPE.settings()
    device, batch_size = settings.runtime.device, settings.batch_size
    torch.manual_seed(seed)
    config = judge_config(tokenizer)
    model = build_judge(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.05)
    pool = judge_pool(scenes, config.image_size, cached=settings.cached)
    run = Run(out_dir, "judge", {"judge": config.__dict__, "seed": seed})
    step_loss = judge_step_loss(model, config, tokenizer, pool, seed, batch_size, device)

    def evaluate() -> str:
        return f"val presence {presence_accuracy(Judge(model, tokenizer, config)):.3f}"

    step = train(run, model, optimizer, settings.schedule(steps, WARMUP_SAMPLES), step_loss, minutes=minutes,
                 evaluate=evaluate, evaluate_every=500, runtime=settings.runtime, batch_size=batch_size)
    run.log(f"finished at step {step}: {evaluate()}")
    return run.model_dir
