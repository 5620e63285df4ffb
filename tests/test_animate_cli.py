"""`avsync animate`: image + audio → mp4 with the audio, on tiny random-weight KeyVID files written by the
real converter (tests/factories/keyvid_files.py) and loaded by the real loader nodes."""

from __future__ import annotations

import numpy as np
import pytest

from avsync.cli import main
from tests.factories import audio as synth
from tests.factories import audio_files as files

# tiny and fast: 64 x 64 px (latents 8 x 8), 2 DDIM steps per sampler, fp32
FAST = ["--width", "64", "--height", "64", "--steps", "2", "--interp-steps", "2", "--keyframe-seed", "1", "--precision", "fp32",
        "--prompt", "a hammer hits a nail", "-q"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from PIL import Image

    from tests.factories.keyvid_files import write_tiny_keyvid_models

    d = tmp_path_factory.mktemp("animate")
    models = d / "models"
    write_tiny_keyvid_models(models)
    wav = files.write_wav(d / "hits.wav", synth.clicks([0.2, 0.7, 1.1, 1.6], duration=2.0, sr=16000), 16000)
    assert wav.shape[-1] == 32000
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)).save(d / "first.png")
    return {"dir": d, "models": models, "image": d / "first.png", "audio": d / "hits.wav"}


def _argv(inputs, out, *extra):
    return ["--models", str(inputs["models"]), "animate", "--image", str(inputs["image"]), "--audio",
            str(inputs["audio"]), "--out", str(out), *FAST, *extra]


def _decode(path):
    import av

    with av.open(str(path)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    with av.open(str(path)) as c:
        s = c.streams.audio[0]
        audio = (s.codec_context.name, s.rate, sum(f.samples for f in c.decode(audio=0)))
        rate = c.streams.video[0].average_rate
    return frames, audio, rate


def test_same_seed_same_video_and_the_audio_is_muxed(inputs):
    from avsync import compat
    from avsync.cli.common import run_node

    # hold the models, so both runs use the same model objects (the loader nodes' cache hands them back)
    compat.set_models_dir(inputs["models"])
    try:
        held = (run_node("AVSyncKeyVIDGeneratorLoader", unet="keyvid_generator_unet.safetensors", precision="fp32"),
                run_node("AVSyncKeyVIDInterpolatorLoader", unet="keyvid_interpolator_unet.safetensors",
                         precision="fp32"))
    finally:
        compat.set_models_dir(None)
    # the frames the command hands to the encoder; x264 itself was seen to encode equal frames into
    # different bytes from one run to the next in this process, so the promise is checked on these
    import avsync.cli.common as common

    encoded, write = [], common.write_mp4

    def keep(path, frames, fps, audio=None):
        encoded.append(frames.clone())
        return write(path, frames, fps, audio)

    d = inputs["dir"]
    try:
        common.write_mp4 = keep
        assert main(_argv(inputs, d / "a.mp4", "--seed", "3")) == 0
        assert main(_argv(inputs, d / "b.mp4", "--seed", "3")) == 0
    finally:
        common.write_mp4 = write
    del held
    import torch

    assert torch.equal(encoded[0], encoded[1])            # same seed: bit-identical frames
    a, audio, rate = _decode(d / "a.mp4")
    b, _, _ = _decode(d / "b.mp4")
    assert a.shape == b.shape
    assert a.shape == (48, 64, 64, 3) and rate == 24       # one 2-s clip at 24 fps
    # the file holds those frames: H.264 crf 18 + 4:2:0 chroma of random-weight, noise-like 64 px frames
    # (measured mean error 16.4 of 255; consecutive frames of such a video differ by ~50)
    assert np.abs(a.astype(float) - encoded[0].numpy() * 255).mean() < 32
    assert a.std() > 10 and np.abs(np.diff(a.astype(int), axis=0)).mean() > 1   # not a constant picture
    codec, sr, samples = audio
    assert codec == "aac" and sr == 16000 and abs(samples - 32000) <= 2048   # 2 s (+ AAC priming/padding)


def test_outputs_are_checked_before_any_work(inputs, capsys, monkeypatch):
    import avsync.cli.cmd_animate as cmd

    def no_model(*a, **kw):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr(cmd, "_keyvid_model", no_model)
    existing = inputs["dir"] / "exists.mp4"
    existing.write_bytes(b"keep")
    assert main(_argv(inputs, existing)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "--force" in err
    assert existing.read_bytes() == b"keep"
    assert main(_argv(inputs, inputs["dir"] / "x.gif")) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize("bad,flag", [("image", "--image"), ("audio", "--audio")])
def test_missing_or_unreadable_inputs_exit_2_with_one_line(inputs, tmp_path, capsys, bad, flag):
    args = _argv(inputs, tmp_path / "o.mp4")
    args[args.index(flag) + 1] = str(tmp_path / "missing.file")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err and "missing.file" in err
    assert not list(tmp_path.iterdir())


def test_an_error_in_sampling_leaves_no_file(inputs, tmp_path, capsys):
    # a keyframe grid KeyVID was not trained on: refused by the generator with the flag's name
    out = tmp_path / "o.mp4"
    assert main(_argv(inputs, out, "--fps", "25")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "24" in err
    assert not list(tmp_path.iterdir())
