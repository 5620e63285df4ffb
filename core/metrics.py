"""Keypoint metrics of KeyVID App. D.

``AP@t``: for each ground-truth keypoint, it is matched when a predicted keypoint
lies within ``t`` frames (``|gt - pred| <= t``, as ``AudioDataset._precision`` in the
released code compares); the score of one instance is ``N_match / N_gt``, and AP@t is
the mean over instances. ``precision@t`` is the other direction: the share of
predicted keypoints that lie within ``t`` frames of some ground-truth keypoint.

Edge cases follow the released evaluation code: no ground-truth keypoint gives 0.5
for that instance (it cannot be judged either way), ground truth without any
prediction gives 0.0. For precision@t, no prediction gives 0.5 and predictions
without ground truth give 0.0.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def _as_int_array(x) -> np.ndarray:
    return np.asarray(sorted(int(v) for v in x), dtype=np.int64)


def _nearest_distance(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """For each value in ``src``, the distance to the nearest value of sorted ``dst``."""
    i = np.searchsorted(dst, src)
    left = np.abs(src - dst[np.clip(i - 1, 0, len(dst) - 1)])
    right = np.abs(dst[np.clip(i, 0, len(dst) - 1)] - src)
    return np.minimum(left, right)


def _share_within(src: Sequence[int], dst: Sequence[int], t: int) -> float:
    """Share of ``src`` keypoints with a ``dst`` keypoint within ``t`` frames; 0.5 when
    there is nothing to judge, 0.0 when there is nothing to match against."""
    src, dst = _as_int_array(src), _as_int_array(dst)
    if len(src) == 0:
        return 0.5
    if len(dst) == 0:
        return 0.0
    return float(np.mean(_nearest_distance(src, dst) <= t))


def match_rate(ground_truth: Sequence[int], predicted: Sequence[int], t: int) -> float:
    """One instance of AP@t: share of ground-truth keypoints with a prediction within ``t`` frames."""
    return _share_within(ground_truth, predicted, t)


def precision_rate(ground_truth: Sequence[int], predicted: Sequence[int], t: int) -> float:
    """One instance of precision@t: share of predictions within ``t`` frames of a ground-truth keypoint."""
    return _share_within(predicted, ground_truth, t)


def average_precision_at(instances: Iterable[tuple[Sequence[int], Sequence[int]]], t: int) -> float:
    """AP@t over ``(ground_truth, predicted)`` pairs (KeyVID App. D)."""
    scores = [match_rate(g, p, t) for g, p in instances]
    return float(np.mean(scores)) if scores else float("nan")


def precision_at(instances: Iterable[tuple[Sequence[int], Sequence[int]]], t: int) -> float:
    """Mean precision@t over ``(ground_truth, predicted)`` pairs."""
    scores = [precision_rate(g, p, t) for g, p in instances]
    return float(np.mean(scores)) if scores else float("nan")


def si_sdr(estimate, reference) -> float:
    """Scale-invariant SDR in dB (Le Roux et al. 2019) of ``estimate`` against
    ``reference`` (any shape, all channels pooled); ``-inf`` when the estimate has no
    part along the reference, ``nan`` for a silent reference."""
    est = np.asarray(estimate, dtype=np.float64).ravel()
    ref = np.asarray(reference, dtype=np.float64).ravel()
    ref_energy = float(ref @ ref)
    if ref_energy == 0.0:
        return float("nan")
    target = (est @ ref) / ref_energy * ref
    noise = float(((est - target) ** 2).sum())
    signal = float((target ** 2).sum())
    if signal == 0.0:
        return float("-inf")
    return float(10 * np.log10(signal / max(noise, 1e-300)))
