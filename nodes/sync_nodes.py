"""Sync scoring: ``AVSyncSyncScore`` (AV-Align, AV offset, keyframe hits, symmetric matching).

Definitions and sources are in core/sync_metrics.py and docs/sync_score.md; this module
only checks inputs and converts IMAGE / AUDIO / keyframes to what the core functions take.
"""

from __future__ import annotations

import math

import torch

from .. import compat
from ..core.audio import check_audio
from ..core.errors import InputError
from ..core.keyframes import Keyframes
from ..core.plot import ONSET, OVERLAY, PEAK, render_plot
from ..core.sync_metrics import KEYFRAME_REFERENCES, MAX_OFFSET_S, score_sync
from ..core.timeline import Timeline, as_fps
from .sockets import AUDIO, IMAGE, KEYFRAMES, SYNC_REPORT, TIMELINE

MAX_FPS = 240.0
MAX_OFFSET_MS = 5000.0


def _check_widgets(fps, keyframe_tolerance, match_tolerance_ms, max_offset_ms, flow_max_side, keyframe_reference):
    if fps is not None and (not math.isfinite(float(fps)) or not 0 < float(fps) <= MAX_FPS):
        return f"fps: must be greater than 0 and at most {MAX_FPS:g}, got {fps}"
    if keyframe_tolerance is not None and not 0 <= int(keyframe_tolerance) <= 48:
        return f"keyframe_tolerance: must be between 0 and 48 frames, got {keyframe_tolerance}"
    if match_tolerance_ms is not None and (not math.isfinite(float(match_tolerance_ms))
                                           or not 0 <= float(match_tolerance_ms) <= 1000):
        return f"match_tolerance_ms: must be between 0 (one frame) and 1000 ms, got {match_tolerance_ms}"
    if max_offset_ms is not None and (not math.isfinite(float(max_offset_ms))
                                      or not 0 < float(max_offset_ms) <= MAX_OFFSET_MS):
        return f"max_offset_ms: must be greater than 0 and at most {MAX_OFFSET_MS:g} ms, got {max_offset_ms}"
    if flow_max_side is not None and not (int(flow_max_side) == 0 or 16 <= int(flow_max_side) <= 8192):
        return f"flow_max_side: must be 0 (full resolution) or 16..8192 pixels, got {flow_max_side}"
    if keyframe_reference is not None and keyframe_reference not in KEYFRAME_REFERENCES:
        return f"keyframe_reference: must be one of {', '.join(KEYFRAME_REFERENCES)}, got {keyframe_reference!r}"
    return True


def _uint8_frames(images: torch.Tensor):
    """IMAGE ``[N, H, W, C]`` floats in [0, 1] → uint8 RGB (or grey) frames, one at a time
    (a whole clip in uint8 would be a second copy of the video)."""
    for i in range(images.shape[0]):
        f = (images[i, :, :, :3].clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
        yield f[:, :, 0] if f.shape[-1] == 1 else f


def _reference_frames(keyframes, reference: str, fps: float):
    """Keyframe indices (or their audio peaks) on this video's frame grid, or None for audio onsets."""
    if keyframes is None or reference == "audio_onsets":
        return None
    if not isinstance(keyframes, Keyframes):
        raise InputError("keyframes", f"expected AVSYNC_KEYFRAMES, got {type(keyframes).__name__}")
    frames = keyframes.peaks if reference == "keyframe_peaks" else keyframes.indices
    ratio = fps / float(keyframes.fps)
    return sorted({int(round(k * ratio)) for k in frames})


class AVSyncSyncScore:
    DESCRIPTION = (
        "Scores how well a video's motion follows its audio: AV-Align (TempoTokens' published metric: librosa-style "
        "audio onsets vs optical-flow motion peaks), the AV offset in ms (+ = video late) with a confidence, keyframe "
        "AP/precision of the motion peaks against keyframes or audio onsets (KeyVID App. D), and a CycleSync-style "
        "symmetric matching score (Syncphony eq. 4, a proxy: no video-to-audio model). Outputs a report, the scores "
        "and a plot. Optical flow needs opencv-python-headless."
    )
    CATEGORY = "AVSync/evaluation"
    FUNCTION = "score"
    OUTPUT_NODE = True
    RETURN_TYPES = (SYNC_REPORT, "FLOAT", "FLOAT", "FLOAT", "FLOAT", "FLOAT", "FLOAT", IMAGE)
    RETURN_NAMES = ("report", "av_align", "offset_ms", "offset_confidence", "keyframe_ap", "keyframe_precision",
                    "matching_score", "plot")
    OUTPUT_TOOLTIPS = (
        "Every score with the onsets, motion peaks, curves and the reasons a score is degenerate.",
        "AV-Align (0..1, higher is better): IoU of audio onsets and motion peaks matched within ±1 frame.",
        "Lag in ms that best aligns the audio onset envelope with the motion energy; positive = video late.",
        "Correlation at the best lag over the second-best lag (1 = ambiguous; 0 when undefined).",
        "AP@t: share of reference frames (keyframes or audio onsets) with a motion peak within t frames.",
        "precision@t: share of motion peaks within t frames of a reference frame.",
        "CycleSync-style symmetric matching of audio onsets and motion peaks (0..1; a proxy, see docs).",
        "Waveform, audio onsets (orange), onset envelope, motion energy and motion peaks (red) against time.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": (IMAGE, {"tooltip": "The video frames to score (at least 2)."}),
                "audio": (AUDIO, {"tooltip": "The video's audio; its first sample is the time of the first frame."}),
                "fps": ("FLOAT", {"default": 24.0, "min": 0.001, "max": MAX_FPS, "step": 0.001, "tooltip":
                        "Frame rate of the frames. Ignored when a timeline is connected (its fps is used)."}),
                "keyframe_reference": (list(KEYFRAME_REFERENCES), {"default": "keyframe_peaks", "tooltip":
                                       "What the motion peaks are scored against for keyframe AP/precision: "
                                       "keyframe_peaks (the audio peaks the keyframes were placed on), all_keyframes "
                                       "(every selected keyframe, frame 0 included), or audio_onsets. Without "
                                       "keyframes connected, audio onsets are used."}),
                "keyframe_tolerance": ("INT", {"default": 1, "min": 0, "max": 48, "tooltip":
                                       "t of AP@t / precision@t, in frames."}),
                "match_tolerance_ms": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 1.0, "tooltip":
                                       "δ of the symmetric matching score, ms. 0: one frame (Syncphony's 5 ms "
                                       "compares two audio tracks; motion peaks are only frame-accurate)."}),
                "max_offset_ms": ("FLOAT", {"default": MAX_OFFSET_S * 1000.0, "min": 1.0, "max": MAX_OFFSET_MS,
                                  "step": 1.0, "tooltip": "The AV offset is searched over ± this many ms."}),
                "flow_max_side": ("INT", {"default": 0, "min": 0, "max": 8192, "tooltip":
                                  "0: optical flow at full resolution (the published AV-Align). Otherwise frames are "
                                  "shrunk to this longer side for the flow (faster; magnitudes scaled back to "
                                  "full-size pixels, but not the published number)."}),
            },
            "optional": {
                "timeline": (TIMELINE, {"tooltip": "Frame grid from AVSyncAudioLoader; when connected its fps is used."}),
                "keyframes": (KEYFRAMES, {"tooltip": "Keyframes from AVSyncKeyframeLocalizer, for keyframe AP and "
                              "precision (mapped to this video's fps when theirs differs)."}),
            },
        }

    # Only flow_max_side needs a check beyond the schema (0, or 16..8192: its min / max cannot say that).
    # ComfyUI skips its own combo / min / max check of every input VALIDATE_INPUTS takes and reports a
    # refusal once per input taken: taking all six widgets showed one bad value six times. score() checks
    # all of them again for direct calls and the command line.
    @classmethod
    def VALIDATE_INPUTS(cls, flow_max_side=None):
        return _check_widgets(None, None, None, None, flow_max_side, None)

    def score(self, images, audio, fps=24.0, keyframe_reference="keyframe_peaks", keyframe_tolerance=1,
              match_tolerance_ms=0.0, max_offset_ms=MAX_OFFSET_S * 1000.0, flow_max_side=0, timeline=None,
              keyframes=None):
        ok = _check_widgets(fps, keyframe_tolerance, match_tolerance_ms, max_offset_ms, flow_max_side,
                            keyframe_reference)
        if ok is not True:
            name, _, problem = ok.partition(": ")
            raise InputError(name, problem)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] not in (1, 3, 4):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InputError("images", f"expected IMAGE [frames, height, width, channels], got {shape}")
        if images.shape[0] < 2:
            raise InputError("images", f"need at least 2 frames to measure motion, got {images.shape[0]}")
        if timeline is not None:
            if not isinstance(timeline, Timeline):
                raise InputError("timeline", f"expected AVSYNC_TIMELINE, got {type(timeline).__name__}")
            rate = timeline.fps
        else:
            rate = as_fps(float(fps))
        wav, sr = check_audio(audio, "audio")
        ref = _reference_frames(keyframes, keyframe_reference, float(rate))
        n = int(images.shape[0])
        bar = compat.Progress(n, "AVSync sync score")
        report = score_sync(_uint8_frames(images), n, rate, wav.cpu().numpy(), sr, keyframe_frames=ref,
                            keyframe_reference=keyframe_reference, keyframe_tolerance=int(keyframe_tolerance),
                            match_tolerance_s=float(match_tolerance_ms) / 1000.0 or None,
                            max_offset_s=float(max_offset_ms) / 1000.0, flow_max_side=int(flow_max_side),
                            progress=lambda i: bar.update_absolute(i, n))
        title = (f"AV-Align {report.av_align:.3f} | offset {report.offset_ms:+.0f} ms (conf {report.offset_confidence:.2f},"
                 f" + = video late) | matching {report.matching_score:.3f}")
        image = render_plot(wav.cpu().numpy(), sr, report.motion_energy, report.fps, peaks=report.motion_peak_frames,
                            onset_times=report.audio_onset_times, overlay=report.audio_curve, title=title,
                            legend=(("motion peak", PEAK), ("audio onset", ONSET), ("onset env", OVERLAY)))
        result = (report, report.av_align, report.offset_ms, report.offset_confidence, report.keyframe_ap,
                  report.keyframe_precision, report.matching_score, torch.from_numpy(image).unsqueeze(0))
        return {"ui": {"text": [report.summary()]}, "result": result}


NODE_CLASS_MAPPINGS = {"AVSyncSyncScore": AVSyncSyncScore}
NODE_DISPLAY_NAME_MAPPINGS = {"AVSyncSyncScore": "AVSync Sync Score"}
