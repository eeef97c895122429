"""Tiny vocabularies in the real ChatGLM3 (SentencePiece) and GLM-4 (tiktoken) formats, made in a temporary folder."""

from __future__ import annotations

from pathlib import Path

from glm.tokenizer import GLMTokenizer, write_tiktoken_model

CORPUS = [
    "The red cube is left of the blue sphere.",
    "A small green cylinder stands behind a large yellow cone.",
    "红色的立方体在蓝色球体的左边。",
    "一个小的绿色圆柱体站在一个大的黄色圆锥后面。",
    "How many objects are there? There are 3 objects.",
    "图中有几个物体？有三个物体。",
] * 20


def chatglm3_tokenizer(folder: Path) -> tuple[GLMTokenizer, Path]:
    """(tokenizer, the model file's prefix) of a SentencePiece BPE vocabulary with byte fallback."""
    import sentencepiece

    prefix = folder / "tokenizer"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(prefix), model_type="bpe", vocab_size=350,
        byte_fallback=True, character_coverage=1.0, minloglevel=2,
    )
    return GLMTokenizer.load(f"{prefix}.model"), prefix


def glm4_tokenizer(folder: Path) -> tuple[GLMTokenizer, dict[bytes, int]]:
    """(tokenizer, its ranks): the 256 bytes and a few merges, in GLM-4's tokenizer.model format."""
    ranks = {bytes([b]): b for b in range(256)}
    for merge in (b"th", b"he", b"the", b" t", b"er", b"re", b" the", b"ob", b"je", b"ct"):
        ranks[merge] = len(ranks)
    path = write_tiktoken_model(ranks, folder / "tokenizer.model")
    return GLMTokenizer.load(path), ranks
