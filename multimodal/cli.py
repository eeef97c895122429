"""The `multimodal` command line.

Each subcommand lives in its own module under `multimodal/commands/` and exposes `register(subparsers)`, which adds
its parser and sets `func` to a callable taking the parsed arguments. Modules are discovered, so `--help` lists
exactly the commands that exist.

A user error (ValueError, FileNotFoundError) becomes one line `error: ...` on stderr and exit code 1; under
torchrun only the first rank prints it, while every rank returns the code.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from multimodal import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multimodal",
        description="GLM multimodal suite: grounded image chat, captioning, text-to-image, quantization, serving.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        importlib.import_module(f"multimodal.commands.{info.name}").register(subparsers)
    return parser


class UserError(Exception):
    """An error whose message is meant for the user as is (no traceback)."""


def _is_main_process() -> bool:
    if "torch.distributed" not in sys.modules:  # no process group can exist; skip importing torch for an error
        return True
    from multimodal.tp import is_main_process

    return is_main_process()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except (UserError, ValueError, FileNotFoundError) as error:
        if _is_main_process():  # under torchrun every rank fails alike; the user reads the sentence once
            print(f"error: {error}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
