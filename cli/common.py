"""What every subcommand shares: running a node exactly as ComfyUI would, reading
audio files into AUDIO, writing results."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..core.errors import AVSyncError


class NodeValidationError(AVSyncError, ValueError):
    pass


def node_class(node_id: str):
    from ..nodes import FAILED_FAMILIES, NODE_CLASS_MAPPINGS

    if node_id not in NODE_CLASS_MAPPINGS:
        raise AVSyncError(f"node {node_id} is not available ({'; '.join(FAILED_FAMILIES.values()) or 'unknown id'})")
    return NODE_CLASS_MAPPINGS[node_id]


def run_node(node_id: str, **inputs: Any) -> tuple:
    """Run a node the way ComfyUI's executor does: defaults for widgets that were not
    given, ``VALIDATE_INPUTS`` first, then ``FUNCTION``. Returns the output tuple."""
    cls = node_class(node_id)
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            if name in inputs:
                continue
            opts = entry[1] if len(entry) > 1 else {}
            if "default" in opts:
                inputs[name] = opts["default"]
            elif section == "required" and isinstance(entry[0], list) and entry[0]:
                inputs[name] = entry[0][0]
    validate = getattr(cls, "VALIDATE_INPUTS", None)
    if validate is not None:
        import inspect

        params = inspect.signature(validate).parameters
        if any(p.kind == p.VAR_KEYWORD for p in params.values()):
            ok = validate(**inputs)
        else:
            ok = validate(**{k: v for k, v in inputs.items() if k in params})
        if ok is not True:
            raise NodeValidationError(f"{node_id}: {ok}")
    out = getattr(cls(), cls.FUNCTION)(**inputs)
    if isinstance(out, dict):
        out = out["result"]
    return out


def write_json(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def terminal_progress(value: int, total: int) -> None:
    if sys.stderr.isatty():
        width = 30
        done = int(width * value / max(total, 1))
        sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {value}/{total}")
        if value >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def load_audio_file(path: str | Path, fps: float = 24.0, sample_rate: int = 0, channels: str = "keep",
                    start: float = 0.0, duration: float = 0.0, max_duration: float = 600.0):
    """Read an audio file through ``AVSyncAudioLoader``: ``(AUDIO, Timeline)``."""
    return run_node("AVSyncAudioLoader", audio_file=str(path), start=start, duration=duration,
                    sample_rate=sample_rate, channels=channels, fps=fps, max_duration=max_duration)


def save_audio_file(path: str | Path, audio: dict, bits: int = 16) -> None:
    """Write an AUDIO value as WAV (16-bit PCM, or 32-bit float with ``bits=32``)."""
    from ..core.audio import check_audio
    from ..core.audio_io import encode_wav

    wav, sr = check_audio(audio, "audio")
    encode_wav(path, wav.numpy(), sr, bits=bits)
