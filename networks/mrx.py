"""MRX, the Multi-Resolution CrossNet of "The Cocktail Fork Problem" (Petermann,
Wichern, Wang, Le Roux; ICASSP 2022), in plain torch.

Faithful to the released code (``merlresearch/cocktail-fork-separation``, ``mrx.py``,
MIT): parameter names match its ``state_dict`` so the released ``.pth`` files load
after a plain conversion to safetensors. Structure:

* one STFT per window length (default 1024, 2048, 8192; hop 256; Hann; centred,
  reflect-padded; ``torch.stft(normalized=True)`` scaling, i.e. divided by
  ``sqrt(n_fft)`` — *not* torchaudio's window-norm scaling),
* per resolution an encoder ``BatchNorm1d(bins) → Linear(bins, hidden) → BatchNorm1d
  → tanh`` on the magnitude of every frame (each channel on its own),
* the encodings are averaged; one 3-layer bidirectional LSTM per source runs on the
  average and their outputs are averaged again ("CrossNet"); the average input and
  the LSTM output are concatenated,
* per source and resolution a decoder ``Linear → BatchNorm1d → ReLU → Linear →
  BatchNorm1d → ReLU`` gives a real mask on that resolution's complex STFT; the
  masked STFTs are inverted and the resolutions are *summed*.

Sources come out in the order the model was trained with: ``music, speech, sfx``
for the released checkpoints (``dnr_dataset.SOURCE_NAMES``).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import List

import torch
from torch import nn

from ..core.stft import hann, istft, stft
from .cpu_threads import run_rnn

SOURCE_NAMES = ("music", "speech", "sfx")
SAMPLE_RATE = 44100


@dataclass
class MRXConfig:
    n_sources: int = 3
    window_lengths: List[int] = field(default_factory=lambda: [1024, 2048, 8192])
    n_hop: int = 256
    n_hidden: int = 512
    n_lstm_layers: int = 3
    sample_rate: int = SAMPLE_RATE
    source_names: List[str] = field(default_factory=lambda: list(SOURCE_NAMES))

    def to_dict(self) -> dict:
        return asdict(self)


class _Encoder(nn.Module):
    def __init__(self, n_bins: int, n_hidden: int):
        super().__init__()
        # the name "layer" and indices 0..2 are the released state_dict's
        self.layer = nn.Sequential(nn.BatchNorm1d(n_bins), nn.Linear(n_bins, n_hidden, bias=False),
                                   nn.BatchNorm1d(n_hidden))

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        """complex ``[B, F, N]`` → ``[B, N, hidden]``."""
        b, f, n = spec.shape
        x = spec.transpose(1, 2).abs().reshape(b * n, f)
        return torch.tanh(self.layer(x)).reshape(b, n, -1)


class _Decoder(nn.Module):
    def __init__(self, n_bins: int, n_hidden: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Linear(2 * n_hidden, n_hidden, bias=False), nn.BatchNorm1d(n_hidden), nn.ReLU(),
            nn.Linear(n_hidden, n_bins, bias=False), nn.BatchNorm1d(n_bins), nn.ReLU(),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``[B, N, 2 * hidden]`` → mask ``[B, F, N]``."""
        b, n, d = h.shape
        return self.block(h.reshape(b * n, d)).reshape(b, n, -1).transpose(1, 2)


class _CrossNet(nn.Module):
    def __init__(self, n_branches: int, n_hidden: int, n_layers: int):
        super().__init__()
        self.lstm = nn.ModuleList(
            nn.LSTM(n_hidden, n_hidden // 2, num_layers=n_layers, bidirectional=True, batch_first=True,
                    dropout=0.4 if n_layers > 1 else 0.0)
            for _ in range(n_branches)
        )

    def forward(self, encoded: list[torch.Tensor]) -> torch.Tensor:
        cross_in = torch.stack(encoded).mean(0)
        # oneDNN's CPU LSTM has a large per-step cost: ~20x slower than the native kernel for
        # small widths, slightly faster for the released width (512). Same numbers either way.
        small = self.lstm[0].hidden_size < 128
        with warnings.catch_warnings():  # flags() warns about TF32 on Intel GPUs, which we do not use
            warnings.simplefilter("ignore", UserWarning)
            mkldnn = torch.backends.mkldnn.flags(enabled=torch.backends.mkldnn.enabled and not small)
            mkldnn.__enter__()
        try:
            # each LSTM direction single-threaded in its own thread at inference (cpu_threads.run_rnn)
            cross_out = torch.stack([run_rnn(lstm, cross_in) for lstm in self.lstm]).mean(0)
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                mkldnn.__exit__(None, None, None)
        return torch.cat([cross_in, cross_out], dim=-1)


class MRX(nn.Module):
    def __init__(self, config: MRXConfig | None = None):
        super().__init__()
        self.config = config or MRXConfig()
        cfg = self.config
        bins = [w // 2 + 1 for w in cfg.window_lengths]
        self._encoders = nn.ModuleList(_Encoder(b, cfg.n_hidden) for b in bins)
        # the released code builds one branch per *source* (not per resolution)
        self._cross_net = _CrossNet(cfg.n_sources, cfg.n_hidden, cfg.n_lstm_layers)
        self._decoders = nn.ModuleList(
            nn.ModuleList(_Decoder(b, cfg.n_hidden) for b in bins) for _ in range(cfg.n_sources))

    @property
    def min_length(self) -> int:
        """Reflect padding of the largest window needs more than half a window of input."""
        return max(self.config.window_lengths) // 2 + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, T]`` → ``[B, n_sources, C, T]`` (each channel is separated on its own)."""
        if x.dim() != 3:
            raise ValueError(f"MRX expects [batch, channels, samples], got {tuple(x.shape)}")
        b, c, t = x.shape
        flat = x.reshape(b * c, t)
        hop = self.config.n_hop
        specs = [stft(flat, w, hop, hann(w, flat), scaling="frame") for w in self.config.window_lengths]
        hidden = self._cross_net([enc(s) for enc, s in zip(self._encoders, specs)])
        sources = []
        for decoders in self._decoders:
            y = 0
            for w, spec, dec in zip(self.config.window_lengths, specs, decoders):
                y = y + istft(dec(hidden) * spec, w, hop, t, hann(w, flat), scaling="frame")
            sources.append(y)
        return torch.stack(sources, dim=1).reshape(b, c, len(sources), t).transpose(1, 2)


def config_from_state_dict(sd: dict, n_hop: int = 256, sample_rate: int = SAMPLE_RATE) -> MRXConfig:
    """Infer the architecture from tensor shapes (the hop and rate are not stored in it)."""
    n_res = len({k.split(".")[1] for k in sd if k.startswith("_encoders.")})
    n_src = len({k.split(".")[1] for k in sd if k.startswith("_decoders.")})
    layers = len({k for k in sd if k.startswith("_cross_net.lstm.0.weight_ih_l") and not k.endswith("_reverse")})
    windows = [2 * (int(sd[f"_encoders.{i}.layer.0.weight"].shape[0]) - 1) for i in range(n_res)]
    hidden = int(sd["_encoders.0.layer.1.weight"].shape[0])
    names = list(SOURCE_NAMES) if n_src == 3 else [f"source{i}" for i in range(n_src)]
    return MRXConfig(n_sources=n_src, window_lengths=windows, n_hop=n_hop, n_hidden=hidden, n_lstm_layers=layers,
                     sample_rate=sample_rate, source_names=names)
