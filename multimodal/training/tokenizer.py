"""A small bilingual byte-level BPE tokenizer trained on the EmojiScenes text, with GLM-4's special tokens.

Digits are split one by one before BPE, so a per-mille box coordinate is three digit tokens (a tiny model learns ten
digit tokens far more easily than a thousand number tokens). The vocabulary is trained with Hugging Face `tokenizers`
on every task text of the first train scenes, in English and Chinese.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from multimodal.language import scene_tasks
from multimodal.world import WorldConfig, make_scene, split_seeds

# GLM-4's specials, in GLM-4's order (after `<|endoftext|>`, which doubles as padding here).
GLM_SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
    "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
)  # fmt: skip


def world_text(num_scenes: int, config: WorldConfig = WorldConfig()) -> Iterator[str]:
    """Every prompt and answer of the first `num_scenes` train scenes (the test split is never read)."""
    for seed in split_seeds("train", num_scenes):
        for task in scene_tasks(make_scene(seed, config)):
            yield task.prompt
            if task.answer:
                yield task.answer


def train_tokenizer(num_scenes: int = 3000, vocab_size: int = 1536) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(GLM_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(world_text(num_scenes), trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path
