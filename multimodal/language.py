"""The EmojiScenes world's language: the tasks of a scene in English and Chinese (caption, grounded caption,
referring expression -> box or "there is none", VQA, text-to-image prompts), follow-ups that refer back to the turn
before, and reading class names back out of text. Each question is built in its form's canonical wording;
`rephrase` words it in any phrasing of `multimodal.phrasing`.

Grammar is deliberately regular (the embedded models are tiny) but correct: irregular plurals, "a" / "an", plural-only
nouns ("Where are the sunglasses?"), and each Chinese class's measure word.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, replace

from multimodal.phrasing import canonical, phrase, phrasing_split
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
    target: int | None = None  # refer: the object the expression points at (None: the scene has none)
    topic: str = ""  # vqa: count | presence | background | neighbour | wearing | size
    form: str = ""  # the question's form in `multimodal.phrasing.PHRASINGS` ("" for draw prompts)
    slots: tuple[tuple[str, str], ...] = ()  # what fills the form's phrasings

    @property
    def split(self) -> str:
        """Which phrasing split the prompt's wording comes from: "train" or "held-out"."""
        return phrasing_split(self.form, self.lang, self.prompt, dict(self.slots))


def asked(kind: str, lang: str, form: str, answer: str, target: int | None = None, topic: str = "",
          **slots: str) -> Task:
    """A task worded in its form's canonical phrasing."""
    return Task(kind, lang, canonical(form, lang, **slots), answer, target, topic, form, tuple(sorted(slots.items())))


def rephrase(task: Task, rng: random.Random, split: str = "train") -> Task:
    """The same task worded in a phrasing of `split`, picked by `rng`."""
    return replace(task, prompt=phrase(task.form, task.lang, dict(task.slots), rng, split))


CAPTION_PROMPTS = {lang: canonical("caption", lang) for lang in ("en", "zh")}
GROUNDED_PROMPTS = {lang: canonical("grounded_caption", lang) for lang in ("en", "zh")}


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
    sizes and presence (as many yes as no). `rng` picks the absent classes asked about."""
    tasks: list[Task] = []

    def ask(topic, en_answer, zh_answer, en_slots, zh_slots):
        tasks.append(asked("vqa", "en", topic, en_answer, topic=topic, **en_slots))
        tasks.append(asked("vqa", "zh", topic, zh_answer, topic=topic, **zh_slots))

    present = sorted({scene.objects[i].name for i in scene.entities})
    absent = sorted(c.name for c in STANDALONE if scene.count(c.name) == 0)
    for name in present + rng.sample(absent, 1):
        n = str(scene.count(name))
        ask("count", n, n, *_count_slots(CLASSES[name]))
    for name in present[:1] + rng.sample(absent, 1):
        cls = CLASSES[name]
        yes = scene.count(name) > 0
        ask("presence", "yes" if yes else "no", "有" if yes else "没有",
            {"a_thing": cls.with_article()}, {"name": cls.zh})
    colour = scene.background.colour
    ask("background", colour, COLOURS[colour][0], {}, {})
    for a, direction, b in _neighbours(scene):
        subject = scene.objects[a]
        if scene.count(subject.name) != 1:
            continue
        other = scene.objects[b].cls
        ask("neighbour", other.name, other.zh, {"relation": _DIRECTION_EN[direction], "name": subject.name},
            {"name": subject.cls.zh, "direction": _DIRECTION_ZH[direction]})
    for i in scene.entities:
        obj = scene.objects[i]
        if scene.count(obj.name) != 1:
            continue
        if obj.cls.wearer:
            ask("wearing", *_worn(scene, i), {"name": obj.name}, {"name": obj.cls.zh})
        ask("size", obj.size, _SIZE_ZH[obj.size], {"name": obj.name}, {"name": obj.cls.zh})
    return tasks


_SIZE_ZH = {"big": "大", "small": "小"}


def _count_slots(cls) -> tuple[dict[str, str], dict[str, str]]:
    return {"plural": cls.plural}, {"name": cls.zh, "measure": cls.measure}


def _worn(scene: Scene, index: int) -> tuple[str, str]:
    """What the animal `index` wears, in English and Chinese ("nothing" / 没有)."""
    wearing = scene.objects[index].wearing
    worn = scene.objects[wearing].cls if wearing is not None else None
    return (worn.name, worn.zh) if worn else ("nothing", "没有")


def absent_answer(name: str, lang: str) -> str:
    """What a question about a class the scene lacks is answered: "There is no cat in the image." / "图中没有猫。"."""
    if lang == "zh":
        return f"图中没有{CLASSES[name].zh}。"
    return f"There {'are' if name in PLURAL_ONLY else 'is'} no {name} in the image."


def _refer(scene: Scene, index: int | None, lang: str, name: str = "") -> Task:
    """"Where is the dog on the left?" -> its box; for `index` None, about the class `name` the scene lacks."""
    if index is None:
        thing, answer = (f"the {name}" if lang == "en" else CLASSES[name].zh), absent_answer(name, lang)
    else:
        name = scene.objects[index].name
        thing, answer = referring_expression(scene, index, lang), format_boxes([scene.box_per_mille(index)])
    slots = {"thing": thing, "be": "are" if name in PLURAL_ONLY else "is"} if lang == "en" else {"thing": thing}
    return asked("refer", lang, "refer", answer, index, **slots)


def follow_ups(scene: Scene, lang: str, rng: random.Random) -> list[tuple[Task, Task]]:
    """(question, follow-up) pairs whose follow-up refers back to the question: "How many dogs are there?" -> "And
    how many cats?"; "Is there a cat?" -> "Where is it?"; "Where is the dog?" -> "What is it wearing?" / "Is it big
    or small?". Each follow-up is a task of its own (its answer needs the question before it)."""
    pairs = []
    by_form = {}
    for task in vqa(scene, rng):
        if task.lang == lang:
            by_form.setdefault(task.form, []).append(task)
    counts = by_form["count"]
    for first, second in zip(counts, counts[1:] + counts[:1]):
        if first is not second:
            name = _class_of(second)
            en, zh = _count_slots(CLASSES[name])
            pairs.append((first, asked("vqa", lang, "count_again", second.answer, topic="count",
                                       **(en if lang == "en" else zh))))
    for question in by_form["presence"]:
        name = _class_of(question)
        holders = [i for i in scene.entities if scene.objects[i].name == name]
        if len(holders) > 1:
            continue  # "Where is it?" has no one answer
        target = holders[0] if holders else None
        answer = format_boxes([scene.box_per_mille(target)]) if holders else absent_answer(name, lang)
        slots = {"pronoun": "it", "be": "is"} if lang == "en" else {"pronoun": "它"}
        pairs.append((question, asked("refer", lang, "where_it", answer, target, **slots)))
    for i in scene.entities:
        obj = scene.objects[i]
        if scene.count(obj.name) != 1:
            continue
        where = _refer(scene, i, lang)
        if obj.cls.wearer:
            en, zh = _worn(scene, i)
            pairs.append((where, asked("vqa", lang, "it_wearing", en if lang == "en" else zh, topic="wearing")))
        size = obj.size if lang == "en" else _SIZE_ZH[obj.size]
        pairs.append((where, asked("vqa", lang, "it_size", size, topic="size")))
    return pairs


def _class_of(task: Task) -> str:
    """The one class a count or presence question names."""
    (name,) = mentioned_classes(task.prompt, task.lang)
    return name


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
        tasks.append(asked("caption", lang, "caption", describe(scene, lang)))
        tasks.append(asked("grounded_caption", lang, "grounded_caption", describe(scene, lang, boxes=True)))
    rng = random.Random(scene.seed * 7919 + 1)
    for lang in ("en", "zh"):
        tasks.extend(_refer(scene, index, lang) for index in range(len(scene.objects)))
    absent = sorted(c.name for c in VOCABULARY if scene.count(c.name) == 0)
    missing = rng.choice(absent)  # "Where is the cat?" in a scene without one
    tasks.extend(_refer(scene, None, lang, missing) for lang in ("en", "zh"))
    tasks.extend(vqa(scene, rng))
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
