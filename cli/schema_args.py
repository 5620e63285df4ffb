"""Command-line flags generated from node schemas: one source of truth for names, types,
ranges, defaults and help.

Every widget input of a node (``INT``, ``FLOAT``, ``BOOLEAN``, ``STRING``, combo lists) becomes a
flag: ``--name-with-dashes``, the node's type, its ``min``/``max`` checked while parsing (an
out-of-range value is an argparse error naming the flag, exit code 2), its combo choices, its
``default`` and its ``tooltip`` as help with the default shown. Socket inputs (AUDIO, IMAGE,
``AVSYNC_*``) carry no value on the command line: the command supplies them (a file it loads,
another node's output).

Adding a command for a node (e.g. ``avsync score`` for ``AVSyncSyncScore``)::

    from .schema_args import add_node_arguments, node_inputs_from_args

    def register(sub):
        p = sub.add_parser("score", help="...")
        add_common_options(p)                       # -v/-q/--models/--force (cli/common.py)
        p.add_argument("--out", required=True, ...)  # CLI-only options stay explicit
        add_node_arguments(p, "AVSyncSyncScore",
                           skip={"fps": "taken from the video file"},   # input -> why it has no flag
                           rename={"keyframes": "keyframes-json"},      # input -> flag name (no --)
                           defaults={"max_offset": 0.5})                # CLI default differs from the node's
        p.set_defaults(func=run)

    def run(args):
        inputs = node_inputs_from_args(args, "AVSyncSyncScore")  # {input name: value}, skipped ones absent
        (report,) = run_node("AVSyncSyncScore", frames=..., audio=..., **inputs)

Several nodes may share one parser (``localize`` = AVSyncAudioLoader + AVSyncKeyframeLocalizer);
``prefix``/``rename`` resolve clashes. ``paths`` turns a model-file combo into free text (a name in
the model folder or a path). The bindings are kept on the parser, so error messages that name a
node input (``InputError("max_duration", ...)``, hints such as "raise 'max_duration'") are rewritten
to the flag (:func:`flag_for_input`, :func:`translate_message`), and ``tests/test_cli.py`` checks that
every widget input has a flag (or a reason in ``skip``) with help text.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

WIDGET_TYPES = ("INT", "FLOAT", "BOOLEAN", "STRING")


@dataclass
class NodeBinding:
    """Which flag (``dest``) feeds which input of one node, and which inputs were left out and why."""

    node_id: str
    dests: dict[str, str] = field(default_factory=dict)      # input name -> argparse dest
    flags: dict[str, str] = field(default_factory=dict)      # input name -> "--flag"
    skipped: dict[str, str] = field(default_factory=dict)    # input name -> reason
    sockets: list[str] = field(default_factory=list)         # inputs a command supplies itself


def node_schema(node_id: str) -> dict:
    from .common import node_class

    return node_class(node_id).INPUT_TYPES()


def iter_inputs(node_id: str):
    """``(name, type, options, section)`` of every input of a node, in schema order."""
    spec = node_schema(node_id)
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            kind = entry[0]
            opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            yield name, kind, opts, section


def is_widget(kind) -> bool:
    return isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _number(kind: str, lo, hi) -> Callable[[str], Any]:
    """An argparse ``type`` that parses and checks the schema's range (NaN/inf refused)."""
    cast = int if kind == "INT" else float

    def parse(text: str):
        try:
            value = cast(text) if cast is float else int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if cast is int else 'a number'}, "
                                             f"got {text!r}") from None
        if cast is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            rng = (f"between {_fmt(lo)} and {_fmt(hi)}" if lo is not None and hi is not None else
                   f">= {_fmt(lo)}" if lo is not None else f"<= {_fmt(hi)}")
            raise argparse.ArgumentTypeError(f"must be {rng}, got {text}")
        return value

    parse.__name__ = "integer" if cast is int else "number"
    return parse


def _help(tooltip: str, default, lo=None, hi=None, choices=None) -> str:
    text = (tooltip or "").strip().replace("%", "%%")
    extra = []
    if lo is not None and hi is not None:
        extra.append(f"{_fmt(lo)}..{_fmt(hi)}")
    elif lo is not None:
        extra.append(f">= {_fmt(lo)}")
    if default is not None:
        extra.append(f"default: {_fmt(default)}")
    return text + (f" [{'; '.join(extra)}]" if extra else "")


def _bindings(parser: argparse.ArgumentParser) -> list[NodeBinding]:
    found = getattr(parser, "_avsync_bindings", None)
    if found is None:
        found = []
        parser._avsync_bindings = found
        parser.set_defaults(_avsync_bindings=found)
    return found


def add_node_arguments(parser: argparse.ArgumentParser, node_id: str, *,
                       skip: Mapping[str, str] | Iterable[str] = (),
                       rename: Optional[Mapping[str, str]] = None,
                       defaults: Optional[Mapping[str, Any]] = None,
                       paths: Iterable[str] = (), prefix: str = "",
                       choice_aliases: Optional[Mapping[str, Mapping[str, str]]] = None,
                       notes: Optional[Mapping[str, str]] = None,
                       title: Optional[str] = None) -> NodeBinding:
    """Add one flag per widget input of ``node_id`` to ``parser``; returns the binding.

    ``skip``: inputs without a flag (a mapping input -> reason, shown by ``avsync CMD --help``'s
    tests; a plain list means "the command supplies it"). ``rename``: input -> flag name without
    ``--``. ``defaults``: CLI defaults that differ from the node's (help shows them).
    ``paths``: combo inputs listing model files, taken as free text (a name or a path).
    ``prefix``: put before every flag name (two nodes with the same input names).
    ``choice_aliases``: input -> {old value: schema value}, accepted for combos (renamed values keep working).
    ``notes``: input -> text added to the tooltip (what the command does differently).
    """
    skip = dict(skip) if isinstance(skip, Mapping) else {name: "supplied by the command" for name in skip}
    rename = dict(rename or {})
    defaults = dict(defaults or {})
    paths = set(paths)
    aliases_of = {k: dict(v) for k, v in (choice_aliases or {}).items()}
    binding = NodeBinding(node_id)
    group = parser.add_argument_group(title or f"{node_id} inputs")
    for name, kind, opts, _section in iter_inputs(node_id):
        if name in skip:
            binding.skipped[name] = skip[name]
            continue
        if not is_widget(kind):
            binding.sockets.append(name)
            continue
        flag = "--" + prefix + rename.get(name, name).replace("_", "-")
        dest = f"node__{node_id}__{name}"
        default = defaults.get(name, opts.get("default"))
        tooltip = (opts.get("tooltip", "") + " " + (notes or {}).get(name, "")).strip()
        if isinstance(kind, (list, tuple)) and name in paths:
            group.add_argument(flag, dest=dest, default=default, metavar="NAME_OR_PATH",
                               help=_help(tooltip + " A name in the model folder, or a path to the file.", default))
        elif isinstance(kind, (list, tuple)):
            choices = [str(c) for c in kind]
            if default is None and choices:
                default = choices[0]
            aliases = aliases_of.get(name, {})
            note = "".join(f" '{a}' means '{v}'." for a, v in aliases.items())
            group.add_argument(flag, dest=dest, default=default, choices=choices + list(aliases),
                               type=(lambda text, a=aliases: a.get(text, text)) if aliases else None,
                               metavar="{" + ",".join(choices) + "}", help=_help(tooltip + note, default))
        elif kind in ("INT", "FLOAT"):
            lo, hi = opts.get("min"), opts.get("max")
            group.add_argument(flag, dest=dest, default=default, type=_number(kind, lo, hi),
                               metavar="N" if kind == "INT" else "X", help=_help(tooltip, default, lo, hi))
        elif kind == "BOOLEAN":
            # BooleanOptionalAction appended "(default: ...)" itself up to Python 3.11.5; not since
            group.add_argument(flag, dest=dest, default=bool(default), action=argparse.BooleanOptionalAction,
                               help=_help(tooltip, bool(default)))
        else:  # STRING
            group.add_argument(flag, dest=dest, default=default, metavar="TEXT", help=_help(tooltip, default))
        binding.dests[name] = dest
        binding.flags[name] = flag
    _bindings(parser).append(binding)
    return binding


def binding_for(args_or_parser, node_id: str) -> NodeBinding:
    bindings = getattr(args_or_parser, "_avsync_bindings", None) or []
    for b in bindings:
        if b.node_id == node_id:
            return b
    raise KeyError(f"no flags were generated for {node_id}")


def node_inputs_from_args(args: argparse.Namespace, node_id: str) -> dict[str, Any]:
    """``{input name: value}`` of every flag generated for ``node_id`` (skipped inputs absent)."""
    b = binding_for(args, node_id)
    return {name: getattr(args, dest) for name, dest in b.dests.items()}


def flag_for_input(args_or_parser, name: str) -> Optional[str]:
    """The flag that feeds a node input of this command (any of its nodes), or None."""
    for b in getattr(args_or_parser, "_avsync_bindings", None) or []:
        if name in b.flags:
            return b.flags[name]
    extra = getattr(args_or_parser, "_avsync_input_flags", None) or {}
    return extra.get(name)


def set_input_flags(parser: argparse.ArgumentParser, mapping: Mapping[str, str]) -> None:
    """Name the hand-written option that feeds an input (``{"audio_file": "AUDIO"}``), for messages."""
    parser.set_defaults(_avsync_input_flags=dict(mapping))


_QUOTED = re.compile(r"'([a-z][a-z0-9_]*)'")


def translate_message(args, message: str, input_name: Optional[str] = None) -> str:
    """A node's message in command-line terms: ``'max_duration'`` → ``--max-duration`` and a leading
    ``input: `` → ``--flag: ``, for every input this command has a flag for."""
    if input_name:
        flag = flag_for_input(args, input_name)
        if flag and message.startswith(f"{input_name}: "):
            message = f"{flag}: {message[len(input_name) + 2:]}"

    def sub(m):
        flag = flag_for_input(args, m.group(1))
        return flag if flag else m.group(0)

    return _QUOTED.sub(sub, message)


def all_bindings(parser: argparse.ArgumentParser) -> dict[str, list[NodeBinding]]:
    """``{command: bindings}`` of every subcommand of the top-level parser (for tests and docs)."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[name] = list(getattr(sub, "_avsync_bindings", None) or [])
    return out
