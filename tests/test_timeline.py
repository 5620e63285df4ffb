"""Timeline: exact frame <-> sample mapping, no drift, the documented rounding rule."""

from fractions import Fraction

import numpy as np
import pytest

from avsync.core.errors import InputError
from avsync.core.timeline import Timeline, as_fps


def test_hand_checked_mapping_24fps_44k1():
    tl = Timeline(24, 44100, 44100 * 2)
    # 44100 / 24 = 1837.5 samples per frame: starts alternate .5 rounding up
    assert [tl.frame_start_sample(k) for k in range(5)] == [0, 1838, 3675, 5513, 7350]
    assert tl.num_frames == 48
    assert tl.frame_of_sample(1837) == 0 and tl.frame_of_sample(1838) == 1
    assert list(tl.frame_bounds()[:5]) == [0, 1838, 3675, 5513, 7350]


def test_no_drift_over_one_hour():
    tl = Timeline(24, 48000, 48000 * 3600)
    assert tl.num_frames == 86400
    assert tl.frame_start_sample(86400) == 48000 * 3600
    ntsc = Timeline(29.97, 48000, 48000 * 3600)
    assert ntsc.fps == Fraction(30000, 1001)
    # after 30000 frames of 29.97 fps exactly 1001 s have passed
    assert ntsc.frame_start_sample(30000) == 1001 * 48000
    b = ntsc.frame_bounds()
    assert len(b) == ntsc.num_frames + 1 and b[30000] == 1001 * 48000
    assert np.all(np.diff(b) >= 1601) and np.all(np.diff(b) <= 1602)


def test_frame_of_sample_inverts_start_for_many_rates():
    for fps, sr in [(24, 16000), (25, 44100), (29.97, 44100), (59.94, 48000), (7, 22050)]:
        tl = Timeline(fps, sr, sr * 10)
        for k in range(0, tl.num_frames, 37):
            s = tl.frame_start_sample(k)
            assert tl.frame_of_sample(s) == k
            assert tl.frame_of_sample(s - 1) == k - 1 if k > 0 else True


def test_partial_trailing_frame_is_not_a_frame():
    assert Timeline(24, 16000, 16000 * 2 + 600).num_frames == 48
    assert Timeline(24, 16000, 100).num_frames == 0


def test_resampled_timeline_keeps_frames():
    tl = Timeline(24, 44100, 44100 * 3, start=1.5)
    t2 = tl.with_sample_rate(16000)
    assert t2.num_frames == tl.num_frames and t2.start == 1.5 and t2.num_samples == 48000


@pytest.mark.parametrize("fps", [0, -1, float("nan"), float("inf")])
def test_bad_fps(fps):
    with pytest.raises(InputError, match="fps"):
        as_fps(fps)
