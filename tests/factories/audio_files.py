"""Write synthetic audio into real files (PyAV/FFmpeg encoders), for loader tests."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

_PCM = {"int16": ("pcm_s16le", "s16"), "int32": ("pcm_s32le", "s32"),
        "float32": ("pcm_f32le", "flt"), "float64": ("pcm_f64le", "dbl")}

# container -> (audio codec, packed/planar sample format it takes)
LOSSY = {
    "mp3": ("libmp3lame", "fltp", "mp3"),
    "ogg": ("vorbis", "fltp", "ogg"),
    "opus": ("libopus", "flt", "ogg"),
    "m4a": ("aac", "fltp", "mp4"),
}


def _layout(c: int) -> str:
    return {1: "mono", 2: "stereo", 3: "2.1", 4: "quad", 5: "4.1", 6: "5.1", 7: "6.1", 8: "7.1"}[c]


def _encode(out, stream, data: np.ndarray, fmt: str, layout: str, sr: int) -> None:
    import av

    planar = fmt.endswith("p")
    step = stream.codec_context.frame_size or 1024
    pts = 0
    for i in range(0, data.shape[1], step):
        block = data[:, i:i + step]
        arr = np.ascontiguousarray(block if planar else block.T.reshape(1, -1))
        frame = av.AudioFrame.from_ndarray(arr, format=fmt, layout=layout)
        frame.sample_rate = sr
        frame.pts = pts
        frame.time_base = Fraction(1, sr)
        pts += block.shape[1]
        for p in stream.encode(frame):
            out.mux(p)
    for p in stream.encode(None):
        out.mux(p)


def write_wav(path, samples: np.ndarray, sr: int, dtype: str = "int16") -> np.ndarray:
    """Write ``[C, T]`` float samples in [-1, 1] as WAV of ``dtype``; returns exactly the
    stored values as float32 in the loader's convention (int / 2**(bits-1))."""
    import av

    samples = np.atleast_2d(samples)
    codec, fmt = _PCM[dtype]
    if dtype == "int16":
        stored = np.clip(np.round(samples * 32767), -32768, 32767).astype(np.int16)
        expect = stored.astype(np.float64) / 32768.0
    elif dtype == "int32":
        stored = np.clip(np.round(samples * 2147483647.0), -2147483648, 2147483647).astype(np.int32)
        expect = stored.astype(np.float64) / 2147483648.0
    else:
        stored = samples.astype(np.float32 if dtype == "float32" else np.float64)
        expect = stored.astype(np.float64)
    layout = _layout(samples.shape[0])
    with av.open(str(path), "w", format="wav") as out:
        st = out.add_stream(codec, rate=sr, layout=layout)
        _encode(out, st, stored, fmt, layout, sr)
    return expect.astype(np.float32)


def write_flac(path, samples: np.ndarray, sr: int) -> np.ndarray:
    import av

    samples = np.atleast_2d(samples)
    stored = np.clip(np.round(samples * 32767), -32768, 32767).astype(np.int16)
    layout = _layout(samples.shape[0])
    with av.open(str(path), "w", format="flac") as out:
        st = out.add_stream("flac", rate=sr, layout=layout)
        _encode(out, st, stored, "s16", layout, sr)
    return (stored.astype(np.float64) / 32768.0).astype(np.float32)


def write_lossy(path, samples: np.ndarray, sr: int, kind: str, bit_rate: int = 192000) -> None:
    import av

    codec, fmt, container = LOSSY[kind]
    samples = np.atleast_2d(samples).astype(np.float32)
    layout = _layout(samples.shape[0])
    with av.open(str(path), "w", format=container) as out:
        st = out.add_stream(codec, rate=sr, layout=layout)
        st.codec_context.bit_rate = bit_rate
        if codec == "vorbis":
            st.codec_context.options = {"strict": "-2"}
        _encode(out, st, samples, fmt, layout, sr)


def write_video_with_audio(path, samples: np.ndarray, sr: int, container: str, fps: int = 12,
                           size=(64, 48), video_seconds: float | None = None) -> None:
    """A short video (grey frames) with an audio track: mp4/mov (h264+aac), mkv (h264+flac), webm (vp9+opus).
    ``video_seconds``: picture length when it should differ from the audio's; ``path`` may also be a
    writable file object (e.g. a non-seekable one, as a pipe: then Matroska gets no per-track duration tags)."""
    import av

    samples = np.atleast_2d(samples).astype(np.float32)
    vcodec, acodec, afmt = {"mp4": ("libx264", "aac", "fltp"), "mov": ("libx264", "aac", "fltp"),
                            "mkv": ("libx264", "flac", "s16"), "webm": ("libvpx-vp9", "libopus", "flt")}[container]
    layout = _layout(samples.shape[0])
    target = path if hasattr(path, "write") else str(path)
    with av.open(target, "w", format={"mkv": "matroska"}.get(container, container)) as out:
        vs = out.add_stream(vcodec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = size[0], size[1], "yuv420p"
        ast = out.add_stream(acodec, rate=sr, layout=layout)
        n_frames = int(np.ceil((samples.shape[1] / sr if video_seconds is None else video_seconds) * fps))
        for i in range(n_frames):
            img = np.full((size[1], size[0], 3), (i * 9) % 255, np.uint8)
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in vs.encode(None):
            out.mux(p)
        data = np.clip(np.round(samples * 32767), -32768, 32767).astype(np.int16) if afmt == "s16" else samples
        _encode(out, ast, data, afmt, layout, sr)


def write_video_only(path, fps: int = 12, frames: int = 6, size=(64, 48)) -> None:
    import av

    with av.open(str(path), "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            img = np.full((size[1], size[0], 3), i * 20, np.uint8)
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in vs.encode(None):
            out.mux(p)
