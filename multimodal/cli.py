"""The `multimodal` command line.

Each subcommand lives in its own module under `multimodal/commands/` and exposes `register(subparsers)`, which adds
its parser and sets `func` to a callable taking the parsed arguments. Modules are discovered, so `--help` lists
exactly the commands that exist.

A user error (ValueError, FileNotFoundError, a device this machine lacks) becomes one line `error: ...` on stderr
and exit code 1; under torchrun only the first rank prints it, while every rank returns the code. Output piped into
a reader that stops early (`| head`) ends quietly.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import warnings

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


def check_device(device: str) -> None:
    """One sentence, before any model loads, when `device` names hardware this machine does not have."""
    kind = device.split(":")[0]
    if kind == "cpu":
        return
    import torch

    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine has no CUDA GPU that torch can use; use --device cpu.")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: this machine has no Apple GPU (MPS); use --device cpu.")
    if kind not in ("cuda", "mps"):
        raise UserError(f"--device {device}: unknown device; use cpu, cuda, cuda:N or mps.")
    if kind == "cuda" and ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s).")


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except BrokenPipeError:
        # The reader closed the pipe (`multimodal ... | head`): stop quietly. Point stdout at devnull so the
        # interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def _run(argv: list[str] | None) -> int:
    warnings.formatwarning = _one_line_warning  # a user reads the sentence, not the source line behind it
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if isinstance(getattr(args, "device", None), str):
            check_device(args.device)
        result = args.func(args)
    except (UserError, ValueError, FileNotFoundError) as error:
        if _is_main_process():  # under torchrun every rank fails alike; the user reads the sentence once
            print(f"error: {error}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
