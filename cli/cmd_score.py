"""``avsync score --video VIDEO [--audio AUDIO]``: how well a video's motion follows its
audio, through the same node a ComfyUI workflow runs (``AVSyncSyncScore``).

Frames are decoded with PyAV; the audio (the video's own track, or ``--audio``) goes
through ``AVSyncAudioLoader`` like every other command. The report is printed as JSON
(``--out`` also writes it); ``--shift-search`` adds the offset curve (correlation per
lag, positive lag = video late) to the JSON and prints it as a table on stderr. The
scoring knobs are the node's widgets, read from its schema (defaults, choices, help).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

NODE_ID = "AVSyncSyncScore"
KNOBS = ("keyframe_reference", "keyframe_tolerance", "match_tolerance_ms", "max_offset_ms", "flow_max_side")
PLOT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def register(sub) -> None:
    from .common import node_class

    p = sub.add_parser("score", help="score audio-video sync of a video (AV-Align, AV offset, keyframe hits)")
    p.add_argument("--video", required=True, metavar="VIDEO", help="video file (mp4, webm, ogv, mkv, mov, ...)")
    p.add_argument("--audio", metavar="AUDIO", help="audio file to score against (default: the video's own track)")
    p.add_argument("--keyframes", metavar="KF.json", help="keyframes JSON written by `avsync localize --out`")
    p.add_argument("--shift-search", action="store_true",
                   help="include the offset curve (correlation per lag; + = video late) and print it")
    p.add_argument("--out", metavar="report.json", help="also write the report (JSON) to this file")
    p.add_argument("--plot", metavar="plot.png", help="save the plot image (png, jpg, webp)")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="refuse videos longer than this (frames are held in memory; default 60)")
    spec = node_class(NODE_ID).INPUT_TYPES()["required"]
    for name in KNOBS:  # the node's schema is the one place these are defined
        kind, opts = spec[name]
        kw = {"default": opts["default"], "help": opts["tooltip"]}
        if isinstance(kind, list):
            kw["choices"] = kind
        else:
            kw["type"] = int if kind == "INT" else float
        p.add_argument("--" + name.replace("_", "-"), **kw)
    p.set_defaults(func=run)


def decode_video_frames(path: Path, max_seconds: float):
    """All frames of the first video stream as uint8 RGB ``[N, H, W, 3]`` and the
    stream's frame rate (``average_rate``, as OpenCV's CAP_PROP_FPS reports it)."""
    import av
    import numpy as np

    from ..core.errors import InputError

    if not path.is_file():
        raise InputError("--video", f"{path}: file not found")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as err:
        raise InputError("--video", f"{path}: cannot be read as video ({err.strerror or err})") from None
    with container:
        if not container.streams.video:
            raise InputError("--video", f"{path}: has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate or rate <= 0:
            raise InputError("--video", f"{path}: the video stream declares no frame rate")
        fps = Fraction(rate)
        limit = int(max_seconds * fps) + 1
        frames = []
        try:
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) > limit:
                    raise InputError("--video", f"{path}: longer than --max-seconds {max_seconds:g}; "
                                                f"cut it or raise --max-seconds")
        except av.error.FFmpegError as err:
            raise InputError("--video", f"{path}: video data cannot be decoded ({err.strerror or err})") from None
    if len(frames) < 2:
        raise InputError("--video", f"{path}: has {len(frames)} decodable frame(s); at least 2 are needed")
    return np.stack(frames), fps


def read_keyframes(path: str):
    """A ``Keyframes`` value from the JSON ``avsync localize --out`` writes."""
    from ..core.errors import InputError
    from ..core.keyframes import Keyframes

    try:
        d = json.loads(Path(path).read_text())
        return Keyframes(indices=[int(k) for k in d["keyframes"]], curve=[float(v) for v in d.get("curve", [])],
                         peaks=[int(k) for k in d.get("peaks", [])], valleys=[int(k) for k in d.get("valleys", [])],
                         fps=float(d["fps"]), num_frames=int(d["num_frames"]), method=str(d.get("method", "file")),
                         seed=int(d.get("seed", 0)))
    except FileNotFoundError:
        raise InputError("--keyframes", f"{path}: file not found") from None
    except (ValueError, KeyError, TypeError) as err:
        raise InputError("--keyframes", f"{path}: not a keyframes JSON from `avsync localize` ({err!r})") from None


def _check_writable(path: Path, option: str) -> None:
    """Before any work: the file's nearest existing folder must be a writable folder."""
    from ..core.errors import InputError

    if path.is_dir():
        raise InputError(option, f"cannot write {path}: it is a folder")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise InputError(option, f"cannot write {path}: {parent} is not a writable folder")


def _write_atomically(path: Path, write, option: str) -> None:
    """Write through a temporary file in the same folder, so a failure leaves no half file."""
    from ..core.errors import InputError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    except OSError as err:
        raise InputError(option, f"cannot write {path} ({err.strerror or err})") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the user expects an ordinary file
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(args) -> int:
    import torch

    from ..core.errors import InputError
    from .common import load_audio_file, run_node

    if args.plot and Path(args.plot).suffix.lower() not in PLOT_SUFFIXES:
        raise InputError("--plot", f"must end in {', '.join(PLOT_SUFFIXES)}, got {args.plot}")
    if not args.max_seconds > 0:
        raise InputError("--max-seconds", f"must be > 0, got {args.max_seconds}")
    for option, target in (("--out", args.out), ("--plot", args.plot)):
        if target:
            _check_writable(Path(target), option)
    keyframes = read_keyframes(args.keyframes) if args.keyframes else None
    audio_path = Path(args.audio or args.video)
    if args.audio and not audio_path.is_file():
        raise InputError("--audio", f"{audio_path}: file not found")
    frames, fps = decode_video_frames(Path(args.video), args.max_seconds)
    # A video's own track is read over the video's span: its container may declare the
    # (longer) video duration, which the audio decoder would take for a truncated track.
    span = 0.0 if args.audio else len(frames) / float(fps)
    audio, _ = load_audio_file(audio_path, fps=float(fps), duration=span)
    images = torch.from_numpy(frames).to(torch.float32).div_(255.0)
    del frames
    inputs = {name.replace("-", "_"): getattr(args, name) for name in KNOBS}
    report, *_, plot = run_node(NODE_ID, images=images, audio=audio, fps=float(fps), keyframes=keyframes, **inputs)
    data = report.to_dict(curves=False)
    data["video"] = str(args.video)
    data["audio"] = str(audio_path)
    if args.shift_search:
        data["offset_curve"] = [[lag, c] for lag, c in zip(report.offset_lags_ms, report.offset_correlation)]
        sys.stderr.write("lag_ms  correlation   (+ lag = video late)\n")
        best = max(range(len(report.offset_correlation)), key=report.offset_correlation.__getitem__, default=-1)
        for i, (lag, c) in enumerate(data["offset_curve"]):
            sys.stderr.write(f"{lag:7.1f}  {c:+.4f}{'  <- best' if i == best else ''}\n")
    text = json.dumps(data, indent=2)
    if args.plot:  # the plot first: a failure there leaves no report behind either
        from PIL import Image

        img = Image.fromarray((plot[0].numpy() * 255).round().astype("uint8"))
        _write_atomically(Path(args.plot), img.save, "--plot")  # the temporary name keeps the suffix
    if args.out:
        _write_atomically(Path(args.out), lambda tmp: Path(tmp).write_text(text + "\n"), "--out")
    print(text)
    return 0
