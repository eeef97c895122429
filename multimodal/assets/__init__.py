"""The embedded default models and tokenizer, trained by `multimodal train ...` on the EmojiScenes world.

A suite folder (written by `multimodal train export`): `tokenizer.json` (byte-level BPE with GLM's special tokens),
`vlm/`, `diffusion/` (the relay pipeline, with the single-stage baseline in `diffusion/single/`) and `judge/`.
A new copy of the weights ships only when it beats the measured table in the README (every copy stays in git
history).
OpenMoji-derived: CC BY-SA 4.0, see `multimodal.world.ATTRIBUTION`.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
# What the embedded models know, said by the CLI, the demo and the README.
EMBEDDED_LIMITS = ("The embedded models know only the EmojiScenes world: 77 OpenMoji classes (animals, hats and "
                   "glasses, food, vehicles, plants, things) on simple backgrounds; `multimodal scene` shows one. "
                   "They are not for photos: pass --checkpoint with a real CogVLM or GLM-4V checkpoint for those. "
                   "Keep one language within a conversation: the embedded VLM learned conversations in one.")
DRAWING_LIMITS = ("The embedded text-to-image model draws one or two of 24 objects (12 animals, 12 others) at 64x64, "
                  "an animal wearing a hat, a crown or glasses, two side by side or stacked, on a plain named "
                  "background colour, from English or Chinese prompts in the world's wording: \"a dog with a hat\", "
                  "\"a cat on the left and a car on the right\", \"一只戴着帽子的狗，蓝色背景\".")


def asset_path(name: str) -> Path:
    """The shipped file or folder `name`; a clear error when this installation does not have it."""
    path = ASSETS_DIR / name
    if not path.exists():
        raise FileNotFoundError(
            f"The embedded {name} is not shipped in {ASSETS_DIR}; train it (`multimodal train`) or pass --checkpoint."
        )
    return path


def load_world_tokenizer(path: str | Path | None = None):
    """The world tokenizer (a `glm.tokenizer.GLMTokenizer`) from `path`, or the shipped one."""
    from glm.tokenizer import GLMTokenizer

    return GLMTokenizer.load(path or asset_path("tokenizer.json"))
