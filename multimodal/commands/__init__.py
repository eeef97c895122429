"""CLI subcommands; each module exposes `register(subparsers)` (see `multimodal/cli.py`)."""
