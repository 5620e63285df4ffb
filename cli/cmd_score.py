"""``avsync score --video VIDEO [--audio AUDIO]``: how well a video's motion follows its
audio, through the same node a ComfyUI workflow runs (``AVSyncSyncScore``).

Frames are decoded with PyAV; the audio (the video's own track, or ``--audio``) goes
through ``AVSyncAudioLoader`` like every other command. The report is printed as JSON
(``--out`` also writes it); ``--shift-search`` adds the offset curve (correlation per
lag, positive lag = video late) to the JSON and prints it as a table on stderr. Every
widget input of the node is a flag generated from its schema (cli/schema_args.py:
range, default and tooltip as help); the frame rate comes from the video file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from fractions import Fraction
from pathlib import Path

NODE_ID = "AVSyncSyncScore"
NODE_SKIP = {"fps": "taken from the video file's frame rate"}


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text}")
    return value


def register(sub) -> None:
    from .common import add_common_options
    from .schema_args import add_node_arguments, set_input_flags

    p = sub.add_parser("score", help="score audio-video sync of a video (AV-Align, AV offset, keyframe hits)",
                       description="Score how well a video's motion follows its audio: the AVSyncSyncScore node, "
                                   "run from the command line; prints the report as JSON.")
    p.add_argument("--video", required=True, metavar="VIDEO", help="video file (mp4, webm, ogv, mkv, mov, ...)")
    p.add_argument("--audio", metavar="AUDIO", help="audio file to score against (default: the video's own track)")
    p.add_argument("--keyframes", metavar="KF.json", help="keyframes JSON written by `avsync localize --out`")
    p.add_argument("--shift-search", action="store_true",
                   help="include the offset curve (correlation per lag; + = video late) and print it on stderr")
    p.add_argument("--out", metavar="report.json", help="also write the report (JSON) to this file")
    p.add_argument("--plot", metavar="IMAGE", help="save the plot as an image (.png, .jpg, ... any format Pillow writes)")
    p.add_argument("--max-seconds", type=_positive_seconds, default=60.0, metavar="S",
                   help="refuse videos longer than this (frames are held in memory) [> 0; default: 60]")
    add_common_options(p)
    add_node_arguments(p, NODE_ID, skip=NODE_SKIP, title="scoring (AVSyncSyncScore)")
    # the node's sockets and the skipped fps, in command-line terms for messages
    set_input_flags(p, {"images": "--video", "fps": "--video", "audio": "--audio", "keyframes": "--keyframes"})
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
        if not isinstance(d, dict):
            raise ValueError(f"holds a JSON {type(d).__name__}, not an object")
        missing = [k for k in ("keyframes", "fps", "num_frames") if k not in d]
        if missing:
            # no quotes around the names: messages turn quoted input names into flags
            raise ValueError(f"has no {', '.join(missing)} field{'s' if len(missing) > 1 else ''}")
        return Keyframes(indices=[int(k) for k in d["keyframes"]], curve=[float(v) for v in d.get("curve", [])],
                         peaks=[int(k) for k in d.get("peaks", [])], valleys=[int(k) for k in d.get("valleys", [])],
                         fps=float(d["fps"]), num_frames=int(d["num_frames"]), method=str(d.get("method", "file")),
                         seed=int(d.get("seed", 0)))
    except FileNotFoundError:
        raise InputError("--keyframes", f"{path}: file not found") from None
    except (ValueError, KeyError, TypeError) as err:
        why = f"invalid JSON: {err}" if isinstance(err, json.JSONDecodeError) else str(err)
        raise InputError("--keyframes", f"{path}: not a keyframes JSON from `avsync localize` ({why})") from None


def run(args) -> int:
    import torch

    from .common import (OutputError, check_input_file, check_output_file, image_suffixes, load_audio_file, run_node,
                         staged_outputs, write_json_to)
    from .schema_args import node_inputs_from_args

    force = bool(getattr(args, "force", False))
    video = check_input_file(args.video, "--video")
    audio_path = check_input_file(args.audio, "--audio") if args.audio else video
    if args.keyframes:
        check_input_file(args.keyframes, "--keyframes")
    out = check_output_file(args.out, "--out", force) if args.out else None
    plot_path = check_output_file(args.plot, "--plot", force, image_suffixes(), "image") if args.plot else None
    if out is not None and plot_path is not None and plot_path.resolve() == out.resolve():
        raise OutputError("--plot", plot_path, "is the same file as --out")
    inputs = node_inputs_from_args(args, NODE_ID)
    keyframes = read_keyframes(args.keyframes) if args.keyframes else None
    frames, fps = decode_video_frames(video, args.max_seconds)
    # the whole track, own or separate: the decoder checks it against the audio stream's own
    # duration (not the container's, which a longer video sets), and the report names a
    # length mismatch between audio and video in its reasons
    audio, _ = load_audio_file(audio_path, fps=float(fps), option="--audio" if args.audio else "--video")
    images = torch.from_numpy(frames).to(torch.float32).div_(255.0)
    del frames
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
    with staged_outputs() as stage:  # temporary names, renamed together once all are written
        if plot_path is not None:
            from PIL import Image

            Image.fromarray((plot[0].numpy() * 255).round().astype("uint8")).save(stage(plot_path))
        if out is not None:
            write_json_to(stage(out), data)
    print(json.dumps(data, indent=2))
    return 0
