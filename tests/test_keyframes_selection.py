"""Keyframe selection (KeyVID App. B): hand-worked examples for both variants,
invariants, and draw-for-draw parity with the released select_keyframe."""

import json
from pathlib import Path

import numpy as np
import pytest

from avsync.core.errors import InputError
from avsync.core.keyframes import (LegacyRandom, find_peaks_valleys, largest_remainder, select_keyframes,
                                   select_paper, select_reference, select_timeline, smooth)

DATA = Path(__file__).parent / "data" / "localizer"


class FirstChoice:
    """A 'random' source whose choices are the first k values and whose coin always says no."""

    def choice(self, values, k, replace=False):
        return np.asarray(values)[:k]

    def random(self):
        return 0.99


UNIFORM = list(range(0, 48, 4))


# ---- paper (Algorithm 1) -------------------------------------------------------------

def test_paper_no_peaks_is_uniform_downsampling():
    assert select_paper([], [], 48, 12, rng=FirstChoice()).tolist() == UNIFORM


def test_paper_one_peak():
    # keys {0, 20}; R = 10 over gaps with 19 and 27 free frames: shares 4.13 / 5.87
    # -> floors 4 / 5, the remainder goes to the tail (0.87 > 0.13)
    # gap (0, 20) gets 4: 4 8 12 16; tail (20, 48) gets 6: 20 + 28j/7
    assert select_paper([20], [], 48, 12, rng=FirstChoice()).tolist() == \
        [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44]


def test_paper_more_peaks_than_half():
    peaks = [5, 10, 15, 20, 25, 30, 35, 40, 45]
    valleys = [7, 12, 17, 22, 27, 32, 37, 42]
    # floor(12/2 - 1) = 5 peaks: 5 10 15 20 25; valleys between them: 7 12 17 22 -> 10 keys;
    # R = 2: free frames per gap 4,1,2,1,2,1,2,1,2 and 22 (tail), W = 38;
    # tail share 1.16 -> 1; largest remainder next: gap (0,5) 0.21 > tail 0.16
    # -> (0,5) gets 0 + floor(5/2) = 2, tail gets 25 + floor(23/2) = 36
    assert select_paper(peaks, valleys, 48, 12, rng=FirstChoice()).tolist() == \
        [0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 36]


def test_paper_adjacent_peaks():
    # keys {0, 10, 11}; R = 9 over free 9 / 0 / 36 (W = 45): shares 1.8 / 0 / 7.2
    # -> 1 / 0 / 7, remainder to (0, 10) (0.8): 3 6; tail 11 + floor(37 j / 8)
    assert select_paper([10, 11], [], 48, 12, rng=FirstChoice()).tolist() == \
        [0, 3, 6, 10, 11, 15, 20, 24, 29, 34, 38, 43]


def test_largest_remainder_hand_worked():
    assert largest_remainder(10, [19, 27]) == [4, 6]
    assert largest_remainder(7, [1, 1, 1]) == [3, 2, 2]     # ties go to the first
    assert largest_remainder(0, [3, 4]) == [0, 0]
    assert sum(largest_remainder(11, [0.3, 5, 17, 2.2])) == 11


# ---- reference (released inference code) -----------------------------------------------

def test_reference_no_peaks_anchors_0_and_44():
    # anchors {0, 44}; the one (last) interval takes all 10 padding frames: 4, 8, ..., 40
    assert select_reference([], [], 48, 12, rng=FirstChoice()).tolist() == UNIFORM


def test_reference_one_peak_pads_only_before_the_last_anchor():
    # anchors {0, 20}: no interval after the last anchor, so all 10 extra frames land in
    # (0, 20): linspace(0, 20, 11, endpoint=False).astype(int)[1:]
    assert select_reference([20], [], 48, 12, rng=FirstChoice()).tolist() == \
        [0, 1, 3, 5, 7, 9, 10, 12, 14, 16, 18, 20]


def test_reference_more_peaks_than_half():
    peaks = [5, 10, 15, 20, 25, 30, 35, 40, 45]
    valleys = [7, 12, 17, 22, 27, 32, 37, 42]
    # 6 peaks (5..30) + frame 0 + a valley in each gap after the first: 12 keys, no padding
    assert select_reference(peaks, valleys, 48, 12, rng=FirstChoice()).tolist() == \
        [0, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27, 30]


def test_reference_adjacent_peaks_tops_up_with_unused_frames():
    # anchors {0, 10, 11}; interval (0,10) gets 0 (coin says no), the last interval (10, 11)
    # gets 9 frames that all truncate to 10; unique leaves 3; 9 unused frames top up: 1..9
    assert select_reference([10, 11], [], 48, 12, rng=FirstChoice()).tolist() == list(range(12))


def test_reference_matches_released_select_keyframe_draw_for_draw():
    cases = json.loads((DATA / "selection_reference.json").read_text())["cases"]
    assert len(cases) >= 60
    for c in cases:
        p, v = find_peaks_valleys(np.array(c["curve"]))
        assert p.tolist() == c["peaks"] and v.tolist() == c["valleys"]
        got = select_reference(p, v, 48, 12, rng=LegacyRandom(c["seed"]))
        assert got.tolist() == c["keyframes"], c


# ---- both ------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["reference", "paper"])
def test_always_tk_unique_sorted_from_zero(variant):
    rng = np.random.default_rng(3)
    for trial in range(150):
        n = int(rng.integers(1, 60))
        tk = int(rng.integers(1, n + 1))
        curve = rng.random(n) * (rng.random(n) < 0.4)
        p, v = find_peaks_valleys(curve, smoothing=5 if trial % 2 else 0)
        k = select_keyframes(p, v, n, tk, variant, seed=trial)
        assert len(k) == tk and k[0] == 0 and np.all(np.diff(k) > 0) and k[-1] < n, (n, tk, k)


@pytest.mark.parametrize("variant", ["reference", "paper"])
def test_seed_decides_everything(variant):
    peaks = [4, 9, 14, 19, 24, 29, 34, 39, 44]
    valleys = [6, 11, 16, 21, 26, 31, 36, 41]
    a = select_keyframes(peaks, valleys, 48, 12, variant, seed=5)
    assert a.tolist() == select_keyframes(peaks, valleys, 48, 12, variant, seed=5).tolist()
    outs = {tuple(select_keyframes(peaks, valleys, 48, 12, variant, seed=s)) for s in range(20)}
    assert len(outs) > 1


def test_tk_larger_than_frames_is_an_input_error():
    with pytest.raises(InputError, match="num_keyframes"):
        select_paper([], [], 10, 12)
    with pytest.raises(InputError, match="num_keyframes"):
        select_timeline(np.zeros(10), num_keyframes=12)
    with pytest.raises(InputError, match="audio"):
        select_timeline(np.zeros(0))


def test_smoothing_is_the_training_loaders_moving_average():
    x = np.array([0, 0, 5, 0, 0, 0, 0], dtype=float)
    assert np.allclose(smooth(x, 5), [1, 1, 1, 1, 1, 0, 0])


def test_timeline_selection_per_clip():
    rng = np.random.default_rng(0)
    curve = rng.random(100)
    idx, clips, peaks, valleys = select_timeline(curve, 12, 48, "paper", seed=1)
    assert [len(c) for c in clips] == [12, 12, 1]       # last clip: 4 frames -> ceil(12 * 4 / 48) = 1
    assert idx == sorted(set(idx)) and {0, 48, 96} <= set(idx)
    assert idx[:12] == clips[0] and [i - 48 for i in idx[12:24]] == clips[1]
    # clips draw from their own streams: clip 0 is the same whatever follows it
    idx2, clips2, _, _ = select_timeline(curve[:48], 12, 48, "paper", seed=1)
    assert clips2[0] == clips[0]
