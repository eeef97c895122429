"""Chat with GLM-4.1V-Thinking / GLM-4.6V-Flash: images in at their own resolution, answers with the thinking held
back and boxes in the suite's format.

- Images are preprocessed as transformers' `Glm4vImageProcessorPil` does (the processor the models were released
  with): resized with PIL's bicubic filter to multiples of 28 pixels whose area lies within the folder's
  `preprocessor_config.json` bounds, scaled to [0, 1], normalised with CLIP's mean and deviation, and cut into
  14x14 patches, two identical frames each, every 2x2 block's patches consecutive.
- The prompt is the GLM-4.1V template: `[gMASK]<sop>`, `<|system|>\\n...`, `<|user|>\\n` + the image's
  `<|begin_of_image|>`, one `<|image|>` per merged patch, `<|end_of_image|>` + the text, earlier answers after
  `<|assistant|>\\n` with their thinking removed, and `<|assistant|>\\n` to answer. With `thinking=False` the user
  text ends in "/nothink" and the answer starts with an empty `<think></think>`, as GLM-4.6V is told not to think.
- The models think in `<think>...</think>`, then answer (GLM-4.1V inside `<answer>...</answer>`), and write boxes
  as `<|begin_of_box|>[x0,y0,x1,y1]<|end_of_box|>` in per mille of the image. What the user sees, streamed, is the
  answer only, its boxes rewritten as `[[x0,y0,x1,y1]]` (`vlm.grounding`'s format; 1000 is read as 999).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from glm.generate import TextDeltas
from multimodal.image import CLIP_MEAN, CLIP_STD
from vlm.glm4v import Glm4vModel, generate_glm4v, load_glm4v

_BOX = re.compile(r"<\|begin_of_box\|>(.*?)<\|end_of_box\|>", re.S)
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class ImageSettings:
    """What `preprocessor_config.json` says; the defaults are transformers' for Glm4vImageProcessor."""

    min_pixels: int = 112 * 112
    max_pixels: int = 28 * 28 * 15000
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_folder(cls, folder: Path) -> ImageSettings:
        path = folder / "preprocessor_config.json"
        if not path.exists():
            return cls()
        values = json.loads(path.read_text())
        size = values.get("size") or {}
        return cls(min_pixels=size.get("shortest_edge", values.get("min_pixels", cls.min_pixels)),
                   max_pixels=size.get("longest_edge", values.get("max_pixels", cls.max_pixels)),
                   patch_size=values.get("patch_size", 14), temporal_patch_size=values.get("temporal_patch_size", 2),
                   merge_size=values.get("merge_size", 2), mean=tuple(values.get("image_mean", CLIP_MEAN)),
                   std=tuple(values.get("image_std", CLIP_STD)))


def fitted_size(height: int, width: int, settings: ImageSettings) -> tuple[int, int]:
    """Height and width in multiples of patch * merge pixels, the area (counted twice, for the two frames) kept
    within [min_pixels, max_pixels], the aspect ratio as close as that allows (transformers' `smart_resize`)."""
    factor, frames = settings.patch_size * settings.merge_size, settings.temporal_patch_size
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"The image's aspect ratio is {max(height, width) / min(height, width):.0f}; at most 200.")
    fitted_h, fitted_w = round(height / factor) * factor, round(width / factor) * factor
    if frames * fitted_h * fitted_w > settings.max_pixels:
        beta = math.sqrt((frames * height * width) / settings.max_pixels)
        fitted_h = max(factor, math.floor(height / beta / factor) * factor)
        fitted_w = max(factor, math.floor(width / beta / factor) * factor)
    elif frames * fitted_h * fitted_w < settings.min_pixels:
        beta = math.sqrt(settings.min_pixels / (frames * height * width))
        fitted_h = math.ceil(height * beta / factor) * factor
        fitted_w = math.ceil(width * beta / factor) * factor
    return fitted_h, fitted_w


def image_patches(image: Image.Image, settings: ImageSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values [N, 3 * T * P * P], grid_thw [1, 3]) of one image."""
    height, width = fitted_size(image.height, image.width, settings)
    pixels = np.asarray(image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC), np.float32) / 255
    pixels = (pixels - np.array(settings.mean, np.float32)) / np.array(settings.std, np.float32)  # [H, W, 3]
    p, m, frames = settings.patch_size, settings.merge_size, settings.temporal_patch_size
    rows, cols = height // p, width // p
    blocks = torch.from_numpy(pixels).permute(2, 0, 1).reshape(3, rows // m, m, p, cols // m, m, p)
    blocks = blocks.permute(1, 4, 2, 5, 0, 3, 6)  # [rows/m, cols/m, m, m, 3, p, p]: each block's patches together
    patches = blocks[:, :, :, :, :, None].expand(*blocks.shape[:5], frames, p, p)  # a still image is both frames
    return patches.reshape(rows * cols, -1).contiguous(), torch.tensor([[1, rows, cols]])


def visible_answer(raw: str, final: bool = True) -> str:
    """The part of a raw reply the user sees: after the thinking, without the answer tags, boxes in `[[...]]`. While
    the reply is still being written (`final=False`), an unfinished thinking or box is held back."""
    if "<think>" in raw and "</think>" not in raw:
        return ""
    text = raw.split("</think>", 1)[1] if "</think>" in raw else raw
    text = text.replace("<answer>", "").replace("</answer>", "").lstrip("\n")
    if not final and "<|begin_of_box|>" in text.rsplit("<|end_of_box|>", 1)[-1]:
        text = text[: text.rindex("<|begin_of_box|>")]
    return _BOX.sub(_suite_box, text)


def _suite_box(match: re.Match) -> str:
    values = [min(int(v), 999) for v in _NUMBER.findall(match.group(1))]
    boxes = [values[i : i + 4] for i in range(0, len(values) - len(values) % 4, 4)]
    return "[[" + "];[".join(",".join(f"{v:03d}" for v in box) for box in boxes) + "]]" if boxes else ""


class Glm4vChat:
    """The engine's chat model for a GLM-4.1V / 4.6V folder (`stream`, `answer_batch`)."""

    sees_images = True
    template = "glm4v"

    def __init__(self, model: Glm4vModel, tokenizer, settings: ImageSettings = ImageSettings(),
                 thinking: bool = True):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.settings = settings
        self.thinking = thinking

    @classmethod
    def load(cls, folder: str | Path, dtype: torch.dtype | None = None, device="cpu") -> Glm4vChat:
        from glm.tokenizer import GLMTokenizer

        folder = Path(folder)
        return cls(load_glm4v(folder, dtype, device), GLMTokenizer.load(folder), ImageSettings.from_folder(folder))

    def prompt(self, image: Image.Image | None, turns: Sequence[tuple[str, str]]
               ) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
        """(ids, pixel_values, grid_thw): the image goes into the first user turn."""
        if not turns or turns[-1][0] != "user":
            raise ValueError("A conversation must end with the user's question.")
        config, tokenizer = self.model.config, self.tokenizer
        ids, pixels, grid = tokenizer.prefix(), None, None
        for index, (role, text) in enumerate(turns):
            if role not in ("system", "user", "assistant"):
                raise ValueError(f"A conversation turn has the role '{role}'; known: system, user, assistant.")
            ids += [tokenizer.token_id(f"<|{role}|>")] + tokenizer.encode("\n")
            if role == "user" and image is not None and pixels is None:
                pixels, grid = image_patches(image, self.settings)
                count = int(grid.prod()) // self.settings.merge_size**2
                ids += [config.image_start_token_id] + [config.image_token_id] * count + [config.image_end_token_id]
            if role == "assistant":
                text = visible_answer(text)
            elif role == "user" and index == len(turns) - 1 and not self.thinking:
                text += "/nothink"
            ids += tokenizer.encode(text)
        ids += [tokenizer.token_id("<|assistant|>")] + tokenizer.encode("\n")
        if not self.thinking:
            ids += tokenizer.encode("<think></think>\n")
        return ids, pixels, grid

    def stream(self, image: Image.Image | None, turns: Sequence[tuple[str, str]], sampling,
               usage=None) -> Iterator[str]:
        """Deltas of the visible answer (greedy decoding); `usage` (a `vlm.chat.Usage`) is filled in at the end."""
        if getattr(sampling, "temperature", 0) not in (0, 0.0):
            raise ValueError("GLM-4.1V / 4.6V answers greedily here; send temperature 0.")
        ids, pixels, grid = self.prompt(image, turns)
        device = self.model.device

        def raw(tokens: list[int]) -> str:
            return self.tokenizer.decode(tokens, skip_special_tokens=False)

        def visible_so_far(tokens: list[int]) -> str:
            text = raw(tokens)  # an unfinished character ends it in U+FFFD, which TextDeltas holds back
            return text if text.endswith("\ufffd") else visible_answer(text, final=False)

        deltas = TextDeltas(visible_so_far, lambda tokens: visible_answer(raw(tokens)))
        for token in generate_glm4v(self.model, torch.tensor([ids], device=device),
                                    None if pixels is None else pixels.to(device), grid,
                                    sampling.max_new_tokens, self.tokenizer.stop_tokens):
            if delta := deltas.push(token):
                yield delta
        if delta := deltas.flush():
            yield delta
        if usage is not None:
            usage.record(len(ids), deltas.tokens, len(deltas.tokens) < sampling.max_new_tokens)

    def answer_batch(self, images: Sequence, turns_list: Sequence[Sequence[tuple[str, str]]], sampling,
                     usages=None) -> list[str]:
        """One answer per (image, turns), each decoded alone (images differ in size and so in token count)."""
        usages = list(usages) if usages is not None else [None] * len(images)
        return ["".join(self.stream(image, turns, sampling, usage))
                for image, turns, usage in zip(images, turns_list, usages)]
