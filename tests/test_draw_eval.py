"""The draw evaluation's measures against slow obvious versions: presence with alternatives, R-precision with a
judge that knows the answer, the VLM's opinion, the background colour, held-out items, and the contact sheet."""

from __future__ import annotations

import random

import torch
from PIL import Image

from multimodal.drawing import DRAWING_CLASSES, drawing_prompts, held_out
from multimodal.evaluation_draw import (
    DrawItem,
    background_accuracy,
    border_colour,
    draw_items,
    held_out_items,
    judge_presence,
    r_precision,
    vlm_asked_presence,
    vlm_presence,
)  # fmt: skip
from multimodal.world import COLOURS, HELD_OUT_COMPOSITIONS, render


class OracleJudge:
    """Image i is a tensor holding its item's index; an image's features are its prompt's one-hot (or a chosen
    class set's indicator), so every ranking has a known answer."""

    def __init__(self, prompts, classes_of_image=None):
        self.prompts = sorted(set(prompts))
        self.classes_of_image = classes_of_image

    def text_features(self, texts):
        return torch.stack([torch.nn.functional.one_hot(torch.tensor(self.prompts.index(t)), len(self.prompts))
                            for t in texts]).float()

    def image_features(self, images):
        return torch.stack([torch.nn.functional.one_hot(torch.tensor(self.prompts.index(p)), len(self.prompts))
                            for p in images]).float()


def test_r_precision_is_one_for_the_right_prompt_and_low_for_a_shuffle():
    items = draw_items(120)
    prompts = [item.task.prompt for item in items]
    judge = OracleJudge(prompts)
    assert r_precision(judge, prompts, items) == 1.0
    shuffled = prompts[1:] + prompts[:1]  # each "image" shows its neighbour's prompt
    assert r_precision(judge, shuffled, items) < 0.1


def test_r_precision_never_counts_a_prompt_the_scene_also_answers():
    items = draw_items(120)
    item = next(i for i in items if i.task.prompt.endswith("background"))
    plain = next(t.prompt for t in drawing_prompts(item.scene) if t.lang == item.task.lang
                 and not t.prompt.endswith("background"))
    others = [i for i in items if i is not item]
    judge = OracleJudge([i.task.prompt for i in items] + [plain])
    plain_item = DrawItem(others[0].scene, type(item.task)("draw", item.task.lang, plain, ""))
    # The image matches the prompt without its background best and its own prompt second: that prompt is one the
    # scene answers too, so it is no distractor and the own prompt still ranks first.
    features = judge.image_features([plain]) * 2 + judge.image_features([item.task.prompt])
    judge.image_features = lambda images: torch.cat([features, OracleJudge.image_features(judge, images[1:])])
    images = [None] + [i.task.prompt for i in others] + [plain]
    assert r_precision(judge, images, [item] + others + [plain_item]) == 1.0


def test_judge_presence_ranks_among_the_drawing_classes_with_alternatives():
    class Ranked:
        """Similarity = the order of DRAWING_CLASSES given per image (first = most similar)."""

        def presence(self, images, names, classes):
            from multimodal.judge import Judge

            judge = object.__new__(Judge)
            judge.text_features = lambda texts: torch.eye(len(classes))
            judge.image_features = lambda imgs: torch.stack([torch.tensor([-list(o).index(c) for c in classes],
                                                                          dtype=torch.float) for o in imgs])
            return Judge.presence(judge, images, names, classes)

    items = [i for i in draw_items(200) if i.scene.objects[0].wearing is not None][:6]
    correct = [[group[0] for group in item.named] + [c for c in DRAWING_CLASSES
               if c not in {g[0] for g in item.named}] for item in items]
    assert judge_presence(Ranked(), correct, items) == [True] * len(items)
    wrong = [sorted(DRAWING_CLASSES, key=lambda c: c in {n for g in item.named for n in g}) for item in items]
    assert judge_presence(Ranked(), wrong, items) == [False] * len(items)


def test_vlm_presence_needs_every_named_object_in_the_caption():
    items = draw_items(40)
    captions = {id(item): " and ".join(f"a {group[-1]}" for group in item.named) for item in items}

    def answer(images, questions, limit):
        assert all(q == "Describe the image." for q in questions)
        return [captions[id(item)] if keep else "a star" for item, keep in images]

    assert vlm_presence(answer, [(item, True) for item in items], items) == [True] * len(items)
    assert vlm_presence(answer, [(item, False) for item in items], items) == [False] * len(items)


def test_vlm_asked_presence_needs_each_object_confirmed_and_one_class_of_an_everyday_word_suffices():
    from multimodal.world import CLASSES

    items = draw_items(80)
    generic = [item for item in items if any(len(group) > 1 for group in item.named)]
    assert generic  # "a dog with a hat": the hat is any of the drawing hats, asked as "What is the dog wearing?"
    asked = {f"Is there {CLASSES[name].with_article()}?": name for name in DRAWING_CLASSES}

    def answer(images, questions, limit):
        assert limit == 8
        replies = []
        for (present, worn), question in zip(images, questions):
            if question.startswith("What is the "):
                replies.append(worn.get(question.removeprefix("What is the ").removesuffix(" wearing?"), "nothing"))
            else:
                replies.append(" Yes" if asked[question] in present else "no")
        return replies

    def shown(item, missing=()):
        """What a fake image holds: the standalone classes, and each wearer's accessory by name."""
        objects = item.scene.objects
        present = {group[-1] for obj, group in zip(objects, item.named) if obj.wearer is None} - set(missing)
        worn = {objects[obj.wearer].name: f"a {group[-1]}" for obj, group in zip(objects, item.named)
                if obj.wearer is not None and group[-1] not in missing}
        return present, worn

    assert vlm_asked_presence(answer, [shown(item) for item in items], items) == [True] * len(items)
    for position in (0, -1):  # the first object (an animal or a thing) and the last (often an accessory)
        images = [shown(item, {item.named[position][-1]}) for item in items]
        assert vlm_asked_presence(answer, images, items) == [False] * len(items)
    assert any(obj.wearer is not None for item in generic for obj in item.scene.objects)


def test_background_colour_is_read_from_the_border():
    items = draw_items(60)
    images = [render(item.scene) for item in items]
    assert all(border_colour(image) == item.scene.background.colour for image, item in zip(images, items))
    assert background_accuracy(images, items) == 1.0
    wrong = [Image.new("RGB", (64, 64), COLOURS["gray"][1] if item.scene.background.colour != "gray"
                       else COLOURS["red"][1]) for item in items]
    assert background_accuracy(wrong, items) == 0.0


def test_held_out_items_ask_for_each_held_out_composition():
    items = held_out_items(3)
    assert len(items) == 3 * len(HELD_OUT_COMPOSITIONS)
    assert all(held_out(item.scene, item.task) for item in items)
    assert {pair for item in items for pair in item.scene.compositions} >= HELD_OUT_COMPOSITIONS
    assert {item.task.lang for item in items} == {"en", "zh"}


def test_contact_sheet_places_every_image(tmp_path):
    from multimodal.sheet import contact_sheet, rendered_scene_for

    target = rendered_scene_for("a dog with a hat")
    assert target is not None
    colours = [tuple(random.Random(i).randrange(256) for _ in range(3)) for i in range(3)]
    rows = [("a dog with a hat", [target, Image.new("RGB", (64, 64), colours[0])]),
            ("一只猫", [None, Image.new("RGB", (64, 64), colours[1]), Image.new("RGB", (64, 64), colours[2])])]
    sheet = contact_sheet(rows, cell=64, header=["rendered", "seed 0", "seed 1"])
    assert sheet.size[0] == 3 * (64 + 4) + 4
    from multimodal.sheet import GAP, LABEL_HEIGHT

    def centre(row, column):
        top = LABEL_HEIGHT + row * (LABEL_HEIGHT + 64 + GAP) + GAP  # under the header, at this row's label
        return GAP + column * (64 + GAP) + 32, top + LABEL_HEIGHT + 32

    assert sheet.getpixel(centre(0, 1)) == colours[0]
    assert sheet.getpixel(centre(1, 2)) == colours[2]
    assert sheet.getpixel(centre(1, 0)) == (255, 255, 255)  # no rendered scene: an empty cell
