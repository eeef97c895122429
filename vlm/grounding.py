"""Grounded text: boxes written as `[[x0,y0,x1,y1]]` inside an answer, in per mille of the original image.

CogVLM's grounding format: coordinates are integers 000-999 relative to the image width and height (origin top-left),
written with three digits; several boxes for one phrase share the brackets, separated by `;`:
`a dog [[086,540,400,760]] and two cats [[500,100,700,300];[710,120,900,310]]`.
Images are resized (not padded) to the model's square, so per-mille values map straight back to the original pixels
(`v / 1000 * W`, as the official parser does).

Model output is untrusted text: parsing never raises. A box that is not four integers is reported in `problems` and
skipped; values outside 0..999 are clamped and corners are ordered.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image

from multimodal.image import draw_boxes

Box = tuple[int, int, int, int]  # per mille: x0, y0, x1, y1 in 0..999
PixelBox = tuple[float, float, float, float]

# Boxes inside one group are joined by `];[`; `[^\[\]]` cannot match the separator's `]`, so the pattern never
# backtracks ambiguously and stays linear on hostile input. A stray separator before the closing brackets
# (`[[1,2,3,4];]`) is tolerated.
_BOX_GROUP = re.compile(r"\[\[([^\[\]]*(?:\];\[[^\[\]]*)*)\](?:;\s*)?\]")
_INTEGER = re.compile(r"[+-]?\d{1,9}")
# A phrase starts after the last clause break before its boxes, and after the last word that joins it to what came
# before ("... at the top left and a taxi", "一只戴着皇冠", "的老虎"), so a label is the noun phrase its box belongs to.
_CLAUSE_BREAK = re.compile(r"[.!?;:,\n，。；：！？、]")
_JOINER = re.compile(r"\b(?:and|wearing)\b|是|戴着|的")
MAX_COORD = 999


@dataclass(frozen=True)
class GroundedPhrase:
    phrase: str  # the words the boxes belong to ("" when the answer is only a box)
    boxes: tuple[Box, ...]
    span: tuple[int, int]  # character span of the `[[...]]` group in the text


@dataclass
class Grounding:
    text: str  # the answer with every box group removed
    phrases: list[GroundedPhrase]
    problems: list[str] = field(default_factory=list)  # one sentence per malformed box

    @property
    def boxes(self) -> list[tuple[str, Box]]:
        return [(p.phrase, box) for p in self.phrases for box in p.boxes]


def _clamp(value: int) -> int:
    return min(max(value, 0), MAX_COORD)


def parse_box(body: str) -> Box:
    """`"086,540,400,760"` -> (86, 540, 400, 760); raises ValueError with one sentence when it is not 4 integers."""
    parts = [part.strip() for part in body.split(",")]
    if len(parts) != 4 or not all(_INTEGER.fullmatch(part) for part in parts):
        raise ValueError(f"'{_preview(body)}' is not four integers x0,y0,x1,y1.")
    x0, y0, x1, y1 = (_clamp(int(part)) for part in parts)
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def _preview(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _phrase_before(text: str) -> str:
    """The noun phrase right before a box group: what follows the last clause break and the last joining word."""
    breaks = list(_CLAUSE_BREAK.finditer(text))
    tail = text[breaks[-1].end():] if breaks else text
    joiners = list(_JOINER.finditer(tail))
    if joiners and tail[joiners[-1].end():].strip():
        tail = tail[joiners[-1].end():]
    return " ".join(tail.split())


def parse_grounding(text: str) -> Grounding:
    """Find every `[[...]]` group, with the phrase each belongs to; never raises on model output."""
    phrases: list[GroundedPhrase] = []
    problems: list[str] = []
    pieces: list[str] = []
    previous_end = 0
    for group_index, match in enumerate(_BOX_GROUP.finditer(text), start=1):
        before = text[previous_end:match.start()]
        pieces.append(before)
        boxes = []
        for body in match.group(1).split(";"):
            body = body.strip().removeprefix("[").removesuffix("]")
            if not body.strip():  # a stray separator: `[[1,2,3,4;]]`
                continue
            try:
                boxes.append(parse_box(body))
            except ValueError as error:
                problems.append(f"Box group {group_index}: {error}")
        if boxes:
            phrases.append(GroundedPhrase(_phrase_before(before), tuple(boxes), match.span()))
        previous_end = match.end()
    pieces.append(text[previous_end:])
    clean = re.sub(r"[ \t]{2,}", " ", "".join(pieces)).strip()
    return Grounding(clean, phrases, problems)


def format_box(box: Box) -> str:
    return ",".join(f"{_clamp(int(v)):03d}" for v in box)


def format_boxes(boxes: Sequence[Box]) -> str:
    """[(86, 540, 400, 760), ...] -> `[[086,540,400,760];[...]]`."""
    if not boxes:
        raise ValueError("A box group needs at least one box.")
    return "[[" + "];[".join(format_box(box) for box in boxes) + "]]"


def format_grounding(parts: Sequence[tuple[str, Sequence[Box]]]) -> str:
    """[(phrase, boxes), ...] -> `phrase [[...]] phrase [[...]]`; a phrase with no boxes is written as plain text."""
    chunks = []
    for phrase, boxes in parts:
        chunks.append(f"{phrase} {format_boxes(boxes)}".strip() if boxes else phrase)
    return " ".join(chunk for chunk in chunks if chunk)


def to_pixels(box: Box, width: int, height: int) -> PixelBox:
    """Per mille of the original image -> pixels of that image."""
    x0, y0, x1, y1 = box
    return x0 / 1000 * width, y0 / 1000 * height, x1 / 1000 * width, y1 / 1000 * height


def to_per_mille(box: PixelBox, width: int, height: int) -> Box:
    """Pixels -> per mille (rounded, clamped to 0..999, corners ordered): the inverse of `to_pixels`."""
    x0, y0, x1, y1 = box
    values = (round(x0 / width * 1000), round(y0 / height * 1000), round(x1 / width * 1000), round(y1 / height * 1000))
    a, b, c, d = (_clamp(v) for v in values)
    return min(a, c), min(b, d), max(a, c), max(b, d)


def pixel_boxes(grounding: Grounding, width: int, height: int) -> list[tuple[str, PixelBox]]:
    return [(phrase, to_pixels(box, width, height)) for phrase, box in grounding.boxes]


def draw_grounding(image: Image.Image, grounding: Grounding) -> Image.Image:
    """A copy of the original image with every parsed box drawn and labelled with its phrase."""
    return draw_boxes(image, pixel_boxes(grounding, *image.size))
