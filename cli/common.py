"""What every subcommand shares: running a node exactly as ComfyUI would, reading
audio files into AUDIO, writing results."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from ..core.errors import AVSyncError, InputError

log = logging.getLogger("avsync.cli")


class NodeValidationError(InputError):
    """A node's ``VALIDATE_INPUTS`` refused the inputs: ``input: problem`` (``node_id`` kept)."""

    def __init__(self, node_id: str, message: str):
        self.node_id = node_id
        name, sep, problem = str(message).partition(": ")
        if not sep or " " in name:
            name, problem = node_id, str(message)
        super().__init__(name, problem)


def node_class(node_id: str):
    from ..nodes import FAILED_FAMILIES, NODE_CLASS_MAPPINGS

    if node_id not in NODE_CLASS_MAPPINGS:
        raise AVSyncError(f"node {node_id} is not available ({'; '.join(FAILED_FAMILIES.values()) or 'unknown id'})")
    return NODE_CLASS_MAPPINGS[node_id]


def validate_node_inputs(node_id: str, inputs: dict) -> dict:
    """What ComfyUI's executor does before running a node: defaults for widgets that were not given
    (filled into ``inputs``), then ``VALIDATE_INPUTS``; a refusal is a :class:`NodeValidationError`.
    Sockets that are not given yet are simply not passed (a command can check the widget values of
    a later node before the expensive work of an earlier one)."""
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
            raise NodeValidationError(node_id, ok)
    return inputs


def run_node(node_id: str, **inputs: Any) -> tuple:
    """Run a node the way ComfyUI's executor does: defaults for widgets that were not
    given, ``VALIDATE_INPUTS`` first, then ``FUNCTION``. Returns the output tuple."""
    cls = node_class(node_id)
    validate_node_inputs(node_id, inputs)
    shown = {k: v for k, v in inputs.items() if isinstance(v, (int, float, str, bool)) or v is None}
    log.info("%s: %s", node_id, ", ".join(f"{k}={v!r}" for k, v in shown.items()))
    start = time.perf_counter()
    out = getattr(cls(), cls.FUNCTION)(**inputs)
    log.info("%s: done in %.2f s", node_id, time.perf_counter() - start)
    if isinstance(out, dict):
        out = out["result"]
    return out


def write_json_to(path: str | Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------------------
# Options every command has, and checking outputs before any work
# --------------------------------------------------------------------------------------

class OutputError(AVSyncError, ValueError):
    """An output path that cannot be written: names the option, the path and what was expected."""

    def __init__(self, option: str, path, problem: str):
        self.option, self.path = option, str(path)
        super().__init__(f"{option}: {path} {problem}")


def add_common_options(p) -> None:
    """-v / -q / --models / --force on a subcommand (the top-level parser has them too; here they
    default to SUPPRESS so that ``avsync -v CMD`` and ``avsync CMD -v`` both work)."""
    import argparse

    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="log details; print the full traceback of an internal error")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress and no summary line (errors are still printed)")
    p.add_argument("--models", metavar="DIR", default=argparse.SUPPRESS,
                   help="models directory (default: $AVSYNC_MODELS_DIR or ./models)")
    p.add_argument("--force", action="store_true", default=argparse.SUPPRESS,
                   help="overwrite existing output files")


def _probe_writable(directory: Path, option: str, path) -> None:
    """Create and delete a file in the nearest existing ancestor of ``directory``."""
    import tempfile

    d = directory
    while not d.exists():
        if d.parent == d:
            break
        d = d.parent
    if not d.is_dir():
        raise OutputError(option, path, f"cannot be created: {d} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=d, prefix=".avsync-probe-"):
            pass
    except OSError as err:
        raise OutputError(option, path, f"cannot be written ({err.strerror or err} in {d})") from None


def check_output_file(path, option: str, force: bool = False, suffixes=None, kind: str = "") -> Path:
    """Refuse, before any work, an output file that cannot or must not be written."""
    path = Path(path)
    if str(path) == "" or path.name in ("", ".", ".."):
        raise OutputError(option, path, "is not a file name")
    if path.is_dir():
        raise OutputError(option, path, "is a directory; expected a file name")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        common = [s for s in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif") if s in suffixes]
        known = (", ".join(sorted(suffixes)) if len(suffixes) <= 8
                 else ", ".join(common) + " or another format Pillow writes")
        raise OutputError(option, path, f"has an unknown {kind or 'file'} extension "
                                        f"'{path.suffix or '(none)'}'; expected one of {known}")
    if path.exists() and not force:
        raise OutputError(option, path, "already exists; pass --force to overwrite it")
    _probe_writable(path.parent, option, path)
    return path


def check_output_dir(path, option: str, names, force: bool = False) -> Path:
    """A folder that will receive ``names``: not a file, writable, no name overwritten without --force."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(option, path, "is a file; expected a folder")
    existing = [n for n in names if (path / n).exists()]
    if any((path / n).is_dir() for n in existing):
        raise OutputError(option, path, f"holds a folder named {next(n for n in existing if (path / n).is_dir())}")
    if existing and not force:
        raise OutputError(option, path, f"already holds {', '.join(existing)}; pass --force to overwrite")
    _probe_writable(path, option, path)
    return path


def image_suffixes() -> set[str]:
    """File extensions Pillow can write."""
    from PIL import Image

    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}


def path_outside_model_folders(name: str, *folders: str) -> Optional[Path]:
    """``name`` as a path to load directly, when it is not an entry of the model folders
    (entries go through the loader nodes, as in a workflow); None otherwise."""
    from .. import compat

    if any(compat.find_model_file(f, name) is not None for f in folders) or not Path(name).exists():
        return None
    return Path(name)


def check_input_file(path, option: str) -> Path:
    """An input file as a command line user expects it checked ("no such file", "is a directory")."""

    p = Path(path)
    if not p.exists():
        raise InputError(option, f"{path}: no such file")
    if p.is_dir():
        raise InputError(option, f"{path}: is a directory, not a file")
    if not os.access(p, os.R_OK):
        raise InputError(option, f"{path}: permission denied")
    return p


class staged_outputs:
    """Write outputs under temporary names in their own folders, rename them all at the end.

    ``with staged_outputs() as stage: write(stage(final_path))`` — on an error (or Ctrl-C) the
    temporary files are removed and no final file is touched."""

    def __init__(self):
        self._pending: list[tuple[Path, Path]] = []

    def __call__(self, final) -> Path:
        final = Path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.stem}.partial-{os.getpid()}-{len(self._pending)}{final.suffix}")
        self._pending.append((tmp, final))
        return tmp

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            for tmp, final in self._pending:
                os.replace(tmp, final)
        else:
            for tmp, _ in self._pending:
                try:
                    tmp.unlink()
                except FileNotFoundError:
                    pass
        return False


# --------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------

class ProgressReporter:
    """The CLI's progress: a bar on a terminal; off a terminal one line every ``interval`` seconds
    (what, done/total, elapsed, ETA); nothing with ``quiet``."""

    def __init__(self, command: str, stream=None, quiet: bool = False, interval: float = 5.0, clock=None):
        import time

        self.command = command
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.interval = interval
        self.clock = clock or time.monotonic
        self._start: dict[str, tuple[float, int]] = {}   # what -> (time and value of its first update)
        self._last = 0.0

    def __call__(self, value: int, total: int, desc: str = "") -> None:
        if self.quiet:
            return
        what = (desc or "working").removeprefix("AVSync ").strip() or "working"
        now = self.clock()
        if what not in self._start or value < self._start[what][1]:
            self._start[what] = (now, value)
            self._last = now
        start, first = self._start[what]
        if _isatty(self.stream):
            width = 30
            done = int(width * value / max(total, 1))
            self.stream.write(f"\r{what}: [{'#' * done}{'.' * (width - done)}] {value}/{total}")
            if value >= total:
                self.stream.write("\n")
            self.stream.flush()
            return
        finished = value >= total
        if finished:
            self._start.pop(what, None)
        if now - self._last < self.interval and not (finished and now - start >= self.interval):
            return  # at most one line per interval; a job shorter than one interval prints nothing
        self._last = now
        elapsed = now - start
        if finished:
            eta_text = "done"
        elif value > first:
            eta_text = f"ETA {_seconds(elapsed / (value - first) * (total - value))}"
        else:
            eta_text = "ETA ?"
        self.stream.write(f"avsync {self.command}: {what} {value}/{total} ({100 * value / max(total, 1):.0f}%), "
                          f"{_seconds(elapsed)} elapsed, {eta_text}\n")
        self.stream.flush()


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{int(s // 60)} min {int(s % 60):02d} s"


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def load_audio_file(path: str | Path, fps: float = 24.0, sample_rate: int = 0, channels: str = "keep",
                    start: float = 0.0, duration: float = 0.0, max_duration: float = 600.0, option: str = ""):
    """Read an audio file through ``AVSyncAudioLoader``: ``(AUDIO, Timeline)``. ``option`` (the flag
    that named the file) leads the message of a file that cannot be read."""
    from ..core.errors import AudioFileError

    try:
        return run_node("AVSyncAudioLoader", audio_file=str(path), start=start, duration=duration,
                        sample_rate=sample_rate, channels=channels, fps=fps, max_duration=max_duration)
    except AudioFileError as err:
        if not option:
            raise
        raise InputError(option, str(err)) from None


def save_audio_file(path: str | Path, audio: dict, bits: int = 16) -> None:
    """Write an AUDIO value as WAV (16-bit PCM, or 32-bit float with ``bits=32``)."""
    from ..core.audio import check_audio
    from ..core.audio_io import encode_wav

    wav, sr = check_audio(audio, "audio")
    encode_wav(path, wav.numpy(), sr, bits=bits)


# --------------------------------------------------------------------------------------
# Images in, videos out
# --------------------------------------------------------------------------------------

def load_image(path, option: str = "") -> "torch.Tensor":
    """An image file as IMAGE ``[1, H, W, 3]`` (0..1), as core LoadImage gives it; ``option`` (the flag
    that named the file) leads the error message."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    try:
        img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    except (OSError, ValueError) as err:
        from PIL import UnidentifiedImageError

        why = "not an image file Pillow can read" if isinstance(err, UnidentifiedImageError) else \
            f"cannot read the image ({err.strerror or err})" if isinstance(err, OSError) else \
            f"cannot read the image ({err})"
        raise InputError(option or str(path), (f"{path}: " if option else "") + why) from None
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


def write_mp4(path, frames, fps, audio: Optional[dict] = None) -> None:
    """IMAGE ``[F, H, W, 3]`` → H.264 mp4 (yuv420p, crf 18) with PyAV; with ``audio`` (AUDIO) also an
    AAC track, cut to the video's length (F / fps) so that both streams end together."""
    from fractions import Fraction

    import av
    import numpy as np

    rgb = (frames.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    h, w = rgb.shape[1:3]
    h, w = h - h % 2, w - w % 2
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        sound = None
        if audio is not None:
            from ..core.audio import check_audio

            wav, sr = check_audio(audio, "audio")
            wav = wav[..., : int(round(len(rgb) / float(rate) * sr))]
            if wav.shape[0] > 2:   # AAC here is mono or stereo
                wav = wav.mean(0, keepdim=True)
            sound = out.add_stream("aac", rate=sr, layout="stereo" if wav.shape[0] == 2 else "mono")
        for i, f in enumerate(rgb):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f[:h, :w]), format="rgb24")
            # explicit timestamps (x264's rate control reads them); even so, the same frames encoded in two
            # runs of one process were seen to give different files here: equal frames, not equal bytes
            frame.pts, frame.time_base = i, 1 / rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if sound is not None:
            samples = np.ascontiguousarray(wav.float().numpy())
            chunk = sound.codec_context.frame_size or 1024
            for start in range(0, samples.shape[1], chunk):
                frame = av.AudioFrame.from_ndarray(samples[:, start:start + chunk], format="fltp",
                                                   layout=sound.layout.name)
                frame.sample_rate, frame.pts = sr, start
                for packet in sound.encode(frame):
                    out.mux(packet)
            for packet in sound.encode():
                out.mux(packet)

