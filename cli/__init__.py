"""The ``avsync`` command line (also ``python -m avsync``).

Subcommands live in ``cli/cmd_*.py``; each module has ``register(subparsers)`` that
adds its parser and sets ``func``. They run the same code the nodes run, through
:func:`avsync.cli.common.run_node`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="avsync",
        description="AVSync: audio-synchronized video generation (the ComfyUI node pack's command line).",
    )
    parser.add_argument("--version", action="version", version=f"avsync {__version__}")
    parser.add_argument("--models", metavar="DIR", help="models directory (default: $AVSYNC_MODELS_DIR or ./models)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod_info.name.startswith("cmd_"):
            mod = importlib.import_module(f".{mod_info.name}", __name__)
            mod.register(sub)
    return parser


def main(argv=None) -> int:
    from .. import compat
    from ..core.errors import AVSyncError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.models:
        compat.set_models_dir(args.models)
    from .common import terminal_progress

    compat.set_default_progress_callback(terminal_progress)  # a bar on a terminal, silent otherwise
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except AVSyncError as err:
        print(f"avsync {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"avsync {args.command}: interrupted", file=sys.stderr)
        return 130
