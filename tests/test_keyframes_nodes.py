"""AVSyncKeyframeLocalizer as ComfyUI runs it, the plot, and `avsync localize`."""

import json

import numpy as np
import pytest
import torch

from avsync.cli.common import NodeValidationError, run_node
from avsync.core.audio import make_audio
from avsync.core.errors import InputError
from avsync.core.keyframes import Keyframes
from avsync.core.timeline import Timeline
from tests.factories.audio import chord, clicks

SR = 16000


def _audio(times, dur=4.0, bed=True):
    x = clicks(times, dur, SR, amp=0.6) + (chord(duration=dur, sr=SR, amp=0.2) if bed else 0.0)
    return make_audio(torch.tensor(x, dtype=torch.float32)[None], SR), Timeline(24, SR, len(x))


def test_node_outputs_keyframes_and_a_readable_plot():
    audio, tl = _audio([0.5, 1.25, 2.0, 3.0])
    keys, plot = run_node("AVSyncKeyframeLocalizer", audio=audio, timeline=tl)
    assert isinstance(keys, Keyframes)
    assert keys.num_frames == 96 and keys.fps == 24.0 and keys.method == "onset" and keys.seed == 0
    assert len(keys.indices) == 24 and keys.indices[0] == 0 and 48 in keys.indices
    assert {12, 30, 48, 72} <= set(keys.peaks)
    d = keys.to_dict()
    assert {"fps", "num_frames", "curve", "peaks", "valleys", "keyframes"} <= set(d)
    json.dumps(d)
    assert plot.shape == (1, 512, 1024, 3) and plot.dtype == torch.float32
    assert 0.0 <= float(plot.min()) and float(plot.max()) <= 1.0
    img = plot[0].numpy()
    blue = (img[..., 2] > 0.75) & (img[..., 0] < 0.3) & (img[..., 1] < 0.5)
    red = (img[..., 0] > 0.75) & (img[..., 1] < 0.3) & (img[..., 2] < 0.3)
    assert blue.sum() > 500 and red.sum() > 50   # keyframe lines and peak markers are drawn


def test_same_seed_same_keyframes_other_seed_may_differ():
    audio, tl = _audio([0.25 * i + 0.1 for i in range(15)], bed=False)   # ~8 peaks per clip
    a = run_node("AVSyncKeyframeLocalizer", audio=audio, timeline=tl, seed=7, selection="paper")[0]
    b = run_node("AVSyncKeyframeLocalizer", audio=audio, timeline=tl, seed=7, selection="paper")[0]
    assert a.indices == b.indices and len(a.peaks) >= 12
    others = {tuple(run_node("AVSyncKeyframeLocalizer", audio=audio, timeline=tl, seed=s, selection="paper")[0].indices)
              for s in range(8)}
    assert len(others) > 1


def test_driving_audio_decides_where_the_keyframes_are():
    silent, tl = make_audio(torch.zeros(1, 4 * SR), SR), Timeline(24, SR, 4 * SR)
    fx, _ = _audio([1.0, 2.5], bed=False)
    k_main = run_node("AVSyncKeyframeLocalizer", audio=silent, timeline=tl)[0]
    k_fx = run_node("AVSyncKeyframeLocalizer", audio=silent, timeline=tl, driving_audio=fx)[0]
    assert k_main.peaks == [] and {24, 60} <= set(k_fx.peaks)
    k_forced = run_node("AVSyncKeyframeLocalizer", audio=silent, timeline=tl, driving_audio=fx, drive_with="audio")[0]
    assert k_forced.peaks == []
    with pytest.raises(InputError, match="driving_audio"):
        run_node("AVSyncKeyframeLocalizer", audio=silent, timeline=tl, drive_with="driving_audio")


def test_bad_inputs_fail_early_with_the_input_named():
    audio, tl = _audio([1.0])
    with pytest.raises(NodeValidationError, match="num_keyframes"):
        run_node("AVSyncKeyframeLocalizer", audio=audio, timeline=tl, num_keyframes=60)
    with pytest.raises(InputError, match="localizer_model"):
        run_node("AVSyncKeyframeLocalizer", audio=audio, timeline=tl, method="learned")
    with pytest.raises(InputError, match="timeline"):
        run_node("AVSyncKeyframeLocalizer", audio=audio, timeline="24 fps")
    short = make_audio(torch.zeros(1, 100), SR)
    with pytest.raises(InputError, match="shorter than one frame"):
        run_node("AVSyncKeyframeLocalizer", audio=short, timeline=Timeline(24, SR, 100))


def test_cli_localize_writes_the_json(tmp_path):
    from avsync.cli import main
    from avsync.core.audio_io import encode_wav

    x = clicks([0.5, 1.5], 2.5, SR) + chord(duration=2.5, sr=SR, amp=0.2)
    wav = tmp_path / "hits.wav"
    encode_wav(wav, x[None].astype(np.float32), SR)
    out = tmp_path / "r.json"
    assert main(["localize", str(wav), "--out", str(out), "--fps", "24", "--seed", "0", "--plot",
                 str(tmp_path / "p.png")]) == 0
    d = json.loads(out.read_text())
    assert d["fps"] == 24.0 and d["num_frames"] == 60 and len(d["curve"]) == 60
    assert {12, 36} <= set(d["peaks"]) and d["keyframes"][0] == 0 and len(d["keyframes"]) == 12 + 3
    # the CLI runs the node's code: the same call through the node gives the same keyframes
    from avsync.cli.common import load_audio_file

    audio, tl = load_audio_file(wav, fps=24)
    assert run_node("AVSyncKeyframeLocalizer", audio=audio, timeline=tl)[0].indices == d["keyframes"]
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_audio_that_does_not_span_the_timeline_is_refused():
    """A driving track of another length would shift or cut keyframes silently."""
    from avsync.nodes.keyframe_nodes import AVSyncKeyframeLocalizer

    sr = 16000
    audio = make_audio(torch.zeros(1, 2 * sr), sr)
    node = AVSyncKeyframeLocalizer()
    with pytest.raises(InputError, match="^driving_audio: is 1.000 s long but the timeline covers 2.000 s"):
        node.localize(audio, Timeline(24, sr, 2 * sr), driving_audio=make_audio(torch.zeros(1, sr), sr))
    with pytest.raises(InputError, match="^audio: is 2.000 s long but the timeline covers 3.000 s"):
        node.localize(audio, Timeline(24, sr, 3 * sr))
    # a demixed track at another rate covering the same time is fine
    kf, _ = node.localize(audio, Timeline(24, sr, 2 * sr), driving_audio=make_audio(torch.zeros(1, 44100 * 2), 44100))
    assert kf.num_frames == 48
