"""Every audio path works without torchaudio (newer ComfyUI installs lack it), and our own torch
code equals torchaudio's where torchaudio is installed (test environment only)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from avsync.core.audio import resample
from avsync.core.fbank import _mel_banks
from avsync.core.loudness import integrated_loudness
from avsync.core.onset import htk_mel_filterbank

RATES = [(44100, 16000), (48000, 44100), (8000, 22050), (22050, 16000), (16000, 48000)]


def _noise(channels=2, n=44100, seed=0):
    return torch.randn(channels, n, generator=torch.Generator().manual_seed(seed)) * 0.3


@pytest.mark.parametrize("orig, new", RATES)
def test_resample_equals_torchaudio(orig, new):
    AF = pytest.importorskip("torchaudio.functional")
    x = _noise(n=orig)
    g = math.gcd(orig, new)
    kw = dict(lowpass_filter_width=16, rolloff=0.945, resampling_method="sinc_interp_kaiser", beta=14.769656459379492)
    ref32 = AF.resample(x, orig // g, new // g, **kw)
    ref64 = AF.resample(x.double(), orig // g, new // g, **kw)
    ours = resample(x, orig, new)
    assert ours.shape == ref32.shape and ours.dtype == torch.float32
    # torchaudio builds the filter in the signal's dtype, we build it in float64: measured
    # max|ours - torchaudio float64| 2.9e-7 .. 3.8e-7 (float32 output rounding, values up to ~1.2),
    # max|torchaudio float32 - torchaudio float64| 6.2e-7 .. 1.9e-5: that is all of ours vs its float32.
    assert (ours.double() - ref64).abs().max() < 2e-6
    assert (ours - ref32).abs().max() < 1e-4


def test_resample_keeps_a_tone_and_the_length():
    """Checked without torchaudio: a 1 kHz tone at 44.1 kHz resampled to 16 kHz is the same tone."""
    t = torch.arange(44100, dtype=torch.float64) / 44100
    y = resample(torch.sin(2 * math.pi * 1000 * t).float()[None], 44100, 16000)
    assert y.shape == (1, 16000)
    expect = torch.sin(2 * math.pi * 1000 * torch.arange(16000, dtype=torch.float64) / 16000)
    # away from the edges (the filter sees zeros beyond them) the error is the filter's ripple
    assert (y[0, 200:-200].double() - expect[200:-200]).abs().max() < 1e-3
    assert torch.equal(resample(y, 16000, 16000), y)
    assert resample(torch.zeros(3, 2, 441), 44100, 16000).shape == (3, 2, 160)


@pytest.mark.parametrize("n_fft, sr", [(256, 16000), (512, 44100), (256, 22050)])
def test_onset_mel_filterbank_equals_torchaudio(n_fft, sr):
    AF = pytest.importorskip("torchaudio.functional")
    f_max = min(sr / 2, 16000.0)
    ref = AF.melscale_fbanks(n_fft // 2 + 1, 30.0, f_max, 40, sr, norm=None, mel_scale="htk")
    ours = htk_mel_filterbank(n_fft // 2 + 1, 30.0, f_max, 40, sr)
    # torchaudio computes in float32, we in float64 then round: measured 2.5e-6 .. 3.7e-6 (weights <= 1)
    assert ours.shape == ref.shape and (ours - ref).abs().max() < 2e-5


def test_kaldi_mel_banks_equal_torchaudio():
    kaldi = pytest.importorskip("torchaudio.compliance.kaldi")
    banks, _ = kaldi.get_mel_banks(128, 512, 16000.0, 20.0, 0.0, 100.0, -500.0, 1.0)
    ref = torch.nn.functional.pad(banks, (0, 1)).float().T
    ours = _mel_banks(128, 512, 16000.0, 20.0, 0.0)
    # float32 (torchaudio) vs float64-then-rounded (ours): measured 1.4e-5 (weights <= 1)
    assert ours.shape == ref.shape and (ours - ref).abs().max() < 1e-4


@pytest.mark.parametrize("gain", [1.0, 8.0])
def test_loudness_equals_torchaudio_also_past_full_scale(gain):
    AF = pytest.importorskip("torchaudio.functional")
    g = torch.Generator().manual_seed(3)
    y = torch.randn(2, 16000 * 10, generator=g) * torch.linspace(0.01, 0.5, 16000 * 10) * gain
    # both in float64 (scipy's lfilter vs torchaudio's): measured 8.9e-16 and 1.4e-14 LU
    assert abs(integrated_loudness(y, 16000) - float(AF.loudness(y.double(), 16000))) < 1e-9


def test_loudness_of_a_997_hz_sine_is_bs1770s_reference():
    """BS.1770-4: a 0 dBFS 997 Hz sine in one channel reads -3.01 LKFS; at -20 dBFS (so that the
    K-weighted signal stays below full scale, where torchaudio's filter clamps) -23.01 (checked
    without torchaudio)."""
    t = torch.arange(48000 * 3, dtype=torch.float64) / 48000
    x = 0.1 * torch.sin(2 * math.pi * 997 * t)[None]
    # -23.052: the K-filter from the Audio EQ Cookbook formulas (torchaudio's, which reads -23.052
    # here too) is 0.04 dB off the standard's tabulated 48 kHz coefficients at 997 Hz
    assert integrated_loudness(x, 48000) == pytest.approx(-23.01, abs=0.05)


_NO_TORCHAUDIO = textwrap.dedent("""
    import sys, importlib.abc

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torchaudio" or name.startswith("torchaudio."):
                raise ImportError("torchaudio is blocked for this test")

    if sys.argv[1] == "block":
        sys.meta_path.insert(0, Block())
    import numpy as np, torch
    import avsync
    from avsync import nodes
    assert not nodes.FAILED_FAMILIES, nodes.FAILED_FAMILIES
    assert "torchaudio" not in sys.modules, "imported at module import time"
    from avsync.cli.common import run_node
    from avsync.core.audio import make_audio
    from avsync.core.fbank import imagebind_input
    from avsync.core.loudness import integrated_loudness
    sr = 22050
    t = torch.arange(sr * 2) / sr
    x = (torch.sin(2 * np.pi * 440 * t) * 0.2 + (torch.arange(sr * 2) % 11025 < 200) * 0.8).float()[None]
    audio, tl = run_node("AVSyncAudioLoader", audio_file="(none: use the audio input)", audio=make_audio(x, sr),
                         sample_rate=16000, fps=24.0)
    assert audio["sample_rate"] == 16000 and audio["waveform"].shape[-1] == 32000
    keyframes, plot = run_node("AVSyncKeyframeLocalizer", audio=audio, timeline=tl)
    assert len(keyframes.indices) > 0 and plot.shape[0] == 1
    speech, effects, music = run_node("AVSyncDemixer", audio=audio, method="dsp")
    assert effects["waveform"].shape == audio["waveform"].shape
    assert imagebind_input(audio["waveform"][0, :, :32000]).shape == (1, 1, 128, 198)
    assert np.isfinite(integrated_loudness(audio["waveform"][0], 16000))
    print("ok", "torchaudio" in sys.modules)
""")


@pytest.mark.parametrize("mode", ["block", "plain"])
def test_every_audio_path_runs_without_torchaudio(mode):
    """In a fresh interpreter, with torchaudio made unimportable ("block"), or merely not imported
    by AVSync ("plain", also where torchaudio is installed): loader with resampling, onset
    keyframes, dsp demix, fbank and loudness all run, and importing AVSync imports no torchaudio."""
    res = subprocess.run([sys.executable, "-c", _NO_TORCHAUDIO, mode], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "ok False"


def test_a_mismatched_torch_torchaudio_pair_is_named(monkeypatch):
    from importlib import metadata

    from tests.conftest import torch_torchaudio_mismatch

    versions = {"torch": "2.14.1", "torchaudio": "2.11.1"}
    monkeypatch.setattr(metadata, "version", lambda name: versions[name])
    msg = torch_torchaudio_mismatch()
    assert "torchaudio 2.11.1 does not belong to torch 2.14.1" in msg and "requirements-test.txt" in msg
    versions["torch"] = "2.11.0+cpu"
    assert torch_torchaudio_mismatch() is None

    def missing(name):
        if name == "torchaudio":
            raise metadata.PackageNotFoundError(name)
        return "2.14.1"

    monkeypatch.setattr(metadata, "version", missing)
    assert torch_torchaudio_mismatch() is None
