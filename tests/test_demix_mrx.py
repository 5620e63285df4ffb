"""MRX (Cocktail Fork) port: parity with the reference implementation on random
weights, conversion of the released checkpoint layout, loading, and the node path
(stem order, loudness gain, resampling)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from avsync.core.errors import MissingModelError, ModelFormatError
from avsync.loaders.demix import convert_checkpoint, load_demix_model
from avsync.networks.mrx import MRX, config_from_state_dict
from avsync.samplers.demix import input_gain

from tests.factories.demix import TINY_MRX, install_tiny_mrx, save_tiny_mrx_pth, tiny_mrx_state_dict

DATA = Path(__file__).parent / "data" / "demix"


def test_parity_with_reference_on_random_weights(tmp_path):
    """tests/data/demix: random weights saved by the reference (README.md there) and
    its output on a random stereo input; our loader path must reproduce it."""
    dst = convert_checkpoint(DATA / "mrx_tiny_state_dict.pth", tmp_path / "tiny.safetensors", hop=32)
    model = load_demix_model(dst)
    io = load_file(str(DATA / "mrx_tiny_io.safetensors"))
    net = model.managed.load()
    with torch.inference_mode():
        y = net(io["input"])
    assert y.shape == io["output"].shape == (1, 3, 2, 3000)
    assert float((y - io["output"]).abs().max()) <= 1e-4
    assert float(io["output"].abs().max()) > 0.1  # the fixture is not trivially zero


def test_converted_file_carries_the_config(tmp_path):
    dst = convert_checkpoint(save_tiny_mrx_pth(tmp_path / "a.pth"), tmp_path / "a.safetensors", hop=32)
    with safe_open(str(dst), framework="pt") as f:
        meta = f.metadata()
    cfg = json.loads(meta["avsync_config"])
    assert meta["avsync_family"] == "mrx"
    assert cfg["window_lengths"] == [128, 256] and cfg["n_hop"] == 32 and cfg["n_hidden"] == 16
    assert cfg["n_lstm_layers"] == 2 and cfg["source_names"] == ["music", "speech", "sfx"]
    model = load_demix_model(dst)
    assert [model.stem_index(s) for s in ("speech", "effects", "music")] == [1, 2, 0]
    assert model.sample_rate == 44100 and model.min_length == 129


def test_config_inferred_from_shapes():
    cfg = config_from_state_dict(tiny_mrx_state_dict(), n_hop=32)
    assert (cfg.n_sources, cfg.window_lengths, cfg.n_hidden, cfg.n_lstm_layers) == (3, [128, 256], 16, 2)


def test_lightning_checkpoint_layout_converts(tmp_path):
    """The reference training script's Lightning .ckpt nests the weights under
    ``state_dict`` with a ``model.`` prefix."""
    sd = tiny_mrx_state_dict(seed=3)
    torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in sd.items()}}, tmp_path / "x.ckpt")
    model = load_demix_model(convert_checkpoint(tmp_path / "x.ckpt", tmp_path / "x.safetensors", hop=32))
    net = model.managed.load()
    assert torch.equal(net.state_dict()["_encoders.0.layer.1.weight"], sd["_encoders.0.layer.1.weight"])


def test_bad_files_get_clear_errors(tmp_path):
    import pathlib

    torch.save({"x": pathlib.PurePosixPath("a")}, tmp_path / "pickle.pth")  # a class weights_only refuses
    with pytest.raises(ModelFormatError, match="weights-only"):
        convert_checkpoint(tmp_path / "pickle.pth", tmp_path / "o.safetensors")
    torch.save({"something.else": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ModelFormatError, match="not an MRX"):
        convert_checkpoint(tmp_path / "other.pth", tmp_path / "o.safetensors")
    with pytest.raises(ModelFormatError, match="safetensors only"):
        load_demix_model(tmp_path / "other.pth")
    sd = tiny_mrx_state_dict()
    sd.pop("_decoders.0.0.block.0.weight")
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(ModelFormatError, match="missing"):
        convert_checkpoint(tmp_path / "broken.pth", tmp_path / "o.safetensors")


def test_loader_node_names_the_missing_file(models_dir):
    from avsync.cli.common import run_node

    with pytest.raises(MissingModelError) as err:
        run_node("AVSyncDemixModelLoader", model_name="mrx_default.safetensors")
    msg = str(err.value)
    assert "avsync_demix" in msg and "cocktail-fork-separation" in msg and "avsync convert demix" in msg


def test_node_runs_the_network_with_the_reference_gain_and_stem_order(models_dir):
    """At the model's rate and with one chunk, the node's stems are exactly the
    network's sources (music, speech, sfx → speech, effects, music) for the input
    brought to -27 LUFS, scaled back."""
    from avsync.cli.common import run_node
    from avsync.core.audio import make_audio

    install_tiny_mrx(models_dir)
    (model,) = run_node("AVSyncDemixModelLoader", model_name="mrx_default.safetensors")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 44100, generator=g) * 0.1
    speech, effects, music = run_node("AVSyncDemixer", audio=make_audio(x, 44100), method="auto",
                                      demix_model=model, chunk_seconds=5.0)
    gain = input_gain(x, 44100)
    from avsync.core.loudness import integrated_loudness

    # MRX's input level (integrated_loudness equals torchaudio's BS.1770: test_audio_without_torchaudio.py)
    assert integrated_loudness(x * gain, 44100) == pytest.approx(-27.0, abs=1e-3)
    with torch.inference_mode():
        ref = model.managed.load()((x * gain).unsqueeze(0))[0] / gain
    for stem, i in ((speech, 1), (effects, 2), (music, 0)):
        assert stem["sample_rate"] == 44100 and stem["waveform"].shape == (1, 2, 44100)
        assert float((stem["waveform"][0] - ref[i]).abs().max()) < 1e-5


@pytest.mark.parametrize("sr,channels,n", [(48000, 2, 30000), (8000, 1, 4000), (96000, 6, 9600), (16000, 1, 1)])
def test_node_resamples_in_and_out(models_dir, sr, channels, n):
    from avsync.cli.common import run_node
    from avsync.core.audio import make_audio

    install_tiny_mrx(models_dir)
    (model,) = run_node("AVSyncDemixModelLoader", model_name="mrx_default.safetensors")
    x = torch.randn(channels, n) * 0.1
    stems = run_node("AVSyncDemixer", audio=make_audio(x, sr), method="model", demix_model=model,
                     chunk_seconds=1.0, overlap=0.25)
    for s in stems:
        assert s["sample_rate"] == sr and s["waveform"].shape == (1, channels, n)
        assert torch.isfinite(s["waveform"]).all()
    if n > 1000:  # a tiny random network does not separate, but it passes the signal on
        assert float(sum(s["waveform"].abs().sum() for s in stems)) > 0


def test_silence_through_the_network_stays_silent(models_dir):
    """Loudness is undefined for silence, so no gain is applied, and masks times an
    all-zero spectrum give all-zero stems (no NaN from the -inf LUFS)."""
    from avsync.cli.common import run_node
    from avsync.core.audio import make_audio

    install_tiny_mrx(models_dir)
    (model,) = run_node("AVSyncDemixModelLoader", model_name="mrx_default.safetensors")
    stems = run_node("AVSyncDemixer", audio=make_audio(torch.zeros(2, 30000), 44100), method="model",
                     demix_model=model)
    assert all(float(s["waveform"].abs().max()) == 0.0 for s in stems)
