"""Audio-video synchronization scores (pure functions; no ComfyUI, no torchaudio, no librosa).

What is computed, and from where (docs/sync_score.md has the full definitions):

* **AV-Align** (Yariv et al., TempoTokens; ``guyyariv/TempoTokens:av_align.py`` at
  bf0b1e3): audio onset peaks from librosa's *default* onset detection
  (:func:`librosa_onset_envelope`, :func:`librosa_onset_detect`, reproduced here in
  numpy) against optical-flow motion peaks (OpenCV Farneback with the reference's
  parameters, :func:`motion_trajectory`); greedy one-to-one matching within ±1 frame;
  IoU ``I / (|A| + |V| - I)`` (:func:`av_align_iou`).
* **AV offset** (ours): the lag that maximizes the Pearson correlation between the
  audio onset envelope and the motion-energy curve on the video frame grid, searched
  over ±``max_offset_s``; **positive = video late** (the picture shows an event after
  the sound of it). Confidence = correlation at the best lag / at the second-best
  local maximum (:func:`av_offset`).
* **Keyframe hit rate**: AP@t / precision@t (KeyVID App. D, :mod:`.metrics`) of the
  motion peaks against keyframes or audio onsets (:func:`keyframe_hits`).
* **Symmetric matching** (Syncphony eq. 4, CycleSync's matching rule) applied to audio
  onsets vs motion peaks — a *proxy*: real CycleSync first regenerates audio from the
  video with a video-to-audio model (V-AURA) that AVSync does not ship
  (:func:`symmetric_matching`).

Every score is defined for every input: a static video or a silent track gives a
number (not NaN) and a reason in :attr:`SyncReport.reasons`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from functools import lru_cache
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from . import metrics
from .errors import AVSyncError, InputError
from .onset import frame_envelope, normalise
from .timeline import Timeline, as_fps

# librosa defaults that av_align.py relies on (librosa.load, onset.onset_strength, onset.onset_detect)
LIBROSA_SR = 22050
N_FFT = 2048
HOP = 512
N_MELS = 128
TOP_DB = 80.0
AMIN = 1e-10
# av_align.py:compute_of — cv2.calcOpticalFlowFarneback(prev, curr, None, 0.5, 3, 15, 3, 5, 1.2, 0)
FARNEBACK_ARGS = (0.5, 3, 15, 3, 5, 1.2, 0)
# av_align.py:find_local_max_indexes — motion peaks below 0.1 px/frame are ignored
MIN_PEAK_FLOW = 0.1
# frame pairs in flight at once at most (each holds a few full-size float buffers of Farneback's)
MAX_FLOW_WORKERS = 8
MAX_OFFSET_S = 0.5
CONFIDENCE_CAP = 100.0  # when nothing else correlates positively, the confidence is capped, not infinite
OPENCV_PACKAGE = "opencv-python-headless"
KEYFRAME_REFERENCES = ("keyframe_peaks", "all_keyframes", "audio_onsets")


class MissingDependencyError(AVSyncError, ImportError):
    """An optional package that a feature needs is not installed."""


def _cv2():
    """OpenCV, imported here and only here (optical flow is its only use)."""
    try:
        import cv2
    except ImportError:
        raise MissingDependencyError(
            f"optical flow (AV-Align's motion peaks) needs OpenCV: pip install {OPENCV_PACKAGE} "
            "(or any OpenCV build that provides cv2)") from None
    return cv2


# -- audio: librosa's default onset detection, reproduced --------------------------------------------------

def to_librosa_input(waveform, sample_rate: int) -> np.ndarray:
    """What ``librosa.load(path)`` returns for these samples: mono (channel mean,
    ``librosa.to_mono``), then resampled to 22 050 Hz.

    librosa resamples with soxr ('soxr_hq'); this uses scipy's polyphase filter, a
    different band-limited resampler: onset times agree, the envelope differs slightly
    (docs/sync_score.md). At 22 050 Hz input nothing is resampled and the result is exact.
    """
    x = np.asarray(waveform, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=0)
    if int(sample_rate) != LIBROSA_SR and x.size:
        from scipy.signal import resample_poly

        g = math.gcd(int(sample_rate), LIBROSA_SR)
        x = resample_poly(x.astype(np.float64), LIBROSA_SR // g, int(sample_rate) // g).astype(np.float32)
    return x


def _hz_to_mel_slaney(f):
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-12) / min_log_hz) / logstep, f / f_sp)


def _mel_to_hz_slaney(m):
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@lru_cache(maxsize=4)
def slaney_mel_filterbank(sr: int = LIBROSA_SR, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """``librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels)`` (fmin 0, fmax sr/2,
    Slaney mel scale, Slaney area normalisation): ``[n_mels, 1 + n_fft // 2]``."""
    fft_freqs = np.linspace(0.0, sr / 2.0, 1 + n_fft // 2)
    mel_f = _mel_to_hz_slaney(np.linspace(_hz_to_mel_slaney(0.0), _hz_to_mel_slaney(sr / 2.0), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    return weights.astype(np.float32)  # librosa builds the basis in float32


def librosa_onset_envelope(y: np.ndarray, sr: int = LIBROSA_SR) -> np.ndarray:
    """``librosa.onset.onset_strength(y=y, sr=sr)`` with every default: power mel
    spectrogram (n_fft 2048, hop 512, centred frames zero-padded, periodic Hann, 128
    Slaney mels), ``power_to_db`` (ref 1, amin 1e-10, top_db 80), first difference
    (lag 1), half-wave rectified, mean over bands, padded by ``lag + n_fft // (2 hop)``
    frames at the front and cut to the spectrogram's length."""
    y = np.asarray(y, dtype=np.float32)
    n_frames = 1 + len(y) // HOP
    padded = np.pad(y.astype(np.float64), (N_FFT // 2, N_FFT // 2), mode="constant")
    if len(padded) < N_FFT:
        padded = np.pad(padded, (0, N_FFT - len(padded)))
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)  # scipy get_window('hann', fftbins=True)
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][:n_frames]
    spec = np.fft.rfft(frames * window, axis=-1)
    power = spec.real ** 2 + spec.imag ** 2                        # [frames, bins]
    mel = power @ slaney_mel_filterbank(sr, N_FFT, N_MELS).T.astype(np.float64)  # [frames, mels]
    db = 10.0 * np.log10(np.maximum(AMIN, mel))
    db = np.maximum(db, db.max() - TOP_DB)
    flux = np.maximum(0.0, db[1:] - db[:-1]).mean(axis=-1)
    pad = 1 + N_FFT // (2 * HOP)
    return np.concatenate([np.zeros(pad), flux])[:n_frames]


def librosa_peak_pick(x: np.ndarray, pre_max: int, post_max: int, pre_avg: int, post_avg: int, delta: float,
                      wait: int) -> np.ndarray:
    """``librosa.util.peak_pick`` (0.11, ``util/utils.py:__peak_pick``): ``x[n]`` is a peak
    when it is the maximum of ``x[n - pre_max : n + post_max]``, at least ``delta`` above
    the mean of ``x[n - pre_avg : n + post_avg]`` (windows cut at the ends), and more than
    ``wait`` frames after the previous peak. ``delta`` is compared in float32, as librosa's
    compiled kernel does."""
    x = np.asarray(x, dtype=np.float64)
    n_total = len(x)
    delta = float(np.float32(delta))
    peaks = []
    if n_total == 0:
        return np.zeros(0, dtype=np.int64)
    first = x[0] >= x[:min(post_max, n_total)].max() and x[0] >= x[:min(post_avg, n_total)].mean() + delta
    n = wait + 1 if first else 1
    if first:
        peaks.append(0)
    while n < n_total:
        if x[n] == x[max(0, n - pre_max):min(n + post_max, n_total)].max() and \
                x[n] >= x[max(0, n - pre_avg):min(n + post_avg, n_total)].mean() + delta:
            peaks.append(n)
            n += wait + 1
        else:
            n += 1
    return np.asarray(peaks, dtype=np.int64)


def librosa_onset_detect(envelope: np.ndarray, sr: int = LIBROSA_SR, hop: int = HOP) -> np.ndarray:
    """``librosa.onset.onset_detect(onset_envelope=envelope, sr=sr)``: the envelope
    min-max normalised, then :func:`librosa_peak_pick` with librosa's defaults (30 ms
    pre-max, 100 ms averaging windows, 30 ms wait, delta 0.07). Returns frame indices."""
    env = np.asarray(envelope, dtype=np.float64)
    if env.size == 0:
        return np.zeros(0, dtype=np.int64)
    env = env - env.min()
    env = env / (env.max() + np.finfo(np.float32).tiny)
    if not env.any() or not np.isfinite(env).all():
        return np.zeros(0, dtype=np.int64)
    ceil = lambda v: int(np.ceil(v))  # noqa: E731  (librosa: valid_int(..., cast=np.ceil))
    return librosa_peak_pick(env, pre_max=ceil(0.03 * sr // hop), post_max=ceil(0.00 * sr // hop + 1),
                             pre_avg=ceil(0.10 * sr // hop), post_avg=ceil(0.10 * sr // hop + 1),
                             delta=0.07, wait=ceil(0.03 * sr // hop))


@dataclass
class AudioOnsets:
    times: np.ndarray         # onset times, seconds (av_align.py:detect_audio_peaks)
    envelope: np.ndarray      # onset strength, one value per 512-sample hop at 22 050 Hz
    envelope_times: np.ndarray  # time of each envelope value (librosa.frames_to_time)


def audio_onsets(waveform, sample_rate: int) -> AudioOnsets:
    """Audio peaks exactly as ``av_align.py:detect_audio_peaks`` finds them."""
    y = to_librosa_input(waveform, sample_rate)
    env = librosa_onset_envelope(y)
    frames = librosa_onset_detect(env)
    return AudioOnsets(frames * HOP / LIBROSA_SR, env, np.arange(len(env)) * HOP / LIBROSA_SR)


# -- video: Farneback flow magnitude ------------------------------------------------------------------------

def flow_workers() -> int:
    """How many frame pairs :func:`motion_trajectory` runs at once by default: OpenCV's
    thread count (``cv2.getNumThreads()``, so ``cv2.setNumThreads(n)`` limits it; 1 when
    OpenCV threading is off), at most the CPUs this process may use, at most
    :data:`MAX_FLOW_WORKERS` (each in-flight pair holds its own Farneback buffers)."""
    import os

    cv2 = _cv2()
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(int(cv2.getNumThreads()), cpus, MAX_FLOW_WORKERS))


def _pair_flow(prev: np.ndarray, curr: np.ndarray, scale: float) -> float:
    """Mean Farneback flow magnitude from ``prev`` to ``curr`` (grey uint8), in full-size pixels
    (``av_align.py:compute_of``)."""
    cv2 = _cv2()
    flow = cv2.calcOpticalFlowFarneback(prev, curr, None, *FARNEBACK_ARGS)
    return float(cv2.mean(cv2.magnitude(flow[..., 0], flow[..., 1]))[0]) / scale


def motion_trajectory(frames: Iterable[np.ndarray], max_side: int = 0,
                      progress: Optional[Callable[[int], None]] = None, workers: Optional[int] = None) -> np.ndarray:
    """Mean Farneback flow magnitude between consecutive frames, with the first value
    repeated (``av_align.py:detect_video_peaks``): ``m[0] = m[1] = flow(f0, f1)``,
    ``m[i] = flow(f[i-1], f[i])``. Values are pixels per frame.

    ``frames``: ``[H, W, 3]`` uint8 RGB (grey via OpenCV's RGB2GRAY, which is the
    reference's BGR2GRAY on the same pixels) or ``[H, W]`` uint8 grey; read one at a time
    (a generator is not materialised).
    ``max_side`` > 0 runs the flow on frames shrunk (area average) so that the longer
    side is at most that many pixels, and scales the magnitudes back to full-size
    pixels — faster, not the reference's number (docs/sync_score.md).

    ``workers``: frame pairs computed at once in a thread pool (``None``:
    :func:`flow_workers`). OpenCV's Farneback runs on one core per call and releases the
    GIL, so pairs run in parallel; each pair is the same independent OpenCV call as in the
    serial loop, and the values are collected in frame order (``progress`` is called from
    the calling thread, in order). At most ``2 × workers`` pairs are in flight.
    """
    cv2 = _cv2()
    workers = flow_workers() if workers is None else max(1, int(workers))
    pool = None
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(workers, thread_name_prefix="avsync-flow")
    pending: deque = deque()  # (frame index, future or value), in frame order
    prev = None
    mags: list[float] = []
    scale = 1.0

    def collect(limit: int) -> None:
        while len(pending) > limit:
            i, value = pending.popleft()
            mags.append(value.result() if pool is not None else value)
            if progress is not None:
                progress(i + 1)

    try:
        for i, frame in enumerate(frames):
            f = np.asarray(frame)
            if f.dtype != np.uint8:
                raise InputError("images", f"frames must be uint8 for optical flow, got {f.dtype}")
            gray = cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) if f.ndim == 3 else np.ascontiguousarray(f)
            if max_side and max(gray.shape) > max_side:
                scale = max_side / max(gray.shape)
                size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
                gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
            if prev is None:
                if progress is not None:
                    progress(i + 1)
            elif pool is not None:
                pending.append((i, pool.submit(_pair_flow, prev, gray, scale)))
                collect(2 * workers)
            else:
                pending.append((i, _pair_flow(prev, gray, scale)))
                collect(0)
            prev = gray
        collect(0)
    finally:
        if pool is not None:
            for _, fut in pending:
                fut.cancel()
            pool.shutdown(wait=True)
    if not mags:
        return np.zeros(1 if prev is not None else 0)
    return np.asarray([mags[0]] + mags, dtype=np.float64)


def motion_peaks(trajectory: np.ndarray, min_flow: float = MIN_PEAK_FLOW) -> np.ndarray:
    """Frame indices ``i`` (1 <= i <= N-2) with ``m[i-1] < m[i] > m[i+1]`` and
    ``m[i] >= min_flow`` (``av_align.py:find_local_max_indexes``)."""
    m = np.asarray(trajectory, dtype=np.float64)
    if len(m) < 3:
        return np.zeros(0, dtype=np.int64)
    mid = m[1:-1]
    ok = (m[:-2] < mid) & (mid > m[2:]) & (mid >= min_flow)
    return np.flatnonzero(ok) + 1


# -- scores ------------------------------------------------------------------------------------------------

def av_align_iou(audio_times: Sequence[float], video_times: Sequence[float], fps: float) -> tuple[float, int]:
    """``av_align.py:calc_intersection_over_union``: each audio peak, in order, takes the
    first unused video peak ``v`` with ``v - 1/fps < a < v + 1/fps``; ``I`` matches give
    ``I / (|A| + |V| - I)``. Returns ``(score, I)``; no peaks at all gives 0 (the reference
    divides by zero)."""
    used = [False] * len(video_times)
    inter = 0
    for a in audio_times:
        for j, v in enumerate(video_times):
            if not used[j] and v - 1 / fps < a < v + 1 / fps:
                inter += 1
                used[j] = True
                break
    union = len(audio_times) + len(video_times) - inter
    return (inter / union if union else 0.0), inter


def _one_to_one_matches(a: np.ndarray, b: np.ndarray, tol: float) -> int:
    """Largest number of disjoint pairs with ``|a - b| <= tol`` (greedy in time order on
    sorted lists is optimal for interval matching)."""
    i = j = n = 0
    while i < len(a) and j < len(b):
        if abs(a[i] - b[j]) <= tol:
            n, i, j = n + 1, i + 1, j + 1
        elif a[i] < b[j]:
            i += 1
        else:
            j += 1
    return n


def symmetric_matching(a_times: Sequence[float], b_times: Sequence[float], tol: float) -> float:
    """Syncphony eq. 4: ``(#{a: some b within tol} + #{b: some a within tol}) / (2 |A ∪ B|)``.

    Peaks are times, so ``|A ∪ B|`` counts two peaks within ``tol`` of each other once:
    ``|A| + |B| - M`` with ``M`` the largest one-to-one matching (our reading of the
    union; with every peak matched the score is 1, with none 0). Empty sets give 0."""
    a = np.sort(np.asarray(a_times, dtype=np.float64))
    b = np.sort(np.asarray(b_times, dtype=np.float64))
    if len(a) == 0 or len(b) == 0:
        return 0.0
    a_hit = int((metrics._nearest_distance(a, b) <= tol + 1e-12).sum())
    b_hit = int((metrics._nearest_distance(b, a) <= tol + 1e-12).sum())
    union = len(a) + len(b) - _one_to_one_matches(a, b, tol + 1e-12)
    return (a_hit + b_hit) / (2.0 * union)


@dataclass
class OffsetResult:
    offset_ms: float
    confidence: float
    lags_ms: list[float]
    correlation: list[float]
    reason: str = ""


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean()
    y = y - y.mean()
    den = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / den if den > 0 else 0.0


def av_offset(audio_curve: np.ndarray, motion_curve: np.ndarray, fps: float,
              max_offset_s: float = MAX_OFFSET_S) -> OffsetResult:
    """Lag (ms) maximizing the Pearson correlation of ``audio_curve[k]`` with
    ``motion_curve[k + L]`` (both on the video frame grid), ``|L| <= max_offset_s``.

    **Positive = video late**: the motion of an event comes ``offset_ms`` after its sound.
    The best integer lag is refined to a fraction of a frame with a parabola through it
    and its neighbours. ``confidence`` = best correlation / the highest other local
    maximum of the curve (capped at :data:`CONFIDENCE_CAP` when no other lag correlates
    positively); 0 when either curve is flat."""
    a = np.asarray(audio_curve, dtype=np.float64)
    m = np.asarray(motion_curve, dtype=np.float64)
    n = min(len(a), len(m))
    a, m = a[:n], m[:n]
    max_lag = int(min(math.floor(max_offset_s * fps + 1e-9), max(n - 3, 0)))
    lags = np.arange(-max_lag, max_lag + 1)
    lags_ms = [float(L / fps * 1000.0) for L in lags]
    flat = [name for name, c in (("audio onset envelope", a), ("motion energy", m)) if n == 0 or np.ptp(c) <= 0]
    if flat:
        return OffsetResult(0.0, 0.0, lags_ms, [0.0] * len(lags),
                            f"offset undefined: the {' and the '.join(flat)} {'are' if len(flat) > 1 else 'is'} flat")
    corr = np.array([_pearson(a[:n - L], m[L:]) if L >= 0 else _pearson(a[-L:], m[:n + L]) for L in lags])
    best = int(np.argmax(corr))
    peak = float(corr[best])
    reason = ""
    frac = 0.0
    if 0 < best < len(corr) - 1:
        l, c, r = corr[best - 1], corr[best], corr[best + 1]
        den = l - 2 * c + r
        if den < 0:
            frac = float(np.clip(0.5 * (l - r) / den, -0.5, 0.5))
    elif len(corr) > 1:
        reason = "the best lag is at the edge of the search range; the true offset may be larger"
    # second best: the highest local maximum other than the best lag
    is_max = np.zeros(len(corr), dtype=bool)
    if len(corr) >= 3:
        is_max[1:-1] = (corr[1:-1] >= corr[:-2]) & (corr[1:-1] >= corr[2:])
    is_max[0] = len(corr) > 1 and corr[0] >= corr[1]
    is_max[-1] = len(corr) > 1 and corr[-1] >= corr[-2]
    is_max[best] = False
    second = float(corr[is_max].max()) if is_max.any() else 0.0
    if peak <= 0:
        confidence = 0.0
        reason = reason or "no lag correlates positively: the motion does not follow the audio onsets"
    elif second <= 0:
        confidence = CONFIDENCE_CAP
    else:
        confidence = min(peak / second, CONFIDENCE_CAP)
    return OffsetResult(float((lags[best] + frac) / fps * 1000.0), float(confidence), lags_ms,
                        [float(v) for v in corr], reason)


def keyframe_hits(reference_frames: Sequence[int], motion_peak_frames: Sequence[int], t: int) -> tuple[float, float]:
    """AP@t and precision@t (one instance, :mod:`.metrics`): the share of reference
    frames (keyframes or audio onsets) with a motion peak within ``t`` frames, and the
    share of motion peaks within ``t`` frames of a reference frame."""
    return (metrics.match_rate(reference_frames, motion_peak_frames, t),
            metrics.precision_rate(reference_frames, motion_peak_frames, t))


def audio_curve_on_frames(onsets: AudioOnsets, fps, num_frames: int) -> np.ndarray:
    """The onset envelope on the video frame grid: each frame takes the largest envelope
    value whose time falls inside the frame (:func:`.onset.frame_envelope` on a
    :class:`.timeline.Timeline` at 22 050 Hz), min-max normalised."""
    exact_fps = as_fps(fps)
    samples = math.ceil(Fraction(num_frames) * LIBROSA_SR / exact_fps)
    tl = Timeline(exact_fps, LIBROSA_SR, samples)
    positions = np.arange(len(onsets.envelope), dtype=np.int64) * HOP
    return normalise(frame_envelope(onsets.envelope, positions, tl)[:num_frames])


# -- the report --------------------------------------------------------------------------------------------

@dataclass
class SyncReport:
    """``AVSYNC_SYNC_REPORT``: every score with what it was computed from.

    Sign convention: ``offset_ms`` > 0 means the video is late (motion after sound).
    """

    av_align: float
    offset_ms: float
    offset_confidence: float
    keyframe_ap: float
    keyframe_precision: float
    matching_score: float
    fps: float
    num_frames: int
    audio_seconds: float
    keyframe_reference: str
    keyframe_tolerance: int
    match_tolerance_s: float
    audio_onset_times: list[float]
    motion_peak_frames: list[int]
    motion_energy: list[float]
    audio_curve: list[float]
    offset_lags_ms: list[float]
    offset_correlation: list[float]
    av_align_matches: int = 0
    flow_max_side: int = 0
    reasons: list[str] = field(default_factory=list)
    sign_convention: str = "offset_ms > 0: video late (motion comes after its sound)"

    @property
    def motion_peak_times(self) -> list[float]:
        return [k / self.fps for k in self.motion_peak_frames]

    def to_dict(self, curves: bool = True) -> dict:
        d = asdict(self)
        d["motion_peak_times"] = self.motion_peak_times
        if not curves:
            for k in ("motion_energy", "audio_curve", "offset_lags_ms", "offset_correlation"):
                d.pop(k)
        return d

    def summary(self) -> str:
        lines = [
            f"AV-Align {self.av_align:.3f} ({self.av_align_matches} matched of {len(self.audio_onset_times)} audio "
            f"onsets, {len(self.motion_peak_frames)} motion peaks)",
            f"AV offset {self.offset_ms:+.1f} ms (confidence {self.offset_confidence:.2f}; + = video late)",
            f"keyframe AP@{self.keyframe_tolerance} {self.keyframe_ap:.3f}, precision@{self.keyframe_tolerance} "
            f"{self.keyframe_precision:.3f} (vs {self.keyframe_reference.replace('_', ' ')})",
            f"symmetric matching (CycleSync-style proxy, ±{self.match_tolerance_s * 1000:.0f} ms) "
            f"{self.matching_score:.3f}",
            f"{self.num_frames} frames at {self.fps:g} fps, {self.audio_seconds:.2f} s of audio",
        ]
        lines += [f"note: {r}" for r in self.reasons]
        return "\n".join(lines)


def score_sync(frames: Iterable[np.ndarray], num_frames: int, fps, waveform, sample_rate: int,
               keyframe_frames: Optional[Sequence[int]] = None, keyframe_reference: str = "audio_onsets",
               keyframe_tolerance: int = 1, match_tolerance_s: Optional[float] = None,
               max_offset_s: float = MAX_OFFSET_S, flow_max_side: int = 0,
               progress: Optional[Callable[[int], None]] = None, workers: Optional[int] = None) -> SyncReport:
    """Every score for one clip. ``frames``: ``num_frames`` uint8 frames (see
    :func:`motion_trajectory`); ``waveform``: ``[C, T]`` or ``[T]`` float samples whose
    sample 0 is the time of frame 0. ``keyframe_frames``: the reference frames for the
    keyframe hit rate (``None``: the audio onsets, rounded to frames).
    ``match_tolerance_s`` ``None``: one frame. ``workers``: frame pairs of optical flow
    computed at once (:func:`motion_trajectory`; ``None``: :func:`flow_workers`)."""
    fps_f = float(as_fps(fps))
    if num_frames < 2:
        raise InputError("images", f"need at least 2 frames to measure motion, got {num_frames}")
    tol = 1.0 / fps_f if match_tolerance_s is None else float(match_tolerance_s)
    wav = np.asarray(waveform, dtype=np.float32)
    audio_seconds = wav.shape[-1] / float(sample_rate)
    reasons: list[str] = []

    onsets = audio_onsets(wav, sample_rate)
    traj = motion_trajectory(frames, max_side=flow_max_side, progress=progress, workers=workers)
    peaks = motion_peaks(traj)
    video_times = [k / fps_f for k in peaks]
    audio_times = [float(t) for t in onsets.times]

    if not np.any(wav):
        reasons.append("silent audio: no onsets, so no audio peak can match (scores are 0)")
    elif len(audio_times) == 0:
        reasons.append("no audio onsets found (the onset envelope has no peak 0.07 above its local mean)")
    if float(np.max(traj)) < MIN_PEAK_FLOW:
        reasons.append(f"static video: no motion above {MIN_PEAK_FLOW} px/frame, so no motion peaks (scores are 0)")
    elif len(peaks) == 0:
        reasons.append("no motion peaks: the motion energy has no local maximum")
    if abs(audio_seconds - num_frames / fps_f) > 1.0 / fps_f + 0.05:
        reasons.append(f"audio ({audio_seconds:.2f} s) and video ({num_frames / fps_f:.2f} s) differ in length; "
                       "audio sample 0 is taken to be frame 0")

    av, inter = av_align_iou(audio_times, video_times, fps_f)
    match = symmetric_matching(audio_times, video_times, tol)
    curve = audio_curve_on_frames(onsets, fps, num_frames)
    off = av_offset(curve, traj, fps_f, max_offset_s)
    if off.reason:
        reasons.append(off.reason)

    if keyframe_frames is None:
        keyframe_reference = "audio_onsets"
        ref = sorted({int(round(t * fps_f)) for t in audio_times})
    else:
        ref = sorted({int(k) for k in keyframe_frames})
    ap, prec = keyframe_hits(ref, peaks.tolist(), int(keyframe_tolerance))
    if not ref:
        reasons.append(f"no reference frames ({keyframe_reference.replace('_', ' ')}): keyframe AP is 0.5 by "
                       "KeyVID's convention (nothing to judge)")

    return SyncReport(
        av_align=float(av), offset_ms=off.offset_ms, offset_confidence=off.confidence, keyframe_ap=float(ap),
        keyframe_precision=float(prec), matching_score=float(match), fps=fps_f, num_frames=int(num_frames),
        audio_seconds=float(audio_seconds), keyframe_reference=keyframe_reference,
        keyframe_tolerance=int(keyframe_tolerance), match_tolerance_s=tol, audio_onset_times=audio_times,
        motion_peak_frames=[int(k) for k in peaks], motion_energy=[float(v) for v in traj],
        audio_curve=[float(v) for v in curve], offset_lags_ms=off.lags_ms, offset_correlation=off.correlation,
        av_align_matches=int(inter), flow_max_side=int(flow_max_side), reasons=reasons)
