"""`multimodal scene --seed S`: render one EmojiScenes scene and print its tasks (captions, boxes, questions)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("scene", help="render an EmojiScenes scene and print its tasks",
                                   description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="canvas side in pixels")
    parser.add_argument("--max-entities", type=int, default=4, help="1 to 4 entities per scene")
    parser.add_argument("--out", default=None, help="write the image here (PNG)")
    parser.add_argument("--boxes", action="store_true", help="draw the exact boxes on the written image")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from multimodal.image import draw_boxes
    from multimodal.language import scene_tasks
    from multimodal.world import WorldConfig, make_scene, render, split_of

    scene = make_scene(args.seed, WorldConfig(size=args.size, max_entities=args.max_entities))
    try:
        split = split_of(args.seed) + " split"
    except ValueError:
        split = "no split"
    print(f"seed {scene.seed} ({split}), {scene.background.kind} {scene.background.colour} background")
    for obj in scene.objects:
        print(f"  {obj.name:<14} box {obj.box}  {obj.region or 'alone'}, {obj.size}")
    for task in scene_tasks(scene):
        answer = f" -> {task.answer}" if task.answer else ""
        print(f"[{task.kind} {task.lang}] {task.prompt}{answer}")
    if args.out:
        image = render(scene)
        if args.boxes:
            image = draw_boxes(image, [(obj.name, obj.box) for obj in scene.objects])
        image.save(args.out)
        print(f"wrote {args.out}")
    return 0
