"""Short-time Fourier transforms on ``[..., T]`` signals, shared by the DSP demixer
and the neural demixers.

Two scalings called "normalized" exist and they differ:

* ``torch.stft(normalized=True)`` divides by ``sqrt(n_fft)`` (``scaling="frame"``),
* ``torchaudio.transforms.Spectrogram(normalized=True)`` divides by the window's
  L2 norm ``sqrt(sum(w**2))`` (``scaling="window"``; for Hann-2048 that is
  ``sqrt(768)``, not ``sqrt(2048)``).

A port must use the scaling its reference trained with, or the network sees its
input scaled by a constant (about 1.6x for Hann windows).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

SCALINGS = ("none", "frame", "window")


def hann(n_fft: int, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A periodic Hann window (what ``torch.hann_window`` gives) on ``like``'s device."""
    w = torch.hann_window(n_fft, dtype=torch.float64 if like is not None and like.dtype == torch.float64 else torch.float32)
    return w.to(like.device) if like is not None else w


def scale_of(window: torch.Tensor, n_fft: int, scaling: str) -> float:
    if scaling == "none":
        return 1.0
    if scaling == "frame":
        return 1.0 / math.sqrt(n_fft)
    if scaling == "window":
        return 1.0 / float(window.double().pow(2).sum().sqrt())
    raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")


def stft(x: torch.Tensor, n_fft: int, hop: int, window: Optional[torch.Tensor] = None,
         scaling: str = "none", pad_mode: str = "reflect") -> torch.Tensor:
    """Centred STFT of ``[..., T]`` → complex ``[..., n_fft // 2 + 1, frames]``.

    ``pad_mode="reflect"`` needs ``T > n_fft // 2``; shorter signals fall back to
    zero padding (reflection is undefined there) instead of failing.
    """
    lead, t = x.shape[:-1], x.shape[-1]
    if window is None:
        window = hann(n_fft, x)
    flat = x.reshape(-1, t)
    if pad_mode == "reflect" and t <= n_fft // 2:
        pad_mode = "constant"
    spec = torch.stft(flat, n_fft, hop, win_length=window.shape[-1], window=window.to(flat), center=True,
                      pad_mode=pad_mode, normalized=False, onesided=True, return_complex=True)
    s = scale_of(window, n_fft, scaling)
    if s != 1.0:
        spec = spec * s
    return spec.reshape(*lead, spec.shape[-2], spec.shape[-1])


def istft(spec: torch.Tensor, n_fft: int, hop: int, length: int, window: Optional[torch.Tensor] = None,
          scaling: str = "none") -> torch.Tensor:
    """Inverse of :func:`stft` (same ``scaling``): complex ``[..., F, N]`` → ``[..., length]``."""
    lead = spec.shape[:-2]
    if window is None:
        window = hann(n_fft, spec.real)
    flat = spec.reshape(-1, spec.shape[-2], spec.shape[-1])
    s = scale_of(window, n_fft, scaling)
    if s != 1.0:
        flat = flat / s
    out = torch.istft(flat, n_fft, hop, win_length=window.shape[-1], window=window.to(flat.real), center=True,
                      normalized=False, onesided=True, length=length)
    return out.reshape(*lead, length)
