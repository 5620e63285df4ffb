"""The learned localizer: fbank front end vs torchaudio, converter + loader on the
released key layout, parity with KeyVID's reference code, windowing without seams."""

from pathlib import Path

import numpy as np
import pytest
import torch

from avsync.core.errors import MissingModelError, ModelFormatError
from avsync.core.fbank import imagebind_input, kaldi_fbank
from avsync.core.localize import (OUTPUT_STEP_SECONDS, crossfade_weights, learned_curve, stitch_windows,
                                  window_starts)
from avsync.core.timeline import Timeline
from avsync.loaders.localizer import convert_checkpoint, load_localizer
from tests.factories.audio import chord, clicks
from tests.factories.localizer import save_converted, save_release_pth

DATA = Path(__file__).parent / "data" / "localizer"


def test_fbank_matches_torchaudio_kaldi():
    torchaudio = pytest.importorskip("torchaudio")

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 32000, generator=g) * torch.linspace(0.01, 0.5, 3)[:, None]
    x[1] += 0.3 * torch.sin(torch.arange(32000) * 0.07)
    ours = kaldi_fbank(x)
    for i in range(3):
        ref = torchaudio.compliance.kaldi.fbank(x[i:i + 1], htk_compat=True, sample_frequency=16000, use_energy=False,
                                                window_type="hanning", num_mel_bins=128, dither=0.0, frame_length=25,
                                                frame_shift=10)
        assert ours[i].shape == ref.shape == (198, 128)
        assert (ours[i] - ref).abs().max() <= 1e-4


def test_converter_keeps_released_names_and_drops_the_rest(tmp_path):
    out = tmp_path / "loc.safetensors"
    summary = convert_checkpoint(DATA / "tiny_localizer.pth", out, num_heads=4)
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        keys = set(f.keys())
    assert "imagebindMoodel.modality_preprocessors.audio.pos_embedding_helper.pos_embed" in keys
    assert {"linear1.weight", "linear2.weight", "linear3.weight"} <= keys
    assert not any("vision" in k or "ada_" in k or "modality_heads" in k for k in keys)
    assert summary["dropped"] > 0
    assert summary["config"]["stride"] == 4 and summary["config"]["kernel_size"] == 16


def test_converter_refuses_pickled_code(tmp_path):
    import collections

    bad = tmp_path / "bad.pth"
    torch.save({"x": collections.Counter(a=1)}, bad)  # not a tensor: weights_only refuses or we do
    with pytest.raises(ModelFormatError):
        convert_checkpoint(bad, tmp_path / "o.safetensors")


def test_parity_with_keyvid_reference():
    """Same random weights and input through KeyVID's released code (see
    tests/data/localizer/README.md) and ours: max abs diff <= 1e-4."""
    from safetensors.torch import load_file

    io = load_file(str(DATA / "parity_io.safetensors"))
    mel = imagebind_input(io["waveform"])
    assert mel.shape == io["mel"].shape == (2, 1, 128, 198)
    assert (mel - io["mel"]).abs().max() <= 1e-4
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        convert_checkpoint(DATA / "tiny_localizer.pth", Path(d) / "t.safetensors", num_heads=4)
        net = load_localizer(Path(d) / "t.safetensors")
    with torch.no_grad():
        out_ref_mel = net(io["mel"])
        out_wave = net(mel)
    assert out_ref_mel.shape == (2, 48)
    assert (out_ref_mel - io["scores"]).abs().max() <= 1e-4
    assert (out_wave - io["scores"]).abs().max() <= 1e-4
    assert io["scores"].std() > 0.1  # the fixture is not trivially flat


def test_loader_reads_only_safetensors_and_names_missing_files(models_dir):
    from avsync.cli.common import run_node

    pth = save_release_pth(models_dir / "avsync" / "localizer" / "raw.pth")
    with pytest.raises(ModelFormatError, match="safetensors only"):
        load_localizer(pth)
    with pytest.raises(MissingModelError) as err:
        run_node("AVSyncLocalizerModelLoader", model_name="keyvid_localizer.safetensors")
    msg = str(err.value)
    assert "keyvid_localizer.safetensors" in msg and "avsync_localizer" in msg and "RyanWW/KeyVID" in msg


def test_window_layout_and_crossfade():
    assert window_starts(10000) == [0]
    assert window_starts(32000) == [0]
    assert window_starts(48000) == [0, 16000]
    assert window_starts(50000) == [0, 16000, 18000]           # the tail: a full window ending at the end
    w = crossfade_weights()
    assert np.allclose(w[:24] + w[24:], 1.0) and w.min() > 0


def test_stitching_has_no_seams():
    # every window reports samples of the same global function of time; stitched, the
    # curve must be that function at every frame time (exact for linear functions)
    f = lambda t: 0.3 * t - 1.0  # noqa: E731
    n = 16000 * 5 + 7000
    starts = window_starts(n)
    scores = [f(s / 16000 + np.arange(48) * OUTPUT_STEP_SECONDS) for s in starts]
    tl = Timeline(30, 16000, n)
    times = np.arange(tl.num_frames) / 30.0
    got = stitch_windows([s / 16000 for s in starts], scores, times)
    last = starts[-1] / 16000 + 47 * OUTPUT_STEP_SECONDS
    inner = times <= last
    assert inner.sum() >= len(times) - 2
    assert np.allclose(got[inner], f(times[inner]), atol=1e-9)
    assert np.allclose(got[~inner], f(last))                   # the last 1/24 s holds the last score


def test_learned_method_end_to_end_through_the_nodes(models_dir):
    from avsync.cli.common import run_node
    from avsync.core.audio import make_audio

    save_converted(models_dir)
    (model,) = run_node("AVSyncLocalizerModelLoader", model_name="keyvid_localizer.safetensors")
    sr = 22050
    dur = 3.3                                                    # two windows + tail
    x = clicks([0.4, 1.1, 2.0, 2.9], dur, sr) + chord(duration=dur, sr=sr, amp=0.2)
    audio = make_audio(torch.tensor(x, dtype=torch.float32)[None], sr)
    tl = Timeline(24, sr, len(x))
    k1, plot = run_node("AVSyncKeyframeLocalizer", audio=audio, timeline=tl, method="learned", localizer_model=model,
                        seed=3)
    k2, _ = run_node("AVSyncKeyframeLocalizer", audio=audio, timeline=tl, method="learned", localizer_model=model,
                     seed=3)
    assert k1.method == "learned" and len(k1.curve) == tl.num_frames == 79
    assert k1.indices == k2.indices and k1.curve == k2.curve
    assert [len(c) for c in k1.clips] == [12, 8]                   # 31-frame tail: ceil(12 * 31 / 48)
    # the curve is the network's output: direct check on the first window's frames
    net = load_localizer(models_dir / "avsync" / "localizer" / "keyvid_localizer.safetensors")
    direct = learned_curve(audio["waveform"][0], sr, tl, lambda m: net(m))
    assert np.allclose(direct, k1.curve)
    assert plot.shape == (1, 512, 1024, 3)


def test_convert_command_line(tmp_path, capsys):
    from avsync.cli import main

    out = tmp_path / "keyvid_localizer.safetensors"
    assert main(["convert", "localizer", str(DATA / "tiny_localizer.pth"), str(out), "--num-heads", "4"]) == 0
    assert "tensors kept" in capsys.readouterr().out
    net = load_localizer(out)
    assert net.cfg.num_heads == 4 and net.cfg.num_blocks == 2 and net.cfg.embed_dim == 32
    # the default head count is ImageBind's 64-dim heads
    assert main(["convert", "localizer", str(DATA / "tiny_localizer.pth"), str(tmp_path / "d.safetensors")]) == 0
    assert load_localizer(tmp_path / "d.safetensors").cfg.num_heads == 8  # 32 is not a multiple of 64: gcd(32, 8)
    assert main(["convert", "localizer", str(tmp_path / "missing.pth"), str(tmp_path / "x.safetensors")]) == 2


def test_real_size_layout_is_read_back_as_the_release_config():
    # shapes of the released file (reference notes §A1/§A6), on the meta device: no memory
    from avsync.loaders.localizer import config_from_state
    from avsync.networks.imagebind_audio import LocalizerConfig
    cfg = LocalizerConfig()
    net_shapes = {
        "imagebindMoodel.modality_preprocessors.audio.rgbt_stem.proj.weight": (768, 1, 16, 16),
        "imagebindMoodel.modality_preprocessors.audio.pos_embedding_helper.pos_embed": (1, 1334, 768),
        "linear1.weight": (48, 1334), "linear2.weight": (16, 768), "linear3.weight": (48, 768),
    }
    state = {k: torch.empty(s, device="meta") for k, s in net_shapes.items()}
    for i in range(12):
        state[f"imagebindMoodel.modality_trunks.audio.blocks.{i}.norm_1.weight"] = torch.empty(768, device="meta")
    assert config_from_state(state) == cfg
    assert cfg.num_tokens == 1334 and cfg.token_grid == (29, 46)
