"""Vision-language models: EVA2-CLIP ViT, GLU adapter, GLM core with visual experts, processor, grounding, chat."""
