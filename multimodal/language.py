"""The EmojiScenes world's language: the tasks of a scene in English and Chinese (caption, grounded caption,
referring expression -> box, VQA, text-to-image prompts), and reading class names back out of text.

Grammar is deliberately regular (the embedded models are tiny) but correct: irregular plurals, "a" / "an", plural-only
nouns ("Where are the sunglasses?"), and each Chinese class's measure word.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

from multimodal.world import (
    CLASSES,
    COLOURS,
    PLURAL_ONLY,
    REGIONS_ZH,
    STANDALONE,
    VOCABULARY,
    Scene,
    with_article,
)
from vlm.grounding import format_boxes


@dataclass(frozen=True)
class Task:
    kind: str  # caption | grounded_caption | refer | vqa | draw
    lang: str  # en | zh
    prompt: str
    answer: str  # for draw tasks: "" (the scene's image is the answer)
    target: int | None = None  # refer: the object the expression points at
    topic: str = ""  # vqa: count | presence | background | neighbour | wearing | size


CAPTION_PROMPTS = {"en": "Describe the image.", "zh": "描述这张图片。"}
GROUNDED_PROMPTS = {"en": "Describe the image with boxes.", "zh": "描述这张图片并标出位置。"}


def _en_entity(scene: Scene, index: int, boxes: bool = False, verb: str = "wearing", generic: bool = False) -> str:
    obj = scene.objects[index]
    text = obj.cls.with_article()
    if boxes:
        text += " " + format_boxes([scene.box_per_mille(index)])
    if obj.wearing is not None:
        worn = scene.objects[obj.wearing].cls
        worn_text = worn.with_article() if not generic else with_article(worn.generic)
        text += f" {verb} {worn_text}"
        if boxes:
            text += " " + format_boxes([scene.box_per_mille(obj.wearing)])
    return text


def _en_region(region: str) -> str:
    if not region:
        return ""
    return (" on the " if region in ("left", "right") else " at the ") + region


def _en_join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _zh_entity(scene: Scene, index: int, boxes: bool = False, generic: bool = False) -> str:
    obj = scene.objects[index]
    text = "一" + obj.cls.measure
    if obj.wearing is not None:
        worn = scene.objects[obj.wearing].cls
        text += "戴着" + (worn.generic_zh if generic else worn.zh)
        if boxes:
            text += format_boxes([scene.box_per_mille(obj.wearing)])
        text += "的"
    text += obj.cls.zh
    if boxes:
        text += format_boxes([scene.box_per_mille(index)])
    return text


def describe(scene: Scene, lang: str, boxes: bool = False, verb: str = "wearing", generic: bool = False) -> str:
    """The scene's caption: entities in reading order, each with its region when there are several."""
    if lang == "en":
        phrases = [
            _en_entity(scene, i, boxes, verb, generic) + _en_region(scene.objects[i].region) for i in scene.entities
        ]
        return _en_join(phrases)
    if lang == "zh":
        parts = []
        for i in scene.entities:
            region = scene.objects[i].region
            entity = _zh_entity(scene, i, boxes, generic)
            parts.append(f"{REGIONS_ZH[region]}是{entity}" if region else entity)
        return "，".join(parts)
    raise ValueError(f"Unknown language '{lang}'; use 'en' or 'zh'.")


def referring_expression(scene: Scene, index: int, lang: str) -> str:
    """A phrase that picks out object `index`: its class name, plus its region when the class repeats."""
    obj = scene.objects[index]
    unique = scene.count(obj.name) == 1
    if lang == "en":
        return f"the {obj.name}" if unique else f"the {obj.name}{_en_region(obj.region)}"
    return obj.cls.zh if unique else f"{REGIONS_ZH[obj.region]}的{obj.cls.zh}"


def _neighbours(scene: Scene) -> list[tuple[int, str, int]]:
    """(entity, direction, entity) triples: b is `direction` of a, for grid neighbours."""
    rows, cols = scene.layout
    cell_of = {}
    for i in scene.entities:
        region = scene.objects[i].region
        row = 1 if "bottom" in region else 0
        col = 1 if "right" in region else 0
        cell_of[(row, col)] = i
    triples = []
    for (row, col), a in cell_of.items():
        for direction, (dr, dc) in {"left": (0, -1), "right": (0, 1), "above": (-1, 0), "below": (1, 0)}.items():
            b = cell_of.get((row + dr, col + dc))
            if b is not None:
                triples.append((a, direction, b))
    return triples


_DIRECTION_EN = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_DIRECTION_ZH = {"left": "左边", "right": "右边", "above": "上面", "below": "下面"}


def vqa(scene: Scene, rng: random.Random) -> list[Task]:
    """Questions with one-word or one-number answers: counts, neighbours, background colour, what an animal wears,
    sizes and presence. `rng` picks the absent classes asked about."""
    tasks: list[Task] = []

    def ask(topic, en_q, en_a, zh_q, zh_a):
        tasks.append(Task("vqa", "en", en_q, en_a, topic=topic))
        tasks.append(Task("vqa", "zh", zh_q, zh_a, topic=topic))

    present = sorted({scene.objects[i].name for i in scene.entities})
    absent = sorted(c.name for c in STANDALONE if scene.count(c.name) == 0)
    for name in present + rng.sample(absent, 1):
        cls = CLASSES[name]
        n = scene.count(name)
        ask("count", f"How many {cls.plural} are there?", str(n), f"图中有几{cls.measure}{cls.zh}？", str(n))
    for name in present[:1] + rng.sample(absent, 1):
        cls = CLASSES[name]
        yes = scene.count(name) > 0
        ask("presence", f"Is there {cls.with_article()}?", "yes" if yes else "no",
            f"图中有{cls.zh}吗？", "有" if yes else "没有")
    colour = scene.background.colour
    ask("background", "What colour is the background?", colour, "背景是什么颜色？", COLOURS[colour][0])
    for a, direction, b in _neighbours(scene):
        subject = scene.objects[a]
        if scene.count(subject.name) != 1:
            continue
        other = scene.objects[b].cls
        ask(
            "neighbour", f"What is {_DIRECTION_EN[direction]} the {subject.name}?", other.name,
            f"{subject.cls.zh}的{_DIRECTION_ZH[direction]}是什么？", other.zh,
        )  # fmt: skip
    for i in scene.entities:
        obj = scene.objects[i]
        if scene.count(obj.name) != 1:
            continue
        if obj.cls.wearer:
            worn = scene.objects[obj.wearing].cls if obj.wearing is not None else None
            ask(
                "wearing", f"What is the {obj.name} wearing?", worn.name if worn else "nothing",
                f"{obj.cls.zh}戴着什么？", worn.zh if worn else "没有",
            )  # fmt: skip
        size_zh = "大" if obj.size == "big" else "小"
        ask("size", f"Is the {obj.name} big or small?", obj.size, f"{obj.cls.zh}是大还是小？", size_zh)
    return tasks


def draw_prompts(scene: Scene) -> list[Task]:
    """Text-to-image prompts the scene answers: "a dog with a top hat" and its everyday form "a dog with a hat"."""
    tasks = []
    for generic in (False, True):
        if generic and not any(o.wearing is not None for o in scene.objects):
            break
        tasks.append(Task("draw", "en", describe(scene, "en", verb="with", generic=generic), ""))
        tasks.append(Task("draw", "zh", describe(scene, "zh", generic=generic), ""))
    return tasks


def scene_tasks(scene: Scene) -> list[Task]:
    """Every task of a scene, in both languages. The rng for the VQA distractors is seeded from the scene."""
    tasks = []
    for lang in ("en", "zh"):
        tasks.append(Task("caption", lang, CAPTION_PROMPTS[lang], describe(scene, lang)))
        tasks.append(Task("grounded_caption", lang, GROUNDED_PROMPTS[lang], describe(scene, lang, boxes=True)))
    for index in range(len(scene.objects)):
        box = format_boxes([scene.box_per_mille(index)])
        verb = "are" if scene.objects[index].name in PLURAL_ONLY else "is"  # "Where are the sunglasses?"
        tasks.append(Task("refer", "en", f"Where {verb} {referring_expression(scene, index, 'en')}?", box, index))
        tasks.append(Task("refer", "zh", f"{referring_expression(scene, index, 'zh')}在哪里？", box, index))
    tasks.extend(vqa(scene, random.Random(scene.seed * 7919 + 1)))
    if scene.drawing:
        from multimodal.drawing import drawing_prompts

        tasks.extend(drawing_prompts(scene))
    else:
        tasks.extend(draw_prompts(scene))
    return tasks


# ----------------------------------------------------------------------------------------------------------------
# Reading text back


@functools.lru_cache(maxsize=2)
def _name_forms(lang: str) -> tuple[re.Pattern, dict[str, str]]:
    """A pattern of every way a class is written (English singular and plural, Chinese) and the class of each."""
    forms = {form: c.name for c in VOCABULARY for form in ((c.name, c.plural) if lang == "en" else (c.zh,))}
    alternation = "|".join(re.escape(form) for form in sorted(forms, key=len, reverse=True))
    # English names are whole words; Chinese has no spaces, so the longest name wins at each position.
    return re.compile(rf"\b(?:{alternation})\b" if lang == "en" else alternation), forms


def mentioned_classes(text: str, lang: str) -> set[str]:
    """English class names mentioned in a text (in either language; "dogs" counts as "dog"), longest name first
    ("sunglasses" is not also "glasses", "熊猫" is not also "熊")."""
    pattern, forms = _name_forms(lang)
    return {forms[found] for found in pattern.findall(text.lower() if lang == "en" else text)}
