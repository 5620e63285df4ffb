"""A small learned speech / effects / music separator, trained by us (weights shipped in
``weights/``; training: ``tools/train_small_demixer.py``).

It estimates, for every STFT frame, three masks that add up to one on a fixed grid of
frequencies, so one set of weights serves every sample rate:

- the **grid**: 257 points 31.25 Hz apart from 0 to 8 kHz (the bins of a 512-point STFT
  at 16 kHz) and 16 bands 1 kHz wide from 8 to 24 kHz;
- the **STFT** is 32 ms long (Hann, zero-padded to a power of two) with a 10 ms hop at
  any rate, so frames mean the same time everywhere;
- **features**: log magnitude of the channel mean on the grid (linear interpolation
  between bins below 8 kHz, band means above), level-normalised by the clip's RMS, and
  for stereo the share of side energy (``|L - R|^2 / (|L|^2 + |R|^2)``; 0 for mono);
- **network**: per frame a linear layer, LayerNorm and GELU, a two-layer bidirectional
  GRU over time (at inference on a CPU each direction runs single-threaded in its own
  thread, :func:`~avsync.networks.cpu_threads.run_rnn`), and a linear layer to 3 x 273
  logits, soft-maxed over the sources (944 k parameters; 1.15 M with the dsp guide);
- **dsp guide** (``dsp_guide``; the shipped network has it): the ``dsp`` separator's
  three stems are computed first and their magnitudes, as a share of the mixture's on
  the grid, are further features, so the network refines ``dsp`` (and its stereo centre
  and side cues) rather than starting over;
- **stems**: the grid masks are interpolated back to each rate's bins, applied to each
  channel's complex STFT for speech and music, and effects is ``input - speech - music``,
  so the three stems add back to the input to float precision (as ``dsp``'s do).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cpu_threads import run_rnn

LOW_POINTS = 257          # 0..8000 Hz every 31.25 Hz
LOW_STEP_HZ = 31.25
HIGH_BANDS = 16           # 8..24 kHz, 1 kHz each
GRID = LOW_POINTS + HIGH_BANDS
WINDOW_SECONDS = 0.032
HOP_SECONDS = 0.010
EPS = 1e-5


@dataclass(frozen=True)
class SmallDemixerConfig:
    width: int = 256      # the per-frame layer
    hidden: int = 128     # GRU units per direction
    layers: int = 2
    dsp_guide: bool = False   # also read the dsp separator's stems (their share of the mixture on the grid)

    @property
    def in_features(self) -> int:
        return (5 if self.dsp_guide else 2) * GRID

    def to_dict(self) -> dict:
        return asdict(self)


def stft_params(sample_rate: int) -> tuple[int, int, int]:
    """``(n_fft, window_length, hop)`` at ``sample_rate``: 32 ms window, 10 ms hop."""
    win = int(round(WINDOW_SECONDS * sample_rate))
    return 1 << (win - 1).bit_length(), win, int(round(HOP_SECONDS * sample_rate))


@lru_cache(maxsize=8)
def grid_maps(sample_rate: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(to_grid [GRID, bins], to_bins [bins, GRID])``: averaging of bin values onto the
    grid, and interpolation of grid values onto the bins (each row sums to 1, so masks
    that add up to one on the grid still do on the bins)."""
    n_fft, _, _ = stft_params(sample_rate)
    bins = n_fft // 2 + 1
    freqs = torch.arange(bins, dtype=torch.float64) * sample_rate / n_fft
    to_bins = torch.zeros(bins, GRID, dtype=torch.float64)
    low = freqs <= 8000.0
    pos = freqs[low] / LOW_STEP_HZ
    lo = pos.floor().long().clamp(max=LOW_POINTS - 2)
    frac = pos - lo
    rows = torch.nonzero(low).squeeze(1)
    to_bins[rows, lo] = 1 - frac
    to_bins[rows, lo + 1] += frac
    high = ~low
    band = ((freqs[high] - 8000.0) / 1000.0).floor().long().clamp(0, HIGH_BANDS - 1)
    to_bins[torch.nonzero(high).squeeze(1), LOW_POINTS + band] = 1.0
    # onto the grid: each grid point is the weighted mean of the bins that interpolate from it;
    # a grid point no bin reaches (above a low rate's Nyquist) stays 0 (silent)
    weight = to_bins.sum(0, keepdim=True)
    to_grid = (to_bins / weight.clamp_min(1e-12)).T * (weight.T > 0)
    return to_grid.float(), to_bins.float()


def spectrogram(waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Complex STFT ``[C, bins, frames]`` of ``[C, T]``."""
    n_fft, win, hop = stft_params(sample_rate)
    window = torch.hann_window(win, device=waveform.device, dtype=waveform.dtype)
    return torch.stft(waveform, n_fft, hop, win, window, center=True, return_complex=True)


def inverse(spec: torch.Tensor, sample_rate: int, length: int) -> torch.Tensor:
    n_fft, win, hop = stft_params(sample_rate)
    window = torch.hann_window(win, device=spec.device, dtype=spec.real.dtype)
    return torch.istft(spec, n_fft, hop, win, window, center=True, length=length)


def grid_magnitude(spec: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """``[..., frames, GRID]``: the channels' RMS magnitude of a complex STFT
    ``[..., C, bins, frames]``, on the grid."""
    to_grid, _ = grid_maps(sample_rate)
    return torch.einsum("gb,...bt->...tg", to_grid.to(spec.device), (spec.real ** 2 + spec.imag ** 2).mean(-3).sqrt())


def features(spec: torch.Tensor, sample_rate: int, rms: torch.Tensor) -> torch.Tensor:
    """``[..., frames, 2 * GRID]`` from a complex STFT ``[..., C, bins, frames]`` (C 1 or 2)
    and the clip's RMS ``[...]`` (the level reference)."""
    to_grid, _ = grid_maps(sample_rate)
    to_grid = to_grid.to(spec.device)
    power = spec.real ** 2 + spec.imag ** 2                         # [..., C, bins, frames]
    level = torch.log(grid_magnitude(spec, sample_rate) / rms[..., None, None].clamp_min(1e-8) + EPS)
    if spec.shape[-3] == 2:
        side = (spec[..., 0, :, :] - spec[..., 1, :, :]).abs() ** 2
        share = torch.einsum("gb,...bt->...tg", to_grid, side) / \
            torch.einsum("gb,...bt->...tg", to_grid, 2 * power.sum(-3)).clamp_min(1e-12)
    else:
        share = torch.zeros_like(level)
    return torch.cat([level, share.clamp(0, 1)], -1)


def guide_features(guide_spec: torch.Tensor, spec: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """``[..., frames, 3 * GRID]``: each guide stem's magnitude as a share of the mixture's on
    the grid (channel power means; clamped to 0..2), from the complex STFTs of the guide
    stems ``[..., 3, C, bins, frames]`` and of the mixture ``[..., C, bins, frames]``."""
    share = grid_magnitude(guide_spec, sample_rate) / (grid_magnitude(spec, sample_rate).unsqueeze(-3) + 1e-8)
    return share.clamp(0, 2).transpose(-3, -2).flatten(-2)


def dsp_guide_spec(waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Complex STFTs ``[3, C, bins, frames]`` of the ``dsp`` separator's stems of ``[C, T]``."""
    from ..core.demix_dsp import demix_dsp

    stems = demix_dsp(waveform, sample_rate)
    return spectrogram(stems.flatten(0, 1), sample_rate).unflatten(0, stems.shape[:2])


class SmallDemixer(nn.Module):
    """Grid masks ``[B, 3, frames, GRID]`` (speech, effects, music; summing to one) from
    features ``[B, frames, config.in_features]`` (:func:`features`, then with ``dsp_guide``
    :func:`guide_features`)."""

    def __init__(self, config: SmallDemixerConfig = SmallDemixerConfig()):
        super().__init__()
        self.config = config
        self.inp = nn.Linear(config.in_features, config.width)
        self.norm = nn.LayerNorm(config.width)
        self.rnn = nn.GRU(config.width, config.hidden, config.layers, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * config.hidden, 3 * GRID)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        h = run_rnn(self.rnn, F.gelu(self.norm(self.inp(feats))))   # the plain GRU call when training
        logits = self.out(h).unflatten(-1, (3, GRID)).transpose(1, 2)
        return logits.softmax(1)


def separate(net: SmallDemixer, waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """``[3, C, T]`` stems (speech, effects, music) of ``[C, T]`` (any rate, any channel
    count: more than two channels are separated with the masks of their mean)."""
    n = waveform.shape[-1]
    n_fft, _, _ = stft_params(sample_rate)
    x = F.pad(waveform.float(), (0, max(0, n_fft - n)))   # the STFT's reflect padding needs n_fft // 2 + 1 samples
    spec = spectrogram(x, sample_rate)                                 # [C, bins, frames]
    rms = x.pow(2).mean().sqrt()
    many = spec.shape[0] > 2
    feat_spec = spec.mean(0, keepdim=True) if many else spec
    feats = features(feat_spec[None], sample_rate, rms[None])
    if net.config.dsp_guide:
        guide = dsp_guide_spec(x.mean(0, keepdim=True) if many else x, sample_rate)
        feats = torch.cat([feats, guide_features(guide[None], feat_spec[None], sample_rate)], -1)
    return stems_from_masks(spec, net(feats)[0], x, sample_rate)[..., :n]


def stems_from_masks(spec: torch.Tensor, masks: torch.Tensor, mixture: torch.Tensor,
                     sample_rate: int) -> torch.Tensor:
    """``[..., 3, C, T]`` stems (speech, effects, music) from the mixture ``[..., C, T]``, its
    spectrogram ``[..., C, bins, frames]`` and the network's grid masks ``[..., 3, frames,
    GRID]`` (one mask for all channels): speech and music masked, effects the rest, so the
    stems add back to the mixture. Shared by :func:`separate` and the training loss."""
    _, to_bins = grid_maps(sample_rate)
    bin_masks = torch.einsum("bg,...stg->...sbt", to_bins.to(masks.device), masks)   # [..., 3, bins, frames]
    lead = spec.shape[:-2]

    def masked(i: int) -> torch.Tensor:
        stem = spec * bin_masks[..., i:i + 1, :, :]
        return inverse(stem.reshape(-1, *stem.shape[-2:]), sample_rate, mixture.shape[-1]).reshape(*lead, -1)

    speech, music = masked(0), masked(2)
    return torch.stack([speech, mixture - speech - music, music], -3)


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())

