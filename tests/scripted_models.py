"""Scripted stand-ins for the engine's two parts, for tests of the layers above the models.

A random tiny model answers gibberish, so tests that must see a specific answer (a box drawn in the demo, each of
many concurrent API requests getting its own answer) put these parts into a real `Engine`: every engine, server,
captioning and demo code path still runs; only the text and the pixels come from a script. The answer names the
question and the image's mean colour, so a test can tell which request it belongs to.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from PIL import Image, ImageStat

from multimodal.engine import Engine

BOX = "[[250,250,750,750]]"


def fingerprint(image: Image.Image | None) -> str:
    if image is None:
        return "no image"
    red, green, blue = (round(v) for v in ImageStat.Stat(image).mean)
    return f"rgb {red} {green} {blue}"


class ScriptedChat:
    """Answers '<question> -> the thing [[250,250,750,750]] (rgb R G B)' and records the batch sizes it saw."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.batch_sizes: list[int] = []
        self.fail_on: str | None = None  # a question that raises, to test failure paths
        self._lock = threading.Lock()

    def answer(self, image, turns) -> str:
        question = turns[-1][1]
        if question == self.fail_on:
            raise ValueError(f"Scripted failure for '{question}'.")
        return f"{question} -> the thing {BOX} ({fingerprint(image)}, {len(turns)} turns)"

    def stream(self, image, turns, sampling, usage=None):
        text = self.answer(image, turns)
        if usage is not None:  # one token per 7 characters, cut at the limit as a real model is
            usage.record(len(turns), [0] * min(-(-len(text) // 7), sampling.max_new_tokens),
                         -(-len(text) // 7) <= sampling.max_new_tokens)
            text = text[: 7 * sampling.max_new_tokens]
        for start in range(0, len(text), 7):
            if self.delay:
                threading.Event().wait(self.delay)
            yield text[start : start + 7]

    def answer_batch(self, images, turns_list, sampling, usages=None):
        with self._lock:
            self.batch_sizes.append(len(images))
        if self.delay:
            threading.Event().wait(self.delay)
        answers = []
        for index, (image, turns) in enumerate(zip(images, turns_list)):
            usage = usages[index] if usages is not None else None
            answers.append("".join(self.stream(image, turns, sampling, usage)))
        return answers


@dataclass
class Painted:
    base: list
    relay: list


@dataclass(frozen=True)
class PainterConfig:
    base_steps: int = 4
    guidance_scale: float = 2.5


class ScriptedPainter:
    """Draws flat images whose colour is a function of the prompt and the seed; reports every step."""

    sizes = ((32, 32), (64, 64))
    config = PainterConfig()

    def __call__(self, prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                 num_images_per_prompt, seed, callback):
        steps = num_inference_steps or self.config.base_steps
        for step in range(steps):
            if callback is not None:
                callback(step + 1, steps)
        colours = [colour_of(prompt + negative_prompt, seed + i) for i in range(num_images_per_prompt)]
        base = [Image.new("RGB", (width // 2, height // 2), c) for c in colours]
        relay = [Image.new("RGB", (width, height), c) for c in colours]
        return Painted(base, relay)


def colour_of(prompt: str, seed: int) -> tuple[int, int, int]:
    value = sum(map(ord, prompt)) * 31 + seed * 97
    return value % 256, (value // 7) % 256, (value // 13) % 256


def scripted_engine(delay: float = 0.0) -> Engine:
    return Engine(ScriptedChat(delay), ScriptedPainter(), name="scripted", caption_prompt="Describe the image.",
                  grounded_caption_prompt="Describe the image with boxes.",
                  scene_maker=lambda seed: Image.new("RGB", (128, 128), colour_of("scene", seed)))
