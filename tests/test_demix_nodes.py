"""AVSyncDemixer / AVSyncDemixModelLoader as ComfyUI runs them, and `avsync demix`."""

import numpy as np
import pytest
import torch

from avsync.cli.common import run_node
from avsync.core.audio import make_audio
from avsync.core.errors import InputError

from tests.factories import audio as A
from tests.factories.demix import known_mixture


@pytest.mark.parametrize("channels,sr", [(1, 8000), (2, 44100), (6, 48000), (2, 96000)])
def test_dsp_outputs_keep_rate_length_channels_and_sum_to_the_input(channels, sr):
    x = torch.tensor(A.multichannel(channels, 0.3, sr), dtype=torch.float32)
    x[:, ::997] += 0.5  # some hits
    speech, effects, music = run_node("AVSyncDemixer", audio=make_audio(x, sr), method="dsp", chunk_seconds=1.0)
    for s in (speech, effects, music):
        assert s["sample_rate"] == sr and s["waveform"].shape == (1, channels, x.shape[1])
        assert s["waveform"].dtype == torch.float32
    total = speech["waveform"] + effects["waveform"] + music["waveform"]
    assert float((total[0] - x).abs().max()) < 1e-5


def test_chunked_dsp_stays_close_to_one_pass():
    """Chunks of 2 s with 0.5 s cross-fades against one 6 s pass: the stems agree up
    to small edge effects (measured relative error energy: speech 0.013, effects
    0.008, music 0.001), and still add back to the input exactly."""
    mix = known_mixture(sr=22050)
    whole = run_node("AVSyncDemixer", audio=make_audio(mix["mixture"], 22050), method="dsp", chunk_seconds=10.0)
    parts = run_node("AVSyncDemixer", audio=make_audio(mix["mixture"], 22050), method="dsp", chunk_seconds=2.0,
                     overlap=0.25)
    for a, b in zip(whole, parts):
        err = (a["waveform"] - b["waveform"]).square().sum() / a["waveform"].square().sum().clamp_min(1e-12)
        assert float(err) < 0.04
    assert float((sum(p["waveform"] for p in parts)[0] - mix["mixture"]).abs().max()) < 1e-5


def test_batch_of_clips_is_demixed_clip_by_clip():
    mix = known_mixture(sr=16000, duration=1.0, times=(0.3,))["mixture"]
    batch = torch.stack([mix, 0.5 * mix])
    speech, _, _ = run_node("AVSyncDemixer", audio={"waveform": batch, "sample_rate": 16000}, method="dsp")
    assert speech["waveform"].shape == (2, 1, 16000)
    assert torch.allclose(speech["waveform"][1], 0.5 * speech["waveform"][0], atol=1e-5)  # masks are scale-free


def test_silence_one_sample_and_empty():
    silent = run_node("AVSyncDemixer", audio=make_audio(torch.zeros(2, 4410), 44100))
    assert all(float(s["waveform"].abs().max()) == 0 for s in silent)
    one = run_node("AVSyncDemixer", audio=make_audio(torch.full((1, 1), 0.25), 44100))
    assert [s["waveform"].shape for s in one] == [(1, 1, 1)] * 3
    assert float(sum(s["waveform"] for s in one).flatten()[0]) == 0.25
    with pytest.raises(InputError, match="audio: is empty"):
        run_node("AVSyncDemixer", audio=make_audio(torch.zeros(1, 0), 44100))


def test_bad_inputs_name_the_input():
    audio = make_audio(torch.zeros(1, 100), 16000)
    with pytest.raises(InputError, match="demix_model"):
        run_node("AVSyncDemixer", audio=audio, method="model")
    # out-of-range widgets: ComfyUI's schema check refuses them (min / max); a direct call, at run time
    with pytest.raises(InputError, match="^overlap: must be between 0 and 0.5"):
        run_node("AVSyncDemixer", audio=audio, overlap=0.9)
    with pytest.raises(InputError, match="^chunk_seconds"):
        run_node("AVSyncDemixer", audio=audio, chunk_seconds=0.0)
    with pytest.raises(InputError, match="audio"):
        run_node("AVSyncDemixer", audio={"waveform": torch.full((1, 1, 10), float("nan")), "sample_rate": 16000})
    with pytest.raises(InputError, match="audio"):
        run_node("AVSyncDemixer", audio="speech.wav")


def test_cli_writes_three_stems_at_input_rate_and_length(tmp_path, models_dir):
    from avsync.cli import main
    from avsync.core.audio_io import decode_audio_file
    from tests.factories.audio_files import write_wav
    from tests.factories.demix import install_tiny_mrx

    mix = known_mixture(sr=22050, duration=2.0, times=(0.5, 1.5), stereo=True)["mixture"].numpy()
    src = tmp_path / "mix.wav"
    write_wav(src, mix, 22050, dtype="float32")
    assert main(["demix", str(src), "--out", str(tmp_path / "dsp"), "--float"]) == 0
    stems = [decode_audio_file(tmp_path / "dsp" / f"{n}.wav") for n in ("speech", "effects", "music")]
    for d in stems:
        assert d.sample_rate == 22050 and d.samples.shape == mix.shape
    assert np.abs(sum(d.samples for d in stems) - mix).max() < 1e-5
    install_tiny_mrx(models_dir)
    assert main(["--models", str(models_dir), "demix", str(src), "--out", str(tmp_path / "mrx"),
                 "--method", "mrx"]) == 0
    d = decode_audio_file(tmp_path / "mrx" / "speech.wav")
    assert d.sample_rate == 22050 and d.samples.shape == mix.shape


def test_cli_missing_model_is_an_error_message(tmp_path, models_dir, capsys):
    from avsync.cli import main
    from tests.factories.audio_files import write_wav

    write_wav(tmp_path / "a.wav", np.zeros((1, 800)), 8000)
    assert main(["--models", str(models_dir), "demix", str(tmp_path / "a.wav"), "--out", str(tmp_path / "o"),
                 "--method", "mrx"]) == 2
    err = capsys.readouterr().err
    assert "mrx_default.safetensors" in err and "avsync_demix" in err
    assert not (tmp_path / "o").exists()
