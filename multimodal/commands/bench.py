"""`multimodal bench NAME`: benchmarks that compare against a peer in the same run and print a table.

Each benchmark is a module under `multimodal/benchmarks/` exposing `register(subparsers)`.
"""

from __future__ import annotations

import importlib
import pkgutil

from multimodal import benchmarks


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark (prints a table with ratios against a peer)")
    inner = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for info in sorted(pkgutil.iter_modules(benchmarks.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"multimodal.benchmarks.{info.name}").register(inner)
