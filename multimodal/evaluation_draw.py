"""`multimodal eval draw`: does the text-to-image pipeline draw what it is asked?

Prompts come from test scenes of the drawing world (`multimodal.drawing`), one per scene, languages alternating,
half naming the background colour; a second set asks only for the held-out (animal, accessory) compositions, which
no training scene shows. Every measure is also taken on the rendered scenes of the same prompts: the ceiling a
perfect model would reach, and the check that the judges can be trusted.

- all objects present, by the judge (GenEval-style zero-shot presence among the drawing classes): the value.
- the same by the suite's VLM, two ways (an independent opinion): asked about each object ("Is there a dog?", "What
  is the dog wearing?"), it must confirm every one; and its caption of the image must name every object asked for.
- R-precision: the judge ranks the image's own prompt against up to 99 other test prompts (never one the image's
  scene also answers, such as the same prompt without its background); the share ranked first.
- per composition ("one object", "animal with accessory", ...) and on the held-out compositions.
- background colour: of the prompts naming one, the share whose image's border is nearest that colour.
- CLIPScore, and a Frechet distance in the judge's features to the rendered scenes.
- the single-stage 64x64 model given the same denoiser FLOPs as base + relay: its presence and Frechet distance.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from multimodal.drawing import (
    DRAWING_CLASSES,
    composition,
    drawing_prompts,
    held_out,
    named_objects,
    names_background,
    pick_prompt,
)
from multimodal.evaluation import BARS, Answer, Result
from multimodal.language import Task, mentioned_classes
from multimodal.world import CLASSES, COLOURS, DRAWING, HELD_OUT_COMPOSITIONS, Scene, make_scene, split_seeds

HELD_OUT_OFFSET = 50_000  # test seeds searched for held-out compositions start here, far from the main items
R_PRECISION_CANDIDATES = 100


@dataclass(frozen=True)
class DrawItem:
    scene: Scene
    task: Task

    @property
    def named(self) -> list[tuple[str, ...]]:
        return named_objects(self.scene, self.task)


def draw_items(count: int, offset: int = 0, split: str = "test") -> list[DrawItem]:
    """One prompt per consecutive scene of the split, languages alternating."""
    return [DrawItem(scene, pick_prompt(scene, random.Random(seed), ("en", "zh")[index % 2]))
            for index, seed in enumerate(split_seeds(split, count, offset))
            for scene in [make_scene(seed, DRAWING)]]  # fmt: skip


def held_out_items(per_composition: int) -> list[DrawItem]:
    """`per_composition` prompts for each held-out composition, naming the accessory exactly."""
    found: dict[tuple[str, str], list[DrawItem]] = {pair: [] for pair in HELD_OUT_COMPOSITIONS}
    for seed in split_seeds("test", offset=HELD_OUT_OFFSET):
        scene = make_scene(seed, DRAWING)
        for pair in scene.compositions & HELD_OUT_COMPOSITIONS:
            if len(found[pair]) < per_composition:
                lang = ("en", "zh")[len(found[pair]) % 2]
                exact = [t for t in drawing_prompts(scene) if t.lang == lang and held_out(scene, t)]
                found[pair].append(DrawItem(scene, random.Random(seed).choice(exact)))
        if all(len(items) == per_composition for items in found.values()):
            break
    return [item for pair in sorted(found) for item in found[pair]]


def judge_presence(judge, images, items: list[DrawItem]) -> list[bool]:
    found = judge.presence(images, [item.named for item in items], classes=DRAWING_CLASSES)
    return [all(result.values()) for result in found]


def vlm_presence(answer: Answer, images, items: list[DrawItem], batch_size: int = 32) -> list[bool]:
    """Whether the VLM's English caption of each image names every object asked for."""
    from multimodal.evaluation import MAX_NEW_TOKENS
    from multimodal.language import CAPTION_PROMPTS

    present = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        captions = answer(list(images[start:start + batch_size]), [CAPTION_PROMPTS["en"]] * len(chunk),
                          MAX_NEW_TOKENS["caption"])
        for item, caption in zip(chunk, captions):
            mentioned = mentioned_classes(caption, "en")
            present.append(all(mentioned.intersection(group) for group in item.named))
    return present


def vlm_asked_presence(answer: Answer, images, items: list[DrawItem], batch_size: int = 32) -> list[bool]:
    """Whether the VLM confirms every object asked for in each image, one question per object (GenEval-style), as
    its training asked them: "Is there a dog?" answered yes; for a worn accessory, "What is the dog wearing?"
    answered with it (an accessory named by its everyday word, "a hat", counts with any class the word covers)."""
    from multimodal.evaluation import MAX_NEW_TOKENS
    from multimodal.phrasing import canonical

    questions = []  # (item index, object index, question, the classes that confirm it, or None for a yes/no)
    for index, item in enumerate(items):
        for position, (obj, group) in enumerate(zip(item.scene.objects, item.named)):
            if obj.wearer is not None:
                wearer = item.scene.objects[obj.wearer].name
                questions.append((index, position, canonical("wearing", "en", name=wearer), set(group)))
            else:
                questions += [(index, position, canonical("presence", "en", a_thing=CLASSES[name].with_article()),
                               None) for name in group]
    confirmed = set()
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        replies = answer([images[index] for index, *_ in chunk], [question for _, _, question, _ in chunk],
                         MAX_NEW_TOKENS["vqa"])
        for (index, position, _, classes), reply in zip(chunk, replies):
            said = reply.strip().lower().startswith("yes") if classes is None else bool(
                mentioned_classes(reply, "en") & classes)
            if said:
                confirmed.add((index, position))
    return [all((index, position) in confirmed for position in range(len(item.named)))
            for index, item in enumerate(items)]


def r_precision(judge, images, items: list[DrawItem], seed: int = 0) -> float:
    """The share of images whose own prompt the judge ranks first among it and up to 99 other test prompts that
    the image's scene does not answer."""
    prompts = sorted({item.task.prompt for item in items})
    index = {prompt: i for i, prompt in enumerate(prompts)}
    text = torch.cat([judge.text_features(prompts[i:i + 256]) for i in range(0, len(prompts), 256)])  # [P, D]
    similarity = judge.image_features(images) @ text.T  # [B, P]
    rng = random.Random(seed)
    hits = []
    for row, item in zip(similarity, items):
        answered = {item.task.prompt} | {t.prompt for t in drawing_prompts(item.scene)}
        others = [index[p] for p in prompts if p not in answered]
        candidates = [index[item.task.prompt]] + rng.sample(others, min(len(others), R_PRECISION_CANDIDATES - 1))
        hits.append(bool((row[candidates[1:]] < row[candidates[0]]).all()))  # a tie is not a win
    return sum(hits) / len(hits)


def border_colour(image) -> str:
    """The named background colour nearest the median of the image's outer ring of pixels."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)  # [H, W, 3]
    ring = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                           pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    median = np.median(ring, axis=0)
    return min(COLOURS, key=lambda name: float(((np.array(COLOURS[name][1]) - median) ** 2).sum()))


def background_accuracy(images, items: list[DrawItem]) -> float:
    asked = [(image, item) for image, item in zip(images, items) if names_background(item.task, item.scene)]
    return sum(border_colour(image) == item.scene.background.colour for image, item in asked) / max(1, len(asked))


def share(flags) -> float:
    flags = list(flags)
    return sum(flags) / max(1, len(flags))


def equal_compute_steps(pipeline, single, text_len: int) -> int:
    """Heun steps of the single-stage model whose FLOPs match the relay pipeline's base + relay steps."""
    config = pipeline.config
    target = pipeline.flops(64, 64, text_len, config.base_steps, config.relay_steps)
    passes = 2 if config.guidance_scale != 1 else 1
    per_step = passes * single.flops_per_forward(64, 64, text_len)
    return max(1, round((target / per_step + 1) / 2))  # Heun: 2N - 1 evaluations


def evaluate_draw(pipeline, single, judge, count: int, answer: Answer | None = None, batch_size: int = 16,
                  seed: int = 0, held_out_count: int = 10, split: str = "test") -> tuple[Result, list[DrawItem], list]:
    """(Result, the main items, their relay images). `answer` is the VLM's (None: no VLM opinion); `single` the
    single-stage baseline (None: no relay-against-single measures). On the val split (for choosing sampler settings)
    there are no held-out compositions to measure."""
    from diffusion.pipeline import RelayPipeline
    from multimodal.judge import frechet_distance
    from multimodal.training.loop import scene_image

    items = draw_items(count, split=split)
    extra = held_out_items(held_out_count) if split == "test" else []
    if single is not None:
        single_pipeline = RelayPipeline(pipeline.text_encoder, single, None, pipeline.config)
        text_len = max(pipeline.text_encoder(item.task.prompt)[0].shape[1] for item in items[:8])
        single_steps = equal_compute_steps(pipeline, single, text_len)

    def draw(batch: list[DrawItem], start: int, relay: bool = True):
        prompts, seeds = [item.task.prompt for item in batch], [seed + start + i for i in range(len(batch))]
        if relay:
            return pipeline(prompts, seed=seeds).relay
        return single_pipeline(prompts, seed=seeds, num_inference_steps=single_steps, use_relay=False).images

    relay_images, single_images, held_out_images = [], [], []
    for start in range(0, len(items), batch_size):
        relay_images += draw(items[start:start + batch_size], start)
        if single is not None:
            single_images += draw(items[start:start + batch_size], start, relay=False)
    for start in range(0, len(extra), batch_size):
        held_out_images += draw(extra[start:start + batch_size], count + start)
    rendered = [scene_image(item.scene, 64) for item in items]
    rendered_features = judge.image_features(rendered)

    presence = judge_presence(judge, relay_images, items)
    details = {
        "judge accuracy on renders": share(judge_presence(judge, rendered, items)),
        "R-precision": r_precision(judge, relay_images, items, seed),
        "R-precision on renders": r_precision(judge, rendered, items, seed),
    }
    if answer is not None:
        details["VLM all present"] = share(vlm_presence(answer, relay_images, items))
        details["VLM on renders"] = share(vlm_presence(answer, rendered, items))
        details["VLM asked, all present"] = share(vlm_asked_presence(answer, relay_images, items))
        details["VLM asked, on renders"] = share(vlm_asked_presence(answer, rendered, items))
    for kind in sorted({composition(item.scene) for item in items}):
        picked = [p for p, item in zip(presence, items) if composition(item.scene) == kind]
        details[f"{kind} ({len(picked)})"] = share(picked)
    for lang in ("en", "zh"):
        picked = [p for p, item in zip(presence, items) if item.task.lang == lang]
        details[f"{lang} ({len(picked)})"] = share(picked)
    if extra:
        details[f"held-out compositions ({len(extra)})"] = share(judge_presence(judge, held_out_images, extra))
    details["background colour"] = background_accuracy(relay_images, items)
    details["CLIPScore"] = float(judge.clip_score(relay_images, [item.task.prompt for item in items]).mean())
    details["FD relay"] = frechet_distance(judge.image_features(relay_images), rendered_features)
    if single is not None:
        details["FD single-stage"] = frechet_distance(judge.image_features(single_images), rendered_features)
        details["single-stage presence"] = share(judge_presence(judge, single_images, items))
        details["single-stage steps"] = single_steps
    result = Result("draw", "all objects present", share(presence), len(items), BARS["draw"], details, split)
    return result, items, relay_images


def write_sheet(path, items: list[DrawItem], images, rows: int = 24) -> None:
    """A contact sheet: per prompt, its rendered scene and the generated image."""
    from multimodal.sheet import contact_sheet
    from multimodal.world import render

    sheet = contact_sheet([(item.task.prompt, [render(item.scene), image])
                           for item, image in zip(items[:rows], images[:rows])], header=["rendered", "drawn"])
    sheet.save(path)
