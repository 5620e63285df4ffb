"""Peaks, valleys and keyframe selection (KeyVID App. B), and the ``AVSYNC_KEYFRAMES`` value.

Two selection variants, both deterministic given a seed:

``reference``
    What KeyVID's released inference code runs (``avgen/data/utils.py:select_keyframe``
    at KeyVID commit 8d5cfb2, called as ``select_keyframe(kp, 0, 12, 6, 24)``), which is
    what the released generator and interpolator saw at inference:
    frame 0 plus up to ``T_K // 2`` random peaks as anchors (anchors ``{0, clip - clip/T_K}``
    when there is no peak), one random valley between each pair of consecutive anchors,
    then padding: every interval but the last gets ``floor(w) + Bernoulli(frac(w))``
    evenly spaced frames with ``w = len_i / sum(len)``, the last interval takes all the
    rest; duplicates are removed, then the list is cut or topped up with random unused
    frames. With :class:`LegacyRandom` it reproduces the released function draw for draw.

``paper``
    Algorithm 1 of KeyVID App. B.2 read literally: the first frame; up to
    ``floor(T_K/2 - 1)`` random peaks; one random valley between each pair of
    consecutive chosen peaks; the remaining ``R`` frames by largest-remainder
    proportional allocation over the gaps between chosen frames (the tail up to the
    end of the clip included), weighted by the number of free frames in each gap;
    the frames a gap receives are spread evenly inside it. Ties in the remainders go
    to the earlier gap. With no peaks this is exactly uniform downsampling.

Both return ``T_K`` unique sorted indices starting at 0.
"""

from __future__ import annotations

import math
import random as _random
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .errors import InputError

VARIANTS = ("reference", "paper")
CLIP_FRAMES = 48        # KeyVID clip: 2 s at 24 fps
NUM_KEYFRAMES = 12      # T_K
PEAK_DISTANCE = 5
PEAK_PROMINENCE = 0.1
SMOOTH_WINDOW = 5


# --------------------------------------------------------------------------------------
# Random draws
# --------------------------------------------------------------------------------------

class SeededRandom:
    """All the draws selection makes, from one seeded ``numpy.random.Generator``."""

    def __init__(self, seed: int):
        self._rng = np.random.default_rng(int(seed))

    def choice(self, values, k: int, replace: bool = False) -> np.ndarray:
        values = np.asarray(values)
        return values[self._rng.choice(len(values), size=k, replace=replace)]

    def random(self) -> float:
        return float(self._rng.random())


class LegacyRandom:
    """The two generators KeyVID's code draws from: ``np.random`` (legacy
    ``RandomState``) for ``choice`` and Python's ``random`` for ``random()``, each
    seeded with ``seed``. Running the released function after ``np.random.seed(s);
    random.seed(s)`` gives the same draws, which is how the parity test checks it."""

    def __init__(self, seed: int):
        self._np = np.random.RandomState(int(seed))
        self._py = _random.Random(int(seed))

    def choice(self, values, k: int, replace: bool = False) -> np.ndarray:
        return self._np.choice(np.asarray(values), k, replace=replace)

    def random(self) -> float:
        return self._py.random()


# --------------------------------------------------------------------------------------
# Peaks and valleys (App. B.1)
# --------------------------------------------------------------------------------------

def smooth(curve: np.ndarray, window: int = SMOOTH_WINDOW) -> np.ndarray:
    """Moving average as KeyVID's training loader does it
    (``np.convolve(x, ones(w)/w, mode='same')``: zero padding, so the ends sag)."""
    curve = np.asarray(curve, dtype=np.float64)
    if window <= 1 or curve.size == 0:
        return curve
    return np.convolve(curve, np.ones(window) / window, mode="same")


def find_peaks_valleys(curve: np.ndarray, distance: int = PEAK_DISTANCE, prominence: float = PEAK_PROMINENCE,
                       smoothing: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of peaks and valleys (``scipy.signal.find_peaks`` on the curve and on its
    negation, minimum ``distance`` frames apart, at least ``prominence`` in curve units).
    ``smoothing > 1`` first applies a moving average of that width."""
    from scipy.signal import find_peaks

    x = smooth(np.asarray(curve, dtype=np.float64), smoothing)
    if x.size < 3:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
    distance = max(int(distance), 1)
    peaks = find_peaks(x, distance=distance, prominence=prominence)[0]
    valleys = find_peaks(-x, distance=distance, prominence=prominence)[0]
    return peaks.astype(np.int64), valleys.astype(np.int64)


# --------------------------------------------------------------------------------------
# Selection inside one clip
# --------------------------------------------------------------------------------------

def _check_counts(num_frames: int, num_keyframes: int) -> None:
    if num_frames < 1:
        raise InputError("audio", "is shorter than one video frame; no keyframes can be chosen")
    if num_keyframes < 1:
        raise InputError("num_keyframes", f"must be at least 1, got {num_keyframes}")
    if num_keyframes > num_frames:
        raise InputError("num_keyframes", f"{num_keyframes} keyframes do not fit in {num_frames} frames")


def select_reference(peaks: Sequence[int], valleys: Sequence[int], num_frames: int = CLIP_FRAMES,
                     num_keyframes: int = NUM_KEYFRAMES, rng=None, seed: int = 0) -> np.ndarray:
    """The released inference selection (see the module docstring), for one clip of
    ``num_frames`` frames. ``peaks``/``valleys`` are clip-relative indices."""
    _check_counts(num_frames, num_keyframes)
    rng = rng or SeededRandom(seed)
    peaks = np.asarray(sorted(int(p) for p in peaks if 0 <= p < num_frames), dtype=np.int64)
    valleys = np.asarray(sorted(int(v) for v in valleys if 0 <= v < num_frames), dtype=np.int64)
    max_peaks = max(num_keyframes // 2, 1)  # the released code hard-codes 6 for T_K = 12

    if len(peaks) == 0:
        # the released code's second anchor is `end - round(fps_ori / target_fps)`,
        # i.e. the last frame of a uniform T_K grid
        anchors = np.array([0, num_frames - round(num_frames / num_keyframes)], dtype=np.float64)
        anchors = np.unique(np.clip(anchors, 0, num_frames - 1))
    else:
        select_num = min(max_peaks, len(peaks))
        chosen = np.asarray(rng.choice(peaks, select_num, replace=False))
        chosen_valleys = []
        if 0 not in chosen:
            chosen = np.insert(chosen, 0, 0)
        else:
            select_num -= 1
        chosen = np.sort(chosen)
        for i in range(select_num):
            a, b = chosen[i], chosen[i + 1]
            between = valleys[(valleys > a) & (valleys < b)]
            if len(between) > 0:
                chosen_valleys.extend(np.asarray(rng.choice(between, 1, replace=True)).tolist())
        anchors = np.sort(np.concatenate([chosen.astype(np.float64), np.asarray(chosen_valleys, dtype=np.float64)]))

    keys = anchors
    if len(keys) < num_keyframes:
        to_add = []
        padding = num_keyframes - len(keys)
        lengths = [keys[i + 1] - keys[i] for i in range(len(keys) - 1)]
        total = sum(lengths)
        for i in range(len(lengths)):
            if i == len(lengths) - 1 and padding > 0:
                n = padding  # the last interval takes all that is left
            else:
                weight = lengths[i] / total
                n = min(padding, int(weight // 1) + int(rng.random() < weight % 1))
                padding -= max(n, 0)
            if n > 0:
                to_add.extend(np.linspace(keys[i], keys[i + 1], n + 1, endpoint=False).astype(int)[1:].tolist())
        keys = np.sort(np.concatenate([keys, np.asarray(to_add, dtype=np.float64)]))
    keys = np.unique(keys)
    if len(keys) > num_keyframes:
        keys = keys[:num_keyframes]
    elif len(keys) < num_keyframes:
        unused = sorted(set(range(num_frames)) - {int(k) for k in keys})
        extra = rng.choice(unused, num_keyframes - len(keys), replace=False)
        keys = np.sort(np.concatenate([keys, np.asarray(extra, dtype=np.float64)]))
    return keys.astype(np.int64)


def largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (Hamilton's method):
    floors of the ideal shares, then one more to the largest remainders (ties: first)."""
    w = [float(x) for x in weights]
    s = sum(w)
    if total <= 0 or s <= 0:
        return [0] * len(w)
    ideal = [total * x / s for x in w]
    alloc = [math.floor(v + 1e-9) for v in ideal]
    rest = total - sum(alloc)
    order = sorted(range(len(w)), key=lambda i: -(ideal[i] - alloc[i]))  # stable: ties keep order
    for i in order[:rest]:
        alloc[i] += 1
    return alloc


def select_paper(peaks: Sequence[int], valleys: Sequence[int], num_frames: int = CLIP_FRAMES,
                 num_keyframes: int = NUM_KEYFRAMES, rng=None, seed: int = 0) -> np.ndarray:
    """Algorithm 1 of KeyVID App. B.2 (see the module docstring), for one clip."""
    _check_counts(num_frames, num_keyframes)
    rng = rng or SeededRandom(seed)
    peaks = np.asarray(sorted({int(p) for p in peaks if 0 < p < num_frames}), dtype=np.int64)
    valleys = np.asarray(sorted({int(v) for v in valleys if 0 < v < num_frames}), dtype=np.int64)
    keys = {0}
    max_peaks = max(math.floor(num_keyframes / 2 - 1), 0)
    max_peaks = min(max_peaks, num_keyframes - 1)
    if len(peaks) and max_peaks:
        chosen = np.sort(np.asarray(rng.choice(peaks, min(max_peaks, len(peaks)), replace=False)))
        keys.update(int(p) for p in chosen)
        for a, b in zip(chosen[:-1], chosen[1:]):
            if len(keys) >= num_keyframes:
                break
            between = valleys[(valleys > a) & (valleys < b)]
            if len(between):
                keys.add(int(np.asarray(rng.choice(between, 1, replace=True))[0]))
    remaining = num_keyframes - len(keys)
    if remaining > 0:
        anchors = sorted(keys)
        ends = anchors[1:] + [num_frames]  # the tail runs to the end of the clip
        free = [b - a - 1 for a, b in zip(anchors, ends)]
        alloc = largest_remainder(remaining, free)
        for a, b, n in zip(anchors, ends, alloc):
            # n frames spread evenly in the open gap (a, b): a + floor(j (b-a) / (n+1))
            keys.update(a + (j * (b - a)) // (n + 1) for j in range(1, n + 1))
    out = np.asarray(sorted(keys), dtype=np.int64)
    assert len(out) == num_keyframes, (out, num_keyframes)
    return out


def select_keyframes(peaks, valleys, num_frames: int, num_keyframes: int, variant: str = "reference",
                     rng=None, seed: int = 0) -> np.ndarray:
    if variant == "reference":
        return select_reference(peaks, valleys, num_frames, num_keyframes, rng=rng, seed=seed)
    if variant == "paper":
        return select_paper(peaks, valleys, num_frames, num_keyframes, rng=rng, seed=seed)
    raise InputError("selection", f"must be one of {', '.join(VARIANTS)}, got {variant!r}")


# --------------------------------------------------------------------------------------
# The whole timeline: one selection per KeyVID clip
# --------------------------------------------------------------------------------------

def clip_ranges(num_frames: int, clip_frames: int = CLIP_FRAMES) -> list[tuple[int, int]]:
    """``[start, end)`` of each clip; the last one may be shorter."""
    if clip_frames < 1:
        raise InputError("clip_frames", f"must be at least 1, got {clip_frames}")
    return [(s, min(s + clip_frames, num_frames)) for s in range(0, num_frames, clip_frames)]


def keyframes_for_clip_length(length: int, clip_frames: int, num_keyframes: int) -> int:
    """Keyframes for a clip of ``length`` frames: ``num_keyframes`` for a full clip,
    proportionally fewer (rounded up, at least 1) for a shorter last clip."""
    if length >= clip_frames:
        return num_keyframes
    return max(1, min(length, math.ceil(num_keyframes * length / clip_frames)))


def clip_seed(seed: int, clip_index: int) -> int:
    """Each clip draws from its own stream, so one clip's choice never shifts another's."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(clip_index)]).generate_state(1)[0])


@dataclass
class Keyframes:
    """``AVSYNC_KEYFRAMES``: where the keyframes are on the timeline's frame grid.

    ``indices``: every keyframe over the whole timeline (sorted, unique, frame 0 first);
    ``clips``: the same split per KeyVID clip, clip-relative; ``curve``: the motion-score
    curve (one value per frame); ``peaks``/``valleys``: detected extrema (timeline frames).
    """

    indices: list[int]
    curve: list[float]
    peaks: list[int]
    valleys: list[int]
    fps: float
    num_frames: int
    method: str
    seed: int
    selection: str = "reference"
    clip_frames: int = CLIP_FRAMES
    num_keyframes: int = NUM_KEYFRAMES
    clips: list[list[int]] = field(default_factory=list)
    fps_fraction: Optional[str] = None

    def to_dict(self) -> dict:
        return {
            "fps": self.fps,
            "fps_fraction": self.fps_fraction,
            "num_frames": self.num_frames,
            "curve": [float(v) for v in self.curve],
            "peaks": [int(v) for v in self.peaks],
            "valleys": [int(v) for v in self.valleys],
            "keyframes": [int(v) for v in self.indices],
            "clips": [[int(v) for v in c] for c in self.clips],
            "clip_frames": self.clip_frames,
            "num_keyframes": self.num_keyframes,
            "method": self.method,
            "selection": self.selection,
            "seed": self.seed,
        }

    def clip(self, i: int) -> list[int]:
        """Keyframes of clip ``i`` (clip-relative indices)."""
        return list(self.clips[i])


def select_timeline(curve: np.ndarray, num_keyframes: int = NUM_KEYFRAMES, clip_frames: int = CLIP_FRAMES,
                    variant: str = "reference", seed: int = 0, smoothing: int = 0,
                    distance: int = PEAK_DISTANCE, prominence: float = PEAK_PROMINENCE,
                    rng_factory=SeededRandom) -> tuple[list[int], list[list[int]], np.ndarray, np.ndarray]:
    """Keyframes over a whole curve, one selection per clip of ``clip_frames`` frames.

    Peaks and valleys are found once on the whole curve (a hit on a clip boundary is
    still a peak, and prominence sees the neighbouring clips); each clip then selects
    from the extrema inside it, with its own random stream. For a curve of one clip
    this is exactly KeyVID's per-clip procedure. Returns
    ``(indices, per_clip_relative, peaks, valleys)`` with timeline-frame indices.
    """
    curve = np.asarray(curve, dtype=np.float64)
    n = int(curve.size)
    if n < 1:
        raise InputError("audio", "is shorter than one video frame; no keyframes can be chosen")
    if num_keyframes < 1:
        raise InputError("num_keyframes", f"must be at least 1, got {num_keyframes}")
    if num_keyframes > min(n, clip_frames):
        raise InputError("num_keyframes", f"{num_keyframes} keyframes do not fit in "
                         f"{'a clip of ' + str(clip_frames) if clip_frames < n else str(n)} frames")
    peaks, valleys = find_peaks_valleys(curve, distance, prominence, smoothing)
    indices, clips = [], []
    for ci, (s, e) in enumerate(clip_ranges(n, clip_frames)):
        p = peaks[(peaks >= s) & (peaks < e)] - s
        v = valleys[(valleys >= s) & (valleys < e)] - s
        # a timeline shorter than one clip is one clip of its own length and gets all
        # T_K keyframes; the short last clip of a longer timeline gets its share
        k = num_keyframes if n <= clip_frames else keyframes_for_clip_length(e - s, clip_frames, num_keyframes)
        rel = select_keyframes(p, v, e - s, k, variant, rng=rng_factory(clip_seed(seed, ci)))
        clips.append([int(x) for x in rel])
        indices.extend(int(x) + s for x in rel)
    return indices, clips, peaks, valleys
