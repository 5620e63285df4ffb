"""Kaldi-compatible log-mel filterbank, batched, as ImageBind's audio front end uses it.

ImageBind (``imagebind/data.py:waveform2melspec``) and KeyVID's localizer
(``motion_scores/network/audiodataset.py:waveform_to_melspectrogram``) call
``torchaudio.compliance.kaldi.fbank`` one clip at a time with: 16 kHz, 128 mel bins,
25 ms frames every 10 ms, Hanning window, ``htk_compat=True``, ``use_energy=False``,
``dither=0``, after subtracting the clip's mean; then normalise with mean -4.268 and
std 9.138 and keep the first 198 frames of a 2-s clip.

:func:`kaldi_fbank` does the same arithmetic for a whole batch of clips in one call
(the windows of every clip at once) — the localizer's many overlapping windows of a
long file — and is checked against torchaudio's function in the tests.
"""

from __future__ import annotations

from functools import lru_cache

import torch

SAMPLE_RATE = 16000
NUM_MEL_BINS = 128
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
FBANK_MEAN = -4.268
FBANK_STD = 9.138
CLIP_SECONDS = 2.0
TARGET_FRAMES = 198


@lru_cache(maxsize=8)
def _mel_banks(num_mel_bins: int, padded: int, sample_rate: float, low_freq: float, high_freq: float) -> torch.Tensor:
    """Kaldi's triangular mel banks ``[padded // 2 + 1, num_mel_bins]`` (float32): the construction of
    torchaudio's ``compliance/kaldi.py:get_mel_banks`` without VTLN warping (Kaldi's mel scale
    ``1127 ln(1 + f/700)``, bins spaced evenly in mel between ``low_freq`` and ``high_freq``), in
    float64; the Nyquist bin gets no weight, as in torchaudio. No torchaudio needed."""
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
        raise ValueError(f"bad mel band edges {low_freq}..{high_freq} Hz at {sample_rate} Hz")

    def mel(f):
        return 1127.0 * torch.log1p(torch.as_tensor(f, dtype=torch.float64) / 700.0)

    lo, hi = mel(low_freq), mel(high_freq)
    delta = (hi - lo) / (num_mel_bins + 1)
    b = torch.arange(num_mel_bins, dtype=torch.float64)[:, None]
    left, center, right = lo + b * delta, lo + (b + 1) * delta, lo + (b + 2) * delta
    fft_mel = mel(sample_rate / padded * torch.arange(padded // 2, dtype=torch.float64))[None, :]
    banks = torch.minimum((fft_mel - left) / (center - left), (right - fft_mel) / (right - center)).clamp_min(0.0)
    banks = torch.nn.functional.pad(banks, (0, 1))  # Nyquist column
    return banks.to(torch.float32).T.contiguous()


def num_frames(num_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    size = int(sample_rate * FRAME_LENGTH_MS / 1000)
    shift = int(sample_rate * FRAME_SHIFT_MS / 1000)
    return 0 if num_samples < size else 1 + (num_samples - size) // shift


def kaldi_fbank(waveform: torch.Tensor, sample_rate: int = SAMPLE_RATE, num_mel_bins: int = NUM_MEL_BINS) -> torch.Tensor:
    """Log-mel filterbank of ``[..., T]`` samples → ``[..., frames, num_mel_bins]``.

    Equals ``torchaudio.compliance.kaldi.fbank(x, htk_compat=True, sample_frequency=sr,
    use_energy=False, window_type='hanning', num_mel_bins=n, dither=0.0,
    frame_length=25, frame_shift=10)`` for each ``[T]`` row (snip_edges, remove the DC
    offset per frame, pre-emphasis 0.97, power spectrum, floor at float eps).
    """
    x = waveform.to(torch.float32)
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    size = int(sample_rate * FRAME_LENGTH_MS / 1000)
    shift = int(sample_rate * FRAME_SHIFT_MS / 1000)
    padded = 1 << (size - 1).bit_length()
    m = num_frames(x.shape[-1], sample_rate)
    if m == 0:
        return torch.zeros(*lead, 0, num_mel_bins)
    frames = x.unfold(-1, size, shift)[:, :m]                       # [B, m, size]
    frames = frames - frames.mean(dim=-1, keepdim=True)
    prev = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)   # replicate-padded shift
    frames = frames - PREEMPHASIS * prev
    frames = frames * torch.hann_window(size, periodic=False, dtype=torch.float32)
    frames = torch.nn.functional.pad(frames, (0, padded - size))
    power = torch.fft.rfft(frames).abs().pow(2.0)
    mel = power @ _mel_banks(num_mel_bins, padded, float(sample_rate), LOW_FREQ, 0.0)
    mel = torch.clamp_min(mel, torch.finfo(torch.float32).eps).log()
    return mel.reshape(*lead, m, num_mel_bins)


def imagebind_input(clips: torch.Tensor, sample_rate: int = SAMPLE_RATE, target_frames: int = TARGET_FRAMES) -> torch.Tensor:
    """``[B, T]`` mono 16-kHz clips → the localizer's input ``[B, 1, 128, target_frames]``:
    per-clip mean removed, fbank, normalised, cropped (or zero-padded, as ImageBind
    pads *before* normalising) to ``target_frames``."""
    clips = clips.to(torch.float32)
    clips = clips - clips.mean(dim=-1, keepdim=True)
    fb = kaldi_fbank(clips, sample_rate).transpose(-1, -2)           # [B, mel, frames]
    n = fb.shape[-1]
    if n < target_frames:
        fb = torch.nn.functional.pad(fb, (0, target_frames - n))
    fb = fb[..., :target_frames]
    return ((fb - FBANK_MEAN) / FBANK_STD).unsqueeze(1)
