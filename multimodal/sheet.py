"""Contact sheets: rows of images under a label each (prompts x seeds), for looking at what a model draws.

`multimodal draw ... --grid` and `multimodal eval draw --sheet` write them. With `rendered`, the first column of a
row is a rendered drawing-world scene that answers the row's prompt exactly (the target a perfect model would
draw), or an empty cell when no test scene does.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

from multimodal.image import label_font

LABEL_HEIGHT = 22
GAP = 4


def contact_sheet(rows: Sequence[tuple[str, Sequence[Image.Image | None]]], cell: int = 128,
                  header: Sequence[str] = ()) -> Image.Image:
    """rows: (label, images) each; a None image leaves its cell empty. `header` labels the columns."""
    columns = max(len(images) for _, images in rows)
    needs_cjk = any(not label.isascii() for label, _ in rows)
    font = label_font(14, needs_cjk)
    top = LABEL_HEIGHT if header else 0
    width = columns * (cell + GAP) + GAP
    height = top + len(rows) * (LABEL_HEIGHT + cell + GAP) + GAP
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for column, title in enumerate(header):
        draw.text((GAP + column * (cell + GAP), 4), title, fill="black", font=font)
    for row, (label, images) in enumerate(rows):
        y = top + row * (LABEL_HEIGHT + cell + GAP) + GAP
        draw.text((GAP, y + 3), label, fill="black", font=font)
        for column, image in enumerate(images):
            x = GAP + column * (cell + GAP)
            if image is None:
                draw.rectangle((x, y + LABEL_HEIGHT, x + cell - 1, y + LABEL_HEIGHT + cell - 1), outline="lightgray")
                continue
            sheet.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, y + LABEL_HEIGHT))
    return sheet


def rendered_scene_for(prompt: str, search: int = 20_000) -> Image.Image | None:
    """A rendered test scene of the drawing world that `prompt` describes exactly (the first of the first `search`
    test seeds), or None."""
    from multimodal.drawing import drawing_prompts
    from multimodal.world import DRAWING, make_scene, render, split_seeds

    for seed in split_seeds("test", search):
        scene = make_scene(seed, DRAWING)
        if any(task.prompt == prompt for task in drawing_prompts(scene)):
            return render(scene)
    return None
