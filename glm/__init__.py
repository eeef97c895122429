"""The GLM language core: model (`glm.model`), tokenizers and chat templates (`glm.tokenizer`), generation
(`glm.generate`) and checkpoint import (`glm.convert`)."""

from glm.convert import load_glm, save_glm
from glm.generate import SamplingConfig, generate, generate_tokens, pack_for_cpu, stream_text
from glm.model import PRESETS, GLMConfig, GLMModel
from glm.tokenizer import GLMTokenizer, train_bpe

__all__ = [
    "GLMConfig", "GLMModel", "PRESETS", "GLMTokenizer", "train_bpe", "SamplingConfig", "generate", "generate_tokens",
    "stream_text", "pack_for_cpu", "load_glm", "save_glm",
]
