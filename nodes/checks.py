"""Widget checks shared by several nodes' ``VALIDATE_INPUTS``.

ComfyUI (0.3.64 ``execution.py:validate_inputs``) skips its own min / max check for every input a
node's ``VALIDATE_INPUTS`` takes, so a node that checks a widget beyond the schema must check the
schema's range too."""

from __future__ import annotations

from typing import Optional, Union


def size_refusal(input_types: dict, width: Optional[int], height: Optional[int]) -> Union[str, None]:
    """``input_types`` is the node's ``INPUT_TYPES()`` (the widgets may be required or optional). ``"width: …"`` / ``"height: …"`` when a frame size is outside the widget's range or not a multiple
    of 8 px; None when both are fine. A linked value arrives as None and is checked when the node runs."""
    spec = {**input_types.get("optional", {}), **input_types.get("required", {})}
    for name, v in (("width", width), ("height", height)):
        if v is None:
            continue
        lo, hi = spec[name][1]["min"], spec[name][1]["max"]
        if not lo <= int(v) <= hi:
            return f"{name}: must be between {lo} and {hi}, got {v}"
        if int(v) % 8:
            return f"{name}: must be a positive multiple of 8 px, got {v}"
    return None
