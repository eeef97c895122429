"""Training the embedded default models on the EmojiScenes world: tokenizer, judge, VLM and relay diffusion.

Every loop checkpoints and resumes (`multimodal train <model> --seed S --out DIR`), draws its examples only from the
world's train split (asserted where batches are built), and keeps one thread per job so several can share a CPU.
"""
