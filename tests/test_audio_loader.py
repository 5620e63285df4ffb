"""AVSyncAudioLoader: formats, sample formats, rates, channels, and every bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from avsync.core.audio import make_audio, to_channels
from avsync.core.errors import AudioFileError, InputError
from avsync.nodes.audio_nodes import NO_FILE, AVSyncAudioLoader, load_audio
from tests.factories import audio as synth
from tests.factories import audio_files as files


def _load(path, **kw):
    args = dict(start=0.0, duration=0.0, sample_rate=0, channels="keep", fps=24.0)
    args.update(kw)
    return load_audio(str(path), **args)


# ------------------------------------------------------------------ lossless, sample-exact

@pytest.mark.parametrize("dtype", ["int16", "int32", "float32", "float64"])
def test_wav_sample_formats_are_sample_exact(tmp_path, dtype):
    x = np.stack([synth.tone(440, 0.5, 16000, 0.7), synth.noise(0.5, 16000, 0.3, seed=1)])
    expect = files.write_wav(tmp_path / "a.wav", x, 16000, dtype)
    audio, tl = _load(tmp_path / "a.wav")
    got = audio["waveform"]
    assert got.dtype == torch.float32 and got.shape == (1, 2, 8000)
    assert audio["sample_rate"] == 16000
    np.testing.assert_array_equal(got[0].numpy(), expect)
    assert tl.num_frames == 12 and tl.sample_rate == 16000


@pytest.mark.parametrize("channels", [1, 2, 3, 4, 5, 6, 7, 8])
def test_one_to_eight_channels(tmp_path, channels):
    x = synth.multichannel(channels, 0.25, 8000)
    expect = files.write_wav(tmp_path / "m.wav", x, 8000, "int16")
    audio, _ = _load(tmp_path / "m.wav")
    np.testing.assert_array_equal(audio["waveform"][0].numpy(), expect)


@pytest.mark.parametrize("sr", [8000, 11025, 16000, 22050, 44100, 48000, 96000, 192000])
def test_sample_rates_8k_to_192k(tmp_path, sr):
    x = synth.tone(300, 0.2, sr, 0.5)
    expect = files.write_wav(tmp_path / "r.wav", x, sr, "int16")
    audio, tl = _load(tmp_path / "r.wav")
    assert audio["sample_rate"] == sr
    np.testing.assert_array_equal(audio["waveform"][0].numpy(), expect)
    assert tl.num_samples == len(x)


def test_flac_sample_exact(tmp_path):
    x = np.stack([synth.chord(duration=0.5, sr=44100), synth.tone(1000, 0.5, 44100, 0.2)])
    expect = files.write_flac(tmp_path / "a.flac", x, 44100)
    audio, _ = _load(tmp_path / "a.flac")
    np.testing.assert_array_equal(audio["waveform"][0].numpy(), expect)


# ------------------------------------------------------------------ lossy and video containers

def _best_lag_corr(a: np.ndarray, b: np.ndarray, max_lag: int) -> float:
    """Correlation of a and b at the best alignment (encoders add priming delay)."""
    best = -1.0
    for lag in range(0, max_lag):
        n = min(len(a), len(b) - lag)
        if n < len(a) // 2:
            break
        c = np.corrcoef(a[:n], b[lag:lag + n])[0, 1]
        best = max(best, c)
    return best


SIGNAL_SR = 48000


def _reference_signal(duration=1.0):
    return synth.chord((220, 330, 440), duration, SIGNAL_SR, 0.4) + synth.tone(880, duration, SIGNAL_SR, 0.1)


@pytest.mark.parametrize("kind", ["mp3", "ogg", "opus", "m4a"])
def test_lossy_formats_duration_and_correlation(tmp_path, kind):
    x = _reference_signal()
    path = tmp_path / f"a.{kind}"
    files.write_lossy(path, np.stack([x, x]), SIGNAL_SR, kind)  # FFmpeg's vorbis encoder is stereo-only
    audio, tl = _load(path, fps=24.0)
    got = audio["waveform"][0, 0].numpy()
    sr = audio["sample_rate"]
    assert sr == SIGNAL_SR
    # duration within one video frame
    assert abs(len(got) / sr - len(x) / SIGNAL_SR) <= 1 / 24
    assert _best_lag_corr(x[: SIGNAL_SR // 2], got, 3000) > 0.95


@pytest.mark.parametrize("container", ["mp4", "mov", "mkv", "webm"])
def test_audio_track_of_video_files(tmp_path, container):
    x = _reference_signal(1.0)
    path = tmp_path / f"v.{container}"
    files.write_video_with_audio(path, np.stack([x, x * 0.5]), SIGNAL_SR, container)
    audio, tl = _load(path)
    got = audio["waveform"][0].numpy()
    assert got.shape[0] == 2
    assert abs(got.shape[1] / audio["sample_rate"] - 1.0) <= 1 / 24
    assert _best_lag_corr(x[: SIGNAL_SR // 2], got[0], 3000) > 0.95


# ------------------------------------------------------------------ segment, resample, channels, timeline

def test_start_and_duration_cut_exact_samples(tmp_path):
    x = synth.noise(2.0, 16000, 0.5, seed=3)
    expect = files.write_wav(tmp_path / "a.wav", x[None], 16000, "int16")
    audio, tl = _load(tmp_path / "a.wav", start=0.5, duration=0.25)
    np.testing.assert_array_equal(audio["waveform"][0].numpy(), expect[:, 8000:12000])
    assert tl.start == 0.5 and tl.num_samples == 4000 and tl.num_frames == 6


def test_resample_is_band_limited(tmp_path):
    sr_in, sr_out = 48000, 16000
    x = synth.tone(1000, 1.0, sr_in, 0.5) + synth.tone(12000, 1.0, sr_in, 0.5)  # 12 kHz must vanish
    files.write_wav(tmp_path / "a.wav", x[None], sr_in, "float32")
    audio, tl = _load(tmp_path / "a.wav", sample_rate=sr_out)
    y = audio["waveform"][0, 0].numpy().astype(np.float64)
    assert audio["sample_rate"] == sr_out and len(y) == sr_out and tl.sample_rate == sr_out
    spec = np.abs(np.fft.rfft(y[2000:-2000] * np.hanning(len(y) - 4000)))
    freqs = np.fft.rfftfreq(len(y) - 4000, 1 / sr_out)
    k1000 = np.argmin(np.abs(freqs - 1000))
    k4000 = np.argmin(np.abs(freqs - 4000))  # where 12 kHz would alias to
    assert spec[k4000 - 3:k4000 + 4].max() < 1e-3 * spec[k1000]
    # the 1 kHz tone keeps its amplitude
    mid = y[4000:-4000]
    assert abs(np.sqrt(2) * mid.std() - 0.5) < 0.01


def test_channel_modes(tmp_path):
    x = np.stack([synth.tone(300, 0.1, 8000, 0.4), synth.tone(500, 0.1, 8000, 0.2)])
    expect = files.write_wav(tmp_path / "s.wav", x, 8000, "float32")
    mono, _ = _load(tmp_path / "s.wav", channels="mono")
    np.testing.assert_allclose(mono["waveform"][0, 0].numpy(), expect.mean(0), atol=1e-7)
    files.write_wav(tmp_path / "m.wav", x[:1], 8000, "float32")
    st, _ = _load(tmp_path / "m.wav", channels="stereo")
    assert st["waveform"].shape[1] == 2
    torch.testing.assert_close(st["waveform"][0, 0], st["waveform"][0, 1])


def test_surround_downmix_to_stereo_hand_checked():
    # 5.1: L R C LFE Ls Rs ; centre and surrounds at -3 dB, LFE dropped
    w = torch.zeros(6, 4)
    w[0, 0] = 0.1   # L
    w[1, 1] = 0.1   # R
    w[2, 2] = 0.1   # C
    w[3, 3] = 0.9   # LFE
    w[4, 0] = 0.1   # Ls
    w[5, 1] = 0.1   # Rs
    out = to_channels(w, "stereo")
    g = 1 / math.sqrt(2)
    expect = torch.tensor([[0.1 + 0.1 * g, 0, 0.1 * g, 0], [0, 0.1 + 0.1 * g, 0.1 * g, 0]])
    torch.testing.assert_close(out, expect)


def test_audio_input_instead_of_file():
    wav = torch.from_numpy(synth.tone(200, 1.0, 22050, 0.3)).float()[None, None]
    audio, tl = load_audio(NO_FILE, 0.25, 0.5, 0, "keep", 30.0, audio=make_audio(wav, 22050))
    assert audio["waveform"].shape == (1, 1, 11025)
    torch.testing.assert_close(audio["waveform"][0, 0], wav[0, 0, 5512:16537], rtol=0, atol=0)
    assert tl.num_frames == 15


def test_node_function_and_output_types(tmp_path):
    files.write_wav(tmp_path / "a.wav", synth.tone(440, 0.5, 16000)[None], 16000)
    node = AVSyncAudioLoader()
    audio, tl = getattr(node, AVSyncAudioLoader.FUNCTION)(str(tmp_path / "a.wav"), 0.0, 0.0, 0, "keep", 24.0)
    assert set(audio) == {"waveform", "sample_rate"} and isinstance(audio["sample_rate"], int)
    assert tl.num_frames == 12


# ------------------------------------------------------------------ bad input

def _expect_file_error(path, match, **kw):
    with pytest.raises(AudioFileError, match=match) as info:
        _load(path, **kw)
    assert str(path) in str(info.value) or path.name in str(info.value)


def test_missing_file(tmp_path):
    _expect_file_error(tmp_path / "nope.wav", "not found")


def test_empty_file(tmp_path):
    (tmp_path / "e.wav").write_bytes(b"")
    _expect_file_error(tmp_path / "e.wav", "empty")


def test_truncated_file(tmp_path):
    files.write_wav(tmp_path / "a.wav", synth.noise(2.0, 16000, 0.5)[None], 16000)
    data = (tmp_path / "a.wav").read_bytes()
    (tmp_path / "t.wav").write_bytes(data[: len(data) // 3])
    _expect_file_error(tmp_path / "t.wav", "truncated")
    (tmp_path / "h.wav").write_bytes(data[:30])  # cut inside the header
    with pytest.raises(AudioFileError):
        _load(tmp_path / "h.wav")


def test_file_without_audio_stream(tmp_path):
    files.write_video_only(tmp_path / "v.mp4")
    _expect_file_error(tmp_path / "v.mp4", "no audio stream")


def test_undecodable_data(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "junk.mp3").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(AudioFileError) as info:
        _load(tmp_path / "junk.mp3")
    assert "junk.mp3" in str(info.value)


def test_start_past_end(tmp_path):
    files.write_wav(tmp_path / "a.wav", synth.tone(440, 1.0, 16000)[None], 16000)
    with pytest.raises(InputError, match="start.*past the end"):
        _load(tmp_path / "a.wav", start=2.0)


@pytest.mark.parametrize("value", [-1.0, float("nan")])
def test_negative_or_nan_duration(tmp_path, value):
    files.write_wav(tmp_path / "a.wav", synth.tone(440, 1.0, 16000)[None], 16000)
    with pytest.raises(InputError, match="duration"):
        _load(tmp_path / "a.wav", duration=value)
    if value < 0:  # ComfyUI's own range check refuses it before the node runs
        opts = AVSyncAudioLoader.INPUT_TYPES()["required"]["duration"][1]
        assert value < opts["min"]


def test_longer_than_limit(tmp_path):
    files.write_wav(tmp_path / "a.wav", synth.noise(3.0, 8000, 0.1)[None], 8000)
    _expect_file_error(tmp_path / "a.wav", "limit", max_duration=2.0)
    audio, _ = _load(tmp_path / "a.wav", max_duration=2.0, duration=1.5)  # a cut under the limit is fine
    assert audio["waveform"].shape[-1] == 12000


def test_nan_and_inf_samples(tmp_path):
    x = synth.tone(440, 0.2, 8000)
    x[100] = np.nan
    x[200] = np.inf
    files.write_wav(tmp_path / "n.wav", x[None], 8000, "float32")
    _expect_file_error(tmp_path / "n.wav", "NaN or infinite")
    bad = make_audio(torch.from_numpy(x).float()[None], 8000)
    with pytest.raises(InputError, match="audio.*NaN"):
        load_audio(NO_FILE, 0, 0, 0, "keep", 24.0, audio=bad)


def test_no_file_and_no_audio():
    with pytest.raises(InputError, match="audio_file"):
        load_audio(NO_FILE, 0, 0, 0, "keep", 24.0)


@pytest.mark.parametrize("fps", [0.0, -24.0, float("nan")])
def test_bad_fps(tmp_path, fps):
    with pytest.raises(InputError, match="^fps"):
        load_audio(NO_FILE, 0, 0, 0, "keep", fps, audio=make_audio(torch.zeros(1, 800), 8000))


def test_path_outside_comfyui_input_folder(tmp_path, monkeypatch):
    """Inside ComfyUI, an upload-widget value may not escape the input folder."""
    from avsync import compat

    inp = tmp_path / "input"
    inp.mkdir()
    files.write_wav(inp / "ok.wav", synth.tone(440, 0.5, 8000)[None], 8000)
    files.write_wav(tmp_path / "secret.wav", synth.tone(440, 0.5, 8000)[None], 8000)
    monkeypatch.setattr(compat, "input_directory", lambda: inp)
    monkeypatch.setattr(compat, "annotated_input_path", lambda name: inp / name)
    assert AVSyncAudioLoader.VALIDATE_INPUTS("ok.wav") is True
    msg = AVSyncAudioLoader.VALIDATE_INPUTS("../secret.wav")
    assert "outside ComfyUI's input folder" in msg
    with pytest.raises(AudioFileError, match="outside"):
        load_audio("../secret.wav", 0, 0, 0, "keep", 24.0)
    assert "not found" in AVSyncAudioLoader.VALIDATE_INPUTS("missing.wav")


# ------------------------------------------------------------------ containers whose audio has no duration field

def _mkv_audio_shorter_than_video(path, audio_seconds=1.5, video_seconds=3.0, sr=16000):
    x = synth.noise(audio_seconds, sr, 0.3, seed=5)
    files.write_video_with_audio(path, x[None], sr, "mkv", video_seconds=video_seconds)
    # the FLAC track holds s16, rounded from float32 as the factory does
    return np.clip(np.round(x.astype(np.float32) * 32767), -32768, 32767) / 32768.0


def test_mkv_audio_shorter_than_its_video_is_not_truncated(tmp_path):
    """Matroska gives the audio stream no duration field; the container's (3 s) is the video's.
    The track's own DURATION tag (1.5 s) is what the audio is checked against."""
    import av

    from avsync.core.audio_io import decode_audio_file, stream_duration

    expect = _mkv_audio_shorter_than_video(tmp_path / "v.mkv")
    with av.open(str(tmp_path / "v.mkv")) as c:  # the situation the fix is for
        assert c.streams.audio[0].duration is None and c.duration / 1e6 == pytest.approx(3.0, abs=0.05)
        assert stream_duration(c.streams.audio[0], 16000) == pytest.approx(1.5)
    got = decode_audio_file(tmp_path / "v.mkv")
    np.testing.assert_array_equal(got.samples[0], expect.astype(np.float32))  # lossless, sample-exact
    assert got.file_duration == pytest.approx(1.5)
    audio, tl = _load(tmp_path / "v.mkv")
    assert audio["waveform"].shape[-1] == 24000 and tl.num_samples == 24000


def test_mkv_without_track_durations_decodes_to_the_end(tmp_path):
    """No per-track tag (other muxers; here the tags renamed in place): the track is decoded to its
    end and judged by what decoded, with the container's 3 s only as an upper bound."""
    import av

    from avsync.core.audio_io import decode_audio_file

    expect = _mkv_audio_shorter_than_video(tmp_path / "v.mkv")
    data = (tmp_path / "v.mkv").read_bytes()
    assert data.count(b"DURATION") == 2  # one tag per track
    (tmp_path / "n.mkv").write_bytes(data.replace(b"DURATION", b"DURATIOX"))
    with av.open(str(tmp_path / "n.mkv")) as c:
        s = c.streams.audio[0]
        assert s.duration is None and "DURATION" not in s.metadata and c.duration / 1e6 == pytest.approx(3.0, abs=0.05)
    got = decode_audio_file(tmp_path / "n.mkv")
    np.testing.assert_array_equal(got.samples[0], expect.astype(np.float32))
    with pytest.raises(InputError, match="start.*past the end"):  # past the decoded end, inside the container's
        _load(tmp_path / "n.mkv", start=2.0)
    cut, _ = _load(tmp_path / "n.mkv", start=0.5, duration=0.5)
    np.testing.assert_array_equal(cut["waveform"][0, 0].numpy(), expect[8000:16000].astype(np.float32))


def test_truncated_mkv_is_still_refused(tmp_path):
    """The track's own duration keeps the truncation check for Matroska (a cut-off download)."""
    x = synth.noise(4.0, 16000, 0.3, seed=6)
    files.write_video_with_audio(tmp_path / "v.mkv", x[None], 16000, "mkv")
    data = (tmp_path / "v.mkv").read_bytes()
    (tmp_path / "t.mkv").write_bytes(data[: len(data) // 3])
    with pytest.raises(AudioFileError, match="truncated"):
        _load(tmp_path / "t.mkv")
