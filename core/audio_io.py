"""Decoding audio files with PyAV (ComfyUI core uses it too; torchaudio >= 2.9 has no
``load``). wav, flac, mp3, ogg/vorbis, opus, m4a/aac and the audio track of
mp4/mov/mkv/webm all go through FFmpeg's demuxers and decoders.

Samples are converted to float32 by hand rather than by FFmpeg's resampler, so that
lossless integer sources come out exactly as ``int / 2**(bits-1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import AudioFileError, InputError

AUDIO_EXTENSIONS = (
    ".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".aiff", ".aif",
    ".mp4", ".mov", ".mkv", ".webm",
)

DEFAULT_MAX_SECONDS = 600.0

# scale that maps each integer sample format onto [-1, 1)
_INT_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}


@dataclass
class DecodedAudio:
    samples: np.ndarray   # float32 [C, T]
    sample_rate: int
    source_format: str    # FFmpeg sample format of the decoder, e.g. "s16", "fltp"
    codec: str
    file_duration: Optional[float]  # seconds the audio stream declares (else the container), if known


def _frame_to_float(frame) -> np.ndarray:
    """One decoded frame as float64 ``[C, n]``."""
    arr = frame.to_ndarray()
    fmt = frame.format.name
    base = fmt.rstrip("p") if fmt.endswith("p") else fmt
    channels = frame.layout.nb_channels
    if not frame.format.is_planar:
        arr = arr.reshape(-1, channels).T
    if base in _INT_SCALE:
        out = arr.astype(np.float64)
        if base == "u8":
            out -= 128.0
        return out / _INT_SCALE[base]
    return arr.astype(np.float64)


def _riff_truncation(path: Path) -> Optional[str]:
    """For RIFF/WAVE files: a message if the data chunk is shorter than its header says.

    FFmpeg estimates a WAV's duration from the file size, so a cut-off WAV would decode
    "successfully" to a shorter clip; the header's data-chunk size tells the truth.
    """
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
            if chunk_id == b"data":
                available = size - (pos + 8)
                if chunk_size not in (0, 0xFFFFFFFF) and available < chunk_size:
                    return (f"is truncated: its header declares {chunk_size} bytes of audio data "
                            f"but only {available} are present")
                return None
            pos += 8 + chunk_size + (chunk_size & 1)
    return "is truncated: the WAV header has no 'data' chunk"


def _parse_clock(text: str) -> Optional[float]:
    """``HH:MM:SS.fraction`` (Matroska's DURATION tag) in seconds; None if it is not one."""
    parts = str(text).strip().split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        return None
    if not 1 <= len(values) <= 3 or not all(math.isfinite(v) and v >= 0 for v in values):
        return None
    seconds = 0.0
    for v in values:
        seconds = seconds * 60.0 + v
    return seconds


def stream_duration(stream, sample_rate: int) -> Optional[float]:
    """Seconds the audio stream itself declares, or None.

    In order: the stream's duration field (mp4, mov, ogg, wav, ...); Matroska/WebM's per-track
    ``DURATION`` tag (FFmpeg's muxer writes one; the demuxer leaves the field empty); its frame
    count × the codec's fixed frame size. The container's duration is *not* the audio's: it
    spans the longest stream (a video longer than its soundtrack), so it is only an upper bound.
    """
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    for key, value in (stream.metadata or {}).items():
        if key.upper() == "DURATION" or key.upper().startswith("DURATION-"):
            seconds = _parse_clock(value)
            if seconds is not None and seconds > 0:
                return seconds
    frame_size = int(getattr(stream.codec_context, "frame_size", 0) or 0)
    if stream.frames and frame_size > 0 and sample_rate > 0:
        return stream.frames * frame_size / sample_rate
    return None


def _check_segment(start: float, duration: float) -> None:
    if not math.isfinite(start) or start < 0:
        raise InputError("start", f"must be a finite number of seconds >= 0, got {start}")
    if not math.isfinite(duration) or duration < 0:
        raise InputError("duration", f"must be a finite number of seconds >= 0 (0 = to the end), got {duration}")


def decode_audio_file(path: str | Path, start: float = 0.0, duration: float = 0.0,
                      max_seconds: float = DEFAULT_MAX_SECONDS) -> DecodedAudio:
    """Decode ``[start, start + duration)`` seconds (``duration`` 0 = to the end) of the
    first audio stream of ``path``. Raises :class:`AudioFileError` naming the file for
    anything that makes it unusable, before any later work runs."""
    import av

    _check_segment(start, duration)
    path = Path(path)
    if not path.exists():
        raise AudioFileError(path, "file not found")
    if path.is_dir():
        raise AudioFileError(path, "is a folder, not an audio file")
    if path.stat().st_size == 0:
        raise AudioFileError(path, "file is empty (0 bytes)")
    truncated = _riff_truncation(path)
    if truncated:
        raise AudioFileError(path, truncated)
    try:
        container = av.open(str(path), mode="r")
    except av.error.FFmpegError as err:
        raise AudioFileError(path, f"cannot be read as audio or video ({err.strerror or err})") from None
    with container:
        streams = container.streams.audio
        if not streams:
            kinds = sorted({s.type for s in container.streams}) or ["nothing"]
            raise AudioFileError(path, f"has no audio stream (it contains: {', '.join(kinds)})")
        stream = streams[0]
        sr = int(stream.rate or stream.codec_context.sample_rate or 0)
        if sr <= 0:
            raise AudioFileError(path, "audio stream declares no sample rate")
        # the audio's own length when the stream declares one: checked against what decodes
        # (truncation) and used to refuse an over-long request before decoding. Otherwise the
        # track is decoded to its end and judged by what decoded; the container's duration
        # only bounds it (it includes a longer video: .mkv files without per-track tags).
        declared = stream_duration(stream, sr)
        container_end = container.duration / 1_000_000 if container.duration is not None else None
        end_bound = declared if declared is not None else container_end
        if end_bound is not None and start > 0 and start >= end_bound:
            raise InputError("start", f"{start:g} s is past the end of {path.name} ({end_bound:.3f} s long)")
        wanted = duration if duration > 0 else (declared - start if declared is not None else None)
        if wanted is not None and wanted > max_seconds:
            raise AudioFileError(
                path, f"the requested audio is {wanted:.1f} s long, over the {max_seconds:g} s limit; "
                      f"set 'duration' (or raise 'max_duration')")

        first = int(round(start * sr))
        last = first + int(round(duration * sr)) if duration > 0 else None
        limit = first + int(math.ceil(max_seconds * sr)) + 1
        chunks: list[np.ndarray] = []
        pos = 0  # sample index of the next decoded sample
        fmt_name = ""
        channels = None
        try:
            for frame in container.decode(stream):
                data = _frame_to_float(frame)
                fmt_name = fmt_name or frame.format.name
                if channels is None:
                    channels = data.shape[0]
                elif data.shape[0] != channels:
                    raise AudioFileError(path, f"channel count changes mid-stream ({channels} -> {data.shape[0]})")
                n = data.shape[1]
                lo, hi = max(first - pos, 0), n if last is None else min(last - pos, n)
                if hi > lo:
                    chunks.append(data[:, lo:hi])
                pos += n
                if last is not None and pos >= last:
                    break
                if pos > limit:
                    raise AudioFileError(path, f"the audio is longer than the {max_seconds:g} s limit; "
                                               f"set 'duration' (or raise 'max_duration')")
        except av.error.FFmpegError as err:
            raise AudioFileError(path, f"audio data cannot be decoded ({err.strerror or err}); "
                                       f"the file may be damaged or truncated") from None
        codec = stream.codec_context.name

    if pos == 0:
        raise AudioFileError(path, "contains no decodable audio samples (empty or truncated)")
    if declared is not None and declared > 0.5 and pos / sr < 0.9 * declared - 0.05 and last is None:
        raise AudioFileError(path, f"is truncated: it declares {declared:.3f} s but only {pos / sr:.3f} s decode")
    if first >= pos:
        raise InputError("start", f"{start:g} s is past the end of {path.name} ({pos / sr:.3f} s long)")
    samples = np.concatenate(chunks, axis=1) if chunks else np.zeros((channels or 1, 0))
    if not np.isfinite(samples).all():
        bad = int((~np.isfinite(samples)).sum())
        raise AudioFileError(path, f"contains {bad} NaN or infinite samples")
    return DecodedAudio(samples.astype(np.float32), sr, fmt_name, codec,
                        declared if declared is not None else container_end)


def encode_wav(path: str | Path, samples: np.ndarray, sample_rate: int, bits: int = 16) -> None:
    """Write ``[C, T]`` float samples as PCM WAV (16-bit by default, or 32-bit float with ``bits=32``)."""
    import av

    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 1:
        samples = samples[None]
    c = samples.shape[0]
    layout = {1: "mono", 2: "stereo"}.get(c, f"{c}c")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if bits == 16:
        codec, fmt = "pcm_s16le", "s16"
        data = np.clip(np.round(samples * 32767.0), -32768, 32767).astype(np.int16)
    else:
        codec, fmt = "pcm_f32le", "flt"
        data = samples
    with av.open(str(path), mode="w", format="wav") as out:
        stream = out.add_stream(codec, rate=int(sample_rate), layout=layout)
        step = 4096
        for i in range(0, data.shape[1], step):
            block = np.ascontiguousarray(data[:, i:i + step].T.reshape(1, -1))
            frame = av.AudioFrame.from_ndarray(block, format=fmt, layout=layout)
            frame.sample_rate = int(sample_rate)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
