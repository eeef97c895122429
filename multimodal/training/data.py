"""Training data that costs nothing per step: scenes rendered once into a memory-mapped uint8 cache that every later
run reuses, and the frozen text encoder's states computed once per distinct prompt.

The scene cache lives under `$MULTIMODAL_CACHE` (default `~/.cache/glm-multimodal`), one pair of files per key:
`<key>.npy` (the pixels, [count, S, S, 3] uint8) and `<key>.json` (the scenes themselves: their objects,
boxes and backgrounds, from which every task is derived). The key names the world's version and settings, the
split, the image size and the count, so a change to any of them builds a new cache rather than reading a stale one.
Both files are written under a temporary name and renamed, so a build killed half-way leaves nothing to misread.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from multimodal.world import (
    WORLD_VERSION,
    Background,
    Scene,
    SceneObject,
    WorldConfig,
    make_scene,
    split_seeds,
)


def cache_root() -> Path:
    return Path(os.environ.get("MULTIMODAL_CACHE", Path.home() / ".cache" / "glm-multimodal"))


def scene_to_dict(scene: Scene) -> dict:
    return dataclasses.asdict(scene)


def scene_from_dict(data: dict) -> Scene:
    objects = tuple(SceneObject(**{**obj, "box": tuple(obj["box"])}) for obj in data["objects"])
    return Scene(seed=data["seed"], size=data["size"], background=Background(**data["background"]),
                 layout=tuple(data["layout"]), objects=objects)


def cache_key(world: WorldConfig, split: str, image_size: int, count: int) -> str:
    settings = json.dumps({"version": WORLD_VERSION, **dataclasses.asdict(world)}, sort_keys=True)
    world_hash = hashlib.sha256(settings.encode()).hexdigest()[:12]
    return f"world{WORLD_VERSION}-{world_hash}-{split}-{image_size}px-{count}"


class SceneCache:
    """The first `count` scenes of a split at `image_size`: `scenes` (in seed order) and `pixels` ([count, S, S, 3]
    uint8, memory-mapped read-only). Built on first use, with a progress line every 2,000 scenes."""

    def __init__(self, world: WorldConfig, split: str, image_size: int, count: int, root: Path | None = None):
        from multimodal.training.loop import scene_pixels  # the one resize rule for every training image

        root = Path(root) if root is not None else cache_root()
        root.mkdir(parents=True, exist_ok=True)
        key = cache_key(world, split, image_size, count)
        pixels_path, scenes_path = root / f"{key}.npy", root / f"{key}.json"
        seeds = split_seeds(split, count)
        if not (pixels_path.exists() and scenes_path.exists()):
            tmp_pixels = pixels_path.with_suffix(f".tmp{os.getpid()}.npy")
            pixels = np.lib.format.open_memmap(tmp_pixels, mode="w+", dtype=np.uint8,
                                               shape=(count, image_size, image_size, 3))
            scenes = []
            for index, seed in enumerate(seeds):
                scene = make_scene(seed, world)
                scenes.append(scene_to_dict(scene))
                pixels[index] = scene_pixels(scene, image_size).permute(1, 2, 0).numpy()
                if (index + 1) % 2000 == 0:
                    print(f"scene cache {key}: {index + 1}/{count} rendered", flush=True)
            pixels.flush()
            del pixels
            tmp_scenes = scenes_path.with_suffix(f".json.tmp{os.getpid()}")
            tmp_scenes.write_text(json.dumps(scenes))
            tmp_pixels.replace(pixels_path)
            tmp_scenes.replace(scenes_path)
        self.key = key
        self.scenes = [scene_from_dict(data) for data in json.loads(scenes_path.read_text())]
        self.pixels = np.load(pixels_path, mmap_mode="r")  # [count, S, S, 3]
        if self.pixels.shape != (count, image_size, image_size, 3) or len(self.scenes) != count:
            raise ValueError(f"The scene cache {pixels_path} is damaged; delete it and its .json to rebuild it.")
        if [scene.seed for scene in self.scenes] != list(seeds):
            raise ValueError(f"The scene cache {scenes_path} holds other seeds; delete it to rebuild it.")

    def image(self, index: int) -> torch.Tensor:
        """[3, S, S] uint8 of the index-th scene."""
        return torch.from_numpy(np.array(self.pixels[index])).permute(2, 0, 1)


class CachedTextEncoder:
    """A frozen `GLMTextEncoder` with padding masked (the suite's own models), remembered per prompt.

    With masked padding a prompt's states do not depend on what it is batched with, so each distinct prompt is
    encoded once and batches are assembled from the stored rows: left-padded to the encoder's multiple, padded rows
    zero, the mask True on real tokens, exactly the layout the encoder returns."""

    def __init__(self, encoder):
        if not encoder.mask_padding:
            raise ValueError("Only an encoder that masks its padding gives states that can be cached per prompt.")
        self.encoder = encoder
        self.states: dict[str, torch.Tensor] = {}  # prompt -> [n, hidden] on the real tokens

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """states [B, T, hidden] and mask [B, T], T a multiple of the encoder's `pad_multiple`."""
        missing = sorted({p for p in prompts if p not in self.states})
        if missing:
            with torch.autocast("cpu", enabled=False):  # the cache must hold float32 states, whatever calls it
                states, mask = self.encoder(missing)
            for row, prompt in enumerate(missing):
                self.states[prompt] = states[row, mask[row]].float().cpu()
        multiple = self.encoder.pad_multiple
        longest = max(len(self.states[p]) for p in prompts)
        length = max(multiple, -(-longest // multiple) * multiple)
        hidden = self.encoder.hidden_size
        out = torch.zeros(len(prompts), length, hidden)  # [B, T, hidden]
        valid = torch.zeros(len(prompts), length, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            n = len(self.states[prompt])
            if n:
                out[row, length - n:] = self.states[prompt]
                valid[row, length - n:] = True
        return out, valid


def drawn_look(pixels: torch.Tensor, seed: int) -> torch.Tensor:
    """A rendered scene ([3, S, S] uint8) given the faults of the painter's 64x64 drawings (`docs/draw-sheet.png`):
    each object pixel taken from a random neighbour a pixel or two away (details break up inside a silhouette that
    holds), dark and stray pixels scattered over the objects, the colours shifted a little and a faint grain. The
    VLM judges those drawings (`multimodal eval draw`); trained on clean renders alone, its captions named every
    object in 0.955 of the renders but 0.695 of the drawings, and with half its drawing-world scenes given this look,
    0.970 and 0.765."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=generator).item()

    size = pixels.shape[-1]
    image = pixels.float() / 255  # [3, S, S]
    background = image[:, :1, :1]  # [3, 1, 1]: scenes have a plain background colour and empty corners
    on_objects = (image - background).abs().amax(0, keepdim=True) > 0.1  # [1, S, S]
    reach = int(torch.randint(1, 3, (), generator=generator))
    rows = (torch.arange(size)[:, None] + torch.randint(-reach, reach + 1, (size, size), generator=generator))
    cols = (torch.arange(size)[None, :] + torch.randint(-reach, reach + 1, (size, size), generator=generator))
    shuffled = image[:, rows.clamp(0, size - 1), cols.clamp(0, size - 1)]  # [3, S, S]
    image = torch.where(on_objects, shuffled, image)  # silhouettes hold, what is inside them breaks up
    scattered = on_objects & (torch.rand(1, size, size, generator=generator) < uniform(0, 0.15))
    dark_or_any = torch.where(torch.rand(1, size, size, generator=generator) < 0.6,
                              torch.rand(1, size, size, generator=generator) * 0.3,
                              torch.rand(3, size, size, generator=generator))  # [3, S, S]
    image = torch.where(scattered, dark_or_any, image)
    image = image * (1 + (torch.rand(3, 1, 1, generator=generator) - 0.5) * 0.2)  # each channel +-10%
    image = image + torch.randn(image.shape, generator=generator) * uniform(0, 0.03)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)
