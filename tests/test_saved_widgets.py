"""Saved workflows store widget values by position (``widgets_values``), so a node's widget order and
its defaults are part of every workflow a user has saved. This pins both per node
(tests/data/widgets/saved_widgets.json): a reorder, a removed or inserted widget, or a changed default
fails here first and must come with a migration note in CHANGELOG.md. New widgets go at the end (after
the last one), and the snapshot is regenerated with ``python tests/test_saved_widgets.py --write``.

Seen in ComfyUI 0.3.64 with frontend 1.58.1 (classic and Nodes 2.0): each example workflow's values
come back on the widgets they were saved from; this keeps it so for workflows saved from older versions."""

import json
import math
import sys
from pathlib import Path

SNAPSHOT = Path(__file__).parent / "data" / "widgets" / "saved_widgets.json"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
SEED_NAMES = {"seed", "noise_seed"}


def saved_widgets() -> dict:
    """node id → the widgets in the order ComfyUI's frontend saves their values: [name, type, default];
    an INT seed is followed by its control_after_generate value ("control"). Combos of model files list
    what is on disk, so only their explicit default is kept."""
    from avsync.nodes import NODE_CLASS_MAPPINGS

    out = {}
    for node_id, cls in sorted(NODE_CLASS_MAPPINGS.items()):
        rows = []
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                kind, opts = entry[0], (entry[1] if len(entry) > 1 else {})
                if opts.get("forceInput"):
                    continue
                if isinstance(kind, (list, tuple)):
                    default = opts.get("default", kind[0] if kind else None)
                    rows.append([name, "COMBO", default])
                elif kind in WIDGET_TYPES:
                    default = opts.get("default")
                    if isinstance(default, float) and not math.isfinite(default):
                        default = str(default)
                    rows.append([name, kind, default])
                    if kind == "INT" and (opts.get("control_after_generate") or name in SEED_NAMES):
                        rows.append([f"{name}:control_after_generate", "control", None])
        out[node_id] = rows
    return out


def test_widget_order_and_defaults_unchanged():
    want = json.loads(SNAPSHOT.read_text())
    got = json.loads(json.dumps(saved_widgets()))      # tuples → lists, as stored
    for node_id in sorted(set(want) | set(got)):
        if node_id not in got:
            raise AssertionError(f"{node_id}: node removed (saved workflows use it)")
        if node_id not in want:
            continue                                       # a new node: nothing saved yet
        old, new = want[node_id], got[node_id]
        assert new[:len(old)] == old, (f"{node_id}: widgets changed in a way saved workflows notice "
                                       f"(order, type or default)\n saved: {old}\n now:   {new}")


if __name__ == "__main__" and "--write" in sys.argv:
    SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    SNAPSHOT.write_text(json.dumps(saved_widgets(), indent=1, ensure_ascii=False) + "\n")
