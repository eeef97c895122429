"""Glue of the GLM multimodal suite: checkpoint and image io, quantization, tensor parallel, the EmojiScenes world,
training, evaluation, benchmarks, the CLI and the API server."""
