"""BandIt v2 port: parity with the reference code on tiny random weights (the network
and its chunked inference over 10 s), conversion and strict loading of a Lightning
checkpoint, clear errors for wrong or broken files, the reference chunker's arithmetic,
and the node / CLI paths. Fixture: tests/data/demix/bandit_v2/README.md."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from avsync.core.errors import InputError, ModelFormatError
from avsync.loaders.demix import convert_checkpoint, load_demix_model
from avsync.networks.bandit_v2 import BanditV2, BanditV2Config, musical_band_specs
from avsync.samplers.bandit_chunking import BanditChunkPlan, bandit_overlap_add_stream, run_bandit_overlap_add
from avsync.samplers.demix import demix, memory_need

DATA = Path(__file__).parent / "data" / "demix" / "bandit_v2"
CKPT = DATA / "bandit_v2_tiny.ckpt"
TINY_RATE, TINY_HOP = 4000, 128          # not stored in a checkpoint (README.md there)
REF_STEMS = ("speech", "music", "sfx")
OURS_FROM_REF = [0, 2, 1]                # ours: speech, effects, music


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    dst = tmp_path_factory.mktemp("bandit") / "tiny.safetensors"
    return load_demix_model(convert_checkpoint(CKPT, dst, sample_rate=TINY_RATE, hop=TINY_HOP))


def test_network_parity_with_reference(tiny):
    io = load_file(str(DATA / "bandit_v2_tiny_net_io.safetensors"))
    with torch.inference_mode():
        y = tiny.managed.load()(io["input"])
    assert y.shape == io["output"].shape == (2, 3, 1, 6000)
    # measured 1.8e-6 (outputs up to 6.5): float32 rounding of two STFT implementations
    assert float((y - io["output"]).abs().max()) <= 1e-4
    assert float(io["output"].abs().max()) > 1.0      # not trivially zero


def test_chunked_inference_parity_with_reference_over_10_s(tiny):
    """The reference chunker (8 s chunks, 1 s hop, Hann / 4, 14 s reflect front pad) on
    10 s of stereo, against our demix() with method bandit_v2."""
    io = load_file(str(DATA / "bandit_v2_tiny_chunked_io.safetensors"))
    y = demix(io["input"], TINY_RATE, "bandit_v2", tiny)
    ref = io["output"][OURS_FROM_REF]
    assert y.shape == ref.shape == (3, 2, 40000)
    assert float((y - ref).abs().max()) <= 1e-4       # measured 1.5e-7
    assert float(ref.abs().max()) > 0.1


def test_conversion_reads_the_lightning_checkpoint(tiny, tmp_path):
    cfg = tiny.managed.info["config"]
    assert tiny.family == "bandit_v2" and tiny.source_names == REF_STEMS and tiny.sample_rate == TINY_RATE
    assert [tiny.stem_index(s) for s in ("speech", "effects", "music")] == [0, 2, 1]
    assert (cfg["n_bands"], cfg["n_sqm_modules"], cfg["emb_dim"], cfg["rnn_dim"], cfg["mlp_dim"]) == (8, 1, 8, 8, 16)
    assert (cfg["rnn_type"], cfg["bidirectional"], cfg["n_fft"], cfg["hop_length"]) == ("GRU", True, 256, 128)
    # chunk and hop read from the stored inference_handler.scaled_window
    assert tiny.chunking == {"kind": "bandit", "chunk_seconds": 8.0, "hop_seconds": 1.0, "batch": 1}
    assert tiny.loudness_normalize is False
    dst = convert_checkpoint(CKPT, tmp_path / "t.safetensors", sample_rate=TINY_RATE, hop=TINY_HOP)
    with safe_open(str(dst), framework="pt") as f:
        keys = list(f.keys())
        assert f.metadata()["avsync_family"] == "bandit_v2"
    # derived tensors (windows, band weights) and the MLP aliases were checked and dropped
    assert not [k for k in keys if "window" in k or "freq_weights" in k or ".combined.1.0." in k]
    assert len(keys) == len(tiny.managed.load().state_dict())


def test_released_band_layout():
    """The released config (n_fft 2048, 48 kHz, 64 bands): overlapping bands from bin 0
    to Nyquist whose weights add up to one on every bin, as the masks rely on."""
    specs, weights = musical_band_specs(2048, 48000, 64)
    assert len(specs) == 64 and specs[0] == (0, 3) and specs[-1] == (918, 1025)
    total = torch.zeros(1025, dtype=torch.float64)
    for (s, e), w in zip(specs, weights):
        total[s:e] += w
    assert torch.allclose(total, torch.ones(1025, dtype=torch.float64))


def test_every_config_field_changes_the_network():
    base = BanditV2Config(n_bands=6, n_sqm_modules=1, emb_dim=4, rnn_dim=4, mlp_dim=8, n_fft=128, hop_length=32,
                          sample_rate=8000)
    n = sum(p.numel() for p in BanditV2(base).parameters())
    import dataclasses
    for change in (dict(n_bands=7), dict(n_sqm_modules=2), dict(emb_dim=6), dict(rnn_dim=6), dict(mlp_dim=10),
                   dict(rnn_type="LSTM"), dict(bidirectional=False), dict(in_channels=2), dict(complex_mask=False),
                   dict(stems=["a", "b"])):
        assert sum(p.numel() for p in BanditV2(dataclasses.replace(base, **change)).parameters()) != n, change
    x = torch.randn(1, 2, 800)
    for change in (dict(in_channels=2), dict(complex_mask=False), dict(rnn_type="LSTM", bidirectional=False)):
        y = BanditV2(dataclasses.replace(base, **change)).eval()(x)
        assert y.shape == (1, 3, 2, 800) and torch.isfinite(y).all()


def _ckpt_state():
    return torch.load(str(CKPT), map_location="cpu", weights_only=True)


def test_strict_loading_refuses_missing_or_extra_tensors(tmp_path):
    ck = _ckpt_state()
    sd = dict(ck["state_dict"])
    sd.pop("model.tf_model.seqband.0.fc.bias")
    torch.save({**ck, "state_dict": sd}, tmp_path / "missing.ckpt")
    with pytest.raises(ModelFormatError, match=r"missing.ckpt.*missing: \['tf_model.seqband.0.fc.bias'\]"):
        convert_checkpoint(tmp_path / "missing.ckpt", tmp_path / "o.safetensors", sample_rate=TINY_RATE, hop=TINY_HOP)
    sd = dict(ck["state_dict"], **{"model.band_split.extra": torch.zeros(2)})
    torch.save({**ck, "state_dict": sd}, tmp_path / "extra.ckpt")
    with pytest.raises(ModelFormatError, match=r"extra.ckpt.*unexpected: \['band_split.extra'\]"):
        convert_checkpoint(tmp_path / "extra.ckpt", tmp_path / "o.safetensors", sample_rate=TINY_RATE, hop=TINY_HOP)
    # the stored band weights are checked against the layout the config builds
    sd = dict(ck["state_dict"])
    sd["model.mask_estim.music.freq_weights/3"] = sd["model.mask_estim.music.freq_weights/3"] * 0.5
    torch.save({**ck, "state_dict": sd}, tmp_path / "bands.ckpt")
    with pytest.raises(ModelFormatError, match=r"bands.ckpt: band 3's stored frequency weights"):
        convert_checkpoint(tmp_path / "bands.ckpt", tmp_path / "o.safetensors", sample_rate=TINY_RATE, hop=TINY_HOP)
    with pytest.raises(ModelFormatError, match="can only reorder"):
        convert_checkpoint(CKPT, tmp_path / "o.safetensors", sample_rate=TINY_RATE, source_names=["a", "b", "c"])
    assert not (tmp_path / "o.safetensors").exists()


def test_wrong_family_and_broken_files_name_the_file(tmp_path):
    from tests.factories.demix import save_tiny_mrx_pth

    mrx = save_tiny_mrx_pth(tmp_path / "mrx.pth")
    with pytest.raises(ModelFormatError, match=r"mrx.pth: not a BandIt v2 checkpoint"):
        convert_checkpoint(mrx, tmp_path / "o.safetensors", family="bandit_v2")
    with pytest.raises(ModelFormatError, match=r"bandit_v2_tiny.ckpt: is a BandIt v2 checkpoint, not MRX"):
        convert_checkpoint(CKPT, tmp_path / "o.safetensors", family="mrx")
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(CKPT.read_bytes()[: CKPT.stat().st_size // 2])
    with pytest.raises(ModelFormatError, match=r"cut.ckpt.*weights-only"):
        convert_checkpoint(cut, tmp_path / "o.safetensors", sample_rate=TINY_RATE)
    good = convert_checkpoint(CKPT, tmp_path / "good.safetensors", sample_rate=TINY_RATE, hop=TINY_HOP)
    short = tmp_path / "short.safetensors"
    short.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ModelFormatError, match=r"short.safetensors.*truncated"):
        load_demix_model(short)


def test_streamed_and_whole_signal_chunking_agree_and_identity_is_exact():
    """Hann / (chunk / (2 hop)) sums to one on the hop, so an identity processor gives
    the input back; blocks of any size give the whole-signal result."""
    g = torch.Generator().manual_seed(0)
    for n in (1, 5, 9, 30, 61, 200):
        x = torch.randn(2, n, generator=g, dtype=torch.float64)
        whole = run_bandit_overlap_add(lambda c: torch.stack([c, 2 * c]), x, 16, 2, 2)
        assert torch.allclose(whole[0], x, atol=1e-12) and torch.allclose(whole[1], 2 * x, atol=1e-12), n
        blocks = [x[:, i:i + 7] for i in range(0, n, 7)]
        for batch in (1, 3):
            parts = list(bandit_overlap_add_stream(lambda c: torch.stack([c, 2 * c]), blocks, 16, 2, 2, batch=batch))
            assert torch.equal(torch.cat([p for _, p in parts], dim=-1), whole), (n, batch)
        assert [s for s, _ in parts] == sorted(s for s, _ in parts)


def _reference_chunking(process, x, chunk, hop):
    """inference_handler.py:StandardTensorChunkedInferenceHandler._tensor_forward, written
    out from its definition (pad, unfold every chunk, window, fold, crop) as an oracle."""
    n = x.shape[-1]
    f = 2 * (chunk - hop)
    n_chunks = math.ceil((n + 2 * f - chunk) / hop) + 1
    e = (n_chunks - 1) * hop + chunk - n
    padded_len = n + 2 * f + e
    if f >= n:
        xp = F.pad(F.pad(x[None], (n - 1, n - 1), mode="reflect"), (f - (n - 1), f - (n - 1) + e))[0]
    elif f + e >= n:
        xp = F.pad(F.pad(x[None], (f, n - 1), mode="reflect"), (0, f + e - (n - 1)))[0]
    else:
        xp = F.pad(x[None], (f, f + e), mode="reflect")[0]
    out = torch.zeros(x.shape[0], padded_len, dtype=x.dtype)
    w = torch.hann_window(chunk, dtype=x.dtype) / (chunk / (2 * hop))
    for k in range((padded_len - chunk) // hop + 1):
        out[:, k * hop: k * hop + chunk] += process(xp[:, k * hop: k * hop + chunk]) * w
    return out[:, f: f + n]


@pytest.mark.parametrize("n", [2, 9, 13, 40, 57, 130])
def test_chunker_matches_the_reference_padding_for_short_and_long_signals(n):
    """n < front pad, front pad + end pad >= n, and the plain reflect case; a processor
    that depends on the position in the chunk, so padding and weighting both show."""
    chunk, hop = 8, 1
    ramp = torch.linspace(0.5, 1.5, chunk, dtype=torch.float64)

    def process(c):
        return c * ramp + 0.1 * c.flip(-1)

    x = torch.randn(1, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    ref = _reference_chunking(process, x, chunk, hop)
    for batch in (1, 4):
        ours = run_bandit_overlap_add(lambda c: process(c)[None], x, chunk, hop, 1, batch=batch)[0]
        assert torch.allclose(ours, ref, atol=1e-12), batch
    assert len(BanditChunkPlan(n, chunk, hop).chunk_indices) == n + chunk - hop   # the skipped ones touch nothing


def test_stems_are_written_before_the_input_is_all_read():
    pulled = []

    def blocks():
        for i in range(40):
            pulled.append(i)
            yield torch.ones(1, 10)

    stream = bandit_overlap_add_stream(lambda c: c[None], blocks(), 80, 10, 1, batch=4)
    start, first = next(stream)
    assert start == 0 and len(pulled) <= 14      # a chunk and a batch of hops of look-ahead, of 40 blocks
    assert torch.allclose(first, torch.ones_like(first))


def test_node_method_bandit_v2(tiny, models_dir):
    from avsync.cli.common import run_node
    from avsync.core.audio import make_audio
    from tests.factories.demix import install_tiny_mrx

    audio = make_audio(torch.randn(2, 8000) * 0.1, 8000)      # 8 kHz in: resampled to the model's 4 kHz per chunk
    with pytest.raises(InputError, match="demix_model"):
        run_node("AVSyncDemixer", audio=audio, method="bandit_v2")
    install_tiny_mrx(models_dir)
    (mrx,) = run_node("AVSyncDemixModelLoader", model_name="mrx_default.safetensors")
    with pytest.raises(InputError, match="needs a bandit_v2 model, got a mrx model"):
        run_node("AVSyncDemixer", audio=audio, method="bandit_v2", demix_model=mrx)
    stems = run_node("AVSyncDemixer", audio=audio, method="bandit_v2", demix_model=tiny)
    for s in stems:
        assert s["sample_rate"] == 8000 and s["waveform"].shape == (1, 2, 8000) and torch.isfinite(s["waveform"]).all()
    assert float(stems[0]["waveform"].abs().max()) > 0
    need = memory_need(2, 8000 * 600, 8000, 8.0, "bandit_v2")
    assert need["chunk"] > memory_need(2, 8000 * 600, 8000, 8.0, "model")["chunk"]


def test_cli_converts_and_demixes(tmp_path, capsys):
    from avsync.cli import main
    from avsync.core.audio_io import decode_audio_file
    from tests.factories.audio_files import write_wav

    out = tmp_path / "tiny.safetensors"
    assert main(["convert", "demix", str(CKPT), str(out), "--sample-rate", "4000", "--hop", "128"]) == 0
    said = capsys.readouterr().out
    assert "bandit_v2, 8 bands, n_fft 256, hop 128" in said and "chunks 8 s on a 1 s hop" in said
    assert main(["convert", "demix", str(CKPT), str(tmp_path / "x.safetensors"), "--family", "mrx"]) == 2
    assert "bandit_v2_tiny.ckpt" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    wav = tmp_path / "mix.wav"
    write_wav(wav, (torch.randn(1, 6000) * 0.1).numpy(), 4000, dtype="float32")
    assert main(["demix", str(wav), "--out", str(tmp_path / "stems"), "--method", "bandit_v2", "--model", str(out),
                 "--float"]) == 0
    d = decode_audio_file(tmp_path / "stems" / "effects.wav")
    assert d.sample_rate == 4000 and d.samples.shape == (1, 6000)
