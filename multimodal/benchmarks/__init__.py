"""Benchmarks for `multimodal bench`; each module exposes `register(subparsers)`."""
