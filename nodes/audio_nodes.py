"""Audio in: ``AVSyncAudioLoader``."""

from __future__ import annotations

import math
import os
from pathlib import Path

from .. import compat
from ..core.audio import check_audio, make_audio, resample, to_channels
from ..core.audio_io import AUDIO_EXTENSIONS, DEFAULT_MAX_SECONDS, decode_audio_file
from ..core.errors import AudioFileError, InputError
from ..core.timeline import Timeline, as_fps
from .sockets import AUDIO, TIMELINE

NO_FILE = "(none: use the audio input)"
CHANNEL_MODES = ["keep", "mono", "stereo"]


def _resolve_input_file(name: str) -> Path:
    """The file behind an upload-widget value. Inside ComfyUI it must lie in the input
    folder (no ``..`` or absolute paths out of it); outside, any path is allowed."""
    path = compat.annotated_input_path(name)
    root = compat.input_directory()
    if root is not None:
        try:
            Path(os.path.realpath(path)).relative_to(os.path.realpath(root))
        except ValueError:
            raise AudioFileError(name, f"is outside ComfyUI's input folder ({root}); "
                                       f"put the file there or upload it with the node") from None
    return path


def _check_widgets(start, duration, fps, sample_rate, max_duration):
    for name, value in (("start", start), ("duration", duration), ("max_duration", max_duration)):
        if value is None or not math.isfinite(float(value)) or float(value) < 0:
            return f"{name}: must be a finite number of seconds >= 0, got {value}"
    if fps is None or not math.isfinite(float(fps)) or float(fps) <= 0:
        return f"fps: must be greater than 0, got {fps}"
    if sample_rate is not None and int(sample_rate) != 0 and not 1000 <= int(sample_rate) <= 384000:
        return f"sample_rate: must be 0 (keep) or 1000..384000 Hz, got {sample_rate}"
    return True


def load_audio(audio_file: str = NO_FILE, start: float = 0.0, duration: float = 0.0, sample_rate: int = 0,
               channels: str = "keep", fps: float = 24.0, max_duration: float = DEFAULT_MAX_SECONDS,
               audio=None):
    """What the node does, callable from the CLI and tests: ``(AUDIO, Timeline)``."""
    msg = _check_widgets(start, duration, fps, sample_rate, max_duration)
    if msg is not True:
        name, _, problem = msg.partition(": ")
        raise InputError(name, problem)
    fps_exact = as_fps(fps)
    if channels not in CHANNEL_MODES:
        raise InputError("channels", f"must be one of {CHANNEL_MODES}, got {channels!r}")
    if audio is not None:
        wav, sr = check_audio(audio, "audio")
        total = wav.shape[1] / sr
        if start > 0 and start >= total:
            raise InputError("start", f"{start:g} s is past the end of the audio input ({total:.3f} s long)")
        a = int(round(start * sr))
        b = wav.shape[1] if duration <= 0 else min(wav.shape[1], a + int(round(duration * sr)))
        if (b - a) / sr > max_duration:
            raise InputError("audio", f"the requested audio is {(b - a) / sr:.1f} s long, over the "
                                      f"{max_duration:g} s limit; set 'duration' (or raise 'max_duration')")
        wav = wav[:, a:b]
    else:
        if not audio_file or audio_file == NO_FILE:
            raise InputError("audio_file", "no file chosen and nothing connected to 'audio'")
        decoded = decode_audio_file(_resolve_input_file(audio_file), start, duration, max_duration)
        import torch

        wav, sr = torch.from_numpy(decoded.samples), decoded.sample_rate
    wav = to_channels(wav, channels)
    if sample_rate and int(sample_rate) != sr:
        wav = resample(wav, sr, int(sample_rate))
        sr = int(sample_rate)
    timeline = Timeline(fps_exact, sr, wav.shape[1], start=float(start))
    return make_audio(wav, sr), timeline


class AVSyncAudioLoader:
    DESCRIPTION = (
        "Loads audio from a file in ComfyUI's input folder (or takes AUDIO from another node), "
        "cuts it to [start, start + duration), optionally resamples and remixes channels, and "
        "lays a video frame grid over it (AVSYNC_TIMELINE) with an exact frame-to-sample mapping. "
        "The AUDIO output works with core PreviewAudio, SaveAudio and CreateVideo."
    )
    CATEGORY = "AVSync/audio"
    FUNCTION = "load"
    RETURN_TYPES = (AUDIO, TIMELINE)
    RETURN_NAMES = ("audio", "timeline")
    OUTPUT_TOOLTIPS = (
        "The audio as ComfyUI AUDIO (float32 waveform [1, channels, samples] and its sample rate).",
        "The video frame grid over this audio: fps, frame count, sample rate, start and duration.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        files = compat.list_input_files(AUDIO_EXTENSIONS)
        return {
            "required": {
                # No "audio_upload" flag: ComfyUI's frontend only honours it on an input named
                # "audio" of its own audio nodes; web/js/avsync_audio_upload.js adds the button.
                "audio_file": (files + [NO_FILE], {
                    "tooltip": "Audio or video file in ComfyUI's input folder (wav, flac, mp3, ogg, opus, m4a, "
                               "or the audio track of mp4/mov/mkv/webm); the button below uploads one. "
                               "Ignored when 'audio' is connected.",
                }),
                "start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 86400.0, "step": 0.01,
                                    "tooltip": "Where to start in the audio, in seconds."}),
                "duration": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 86400.0, "step": 0.01,
                                       "tooltip": "How many seconds to take from 'start'; 0 = to the end."}),
                "sample_rate": ("INT", {"default": 0, "min": 0, "max": 384000, "step": 1,
                                        "tooltip": "Resample to this rate in Hz (band-limited); 0 keeps the "
                                                   "file's rate."}),
                "channels": (CHANNEL_MODES, {"default": "keep",
                                             "tooltip": "keep the file's channels, average to mono, or make "
                                                        "stereo (mono is duplicated, surround is downmixed)."}),
                "fps": ("FLOAT", {"default": 24.0, "min": 0.001, "max": 240.0, "step": 0.001,
                                  "tooltip": "Frame rate of the video this audio will drive. 23.976/29.97/59.94 "
                                             "are taken as the exact NTSC rates."}),
                "max_duration": ("FLOAT", {"default": DEFAULT_MAX_SECONDS, "min": 1.0, "max": 86400.0,
                                           "step": 1.0,
                                           "tooltip": "Refuse audio longer than this many seconds, so a wrong "
                                                      "file does not fill memory."}),
            },
            "optional": {
                "audio": (AUDIO, {"tooltip": "Audio from another node (e.g. core LoadAudio). When connected, "
                                             "it is used instead of 'audio_file'."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, audio_file=None):
        # Only audio_file is named here: ComfyUI reports a failure once per named input,
        # and naming an input turns off its built-in min/max check. Naming audio_file
        # turns off "value not in list", so a workflow whose 'audio' socket is connected
        # runs without any file present. The numbers keep ComfyUI's range checks, and
        # NaN (which passes them) is refused by load_audio before any decoding.
        if audio_file and audio_file != NO_FILE:
            try:
                path = _resolve_input_file(audio_file)
            except AudioFileError as err:
                return f"audio_file: {err}"
            if not path.is_file():
                if compat.input_directory() is None:  # outside ComfyUI (command line, scripts): a plain path
                    problem = "is a directory, not a file" if path.is_dir() else "no such file"
                    return f"audio_file: {audio_file}: {problem}"
                return f"audio_file: '{audio_file}' not found in ComfyUI's input folder"
        return True

    @classmethod
    def IS_CHANGED(cls, audio_file, **_):
        if not audio_file or audio_file == NO_FILE:
            return ""
        try:
            st = _resolve_input_file(audio_file).stat()
        except (OSError, AudioFileError):
            return float("nan")
        return f"{st.st_mtime_ns}:{st.st_size}"

    def load(self, audio_file, start, duration, sample_rate, channels, fps, max_duration=DEFAULT_MAX_SECONDS,
             audio=None):
        return load_audio(audio_file, start, duration, sample_rate, channels, fps, max_duration, audio)


NODE_CLASS_MAPPINGS = {"AVSyncAudioLoader": AVSyncAudioLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"AVSyncAudioLoader": "AVSync Audio Loader"}
