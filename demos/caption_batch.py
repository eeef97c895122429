"""Batch captioning entry point: the same as `multimodal caption ...` (see `multimodal/commands/caption.py`).

    python -m demos.caption_batch photos/ --out captions.jsonl --grounded --batch-size 16
    torchrun --standalone --nproc-per-node 2 -m demos.caption_batch photos/ --out captions.jsonl
"""

from __future__ import annotations

import sys

from multimodal.cli import main

if __name__ == "__main__":
    sys.exit(main(["caption", *sys.argv[1:]]))
