"""``avsync score``: JSON report from a video file, its own track or a separate audio file;
user errors exit 2 with one line and write nothing. Plus the real clip
(tests/data/sync/README.md): as-is vs shifted audio."""

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from avsync.cli import main
from avsync.cli.cmd_score import decode_video_frames
from avsync.cli.common import load_audio_file
from avsync.core.audio_io import encode_wav
from tests.factories import audio as A
from tests.factories.video import jumping_square

FPS, SR, N = 24, 48000, 72
EVENTS = [12, 25, 33, 50, 61]
REAL_CLIP = Path(__file__).parent / "data" / "sync" / "movie_hello_512x288.mp4"


def _write_video(path: Path, with_audio: bool):
    """H.264 picture (+ FLAC track in Matroska: lossless, no encoder delay to shift the clicks)."""
    import av

    frames = jumping_square(N, EVENTS, seed=2)
    wav = A.clicks([k / FPS for k in EVENTS], N / FPS, SR, seed=2).astype(np.float32)
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=FPS)
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        vs.options = {"crf": "18"}
        aus = out.add_stream("flac", rate=SR, layout="mono") if with_audio else None
        for f in frames:
            for p in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(p)
        for p in vs.encode(None):
            out.mux(p)
        if aus is not None:
            fr = av.AudioFrame.from_ndarray((wav * 32767).round().astype(np.int16)[None], format="s16", layout="mono")
            fr.sample_rate, fr.pts, fr.time_base = SR, 0, Fraction(1, SR)
            for p in list(aus.encode(fr)) + list(aus.encode(None)):
                out.mux(p)
    return wav


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("score")
    wav = _write_video(d / "own.mkv", with_audio=True)
    _write_video(d / "silent_picture.mp4", with_audio=False)
    encode_wav(d / "clicks.wav", wav[None], SR)
    return d


def test_score_video_with_its_own_track(files, capsys, tmp_path):
    out, plot = tmp_path / "r" / "report.json", tmp_path / "plot.png"
    assert main(["score", "--video", str(files / "own.mkv"), "--out", str(out), "--plot", str(plot)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text())["av_align"] == printed["av_align"]
    assert printed["av_align"] > 0.8 and printed["motion_peak_frames"] == EVENTS
    assert abs(printed["offset_ms"]) < 1000 / FPS and printed["fps"] == FPS
    assert "offset_curve" not in printed and "offset_ms > 0: video late" in printed["sign_convention"]
    from PIL import Image

    assert Image.open(plot).size == (1024, 512)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png", "r"]  # no temporary files left


def test_score_separate_audio_and_shift_search(files, capsys):
    rc = main(["score", "--video", str(files / "silent_picture.mp4"), "--audio", str(files / "clicks.wav"),
               "--shift-search", "--flow-max-side", "64", "--keyframe-tolerance", "0"])
    cap = capsys.readouterr()
    assert rc == 0
    report = json.loads(cap.out)
    lags = [lag for lag, _ in report["offset_curve"]]
    assert lags[0] == pytest.approx(-500.0) and lags[-1] == pytest.approx(500.0) and len(lags) == 25
    assert "<- best" in cap.err and report["flow_max_side"] == 64 and report["keyframe_tolerance"] == 0


def test_keyframes_file(files, capsys, tmp_path):
    kf = {"fps": FPS, "num_frames": N, "keyframes": [0] + EVENTS, "peaks": EVENTS, "valleys": [], "curve": []}
    (tmp_path / "kf.json").write_text(json.dumps(kf))
    assert main(["score", "--video", str(files / "own.mkv"), "--keyframes", str(tmp_path / "kf.json")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["keyframe_reference"] == "keyframe_peaks" and report["keyframe_ap"] == 1.0


@pytest.mark.parametrize("args,word", [
    (["--video", "{d}/missing.mp4"], "--video: {d}/missing.mp4: no such file"),
    (["--video", "{d}/clicks.wav"], "has no video stream"),
    (["--video", "{d}/own.mkv", "--audio", "{d}/nope.wav"], "--audio: {d}/nope.wav: no such file"),
    (["--video", "{d}/own.mkv", "--plot", "{t}/plot.gifx"], "--plot"),
    (["--video", "{d}/own.mkv", "--keyframes", "{d}/clicks.wav"], "--keyframes"),
    (["--video", "{d}/own.mkv", "--flow-max-side", "5"], "--flow-max-side: must be 0"),
    (["--video", "{d}/own.mkv", "--keyframe-tolerance", "49"], "argument --keyframe-tolerance: must be between 0"),
    (["--video", "{d}/own.mkv", "--max-seconds", "0"], "argument --max-seconds: must be"),
    (["--video", "{d}/own.mkv", "--out", "{t}"], "--out: {t} is a directory"),
    (["--video", "{d}/own.mkv", "--max-seconds", "1"], "--max-seconds"),
    (["--video", "{d}/own.mkv", "--plot", "{d}/clicks.wav/p.png"], "--plot: {d}/clicks.wav/p.png cannot be created"),
])
def test_user_errors_exit_2_with_one_line_and_no_output(files, tmp_path, capsys, args, word):
    args = [a.format(d=files, t=tmp_path) for a in args]
    word = word.format(d=files, t=tmp_path)
    out = tmp_path / "report.json"
    assert main(["score", *args, "--out", str(out)] if "--out" not in args else ["score", *args]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith(("usage:", " "))]  # argparse's usage
    assert word in err and "Traceback" not in err and len(lines) == 1, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_score_flags_come_from_the_node_schema(files, tmp_path, capsys):
    """Every widget input of AVSyncSyncScore has its flag, help with range and default; an
    existing --out is refused without --force and replaced with it."""
    from avsync.cli import build_parser
    from avsync.cli.schema_args import binding_for, flag_for_input

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction").choices["score"]
    b = binding_for(sub, "AVSyncSyncScore")
    assert set(b.flags) == {"keyframe_reference", "keyframe_tolerance", "match_tolerance_ms", "max_offset_ms",
                            "flow_max_side"} and set(b.skipped) == {"fps"}
    helps = {a.dest: a.help for a in sub._actions}
    assert "0..48; default: 1" in helps[b.dests["keyframe_tolerance"]]
    args = sub.parse_args(["--video", "v.mp4"])
    assert flag_for_input(args, "audio") == "--audio" and flag_for_input(args, "fps") == "--video"
    out = tmp_path / "report.json"
    out.write_text("old")
    argv = ["score", "--video", str(files / "own.mkv"), "--flow-max-side", "64", "--out", str(out)]
    assert main(argv) == 2 and "pass --force" in capsys.readouterr().err and out.read_text() == "old"
    assert main([*argv, "--force"]) == 0 and json.loads(out.read_text())["flow_max_side"] == 64


def test_real_clip_offset_follows_the_applied_shift():
    """A real recording with its own track (tests/data/sync/README.md). Delaying the audio
    by s moves the measured offset by -s (within one frame). AV-Align and the matching
    score do not order as-is above shifted on this talking-and-typing clip (numbers in
    the README; Syncphony App. C reports the same weakness of AV-Align)."""
    from avsync.core import sync_metrics as sm

    frames, fps = decode_video_frames(REAL_CLIP, 60)
    audio, _ = load_audio_file(REAL_CLIP, fps=float(fps), duration=len(frames) / float(fps))
    wav, sr = audio["waveform"][0].numpy(), audio["sample_rate"]
    motion = sm.motion_trajectory(frames, max_side=256)  # the picture does not change: one flow pass

    def offset(shift_s):
        n = int(round(shift_s * sr))
        delayed = np.concatenate([np.zeros_like(wav[:, :n]), wav[:, :wav.shape[-1] - n]], axis=-1)
        onsets = sm.audio_onsets(delayed, sr)
        return sm.av_offset(sm.audio_curve_on_frames(onsets, fps, len(frames)), motion, float(fps)), onsets

    as_is, onsets = offset(0.0)
    assert len(onsets.times) > 20 and len(sm.motion_peaks(motion)) > 10 and as_is.confidence > 1.2
    for shift in (0.1, 0.2, 0.3):
        r, _ = offset(shift)
        assert abs((r.offset_ms - as_is.offset_ms) - (-shift * 1000)) <= 1000 / float(fps), (shift, r.offset_ms)


def test_score_mkv_whose_audio_is_shorter_than_its_video(tmp_path, capsys):
    """Matroska: the container's duration is the (longer) video's; the own track is still read whole
    and not taken for truncated (core/audio_io.py:stream_duration), the mismatch is a reason."""
    from tests.factories import audio_files

    audio_files.write_video_with_audio(tmp_path / "v.mkv", A.clicks([0.25, 0.75], 1.0, 16000, seed=1)[None], 16000,
                                       "mkv", fps=12, video_seconds=2.0)
    assert main(["score", "--video", str(tmp_path / "v.mkv"), "--flow-max-side", "32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_frames"] == 24 and report["audio_seconds"] == pytest.approx(1.0)
    assert any("differ in length" in r for r in report["reasons"]), report["reasons"]
