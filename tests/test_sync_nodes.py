"""AVSyncSyncScore: the node returns what core.sync_metrics computes, uses the timeline's
fps, maps keyframes, and refuses bad widgets before any work."""

import numpy as np
import pytest
import torch

from avsync.cli.common import NodeValidationError, run_node
from avsync.core import sync_metrics as sm
from avsync.core.audio import make_audio
from avsync.core.errors import InputError
from avsync.core.keyframes import Keyframes
from avsync.core.timeline import Timeline
from avsync.nodes.sync_nodes import AVSyncSyncScore
from tests.factories import audio as A
from tests.factories.video import jumping_square

FPS, SR, N = 24, 32000, 72
EVENTS = [12, 25, 33, 50, 61]


@pytest.fixture(scope="module")
def clip():
    frames = jumping_square(N, EVENTS, seed=1)
    wav = A.clicks([k / FPS for k in EVENTS], N / FPS, SR, seed=1).astype(np.float32)
    return frames, wav


def _images(frames):
    return torch.from_numpy(frames).float() / 255.0


def _keyframes(peaks, indices, fps=FPS):
    return Keyframes(indices=indices, curve=[0.0] * N, peaks=peaks, valleys=[], fps=fps, num_frames=N,
                     method="onset", seed=0)


def test_outputs_are_the_core_scores(clip):
    frames, wav = clip
    out = AVSyncSyncScore().score(_images(frames), make_audio(torch.from_numpy(wav)[None], SR), fps=FPS)
    report, av, off, conf, ap, prec, match, plot = out["result"]
    expect = sm.score_sync(list(frames), N, FPS, wav[None], SR, keyframe_reference="keyframe_peaks")
    assert report.av_align == expect.av_align == av and av > 0.9
    # OpenCV's threaded Farneback differs run to run in the last bits (measured 2e-9 relative)
    assert (off, conf) == pytest.approx((expect.offset_ms, expect.offset_confidence), rel=1e-6)
    assert (ap, prec, match) == (expect.keyframe_ap, expect.keyframe_precision, expect.matching_score)
    assert report.motion_peak_frames == EVENTS
    assert report.keyframe_reference == "audio_onsets"  # nothing connected: scored against the onsets
    assert plot.shape == (1, 512, 1024, 3) and 0.0 <= float(plot.min()) and float(plot.max()) <= 1.0
    assert "AV-Align" in out["ui"]["text"][0] and "video late" in out["ui"]["text"][0]


def test_timeline_fps_wins_and_keyframes_are_mapped(clip):
    frames, wav = clip
    audio = make_audio(torch.from_numpy(wav)[None], SR)
    tl = Timeline(FPS, SR, wav.shape[-1])
    report = run_node("AVSyncSyncScore", images=_images(frames), audio=audio, fps=30.0, timeline=tl,
                      keyframes=_keyframes(EVENTS, [0] + EVENTS))[0]
    assert report.fps == FPS
    assert (report.keyframe_ap, report.keyframe_precision) == (1.0, 1.0)
    # all_keyframes includes frame 0, which has no motion peak
    r = run_node("AVSyncSyncScore", images=_images(frames), audio=audio, fps=FPS, keyframe_reference="all_keyframes",
                 keyframes=_keyframes(EVENTS, [0] + EVENTS))[0]
    assert r.keyframe_ap == pytest.approx(5 / 6) and r.keyframe_precision == 1.0
    # keyframes on a 12-fps grid land on this 24-fps grid at twice the index
    r = run_node("AVSyncSyncScore", images=_images(frames), audio=audio, fps=FPS,
                 keyframes=_keyframes([k // 2 for k in EVENTS], [0], fps=12))[0]
    assert r.keyframe_ap == pytest.approx(1.0)
    # keyframes far from every motion peak
    r = run_node("AVSyncSyncScore", images=_images(frames), audio=audio, fps=FPS,
                 keyframes=_keyframes([5, 40, 70], [0]))[0]
    assert (r.keyframe_ap, r.keyframe_precision) == (0.0, 0.0)


@pytest.mark.parametrize("widget,value,word", [
    ("fps", 0.0, "fps"), ("keyframe_tolerance", 99, "keyframe_tolerance"),
    ("flow_max_side", 5, "flow_max_side"), ("max_offset_ms", 0.0, "max_offset_ms"),
    ("keyframe_reference", "nearest", "keyframe_reference"), ("match_tolerance_ms", -1.0, "match_tolerance_ms"),
])
def test_bad_widget_values_name_the_widget(widget, value, word):
    """flow_max_side is refused before the run (VALIDATE_INPUTS: its schema range cannot say "0 or
    16..8192"); in ComfyUI the schema refuses the others, and a direct call or the command line is
    refused by score() itself, before any frame is read."""
    if widget == "flow_max_side":
        msg = AVSyncSyncScore.VALIDATE_INPUTS(flow_max_side=value)
        assert isinstance(msg, str) and msg.startswith(word)
    with pytest.raises(NodeValidationError if widget == "flow_max_side" else InputError, match=f"^{word}"):
        run_node("AVSyncSyncScore", images=torch.zeros(2, 8, 8, 3), audio=make_audio(torch.zeros(1, 800), 8000),
                 **{widget: value})


def test_bad_sockets_are_input_errors():
    audio = make_audio(torch.zeros(1, 8000), 8000)
    with pytest.raises(InputError, match="images.*at least 2 frames"):
        AVSyncSyncScore().score(torch.zeros(1, 8, 8, 3), audio)
    with pytest.raises(InputError, match="images"):
        AVSyncSyncScore().score(torch.zeros(8, 8, 3), audio)
    with pytest.raises(InputError, match="timeline"):
        AVSyncSyncScore().score(torch.zeros(3, 8, 8, 3), audio, timeline="24 fps")
    with pytest.raises(InputError, match="keyframes"):
        AVSyncSyncScore().score(torch.zeros(3, 8, 8, 3), audio, keyframes=[1, 2])
