"""Audio → motion-score curve on the timeline's frame grid → keyframes.

Two curves: ``onset`` (:mod:`.onset`, no weights) and ``learned`` (KeyVID's localizer,
passed in as ``score_fn``: normalised fbank ``[B, 1, 128, 198]`` → ``[B, 48]``, so
this module stays free of networks).

The learned localizer sees 2-s windows at 16 kHz and returns 48 scores, score ``i``
at ``i / 24`` s into the window. Audio of any length is covered by windows every
second (half overlap); the last window is placed to end where the audio ends, so
the tail is seen by a full window of real audio rather than padding. Each window's
scores are interpolated to the timeline's frame times and cross-faded with
``sin^2`` weights, which sum to one at half overlap — no seams. Audio shorter than
one window is zero-padded to 2 s (scores past the end are never used).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from .audio import resample
from .errors import InputError
from .fbank import imagebind_input
from .keyframes import (CLIP_FRAMES, NUM_KEYFRAMES, PEAK_DISTANCE, PEAK_PROMINENCE, SMOOTH_WINDOW, VARIANTS,
                        Keyframes, select_timeline)
from .onset import onset_curve
from .timeline import Timeline

METHODS = ("onset", "learned")
SMOOTHING = ("auto", "off", "on")
MODEL_RATE = 16000
WINDOW_SAMPLES = 32000
WINDOW_HOP = 16000
WINDOW_OUTPUTS = 48
OUTPUT_STEP_SECONDS = 2.0 / WINDOW_OUTPUTS


def window_starts(num_samples: int, window: int = WINDOW_SAMPLES, hop: int = WINDOW_HOP) -> list[int]:
    """Window start samples: every ``hop``, plus one ending exactly at the end."""
    if num_samples <= window:
        return [0]
    starts = list(range(0, num_samples - window + 1, hop))
    if starts[-1] + window < num_samples:
        starts.append(num_samples - window)
    return starts


def crossfade_weights(n: int = WINDOW_OUTPUTS) -> np.ndarray:
    """``sin^2(pi (i + 1/2) / n)``: positive everywhere, sums to 1 at half overlap."""
    return np.sin(np.pi * (np.arange(n) + 0.5) / n) ** 2


def stitch_windows(starts_seconds, scores, times: np.ndarray) -> np.ndarray:
    """Cross-fade per-window scores (score ``i`` of a window starting at ``t0`` belongs to
    ``t0 + i / 24`` s) into one value per entry of ``times``. Inside a window, scores
    are interpolated linearly; the last 1/24 s of the audio, after the last window's
    last score, holds that score."""
    num = np.zeros_like(times, dtype=np.float64)
    den = np.zeros_like(times, dtype=np.float64)
    wts = crossfade_weights()
    offsets = np.arange(WINDOW_OUTPUTS) * OUTPUT_STEP_SECONDS
    last_t, last_v = -np.inf, 0.0
    for t0, sc in zip(starts_seconds, scores):
        sc = np.asarray(sc, dtype=np.float64)
        inside = (times >= t0) & (times <= t0 + offsets[-1])
        tt = times[inside] - t0
        w = np.interp(tt, offsets, wts)
        num[inside] += w * np.interp(tt, offsets, sc)
        den[inside] += w
        if t0 + offsets[-1] >= last_t:
            last_t, last_v = t0 + offsets[-1], float(sc[-1])
    out = np.zeros_like(num)
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    out[(~ok) & (times > last_t)] = last_v
    return out


def learned_curve(waveform: torch.Tensor, sample_rate: int, timeline: Timeline,
                  score_fn: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 8,
                  progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """KeyVID localizer scores on the timeline grid (raw, not renormalised: the
    released code finds peaks on the raw scores with prominence 0.1)."""
    x = waveform.to(torch.float32)
    x = x.mean(dim=0) if x.dim() == 2 else x
    x = resample(x, sample_rate, MODEL_RATE)
    n = int(x.shape[-1])
    starts = window_starts(n)
    if n < WINDOW_SAMPLES:
        x = torch.nn.functional.pad(x, (0, WINDOW_SAMPLES - n))
    all_scores = []
    for b in range(0, len(starts), batch_size):
        clips = torch.stack([x[s:s + WINDOW_SAMPLES] for s in starts[b:b + batch_size]])
        with torch.inference_mode():
            # float32 on the device, float64 only on the CPU (MPS has no float64)
            all_scores.extend(score_fn(imagebind_input(clips)).detach().float().cpu().double().numpy())
        if progress is not None:
            progress(min(b + batch_size, len(starts)), len(starts))
    return stitch_windows([s / MODEL_RATE for s in starts], all_scores, timeline.frame_times())


def driving_timeline(timeline: Timeline, sample_rate: int) -> Timeline:
    """The same frames laid over audio at another rate (e.g. a demixed track)."""
    return timeline if sample_rate == timeline.sample_rate else timeline.with_sample_rate(sample_rate)


def fit_length(curve: np.ndarray, n: int) -> np.ndarray:
    """Crop, or pad with zeros (audio that ends before the timeline does: nothing happens there)."""
    curve = np.asarray(curve, dtype=np.float64)
    if len(curve) >= n:
        return curve[:n]
    return np.concatenate([curve, np.zeros(n - len(curve))])


def motion_curve(waveform: torch.Tensor, sample_rate: int, timeline: Timeline, method: str = "onset",
                 score_fn=None, progress=None) -> np.ndarray:
    if method == "onset":
        curve = onset_curve(waveform, driving_timeline(timeline, sample_rate))
    elif method == "learned":
        if score_fn is None:
            raise InputError("localizer_model", "method 'learned' needs a localizer model (AVSyncLocalizerModelLoader)")
        curve = learned_curve(waveform, sample_rate, timeline, score_fn, progress=progress)
    else:
        raise InputError("method", f"must be one of {', '.join(METHODS)}, got {method!r}")
    return fit_length(curve, timeline.num_frames)


def smoothing_window(smoothing: str, selection: str) -> int:
    """``auto``: the paper's window-5 moving average for ``paper``, none for ``reference``
    (the released inference code has it commented out)."""
    if smoothing == "auto":
        return SMOOTH_WINDOW if selection == "paper" else 0
    if smoothing == "on":
        return SMOOTH_WINDOW
    if smoothing == "off":
        return 0
    raise InputError("smoothing", f"must be one of {', '.join(SMOOTHING)}, got {smoothing!r}")


def check_covers_timeline(num_samples: int, sample_rate: int, timeline: Timeline, name: str) -> None:
    """Audio that drives a timeline must span it (within one frame): a track of another
    length would silently shift or cut the keyframes."""
    seconds = num_samples / sample_rate
    if abs(seconds - timeline.duration) > 1.0 / float(timeline.fps):
        raise InputError(name, f"is {seconds:.3f} s long but the timeline covers {timeline.duration:.3f} s; "
                               f"connect audio and timeline from the same AVSyncAudioLoader (or a demixed "
                               f"track of that audio)")


def check_request(timeline: Timeline, num_keyframes: int, clip_frames: int, method: str, selection: str) -> None:
    """Everything that can be said about the inputs before any audio is analysed."""
    if method not in METHODS:
        raise InputError("method", f"must be one of {', '.join(METHODS)}, got {method!r}")
    if selection not in VARIANTS:
        raise InputError("selection", f"must be one of {', '.join(VARIANTS)}, got {selection!r}")
    n = timeline.num_frames
    if n < 1:
        raise InputError("audio", f"is {timeline.duration * 1000:.1f} ms long, shorter than one frame at "
                         f"{float(timeline.fps):g} fps; no keyframes can be chosen")
    if clip_frames < 1:
        raise InputError("clip_frames", f"must be at least 1, got {clip_frames}")
    if num_keyframes < 1:
        raise InputError("num_keyframes", f"must be at least 1, got {num_keyframes}")
    room = min(n, clip_frames)
    if num_keyframes > room:
        what = f"the {n} frames of the audio" if n <= clip_frames else f"a clip of {clip_frames} frames"
        raise InputError("num_keyframes", f"{num_keyframes} keyframes do not fit in {what}")


def localize(waveform: torch.Tensor, sample_rate: int, timeline: Timeline, method: str = "onset",
             score_fn=None, num_keyframes: int = NUM_KEYFRAMES, clip_frames: int = CLIP_FRAMES,
             selection: str = "reference", seed: int = 0, smoothing: str = "auto",
             distance: int = PEAK_DISTANCE, prominence: float = PEAK_PROMINENCE, progress=None) -> Keyframes:
    """The whole localizer: curve, peaks/valleys, keyframes per clip and over the timeline."""
    check_request(timeline, num_keyframes, clip_frames, method, selection)
    window = smoothing_window(smoothing, selection)
    curve = motion_curve(waveform, sample_rate, timeline, method, score_fn, progress)
    indices, clips, peaks, valleys = select_timeline(curve, num_keyframes, clip_frames, selection, seed, window,
                                                     distance, prominence)
    return Keyframes(indices=indices, curve=[float(v) for v in curve], peaks=[int(p) for p in peaks],
                     valleys=[int(v) for v in valleys], fps=float(timeline.fps), num_frames=timeline.num_frames,
                     method=method, seed=int(seed), selection=selection, clip_frames=clip_frames,
                     num_keyframes=num_keyframes, clips=clips,
                     fps_fraction=f"{timeline.fps.numerator}/{timeline.fps.denominator}")
