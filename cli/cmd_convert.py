"""``avsync convert KIND ...``: turn released (pickled) checkpoints into the
safetensors files the nodes load. Each KIND lives in ``cli/convert_*.py`` with
``register(subparsers)``."""

from __future__ import annotations

import importlib
import pkgutil


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert released checkpoints to safetensors (loaded with weights_only=True)")
    kinds = p.add_subparsers(dest="kind", metavar="KIND")
    from .. import cli

    for m in sorted(pkgutil.iter_modules(cli.__path__), key=lambda m: m.name):
        if m.name.startswith("convert_"):
            importlib.import_module(f".{m.name}", cli.__name__).register(kinds)
    p.set_defaults(func=lambda args: p.print_help() or 1)
