"""The GLM language core: model (`glm.model`), tokenizers and chat templates (`glm.tokenizer`), generation
(`glm.generate`) and checkpoint import (`glm.convert`)."""

from glm.model import PRESETS, GLMConfig, GLMModel

__all__ = ["GLMConfig", "GLMModel", "PRESETS"]
