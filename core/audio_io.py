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
from typing import Iterator, Optional

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


class AudioStream:
    """The first audio stream of a file, decoded block by block (PyAV): memory does not
    grow with the file's length. ``open()`` checks everything that can be checked
    before decoding (existence, RIFF truncation, an audio stream, a rate, the
    declared length against ``max_seconds``) and raises :class:`AudioFileError`
    naming the file; iterating yields float32 ``[C, n]`` blocks of
    ``[start, start + duration)`` and raises the same way for damage found while
    decoding (a truncated file, NaN samples, a channel count that changes).
    """

    def __init__(self, path: str | Path, start: float = 0.0, duration: float = 0.0,
                 max_seconds: float = DEFAULT_MAX_SECONDS):
        _check_segment(start, duration)
        self.path = Path(path)
        self.start, self.duration, self.max_seconds = start, duration, max_seconds
        self.container = None
        self.sample_rate = 0
        self.channels: Optional[int] = None
        self.declared: Optional[float] = None   # seconds the container declares, if it does
        self.source_format = ""
        self.codec = ""
        self.decoded = 0                          # samples decoded so far (from the file's start)

    def open(self) -> "AudioStream":
        import av

        path = self.path
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
            self.container = av.open(str(path), mode="r")
        except av.error.FFmpegError as err:
            raise AudioFileError(path, f"cannot be read as audio or video ({err.strerror or err})") from None
        try:
            self._check_stream()
        except BaseException:
            self.close()
            raise
        return self

    def _check_stream(self) -> None:
        container, path, start = self.container, self.path, self.start
        streams = container.streams.audio
        if not streams:
            kinds = sorted({s.type for s in container.streams}) or ["nothing"]
            raise AudioFileError(path, f"has no audio stream (it contains: {', '.join(kinds)})")
        stream = self.stream = streams[0]
        self.sample_rate = sr = int(stream.rate or stream.codec_context.sample_rate or 0)
        if sr <= 0:
            raise AudioFileError(path, "audio stream declares no sample rate")
        self.channels = int(stream.codec_context.channels or 0) or None
        self.codec = stream.codec_context.name
        # the audio's own length when the stream declares one: checked against what decodes
        # (truncation) and used to refuse an over-long request before decoding. Otherwise the
        # track is decoded to its end and judged by what decoded; the container's duration
        # only bounds it (it includes a longer video: .mkv files without per-track tags).
        self.declared = declared = stream_duration(stream, sr)
        container_end = container.duration / 1_000_000 if container.duration is not None else None
        end_bound = declared if declared is not None else container_end
        if end_bound is not None and start > 0 and start >= end_bound:
            raise InputError("start", f"{start:g} s is past the end of {path.name} ({end_bound:.3f} s long)")
        wanted = self.duration if self.duration > 0 else (declared - start if declared is not None else None)
        if wanted is not None and wanted > self.max_seconds:
            raise AudioFileError(
                path, f"the requested audio is {wanted:.1f} s long, over the {self.max_seconds:g} s limit; "
                      f"set 'duration' (or raise 'max_duration')")

    @property
    def expected_samples(self) -> Optional[int]:
        """Samples the requested segment should have, from the declared length (None if unknown)."""
        if self.duration > 0:
            return int(round(self.duration * self.sample_rate))
        if self.declared is None:
            return None
        return max(0, int(round((self.declared - self.start) * self.sample_rate)))

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
            self.container = None

    def __enter__(self) -> "AudioStream":
        return self.open() if self.container is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[np.ndarray]:
        import av

        if self.container is None:
            self.open()
        path, sr, max_seconds = self.path, self.sample_rate, self.max_seconds
        first = int(round(self.start * sr))
        last = first + int(round(self.duration * sr)) if self.duration > 0 else None
        limit = first + int(math.ceil(max_seconds * sr)) + 1
        pos = 0  # sample index of the next decoded sample
        try:
            for frame in self.container.decode(self.stream):
                data = _frame_to_float(frame)
                self.source_format = self.source_format or frame.format.name
                if not self.channels or pos == 0:
                    self.channels = data.shape[0]
                elif data.shape[0] != self.channels:
                    raise AudioFileError(path, f"channel count changes mid-stream ({self.channels} -> {data.shape[0]})")
                n = data.shape[1]
                lo, hi = max(first - pos, 0), n if last is None else min(last - pos, n)
                pos += n
                self.decoded = pos
                if pos > limit:
                    raise AudioFileError(path, f"the audio is longer than the {max_seconds:g} s limit; "
                                               f"set 'duration' (or raise 'max_duration')")
                if hi > lo:
                    block = data[:, lo:hi]
                    if not np.isfinite(block).all():
                        bad = int((~np.isfinite(block)).sum())
                        raise AudioFileError(path, f"contains {bad} NaN or infinite samples (at "
                                                   f"{(pos - n + lo) / sr:.3f} s)")
                    yield block.astype(np.float32)
                if last is not None and pos >= last:
                    break
        except av.error.FFmpegError as err:
            raise AudioFileError(path, f"audio data cannot be decoded ({err.strerror or err}); "
                                       f"the file may be damaged or truncated") from None
        declared = self.declared
        if pos == 0:
            raise AudioFileError(path, "contains no decodable audio samples (empty or truncated)")
        if declared is not None and declared > 0.5 and pos / sr < 0.9 * declared - 0.05 and last is None:
            raise AudioFileError(path, f"is truncated: it declares {declared:.3f} s but only {pos / sr:.3f} s decode")
        if first >= pos:
            raise InputError("start", f"{self.start:g} s is past the end of {path.name} ({pos / sr:.3f} s long)")


def decode_audio_file(path: str | Path, start: float = 0.0, duration: float = 0.0,
                      max_seconds: float = DEFAULT_MAX_SECONDS) -> DecodedAudio:
    """Decode ``[start, start + duration)`` seconds (``duration`` 0 = to the end) of the
    first audio stream of ``path``. Raises :class:`AudioFileError` naming the file for
    anything that makes it unusable, before any later work runs. (:class:`AudioStream`
    decodes the same samples block by block.)"""
    with AudioStream(path, start, duration, max_seconds) as stream:
        chunks = list(stream)
        samples = np.concatenate(chunks, axis=1) if chunks else np.zeros((stream.channels or 1, 0), np.float32)
        return DecodedAudio(samples, stream.sample_rate, stream.source_format, stream.codec, stream.declared)


class WavWriter:
    """A WAV file written block by block (16-bit PCM, or 32-bit float with ``bits=32``).

    The samples go to a hidden temporary file next to ``path``; :meth:`commit`
    finishes it and renames it to ``path`` (an atomic replace on one file system), and
    :meth:`abort` (or leaving a ``with`` block by an exception) deletes it, so a
    failure never leaves a half-written ``path`` behind.
    """

    def __init__(self, path: str | Path, sample_rate: int, channels: int, bits: int = 16):
        import av

        if bits not in (16, 32):
            raise ValueError(f"bits must be 16 or 32, got {bits}")
        self.path = Path(path)
        self.sample_rate, self.channels, self.bits = int(sample_rate), int(channels), bits
        self.layout = {1: "mono", 2: "stereo"}.get(self.channels, f"{self.channels}c")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.temp = self.path.with_name(f".{self.path.name}.partial")
        self.written = 0   # samples per channel handed to the encoder so far
        self._out = av.open(str(self.temp), mode="w", format="wav")
        codec, self._fmt = ("pcm_s16le", "s16") if bits == 16 else ("pcm_f32le", "flt")
        self._stream = self._out.add_stream(codec, rate=self.sample_rate, layout=self.layout)

    def write(self, samples: np.ndarray) -> None:
        """Append ``[C, n]`` float samples (clipped to [-1, 1] for 16-bit)."""
        import av

        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim == 1:
            samples = samples[None]
        if samples.shape[0] != self.channels:
            raise ValueError(f"{self.path.name}: expected {self.channels} channels, got {samples.shape[0]}")
        step = 4096
        for i in range(0, samples.shape[1], step):
            part = samples[:, i:i + step]
            if self.bits == 16:
                part = np.clip(np.round(part * 32767.0), -32768, 32767).astype(np.int16)
            block = np.ascontiguousarray(part.T.reshape(1, -1))
            frame = av.AudioFrame.from_ndarray(block, format=self._fmt, layout=self.layout)
            frame.sample_rate = self.sample_rate
            for packet in self._stream.encode(frame):
                self._out.mux(packet)
        self.written += samples.shape[1]

    def finish(self) -> None:
        """Flush the encoder and close the temporary file (not yet renamed)."""
        if self._out is not None:
            for packet in self._stream.encode(None):
                self._out.mux(packet)
            self._out.close()
            self._out = None

    def commit(self) -> Path:
        """Finish and rename the temporary file to ``path``."""
        self.finish()
        self.temp.replace(self.path)
        return self.path

    def abort(self) -> None:
        if self._out is not None:
            try:
                self._out.close()
            except Exception:  # noqa: BLE001 - cleaning up after another error; that one is what matters
                pass
            self._out = None
        self.temp.unlink(missing_ok=True)

    def __enter__(self) -> "WavWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()
        elif self.temp.exists():
            self.commit()


def encode_wav(path: str | Path, samples: np.ndarray, sample_rate: int, bits: int = 16) -> None:
    """Write ``[C, T]`` float samples as PCM WAV (16-bit by default, or 32-bit float with ``bits=32``);
    nothing is left at ``path`` if writing fails."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 1:
        samples = samples[None]
    with WavWriter(path, sample_rate, samples.shape[0], bits=32 if bits != 16 else 16) as out:
        out.write(samples)
