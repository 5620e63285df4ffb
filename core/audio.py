"""ComfyUI's AUDIO value and the small operations every audio node needs.

AUDIO is ``{"waveform": float32 tensor [B, C, T], "sample_rate": int}`` (as core
``LoadAudio`` produces it), so core ``PreviewAudio``, ``SaveAudio`` and
``CreateVideo`` accept what AVSync returns.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Mapping

import torch

from .errors import InputError

MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 384000


def make_audio(waveform: torch.Tensor, sample_rate: int) -> dict:
    """Build an AUDIO dict from ``[C, T]`` or ``[B, C, T]`` samples."""
    if waveform.dim() == 2:
        waveform = waveform.unsqueeze(0)
    if waveform.dim() != 3:
        raise ValueError(f"waveform must be [C, T] or [B, C, T], got shape {tuple(waveform.shape)}")
    return {"waveform": waveform.to(torch.float32).contiguous(), "sample_rate": int(sample_rate)}


def check_audio(audio: Any, name: str = "audio", allow_batch: bool = False) -> tuple[torch.Tensor, int]:
    """Validate an AUDIO value and return ``(waveform [C, T] float32, sample_rate)``.

    Raises :class:`InputError` naming ``name`` for anything a node cannot use: a
    value that is not AUDIO, a batch of several clips (unless ``allow_batch``, then
    the waveform stays ``[B, C, T]``), no channels, a bad rate, NaN or Inf samples.
    """
    if not isinstance(audio, Mapping) or "waveform" not in audio or "sample_rate" not in audio:
        raise InputError(name, f"expected AUDIO ({{'waveform', 'sample_rate'}}), got {type(audio).__name__}")
    wav = audio["waveform"]
    if not isinstance(wav, torch.Tensor):
        raise InputError(name, f"waveform must be a torch tensor, got {type(wav).__name__}")
    try:
        sr = int(audio["sample_rate"])
    except (TypeError, ValueError):
        raise InputError(name, f"sample_rate must be an integer, got {audio['sample_rate']!r}") from None
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise InputError(name, f"sample rate {sr} Hz is outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz")
    if wav.dim() == 2:
        wav = wav.unsqueeze(0)
    if wav.dim() != 3:
        raise InputError(name, f"waveform must be [batch, channels, samples], got shape {tuple(wav.shape)}")
    if wav.shape[0] != 1 and not allow_batch:
        raise InputError(name, f"expected one clip, got a batch of {wav.shape[0]}; split the batch first")
    if wav.shape[1] < 1:
        raise InputError(name, "has no channels")
    wav = wav.to(torch.float32)
    if not torch.isfinite(wav).all():
        bad = int((~torch.isfinite(wav)).sum())
        raise InputError(name, f"contains {bad} NaN or infinite samples")
    return (wav if allow_batch else wav[0]), sr


def to_channels(waveform: torch.Tensor, mode: str) -> torch.Tensor:
    """``keep``, ``mono`` (average of all channels) or ``stereo`` (mono is duplicated;
    more than two channels are folded with ITU-style downmix: front L/R, centre and
    surrounds at -3 dB, LFE dropped) for ``[C, T]`` samples."""
    c = waveform.shape[0]
    if mode == "keep":
        return waveform
    if mode == "mono":
        return waveform.mean(dim=0, keepdim=True)
    if mode == "stereo":
        if c == 1:
            return waveform.repeat(2, 1)
        if c == 2:
            return waveform
        g = 1.0 / math.sqrt(2.0)
        left = waveform[0].clone()
        right = waveform[1].clone()
        if c >= 3:  # centre
            left += g * waveform[2]
            right += g * waveform[2]
        # channel 4 (index 3) is LFE in 5.1 / 7.1 layouts; surrounds follow it
        surrounds = list(range(4, c)) if c >= 6 else list(range(3, c))
        for i, ch in enumerate(surrounds):
            (left if i % 2 == 0 else right).add_(g * waveform[ch])
        out = torch.stack([left, right])
        peak = out.abs().max()
        src_peak = waveform.abs().max()
        if peak > 0 and peak > src_peak:  # keep the downmix from clipping harder than the source
            out = out * (src_peak / peak)
        return out
    raise InputError("channels", f"must be keep, mono or stereo, got {mode!r}")


# Resampling parameters (Kaiser-windowed sinc; the "kaiser_best" setting of librosa/resampy that
# torchaudio's documentation recommends for quality).
RESAMPLE_ZEROS = 16
RESAMPLE_ROLLOFF = 0.945
RESAMPLE_BETA = 14.769656459379492


@lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int) -> tuple[torch.Tensor, int]:
    """Polyphase Kaiser-windowed sinc filters ``[new, 1, 2·width + orig]`` (float64) for rates reduced by
    their gcd. The same construction as torchaudio's
    ``functional/functional.py:_get_sinc_resample_kernel`` (``sinc_interp_kaiser``), computed in float64."""
    base = min(orig, new) * RESAMPLE_ROLLOFF
    width = math.ceil(RESAMPLE_ZEROS * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new + idx
    t = (t * base).clamp_(-RESAMPLE_ZEROS, RESAMPLE_ZEROS)
    beta = torch.tensor(RESAMPLE_BETA, dtype=torch.float64)
    window = torch.i0(beta * torch.sqrt(1 - (t / RESAMPLE_ZEROS) ** 2)) / torch.i0(beta)
    t = t * math.pi
    kernels = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t) * window * (base / orig)
    return kernels, width


def resample(waveform: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Band-limited resampling (Kaiser-windowed sinc, 16 zero crossings, roll-off 0.945) of
    ``[..., T]`` samples; the output has ``ceil(T · new / orig)`` samples. Pure torch: equal to
    ``torchaudio.functional.resample(x, orig, new, lowpass_filter_width=16, rolloff=0.945,
    resampling_method="sinc_interp_kaiser", beta=14.77)`` within float32 rounding (tested), without
    needing torchaudio (newer ComfyUI installs may lack it)."""
    if int(orig_sr) == int(new_sr):
        return waveform
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    kernel, width = _sinc_kernel(orig, new)
    shape = waveform.shape
    x = waveform.reshape(-1, shape[-1])
    length = x.shape[-1]
    x = torch.nn.functional.pad(x, (width, width + orig))
    y = torch.nn.functional.conv1d(x[:, None], kernel.to(device=x.device, dtype=x.dtype), stride=orig)
    y = y.transpose(1, 2).reshape(x.shape[0], -1)[:, : -(-new * length // orig)]
    return y.reshape(*shape[:-1], y.shape[-1])
