"""BandIt v2, the band-split RNN cinematic separator of "Remastering Divide and Remaster"
(Watcharasupat, Wu, Orife; arXiv 2407.07275), in plain torch.

Faithful to the released code (``kwatcharasupat/bandit-v2``, Apache-2.0, commit
``d5563d9``) with the released model config (``configs/models/bandit-mus64.yaml``) as
the defaults of :class:`BanditV2Config`. Parameter names match the released Lightning
checkpoints' ``state_dict`` after its ``model.`` prefix, so a converted checkpoint loads
with a strict ``load_state_dict``. Structure (``src/models/bandit/bandit.py:Bandit``):

* a centred STFT, n_fft 2048, hop 512, periodic Hann, *reflect* padding (the released
  config overrides the class default ``constant``), scaled like torchaudio's
  ``Spectrogram(normalized=True)``: divided by the window's L2 norm
  (:func:`~avsync.core.stft.stft` with ``scaling="window"``); each channel is its own
  mono item (``in_channels=1``: the reference chunker folds channels into the batch);
* band split (``bandsplit.py:BandSplitModule``): 64 overlapping "musical" bands
  (``utils.py:MusicalBandsplitSpecification``, :func:`musical_band_specs`); per band
  ``LayerNorm → Linear`` on the interleaved real/imaginary bins gives a 128-d embedding;
* the sequence/band modelling stack (``tfmodel.py:SeqBandModellingModule``, serial mode):
  ``2 × n_sqm_modules`` residual bidirectional GRUs (``LayerNorm → GRU → Linear`` plus the
  input) alternating over time and over bands;
* per stem an overlapping mask estimator (``maskestim.py:OverlappingMaskEstimationModule``):
  per band ``LayerNorm → Linear → Tanh → Linear → GLU`` gives a complex mask of the band,
  weighted by the band's normalised filterbank weights and summed where bands overlap;
* each stem = mask × mixture STFT, inverted with the same scaling.

The released checkpoints' stems are ``speech, music, sfx`` (MSST's
``config_dnr_bandit_v2_mus64.yaml``; the Lightning config ``stems`` list), at 48 kHz.
Every size is a config field so that tiny configs exercise every code path.

Not ported: training-only pieces (gradient checkpointing, ``torch.compile(disable=True)``
wrappers, which change nothing at inference) and the reference's unused ``parallel_mode``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List

import numpy as np
import torch
from torch import nn

from ..core.stft import hann, istft, stft
from .cpu_threads import run_items_in_threads, run_rnn

SOURCE_NAMES = ("speech", "music", "sfx")
SAMPLE_RATE = 48000


@dataclass
class BanditV2Config:
    """Released defaults: ``configs/models/bandit-mus64.yaml`` + ``expt/inference.yaml``
    (fs 48000) + ``configs/inference/chunked-tensor.yaml`` (8 s chunks, 1 s hop)."""

    in_channels: int = 1
    stems: List[str] = field(default_factory=lambda: list(SOURCE_NAMES))
    n_bands: int = 64
    n_sqm_modules: int = 8
    emb_dim: int = 128
    rnn_dim: int = 256
    bidirectional: bool = True
    rnn_type: str = "GRU"
    mlp_dim: int = 512
    hidden_activation: str = "Tanh"
    complex_mask: bool = True
    use_freq_weights: bool = True
    n_fft: int = 2048
    hop_length: int = 512
    pad_mode: str = "reflect"
    sample_rate: int = SAMPLE_RATE
    # the reference chunker (src/system/inference_handler.py:StandardTensorChunkedInferenceHandler)
    chunk_seconds: float = 8.0
    hop_seconds: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def chunk_samples(self) -> int:
        return int(self.chunk_seconds * self.sample_rate)      # int() as the reference does

    @property
    def hop_samples(self) -> int:
        return int(self.hop_seconds * self.sample_rate)


def _hz_to_midi(f):
    """``librosa.hz_to_midi`` (librosa/core/convert.py): 12 (log2 f − log2 440) + 69."""
    return 12 * (np.log2(np.asanyarray(f)) - np.log2(440.0)) + 69


def _midi_to_hz(m):
    """``librosa.midi_to_hz``: 440 · 2^((m − 69) / 12)."""
    return 440.0 * (2.0 ** ((np.asanyarray(m) - 69.0) / 12.0))


def musical_filterbank(n_bands: int, fs: int, n_freqs: int) -> torch.Tensor:
    """``utils.py:musical_filterbank`` with the released ``f_min=0``, ``f_max=None``:
    ``n_bands`` rectangular bands equally spaced in MIDI pitch from one bin to Nyquist,
    each one ``log2(f_max / f_min) / n_bands`` octaves wide on either side; the first
    band also covers everything below it, the last everything above it. float64."""
    nfft = 2 * (n_freqs - 1)
    df = fs / nfft
    f_max = fs / 2
    f_min = fs / nfft
    n_octaves = np.log2(f_max / f_min)
    bandwidth_mult = np.power(2.0, n_octaves / n_bands)
    low_midi = max(0, _hz_to_midi(f_min))
    high_midi = _hz_to_midi(f_max)
    hz_pts = _midi_to_hz(np.linspace(low_midi, high_midi, n_bands))
    low_bins = np.floor(hz_pts / bandwidth_mult / df).astype(int)
    high_bins = np.ceil(hz_pts * bandwidth_mult / df).astype(int)
    fb = np.zeros((n_bands, n_freqs))
    for i in range(n_bands):
        fb[i, low_bins[i]: high_bins[i] + 1] = 1.0
    fb[0, : low_bins[0]] = 1.0
    fb[-1, high_bins[-1] + 1:] = 1.0
    return torch.as_tensor(fb)


def musical_band_specs(n_fft: int, fs: int, n_bands: int) -> tuple[list[tuple[int, int]], list[torch.Tensor]]:
    """``utils.py:PerceptualBandsplitSpecification``: ``[start, end)`` bins of each
    non-empty band and its weights (the filterbank divided by its sum over bands, so
    overlapping masks add up to one band's worth). Bands may repeat at low frequencies."""
    fb = musical_filterbank(n_bands, fs, n_fft // 2 + 1)
    normalized = fb / fb.sum(dim=0, keepdim=True)
    specs, weights = [], []
    for i in range(n_bands):
        active = torch.nonzero(fb[i]).flatten().tolist()
        if not active:
            continue
        start, end = active[0], active[-1] + 1
        specs.append((start, end))
        weights.append(normalized[i, start:end])
    return specs, weights


class _NormFC(nn.Module):
    """``bandsplit.py:NormFC`` (channels as features): ``combined = [LayerNorm, Linear]``."""

    def __init__(self, emb_dim: int, bandwidth: int, in_channels: int):
        super().__init__()
        n = in_channels * bandwidth * 2
        self.combined = nn.Sequential(nn.LayerNorm(n), nn.Linear(n, emb_dim))

    def forward(self, xb: torch.Tensor) -> torch.Tensor:
        return self.combined(xb)


class _BandSplit(nn.Module):
    def __init__(self, band_specs, emb_dim: int, in_channels: int):
        super().__init__()
        self.band_specs = list(band_specs)
        self.emb_dim = emb_dim
        self.norm_fc_modules = nn.ModuleList(_NormFC(emb_dim, e - s, in_channels) for s, e in self.band_specs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """complex ``[B, C, F, N]`` → ``[B, bands, N, emb]``."""
        b, _, _, n = x.shape
        x = x.permute(0, 3, 1, 2).contiguous()                    # [B, N, C, F]
        out = []
        for (s, e), nfm in zip(self.band_specs, self.norm_fc_modules):
            xb = torch.view_as_real(x[:, :, :, s:e]).reshape(b, n, -1)   # re/im interleaved per bin
            out.append(nfm(xb))
        return torch.stack(out, dim=1)


class _ResidualRNN(nn.Module):
    """``tfmodel.py:ResidualRNN``: ``LayerNorm → RNN over dim 2 → Linear``, plus the input."""

    def __init__(self, emb_dim: int, rnn_dim: int, bidirectional: bool, rnn_type: str):
        super().__init__()
        if rnn_type not in ("GRU", "LSTM", "RNN"):
            raise ValueError(f"rnn_type must be GRU, LSTM or RNN, got {rnn_type!r}")
        self.norm = nn.LayerNorm(emb_dim)
        self.rnn = getattr(nn, rnn_type)(input_size=emb_dim, hidden_size=rnn_dim, num_layers=1, batch_first=True,
                                         bidirectional=bidirectional)
        self.fc = nn.Linear(rnn_dim * (2 if bidirectional else 1), emb_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, u, a, d = z.shape
        y = run_rnn(self.rnn, self.norm(z).reshape(b * u, a, d))
        return self.fc(y.reshape(b, u, a, -1)) + z


class _Transpose(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z.transpose(1, 2)


class _SeqBand(nn.Module):
    """``tfmodel.py:SeqBandModellingModule`` (serial): ``seqband`` alternates
    ResidualRNN (even indices, the checkpoint's keys) and a band/time transpose."""

    def __init__(self, n_modules: int, emb_dim: int, rnn_dim: int, bidirectional: bool, rnn_type: str):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(2 * n_modules):
            layers += [_ResidualRNN(emb_dim, rnn_dim, bidirectional, rnn_type), _Transpose()]
        self.seqband = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.seqband(z)


class _NormMLP(nn.Module):
    """``maskestim.py:NormMLP``. The reference also registers the same three modules a
    second time as ``combined``; those alias keys are dropped at conversion."""

    def __init__(self, emb_dim: int, mlp_dim: int, bandwidth: int, in_channels: int, hidden_activation: str,
                 complex_mask: bool):
        super().__init__()
        act = getattr(nn, hidden_activation, None)
        if act is None:
            raise ValueError(f"hidden_activation {hidden_activation!r} is not a torch.nn activation")
        self.bandwidth, self.in_channels, self.complex_mask = bandwidth, in_channels, complex_mask
        self.reim = 2 if complex_mask else 1
        self.norm = nn.LayerNorm(emb_dim)
        self.hidden = nn.Sequential(nn.Linear(emb_dim, mlp_dim), act())
        self.output = nn.Sequential(nn.Linear(mlp_dim, bandwidth * in_channels * self.reim * 2), nn.GLU(dim=-1))

    def forward(self, qb: torch.Tensor) -> torch.Tensor:
        """``[B, N, emb]`` → mask ``[B, C, bandwidth, N]`` (complex when ``complex_mask``)."""
        mb = self.output(self.hidden(self.norm(qb)))
        b, n, _ = mb.shape
        if self.complex_mask:
            mb = torch.view_as_complex(mb.reshape(b, n, self.in_channels, self.bandwidth, 2).contiguous())
        else:
            mb = mb.reshape(b, n, self.in_channels, self.bandwidth)
        return mb.permute(0, 2, 3, 1)


class _MaskEstimator(nn.Module):
    """``maskestim.py:OverlappingMaskEstimationModule`` for one stem."""

    def __init__(self, band_specs, freq_weights, n_freq: int, cfg: BanditV2Config):
        super().__init__()
        self.band_specs = list(band_specs)
        self.n_freq = n_freq
        self.in_channels = cfg.in_channels
        self.use_freq_weights = cfg.use_freq_weights
        self.norm_mlp = nn.ModuleList(
            _NormMLP(cfg.emb_dim, cfg.mlp_dim, e - s, cfg.in_channels, cfg.hidden_activation, cfg.complex_mask)
            for s, e in self.band_specs)
        # derived from the band specs, so not stored in our files; the released checkpoints
        # store them (as "freq_weights/<i>", float64) and conversion checks they agree
        self.freq_weights = list(freq_weights)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = q.shape
        masks = torch.zeros(b, self.in_channels, self.n_freq, n, device=q.device, dtype=torch.complex64)
        for i, ((s, e), mlp) in enumerate(zip(self.band_specs, self.norm_mlp)):
            mask = mlp(q[:, i])
            if self.use_freq_weights:
                # float64 weights as in the reference (its buffers are float64; the sum is complex64),
                # except on MPS, which has no float64
                fw = self.freq_weights[i]
                fw = fw.to(q.device) if q.device.type != "mps" else fw.float().to(q.device)
                mask = mask * fw[:, None]
            masks[:, :, s:e, :] += mask
        return masks


class BanditV2(nn.Module):
    def __init__(self, config: BanditV2Config | None = None):
        super().__init__()
        self.config = cfg = config or BanditV2Config()
        if cfg.in_channels < 1 or not cfg.stems:
            raise ValueError("BandIt v2 needs at least one input channel and one stem")
        specs, weights = musical_band_specs(cfg.n_fft, cfg.sample_rate, cfg.n_bands)
        self.band_specs = specs
        self.freq_weights = weights
        n_freq = cfg.n_fft // 2 + 1
        self.band_split = _BandSplit(specs, cfg.emb_dim, cfg.in_channels)
        self.tf_model = _SeqBand(cfg.n_sqm_modules, cfg.emb_dim, cfg.rnn_dim, cfg.bidirectional, cfg.rnn_type)
        self.mask_estim = nn.ModuleDict({stem: _MaskEstimator(specs, weights, n_freq, cfg) for stem in cfg.stems})

    @property
    def min_length(self) -> int:
        """Reflect padding needs more than half a window of input."""
        return self.config.n_fft // 2 + 1

    def separate_items(self, audio: torch.Tensor) -> torch.Tensor:
        """The reference ``Bandit.forward`` on ``batch["mixture"]["audio"]``:
        ``[B, in_channels, T]`` → ``[B, stems, in_channels, T]``."""
        cfg = self.config
        length = audio.shape[-1]
        window = hann(cfg.n_fft, audio)
        x = stft(audio, cfg.n_fft, cfg.hop_length, window, scaling="window", pad_mode=cfg.pad_mode)
        q = self.tf_model(self.band_split(x))
        outs = []
        for mem in self.mask_estim.values():
            s = x * mem(q).to(x.dtype)
            outs.append(istft(s, cfg.n_fft, cfg.hop_length, length, window, scaling="window"))
        return torch.stack(outs, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, T]`` → ``[B, stems, C, T]``. With the released ``in_channels=1`` each
        channel is separated on its own, as the reference chunker does (it folds
        channels into the batch)."""
        if x.dim() != 3:
            raise ValueError(f"BandIt v2 expects [batch, channels, samples], got {tuple(x.shape)}")
        b, c, t = x.shape
        k = self.config.in_channels
        if c % k:
            raise ValueError(f"BandIt v2 with in_channels={k} cannot take {c} channels")
        # items are independent: on a CPU they run in parallel threads, not op by op (networks/cpu_threads.py)
        y = run_items_in_threads(self.separate_items, x.reshape(b * c // k, k, t), self)
        return y.reshape(b, c // k, len(self.config.stems), k, t).transpose(1, 2).reshape(b, -1, c, t)


def config_from_state_dict(sd: dict, sample_rate: int = SAMPLE_RATE, stems=None, **fixed) -> BanditV2Config:
    """Infer the sizes from tensor shapes. The band count, n_fft and rate are not all in
    the shapes: n_fft comes from the STFT window a Lightning checkpoint stores (else the
    released 2048), the rate is given; the bands are then checked by building the net."""
    names = list(stems) if stems else list(dict.fromkeys(k.split(".")[1] for k in sd if k.startswith("mask_estim.")))
    n_rnn = len({k.split(".")[2] for k in sd if k.startswith("tf_model.seqband.") and k.endswith(".norm.weight")})
    emb = int(sd["band_split.norm_fc_modules.0.combined.1.weight"].shape[0])
    first = names[0]
    mlp = int(sd[f"mask_estim.{first}.norm_mlp.0.hidden.0.weight"].shape[0])
    w_ih = sd["tf_model.seqband.0.rnn.weight_ih_l0"]
    fc_in = int(sd["tf_model.seqband.0.fc.weight"].shape[1])
    bidirectional = "tf_model.seqband.0.rnn.weight_ih_l0_reverse" in sd
    rnn_dim = fc_in // (2 if bidirectional else 1)
    gates = int(w_ih.shape[0]) // rnn_dim
    rnn_type = {3: "GRU", 4: "LSTM", 1: "RNN"}[gates]
    n_bands = len({k.split(".")[2] for k in sd if k.startswith("band_split.norm_fc_modules.")})
    n_fft = int(sd["stft.window"].shape[0]) if "stft.window" in sd else fixed.pop("n_fft", 2048)
    kwargs = dict(stems=names, n_bands=n_bands, n_sqm_modules=n_rnn // 2, emb_dim=emb, rnn_dim=rnn_dim,
                  bidirectional=bidirectional, rnn_type=rnn_type, mlp_dim=mlp, n_fft=n_fft, sample_rate=sample_rate)
    kwargs.update(fixed)
    return BanditV2Config(**kwargs)
