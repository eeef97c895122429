"""Grounding text: parse/format round trips, per-mille <-> pixels, clamping, hostile strings reported not raised."""

from __future__ import annotations

from PIL import Image

from vlm.grounding import (
    draw_grounding,
    format_boxes,
    format_grounding,
    parse_grounding,
    pixel_boxes,
    to_per_mille,
    to_pixels,
)


def test_parse_phrases_and_several_boxes():
    text = "A dog [[086,540,400,760]] chases two cats [[500,100,700,300];[710,120,900,310]]."
    result = parse_grounding(text)
    assert [(p.phrase, p.boxes) for p in result.phrases] == [
        ("A dog", ((86, 540, 400, 760),)),
        ("chases two cats", ((500, 100, 700, 300), (710, 120, 900, 310))),
    ]
    assert result.text == "A dog chases two cats ." and not result.problems
    assert result.phrases[0].span == (6, 25) and text[6:25] == "[[086,540,400,760]]"


def test_format_parse_round_trip(generator):
    import torch

    for _ in range(30):
        parts = []
        for index in range(int(torch.randint(1, 4, (1,), generator=generator))):
            count = int(torch.randint(1, 3, (1,), generator=generator))
            corners = torch.randint(0, 1000, (count, 4), generator=generator).tolist()
            boxes = tuple((min(a, c), min(b, d), max(a, c), max(b, d)) for a, b, c, d in corners)
            parts.append((f"the object {index}", boxes))
        text = format_grounding(parts)
        assert [(p.phrase, p.boxes) for p in parse_grounding(text).phrases] == parts
    assert format_boxes([(5, 6, 70, 999)]) == "[[005,006,070,999]]"


def test_pixels_round_trip_for_the_original_size(generator):
    import torch

    for _ in range(50):
        width, height = torch.randint(1, 5000, (2,), generator=generator).tolist()
        a, b, c, d = torch.randint(0, 1000, (4,), generator=generator).tolist()
        box = (min(a, c), min(b, d), max(a, c), max(b, d))
        pixels = to_pixels(box, width, height)
        assert pixels == (box[0] / 1000 * width, box[1] / 1000 * height, box[2] / 1000 * width, box[3] / 1000 * height)
        assert to_per_mille(pixels, width, height) == box
    assert to_per_mille((-5, 10, 2000, 5), 100, 100) == (0, 50, 999, 100)  # clamped, corners ordered


def test_clamping_and_hostile_strings_are_reported_not_raised():
    clamped = parse_grounding("x [[-5,1200,30,20]]")
    assert clamped.phrases[0].boxes == ((0, 20, 30, 999),) and not clamped.problems
    hostile = [
        "[[", "]]", "[[]]", "[[1,2,3]]", "[[a,b,c,d]]", "[[1,2,3,4,5]]", "[[[[1,2,3,4]]]]", "[[1;2;3;4]]",
        "[[" + "9" * 5000 + ",1,2,3]]", "[" * 10000 + "]" * 10000, "[[1,2,3,4]" * 3000, "\x00[[1,2,3,4]]\ud800",
        "[[1.5,2,3,4]]", "[[ 1 , 2 , 3 , 4 ]]",
    ]
    for text in hostile:
        result = parse_grounding(text)
        assert isinstance(result.problems, list)
    assert parse_grounding("[[1,2,3]]").problems == ["Box group 1: '1,2,3' is not four integers x0,y0,x1,y1."]
    mixed = parse_grounding("cat [[1,2,3,4];[bad];[5,6,7,8]] and [[x]]")
    assert mixed.phrases[0].boxes == ((1, 2, 3, 4), (5, 6, 7, 8)) and len(mixed.problems) == 2
    assert parse_grounding("[[ 1 , 2 , 3 , 4 ]]").phrases[0].boxes == ((1, 2, 3, 4),)


def test_drawn_boxes_land_on_the_original_pixels():
    image = Image.new("RGB", (200, 100), "white")
    result = parse_grounding("the box [[100,200,500,800]]")
    assert pixel_boxes(result, 200, 100) == [("the box", (20.0, 20.0, 100.0, 80.0))]
    drawn = draw_grounding(image, result)
    assert drawn.size == image.size and drawn.getpixel((60, 80)) != (255, 255, 255)
    assert drawn.getpixel((150, 50)) == (255, 255, 255) and image.getpixel((60, 80)) == (255, 255, 255)


def test_a_stray_separator_does_not_drop_a_valid_box():
    for text, expected in [("a dog [[100,200,300,400];] ok", [(100, 200, 300, 400)]),
                           ("two [[1,2,3,4];[5,6,7,8];]", [(1, 2, 3, 4), (5, 6, 7, 8)]),
                           ("one [[1,2,3,4;]]", [(1, 2, 3, 4)])]:
        grounding = parse_grounding(text)
        assert [box for _, box in grounding.boxes] == expected and not grounding.problems
        assert "[" not in grounding.text and ";" not in grounding.text


def test_each_phrase_is_the_noun_phrase_its_box_belongs_to():
    from multimodal.language import scene_tasks
    from multimodal.world import make_scene, split_seeds

    for seed in split_seeds("val", 40):
        scene = make_scene(seed)
        for task in scene_tasks(scene):
            if task.kind != "grounded_caption":
                continue
            phrases = [phrase for phrase, _ in parse_grounding(task.answer).boxes]
            assert len(phrases) == len(scene.objects)
            forbidden = (" and ", "wearing", "left", "right", "是", "的", "，", "上角", "下角")
            for phrase in phrases:  # "a crown", "一只瓢虫", "老虎": no region words, no joining words
                assert not any(word in phrase for word in forbidden)
            names = {obj.cls.name if task.lang == "en" else obj.cls.zh for obj in scene.objects}
            assert all(any(name in phrase for name in names) for phrase in phrases)


def test_chinese_labels_are_drawn_with_their_glyphs():
    import pytest

    from multimodal.image import CJK_FONTS, draw_boxes

    if not any(__import__("pathlib").Path(path).exists() for path in CJK_FONTS):
        pytest.skip("no CJK font on this machine (make installs fonts-wqy-microhei)")
    image = Image.new("RGB", (128, 128), "white")
    dog, cat = (draw_boxes(image, [(label, (10.0, 40.0, 100.0, 120.0))]) for label in ("狗", "猫"))
    assert dog.crop((10, 0, 60, 40)).tobytes() != cat.crop((10, 0, 60, 40)).tobytes()  # not the same empty box
