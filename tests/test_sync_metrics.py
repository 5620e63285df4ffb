"""Sync scores (core/sync_metrics.py) on rendered videos with clicks at known times,
librosa / av_align.py parity, and the degenerate inputs."""

import math
import sys
import threading

import numpy as np
import pytest

from avsync.core import sync_metrics as sm
from tests.factories import audio as A
from tests.factories.video import jumping_square

SR = 44100
SECONDS = 4.0


def _clip(fps, shift_s=0.0, seed=0):
    """Events 0.5 s .. 3.5 s, irregularly spaced (no periodicity for the offset search to
    confuse); clicks at the event times + ``shift_s`` (audio late for shift > 0)."""
    rng = np.random.default_rng(seed)
    n = int(round(SECONDS * fps))
    events, t = [], 0.5
    while t < SECONDS - 0.5:
        events.append(int(round(t * fps)))
        t += rng.uniform(0.28, 0.6)
    frames = jumping_square(n, events, seed=seed)
    wav = A.clicks([k / fps + shift_s for k in events], SECONDS, SR, seed=seed)
    return frames, wav[None].astype(np.float32), events


def _score(frames, wav, fps, **kw):
    return sm.score_sync(list(frames), len(frames), fps, wav, SR, **kw)


@pytest.mark.parametrize("fps", [24, 30])
def test_synced_clip_beats_shifted_audio_and_offset_recovers_the_shift(fps):
    frames, wav, events = _clip(fps)
    synced = _score(frames, wav, fps)
    assert synced.motion_peak_frames == events       # the flow finds exactly the jumps
    assert synced.av_align >= 0.9 and synced.matching_score >= 0.9
    assert abs(synced.offset_ms) < 1000 / fps
    for shift in (0.1, 0.2, 0.3, -0.1, -0.2, -0.3):
        _, wav_s, _ = _clip(fps, shift)
        r = _score(frames, wav_s, fps)
        if shift > 0:  # the issue asks for the ordering at +0.1/0.2/0.3 s; checked both ways
            assert synced.av_align - r.av_align >= 0.5, (shift, r.av_align)
            assert synced.matching_score - r.matching_score >= 0.5, (shift, r.matching_score)
        # audio late by `shift` = video early by `shift`: offset is -shift (positive = video late)
        assert abs(r.offset_ms - (-shift * 1000)) <= 1000 / fps, (shift, r.offset_ms)
        assert r.offset_confidence > 1.0
        assert not math.isnan(r.av_align)


def test_static_video_and_silent_audio_are_defined_with_reasons():
    fps = 24
    frames, wav, _ = _clip(fps)
    static = np.repeat(frames[:1], len(frames), axis=0)
    for f, w, word in ((static, wav, "static video"), (frames, np.zeros_like(wav), "silent audio"),
                       (static, np.zeros_like(wav), "static video")):
        r = _score(f, w, fps)
        values = [r.av_align, r.offset_ms, r.offset_confidence, r.keyframe_ap, r.keyframe_precision,
                  r.matching_score]
        assert all(math.isfinite(v) for v in values), values
        assert r.av_align == 0.0 and r.matching_score == 0.0
        assert r.offset_ms == 0.0 and r.offset_confidence == 0.0
        assert any(word in reason for reason in r.reasons), r.reasons
        assert any("offset undefined" in reason for reason in r.reasons)


def test_av_align_iou_hand_checked():
    # reference rule: strict ±1 frame, first unused video peak, each video peak used once
    fps = 10.0
    assert sm.av_align_iou([1.0, 1.05], [1.0], fps) == (1 / 2, 1)   # second audio peak finds the video peak used
    assert sm.av_align_iou([1.0], [1.1], fps) == (0.0, 0)            # exactly one frame apart: strict, no match
    assert sm.av_align_iou([1.0, 2.0], [1.05, 2.02, 3.0], fps) == (2 / 3, 2)
    assert sm.av_align_iou([], [], fps) == (0.0, 0)


def test_symmetric_matching_hand_checked():
    # eq. 4 with |A ∪ B| = |A| + |B| - one-to-one matches
    assert sm.symmetric_matching([1.0, 2.0], [1.0, 2.0], 0.05) == 1.0
    assert sm.symmetric_matching([1.0, 2.0], [1.02, 3.0], 0.05) == pytest.approx((1 + 1) / (2 * 3))
    # two audio peaks near one motion peak: both audio peaks hit, union 2 + 1 - 1 = 2
    assert sm.symmetric_matching([1.0, 1.01], [1.0], 0.05) == pytest.approx((2 + 1) / 4)
    assert sm.symmetric_matching([], [1.0], 0.05) == 0.0


def test_av_offset_sign_and_confidence_on_curves():
    rng = np.random.default_rng(0)
    a = np.zeros(120)
    a[rng.choice(np.arange(10, 100), 8, replace=False)] = 1.0
    m = np.roll(a, 3)  # motion 3 frames after the sound: video late
    r = sm.av_offset(a, m, fps=25.0)
    assert r.offset_ms == pytest.approx(120.0, abs=0.5)  # sub-frame parabola: measured 0.013 ms off
    assert r.confidence > 2
    r = sm.av_offset(a, np.roll(a, -5), fps=25.0)
    assert r.offset_ms == pytest.approx(-200.0, abs=0.5)
    flat = sm.av_offset(a, np.zeros(120), fps=25.0)
    assert (flat.offset_ms, flat.confidence) == (0.0, 0.0) and "motion energy" in flat.reason


def test_motion_peaks_threshold():
    m = np.array([0.0, 0.05, 0.0, 0.5, 0.2, 0.2, 0.3, 0.1])
    assert sm.motion_peaks(m).tolist() == [3, 6]                 # 0.05 is below 0.1 px/frame
    assert sm.motion_peaks(m, min_flow=0.0).tolist() == [1, 3, 6]


def test_flow_in_a_thread_pool_equals_one_pair_at_a_time():
    """Frame pairs computed in parallel give the serial trajectory, in frame order, read from a
    generator (never materialised), with progress reported in order from the calling thread;
    grey and shrunk (flow_max_side) frames too."""
    frames, _, events = _clip(24, seed=3)
    serial = sm.motion_trajectory(iter(frames), workers=1)
    seen, caller = [], threading.get_ident()
    par = sm.motion_trajectory((f for f in frames), workers=3,
                               progress=lambda i: seen.append((i, threading.get_ident())))
    # the same OpenCV call per pair; measured identical here, the tolerance is the one OpenCV's
    # internal threading needs run to run (2.2e-9 relative, test_av_align_equals_the_published_definition)
    np.testing.assert_allclose(par, serial, rtol=1e-6, atol=1e-9)
    assert [i for i, _ in seen] == list(range(1, len(frames) + 1)) and {t for _, t in seen} == {caller}
    assert sm.motion_peaks(par).tolist() == events
    grey = [f.mean(axis=-1).astype(np.uint8) for f in frames]
    np.testing.assert_allclose(sm.motion_trajectory(grey, max_side=48, workers=2),
                               sm.motion_trajectory(grey, max_side=48, workers=1), rtol=1e-6, atol=1e-9)
    assert 1 <= sm.flow_workers() <= sm.MAX_FLOW_WORKERS


def test_flow_pool_stops_on_a_bad_frame():
    frames, _, _ = _clip(24, seed=3)
    bad = list(frames[:10]) + [frames[10].astype(np.float32)]
    with pytest.raises(sm.InputError, match="uint8"):
        sm.motion_trajectory(bad, workers=2)
    assert not [t for t in threading.enumerate() if t.name.startswith("avsync-flow")]  # pool shut down


def test_missing_opencv_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(sm.MissingDependencyError, match="pip install opencv-python-headless"):
        sm.motion_trajectory([np.zeros((8, 8), np.uint8)] * 2)


# -- parity with the published definition --------------------------------------------------------------------

@pytest.fixture()
def librosa():
    """Test-only dependency (requirements-test.txt); only the parity tests need it."""
    return pytest.importorskip("librosa")


def _mixture(sr, seed):
    rng = np.random.default_rng(seed)
    times = np.sort(rng.uniform(0.1, 2.9, 8))
    x = A.clicks(times, 3.0, sr, seed=seed) + 0.3 * A.chord(duration=3.0, sr=sr) + A.noise(3.0, sr, 0.01, seed)
    return x.astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_onsets_equal_librosa_defaults_at_22050(seed, librosa):
    y = _mixture(22050, seed)
    env_ref = librosa.onset.onset_strength(y=y, sr=22050)
    env = sm.librosa_onset_envelope(y)
    # measured floor 2.5e-6 (float32 spectrogram in librosa, float64 here) on envelopes of max ~14
    np.testing.assert_allclose(env, env_ref, atol=1e-4)
    assert sm.librosa_onset_detect(env).tolist() == librosa.onset.onset_detect(onset_envelope=env_ref, sr=22050).tolist()
    np.testing.assert_allclose(sm.slaney_mel_filterbank(), librosa.filters.mel(sr=22050, n_fft=2048), atol=1e-8)


@pytest.mark.parametrize("sr", [44100, 48000])
def test_onset_times_equal_librosa_load_path(sr, librosa):
    # librosa.load resamples with soxr, we with scipy's polyphase filter: the envelopes
    # differ a little (measured max 0.05 on ~14), the detected onsets do not
    x = _mixture(sr, 3)
    y = librosa.resample(x, orig_sr=sr, target_sr=22050)
    ref = librosa.frames_to_time(librosa.onset.onset_detect(onset_envelope=librosa.onset.onset_strength(y=y, sr=22050),
                                                            sr=22050), sr=22050)
    np.testing.assert_allclose(sm.audio_onsets(x, sr).times, ref)


def _reference_av_align(librosa, frames_bgr, fps, y22050):
    """av_align.py's logic written from its definition (guyyariv/TempoTokens@bf0b1e3:
    detect_audio_peaks, compute_of, detect_video_peaks, find_local_max_indexes,
    calc_intersection_over_union), run with librosa and OpenCV on the same inputs."""
    import cv2

    env = librosa.onset.onset_strength(y=y22050, sr=22050)
    audio_peaks = librosa.frames_to_time(librosa.onset.onset_detect(onset_envelope=env, sr=22050), sr=22050)

    def flow_mag(a, b):
        fl = cv2.calcOpticalFlowFarneback(cv2.cvtColor(a, cv2.COLOR_BGR2GRAY), cv2.cvtColor(b, cv2.COLOR_BGR2GRAY),
                                          None, 0.5, 3, 15, 3, 5, 1.2, 0)
        return cv2.mean(cv2.magnitude(fl[..., 0], fl[..., 1]))[0]

    traj = [flow_mag(frames_bgr[0], frames_bgr[1])] + [flow_mag(frames_bgr[i - 1], frames_bgr[i])
                                                       for i in range(1, len(frames_bgr))]
    video_peaks = [i / fps for i in range(1, len(traj) - 1)
                   if traj[i - 1] < traj[i] > traj[i + 1] and traj[i] >= 0.1]
    inter, used = 0, [False] * len(video_peaks)
    for a in audio_peaks:
        for j, v in enumerate(video_peaks):
            if not used[j] and v - 1 / fps < a < v + 1 / fps:
                inter += 1
                used[j] = True
                break
    return inter / (len(audio_peaks) + len(video_peaks) - inter), traj


@pytest.mark.parametrize("shift", [0.0, 0.025, 0.2])
def test_av_align_equals_the_published_definition(shift, librosa):
    fps = 24
    frames, _, events = _clip(fps, seed=4)
    # audio at 22 050 Hz, so librosa.load would not resample: the inputs are identical
    y = A.clicks([k / fps + shift for k in events], SECONDS, 22050, seed=4) + A.noise(SECONDS, 22050, 0.002, 4)
    y = y.astype(np.float32)
    ref, traj_ref = _reference_av_align(librosa, frames[..., ::-1].copy(), fps, y)  # OpenCV reads BGR
    # at the clip's own resolution (flow_max_side=0): av_align.py runs the flow on the frames as
    # cv2.VideoCapture decodes them, unresized. Frame pairs in a pool of 2 threads and one by one.
    for workers in (2, 1):
        ours = sm.score_sync(list(frames), len(frames), fps, y, 22050, workers=workers)
        # same OpenCV calls on the same pixels; OpenCV's threaded Farneback is not bit-reproducible
        # run to run (measured: up to 2.2e-9 relative), hence the tolerance
        np.testing.assert_allclose(ours.motion_energy, traj_ref, rtol=1e-6, atol=1e-9)
        assert ours.av_align == ref
    if shift == 0.0:
        assert ours.av_align > 0.5  # a score that says something, not 0 == 0
