"""The drawing world: large entities in their regions, held-out compositions only in test scenes, prompts in both
languages with and without the background, and what each prompt asks for."""

from __future__ import annotations

import random
import re

import pytest

from multimodal.drawing import (
    DRAWING_ACCESSORIES,
    DRAWING_CLASSES,
    composition,
    drawing_prompts,
    held_out,
    named_objects,
    names_background,
    pick_prompt,
)  # fmt: skip
from multimodal.language import scene_tasks
from multimodal.world import DRAWING, HELD_OUT_COMPOSITIONS, make_scene, render, split_seeds


@pytest.fixture(scope="module")
def train_scenes():
    return [make_scene(seed, DRAWING) for seed in split_seeds("train", 1500)]


def test_scenes_are_deterministic_and_render_their_boxes():
    a, b = make_scene(123, DRAWING), make_scene(123, DRAWING)
    assert a == b and a.drawing and render(a).tobytes() == render(b).tobytes()


def test_entities_are_large_and_stay_in_their_regions(train_scenes):
    for scene in train_scenes:
        entities = scene.entities
        assert 1 <= len(entities) <= 2 and all(o.name in DRAWING_CLASSES for o in scene.objects)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= scene.size and 0 <= y0 < y1 <= scene.size
        sides = [max(b[2] - b[0], b[3] - b[1]) / scene.size for b in (scene.objects[i].box for i in entities)]
        if len(entities) == 1:
            assert scene.objects[entities[0]].region == "" and min(sides) > 0.45
            continue
        assert min(sides) > 0.25
        first, second = (scene.objects[i] for i in entities)
        if first.region == "left":
            assert second.region == "right" and first.box[2] <= second.box[0]
        else:
            assert (first.region, second.region) == ("top", "bottom") and first.box[3] <= second.box[1]


def test_held_out_compositions_appear_only_in_test_scenes(train_scenes):
    assert not any(scene.compositions & HELD_OUT_COMPOSITIONS for scene in train_scenes)
    test = [make_scene(seed, DRAWING) for seed in split_seeds("test", 3000)]
    assert any(scene.compositions & HELD_OUT_COMPOSITIONS for scene in test)


def test_prompts_cover_the_compositions_in_both_languages(train_scenes):
    prompts = {t.prompt for scene in train_scenes for t in drawing_prompts(scene)}
    assert {"a dog with a hat", "一只戴着帽子的狗", "a cat wearing sunglasses"} <= prompts
    assert any(re.fullmatch(r"a \w+ to the left of an? [\w ]+", p) for p in prompts)
    assert any(p.endswith("on a blue background") for p in prompts) and any(p.endswith("蓝色背景") for p in prompts)
    kinds = {composition(scene) for scene in train_scenes}
    assert kinds == {"one object", "animal with accessory", "two objects", "two objects, one wearing"}
    scene = train_scenes[0]
    assert [t for t in scene_tasks(scene) if t.kind == "draw"] == drawing_prompts(scene)


def test_relations_name_the_entities_in_their_places(train_scenes):
    pair = next(s for s in train_scenes if len(s.entities) == 2 and composition(s) == "two objects")
    left_or_top, right_or_bottom = (pair.objects[i].cls for i in pair.entities)
    relation = "to the left of" if pair.objects[pair.entities[0]].region == "left" else "above"
    expected = f"{left_or_top.with_article()} {relation} {right_or_bottom.with_article()}"
    assert expected in {t.prompt for t in drawing_prompts(pair)}


def test_pick_prompt_names_the_background_about_half_the_time(train_scenes):
    rng = random.Random(0)
    picked = [(pick_prompt(scene, rng), scene) for scene in train_scenes[:600]]
    share = sum(names_background(task, scene) for task, scene in picked) / len(picked)
    assert 0.42 < share < 0.58
    assert {task.lang for task, _ in picked} == {"en", "zh"}


def test_an_everyday_hat_accepts_any_hat_and_exact_names_one(train_scenes):
    scene = next(s for s in train_scenes if composition(s) == "animal with accessory"
                 and s.objects[1].name in ("top hat", "cap", "sun hat", "graduation cap"))
    hats = tuple(a for a in DRAWING_ACCESSORIES if "hat" in a or "cap" in a)
    by_prompt = {t.prompt: named_objects(scene, t) for t in drawing_prompts(scene)}
    animal, accessory = scene.objects[0].name, scene.objects[1].name
    assert by_prompt[f"{scene.objects[0].cls.with_article()} with a hat"] == [(animal,), hats]
    exact = f"{scene.objects[0].cls.with_article()} wearing {scene.objects[1].cls.with_article()}"
    assert by_prompt[exact] == [(animal,), (accessory,)]


def test_held_out_prompts_name_the_accessory_exactly():
    scene = next(s for s in (make_scene(seed, DRAWING) for seed in split_seeds("test", 5000))
                 if s.compositions & HELD_OUT_COMPOSITIONS and len(s.entities) == 1)
    flags = {t.prompt: held_out(scene, t) for t in drawing_prompts(scene)}
    accessory = scene.objects[1].cls
    assert all(flag == (accessory.with_article() in prompt or accessory.zh in prompt) for prompt, flag in flags.items())
    assert any(flags.values())


def test_prompts_outside_the_drawing_world_are_warned_about():
    from multimodal.drawing import prompt_warning

    assert prompt_warning("a dog with a hat") is None and prompt_warning("一只戴着帽子的狗，蓝色背景") is None
    assert "taxi" in prompt_warning("a taxi on the left and a dog on the right")
    assert "none of the objects" in prompt_warning("a giraffe in a spaceship")
    assert "pizza" in prompt_warning("一块披萨")
