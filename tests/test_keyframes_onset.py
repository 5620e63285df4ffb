"""The onset method: hits at known frames come back on the right frame, over a
whole minute, with and without a music bed; bad audio gives clear results."""

from fractions import Fraction

import numpy as np
import pytest
import torch

from avsync.core.errors import InputError
from avsync.core.keyframes import find_peaks_valleys
from avsync.core.localize import localize
from avsync.core.metrics import average_precision_at
from avsync.core.onset import onset_curve
from avsync.core.timeline import Timeline
from tests.factories.audio import chord, clicks, noise


def _hits_on_frames(tl: Timeline, frames, offset_fraction=0.0):
    """Hit times (s) at the start of each frame (plus a fraction of a frame)."""
    spf = tl.samples_per_frame
    return [(tl.frame_start_sample(k) + float(offset_fraction * spf)) / tl.sample_rate for k in frames]


def _frames(seed, n_frames, count, min_gap=8):
    rng = np.random.default_rng(seed)
    out, k = [], int(rng.integers(3, 10))
    while k < n_frames - 3 and len(out) < count:
        out.append(k)
        k += int(rng.integers(min_gap, 3 * min_gap))
    return out


@pytest.mark.parametrize("sr,bed", [(16000, False), (16000, True), (48000, True), (44100, False)])
def test_hits_at_known_frames(sr, bed):
    dur = 8.0
    tl = Timeline(24, sr, int(dur * sr))
    truth = _frames(sr + bed, tl.num_frames, 40)
    # hits anywhere in the first 90% of their frame
    rng = np.random.default_rng(1)
    times = [t for k in truth for t in _hits_on_frames(tl, [k], rng.uniform(0.0, 0.9))]
    x = clicks(times, dur, sr, amp=0.5)
    if bed:
        x = x + chord(duration=dur, sr=sr, amp=0.35) + noise(dur, sr, amp=0.01)
    curve = onset_curve(torch.tensor(x, dtype=torch.float32)[None], tl)
    assert curve.shape == (tl.num_frames,) and curve.min() == 0.0 and curve.max() == 1.0
    peaks, _ = find_peaks_valleys(curve)
    assert average_precision_at([(truth, peaks)], 3) >= 0.95
    assert average_precision_at([(truth, peaks)], 0) >= 0.95   # on the very frame
    assert len(peaks) <= len(truth) + 2


@pytest.mark.parametrize("fps", [24, Fraction(30000, 1001)])
def test_no_drift_over_a_minute(fps):
    sr, dur = 48000, 60.0
    tl = Timeline(fps, sr, int(dur * sr))
    truth = _frames(7, tl.num_frames, 200, min_gap=10)
    assert truth[-1] > tl.num_frames - 40                     # hits up to the end of the minute
    x = clicks(_hits_on_frames(tl, truth), dur, sr, amp=0.6) + chord(duration=dur, sr=sr, amp=0.3)
    stereo = torch.tensor(np.stack([x, 0.5 * x]), dtype=torch.float32)
    peaks, _ = find_peaks_valleys(onset_curve(stereo, tl))
    found = set(peaks.tolist())
    late = [k for k in truth if k not in found]
    assert not late, f"hits not on their frame: {late[:10]}"
    # the last ten hits are still exactly on their frames
    assert all(k in found for k in truth[-10:])


def test_gain_does_not_matter_and_curve_is_normalised():
    sr = 16000
    tl = Timeline(24, sr, 3 * sr)
    x = torch.tensor(clicks([0.5, 1.2, 2.0], 3.0, sr) + chord(duration=3.0, sr=sr, amp=0.2), dtype=torch.float32)[None]
    a, b = onset_curve(x, tl), onset_curve(0.01 * x, tl)
    assert np.allclose(a, b, atol=1e-4)  # measured 1.9e-7 on both kernel sets (curve in [0, 1])


def test_silence_and_dc_give_a_flat_curve_and_uniform_keyframes():
    sr = 16000
    tl = Timeline(24, sr, 2 * sr)
    for wav in (torch.zeros(1, 2 * sr), torch.full((1, 2 * sr), 0.5)):
        r = localize(wav, sr, tl, "onset", selection="paper")
        assert np.all(np.asarray(r.curve) == 0.0) and r.peaks == [] and r.valleys == []
        assert r.indices == list(range(0, 48, 4))


def test_clipped_audio_still_finds_hits():
    sr = 16000
    tl = Timeline(24, sr, 4 * sr)
    truth = [10, 30, 50, 70, 85]
    x = np.clip(4.0 * (clicks(_hits_on_frames(tl, truth), 4.0, sr) + chord(duration=4.0, sr=sr, amp=0.3)), -1, 1)
    peaks, _ = find_peaks_valleys(onset_curve(torch.tensor(x, dtype=torch.float32)[None], tl))
    assert average_precision_at([(truth, peaks)], 1) == 1.0


def test_bad_lengths_and_rates():
    sr = 16000
    with pytest.raises(InputError, match="audio.*shorter than one frame"):
        localize(torch.zeros(1, 300), sr, Timeline(24, sr, 300))
    with pytest.raises(InputError, match="fps"):
        Timeline(0, sr, sr)
    with pytest.raises(InputError, match="fps"):
        Timeline(-24, sr, sr)
    with pytest.raises(InputError, match="num_keyframes"):
        localize(torch.zeros(1, sr // 2), sr, Timeline(24, sr, sr // 2), num_keyframes=13)  # 12 frames
    with pytest.raises(InputError, match="method"):
        localize(torch.zeros(1, sr), sr, Timeline(24, sr, sr), method="magic")
    with pytest.raises(InputError, match="localizer_model"):
        localize(torch.zeros(1, sr), sr, Timeline(24, sr, sr), method="learned")


def test_a_short_clip_gets_all_its_frames_when_asked():
    sr = 16000
    tl = Timeline(24, sr, sr // 2)  # 12 frames
    r = localize(torch.tensor(clicks([0.2], 0.5, sr), dtype=torch.float32)[None], sr, tl, num_keyframes=12)
    assert r.indices == list(range(12))
