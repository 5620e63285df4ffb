"""The ``avsync`` command line (also ``python -m avsync``).

Subcommands live in ``cli/cmd_*.py``; each module has ``register(subparsers)`` that
adds its parser and sets ``func``. They run the same code the nodes run, through
:func:`avsync.cli.common.run_node`, and get their node flags from the node schemas
(:mod:`avsync.cli.schema_args`).

Exit codes: 0 done; 2 a user error (bad option, missing or broken file, output that cannot
be written), one line naming the option or file, no traceback; 1 an internal error, a short
message and the log file holding the traceback (printed too with ``-v``); 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
from pathlib import Path


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints its usage block before a bad option's message; a user error here is
    one line naming the option (exit code 2), with where to read the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = OneLineErrorParser(
        prog="avsync",
        description="AVSync: audio-synchronized video generation (the ComfyUI node pack's command line).",
    )
    parser.add_argument("--version", action="version", version=f"avsync {__version__}")
    parser.add_argument("--models", metavar="DIR", help="models directory (default: $AVSYNC_MODELS_DIR or ./models)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log details; print the full traceback of an internal error")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress and no summary line")
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod_info.name.startswith("cmd_"):
            mod = importlib.import_module(f".{mod_info.name}", __name__)
            mod.register(sub)
    return parser


def error_log_path() -> Path:
    """Where an internal error's traceback is written: $XDG_STATE_HOME/avsync/last-error.log
    (~/.local/state/...), or the temp folder when that cannot be written."""
    import tempfile

    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    for d in (Path(base) / "avsync", Path(tempfile.gettempdir())):
        try:
            d.mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK):
                return d / ("last-error.log" if d.name == "avsync" else "avsync-last-error.log")
        except OSError:
            continue
    return Path(tempfile.gettempdir()) / "avsync-last-error.log"


def _internal_error(command: str, err: BaseException, verbose: bool) -> int:
    import traceback

    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    log = error_log_path()
    try:
        log.write_text(f"avsync {command}: {' '.join(sys.argv)}\n{text}")
        where = f"traceback in {log}"
    except OSError:
        where = "no log could be written"
    if verbose:
        sys.stderr.write(text)
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    print(f"avsync {command}: internal error: {type(err).__name__}{': ' + first[:300] if first else ''} "
          f"({where}; rerun with -v to print it)", file=sys.stderr)
    return 1


def _command_parser(parser: argparse.ArgumentParser, argv) -> argparse.ArgumentParser:
    """The parser of the command named in ``argv`` (``avsync convert demix …`` → the ``convert demix``
    one), or the top-level parser."""
    found = parser
    args = list(sys.argv[1:] if argv is None else argv)
    while True:
        subs = [a for a in found._actions if isinstance(a, argparse._SubParsersAction)]
        name = next((x for x in args if subs and x in subs[0].choices), None)
        if name is None:
            return found
        found = subs[0].choices[name]
        args = args[args.index(name) + 1:]


def main(argv=None) -> int:
    from .. import compat
    from ..core.errors import AVSyncError
    from .common import ProgressReporter
    from .schema_args import translate_message

    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # the command's own parser says it, pointing at that command's --help
            _command_parser(parser, argv).error(
                f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exit_:  # --help, --version, or a usage error (already printed, code 2)
        return int(exit_.code or 0)
    verbose, quiet = bool(getattr(args, "verbose", False)), bool(getattr(args, "quiet", False))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    if getattr(args, "models", None):
        compat.set_models_dir(args.models)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    command = args.command
    compat.set_default_progress_callback(ProgressReporter(command, quiet=quiet), with_desc=True)
    try:
        return int(args.func(args) or 0)
    except AVSyncError as err:
        msg = translate_message(args, str(err), getattr(err, "input_name", None))
        print(f"avsync {command}: error: {msg}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, compat.Interrupted):
        print(f"avsync {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # an internal error: short message, traceback in the log (and with -v)
        return _internal_error(command, err, verbose)
    finally:
        compat.set_default_progress_callback(None)
