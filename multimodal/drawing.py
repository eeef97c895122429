"""The drawing world: EmojiScenes made to be drawn by the embedded text-to-image models.

A drawing scene has one entity that fills most of the canvas, as emoji art does, or two side by side (left / right)
or stacked (top / bottom); an entity is an object of `DRAWING_CLASSES`, and an animal face may wear a hat or
glasses. The background is plain, in one of the world's eight colours. At the base stage's 32x32 a single entity
is about 20 pixels wide and each of two about 12: large enough to be recognised.

Prompts come in English and Chinese, with the accessory's exact name or its everyday word ("a dog with a top hat",
"a dog wearing a hat", "一只戴着帽子的狗"), two entities by region or by relation ("a cat on the left and a car on
the right", "a car to the right of a cat", "一只猫在一辆汽车的左边"), and half of them name the background colour
("..., on a blue background", "...，蓝色背景"). The world's held-out (animal, accessory) compositions occur only in
test scenes, here too.
"""

from __future__ import annotations

import random

from multimodal.language import Task
from multimodal.world import (
    CLASSES,
    COLOURS,
    HELD_OUT_COMPOSITIONS,
    SPLITS,
    Background,
    Scene,
    SceneObject,
    WorldConfig,
    _compose,
    with_article,
)

# Classes that stay distinct in shape and colour at 32x32, with every wearer of a held-out composition.
DRAWING_ANIMALS = ("dog", "cat", "rabbit", "fox", "bear", "panda", "tiger", "pig", "frog", "monkey", "unicorn", "cow")
DRAWING_ACCESSORIES = ("top hat", "cap", "sun hat", "graduation cap", "crown", "glasses", "sunglasses")
DRAWING_OTHERS = ("apple", "banana", "watermelon", "car", "bus", "rocket", "tree", "sunflower", "soccer ball",
                  "house", "fish", "butterfly")  # fmt: skip
DRAWING_STANDALONE = DRAWING_ANIMALS + DRAWING_OTHERS
DRAWING_CLASSES = DRAWING_STANDALONE + DRAWING_ACCESSORIES

PAIR_PROBABILITY = 0.4  # scenes with two entities
WEAR_PROBABILITY = 0.6  # chance that an animal face wears an accessory
BACKGROUND_PROMPT_SHARE = 0.5  # of a scene's prompts, the share that name the background colour
# The main object's longest side as a fraction of the canvas: alone, or as one of two.
_SIDE = {"single": (0.56, 0.66), "pair": (0.34, 0.40)}
_MARGIN = 0.04  # of the canvas, kept free around each entity


def make_drawing_scene(seed: int, config: WorldConfig) -> Scene:
    """The drawing scene of a seed (deterministic, like `world.make_scene`)."""
    rng = random.Random(f"drawing-{seed}")
    allow_held_out = seed in SPLITS["test"]
    size = config.size
    background = Background("plain", rng.choice(sorted(COLOURS)), 0)
    pair = config.max_entities >= 2 and rng.random() < PAIR_PROBABILITY
    rows, cols = rng.choice([(1, 2), (2, 1)]) if pair else (1, 1)
    regions = (("left", "right") if cols == 2 else ("top", "bottom")) if pair else ("",)
    cell_w, cell_h = size / cols, size / rows
    objects: list[SceneObject] = []
    for cell, region in enumerate(regions):
        main = CLASSES[rng.choice(DRAWING_STANDALONE)]
        accessory = None
        if main.wearer and rng.random() < WEAR_PROBABILITY:
            options = [a for a in DRAWING_ACCESSORIES
                       if allow_held_out or (main.name, a) not in HELD_OUT_COMPOSITIONS]
            accessory = CLASSES[rng.choice(options)]
        low, high = _SIDE["pair" if pair else "single"]
        side = rng.uniform(low, high) * size
        room_w, room_h = cell_w - 2 * _MARGIN * size, cell_h - 2 * _MARGIN * size
        parts, (width, height) = _compose(main, accessory, side)
        while width > room_w or height > room_h:  # a tall hat or a wide glyph: shrink the entity until it fits
            side *= 0.92
            parts, (width, height) = _compose(main, accessory, side)
        col, row = (cell, 0) if cols == 2 else (0, cell)
        x0 = round(col * cell_w + _MARGIN * size + rng.uniform(0, room_w - width))
        y0 = round(row * cell_h + _MARGIN * size + rng.uniform(0, room_h - height))
        main_index = len(objects)
        for k, (cls, font_px, (dx, dy), (w, h)) in enumerate(parts):
            box = (x0 + dx, y0 + dy, x0 + dx + w, y0 + dy + h)
            wearer = main_index if k > 0 else None
            wearing = main_index + 1 if k == 0 and len(parts) > 1 else None
            objects.append(SceneObject(cls.name, box, font_px, region, "big", wearer, wearing))
    return Scene(seed, size, background, (rows, cols), tuple(objects), drawing=True)


def _en_entity(scene: Scene, index: int, verb: str, generic: bool) -> str:
    obj = scene.objects[index]
    text = obj.cls.with_article()
    if obj.wearing is not None:
        worn = scene.objects[obj.wearing].cls
        text += f" {verb} " + with_article(worn.generic if generic else worn.name)
    return text


def _zh_entity(scene: Scene, index: int, generic: bool) -> str:
    obj = scene.objects[index]
    text = "一" + obj.cls.measure
    if obj.wearing is not None:
        worn = scene.objects[obj.wearing].cls
        text += "戴着" + (worn.generic_zh if generic else worn.zh) + "的"
    return text + obj.cls.zh


_EN_RELATION = {"left": "to the left of", "right": "to the right of", "top": "above", "bottom": "below"}
_ZH_RELATION = {"left": "左边", "right": "右边", "top": "上边", "bottom": "下边"}
_EN_REGION = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}


def composition(scene: Scene) -> str:
    """What a drawing scene composes: "one object", "animal with accessory", "two objects" or "two objects, one
    wearing" (at least one of the two wears something)."""
    wearing = any(obj.wearing is not None for obj in scene.objects)
    if len(scene.entities) == 1:
        return "animal with accessory" if wearing else "one object"
    return "two objects, one wearing" if wearing else "two objects"


def _phrasings(scene: Scene, lang: str, verb: str, generic: bool) -> list[str]:
    """Prompts without the background: the one entity, or the two by region and by relation (both ways round)."""
    entities = scene.entities
    if lang == "en":
        phrases = [_en_entity(scene, i, verb, generic) for i in entities]
        if len(entities) == 1:
            return phrases
        (a, b), (ra, rb) = phrases, [scene.objects[i].region for i in entities]
        return [f"{a} {_EN_REGION[ra]} and {b} {_EN_REGION[rb]}", f"{a} {_EN_RELATION[ra]} {b}",
                f"{b} {_EN_RELATION[rb]} {a}"]
    phrases = [_zh_entity(scene, i, generic) for i in entities]
    if len(entities) == 1:
        return phrases
    (a, b), (ra, rb) = phrases, [scene.objects[i].region for i in entities]
    return [f"{_ZH_RELATION[ra]}是{a}，{_ZH_RELATION[rb]}是{b}", f"{a}在{b}的{_ZH_RELATION[ra]}",
            f"{b}在{a}的{_ZH_RELATION[rb]}"]


def with_background(prompt: str, colour: str, lang: str) -> str:
    if lang == "en":
        return f"{prompt} on {with_article(colour)} background"
    return f"{prompt}，{COLOURS[colour][0]}背景"


def drawing_prompts(scene: Scene) -> list[Task]:
    """Every prompt the scene answers, without and with its background colour; `topic` is its composition."""
    wears = any(obj.wearing is not None for obj in scene.objects)
    tasks = []
    for lang in ("en", "zh"):
        variants = [("with", False), ("with", True), ("wearing", False), ("wearing", True)] if wears else [("", False)]
        if lang == "zh":
            variants = [("", False), ("", True)] if wears else [("", False)]
        prompts = [p for verb, generic in variants for p in _phrasings(scene, lang, verb, generic)]
        for prompt in dict.fromkeys(prompts):
            for named in (prompt, with_background(prompt, scene.background.colour, lang)):
                tasks.append(Task("draw", lang, named, "", topic=composition(scene)))
    return tasks


def pick_prompt(scene: Scene, rng: random.Random, lang: str | None = None) -> Task:
    """One prompt of the scene: the language (when not given) and the background mention at even odds."""
    lang = lang or rng.choice(("en", "zh"))
    options = [t for t in drawing_prompts(scene) if t.lang == lang]
    named = rng.random() < BACKGROUND_PROMPT_SHARE
    return rng.choice([t for t in options if names_background(t, scene) == named])


def names_background(task: Task, scene: Scene) -> bool:
    colour = scene.background.colour
    return task.prompt.endswith(colour + " background") or task.prompt.endswith(COLOURS[colour][0] + "背景")


def named_objects(scene: Scene, task: Task) -> list[tuple[str, ...]]:
    """What a prompt asks for, one entry per object of the scene: the classes that satisfy it. An accessory named
    by its everyday word ("hat", "帽子") is satisfied by any drawing accessory that word covers."""
    named = []
    for obj in scene.objects:
        cls = obj.cls
        # "a cap" is not in "a graduation cap"; the Chinese names share no characters with the everyday "帽子"
        exact = with_article(cls.name) in task.prompt if task.lang == "en" else cls.zh in task.prompt
        if cls.category == "accessory" and not exact:
            named.append(tuple(a for a in DRAWING_ACCESSORIES if CLASSES[a].generic == cls.generic))
        else:
            named.append((cls.name,))
    return named


def held_out(scene: Scene, task: Task) -> bool:
    """Whether the prompt asks for a held-out (animal, accessory) composition by the accessory's exact name."""
    named = {group[0] for group in named_objects(scene, task) if len(group) == 1}
    return any(accessory in named for _, accessory in scene.compositions & HELD_OUT_COMPOSITIONS)


def prompt_warning(prompt: str) -> str | None:
    """A sentence for a prompt the embedded model cannot follow: one naming no object it draws, or one it does not."""
    from multimodal.language import mentioned_classes

    lang = "zh" if any("\u4e00" <= char <= "\u9fff" for char in prompt) else "en"
    named = mentioned_classes(prompt, lang)
    unknown = sorted(named - set(DRAWING_CLASSES))
    if unknown:
        return f"The embedded model has not learned to draw {', '.join(unknown)}; expect something else."
    if not named:
        return "This prompt names none of the objects the embedded model draws; expect a random one."
    return None
