"""Integrated loudness (ITU-R BS.1770-4, LUFS) of long signals in bounded memory.

Same definition as ``torchaudio.functional.loudness`` (without needing torchaudio) (K-weighting by two biquads,
400 ms blocks every 100 ms, absolute gate at -70 LUFS, relative gate 10 LU below the
gated mean, channel weights 1, 1, 1, 1.41, 1.41), but the signal is K-weighted in
segments with a warm-up margin (the filters' transients die out within a few ms), so
memory does not grow with the file's length.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.signal import lfilter

BLOCK_SECONDS = 0.4
STEP_SECONDS = 0.1
WARMUP_SECONDS = 0.5
CHANNEL_WEIGHTS = (1.0, 1.0, 1.0, 1.41, 1.41)


def k_weighting(sample_rate: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """BS.1770's K-weighting as two biquads ``(b, a)`` (normalised by ``a0``): the high-shelf
    (+4 dB above 1.5 kHz, Q 1/sqrt(2)) and the high-pass (38 Hz, Q 0.5) that torchaudio's
    ``functional/functional.py:loudness`` builds with ``treble_biquad`` and ``highpass_biquad``
    (Audio EQ Cookbook formulas, ``functional/filtering.py``)."""
    w0 = 2 * math.pi * 1500.0 / sample_rate
    alpha = math.sin(w0) / 2 / (1 / math.sqrt(2))
    A = math.exp(4.0 / 40 * math.log(10))
    t1, t2, t3 = 2 * math.sqrt(A) * alpha, (A - 1) * math.cos(w0), (A + 1) * math.cos(w0)
    shelf = ([A * ((A + 1) + t2 + t1), -2 * A * ((A - 1) + t3), A * ((A + 1) + t2 - t1)],
             [(A + 1) - t2 + t1, 2 * ((A - 1) - t3), (A + 1) - t2 - t1])
    w0 = 2 * math.pi * 38.0 / sample_rate
    alpha = math.sin(w0) / 2 / 0.5
    highpass = ([(1 + math.cos(w0)) / 2, -1 - math.cos(w0), (1 + math.cos(w0)) / 2],
                [1 + alpha, -2 * math.cos(w0), 1 - alpha])
    return [(np.array(b) / a[0], np.array(a) / a[0]) for b, a in (shelf, highpass)]


def _k_weighted_block_energy(x: torch.Tensor, sample_rate: int, block: int, step: int, n_blocks: int,
                             segment_blocks: int = 600) -> torch.Tensor:
    """Mean square per channel of every K-weighted block: ``[C, n_blocks]``."""
    warm = int(WARMUP_SECONDS * sample_rate)
    stages = k_weighting(sample_rate)
    out = torch.empty(x.shape[0], n_blocks, dtype=torch.float64)
    for first in range(0, n_blocks, segment_blocks):
        last = min(n_blocks, first + segment_blocks)
        a = first * step
        b = (last - 1) * step + block
        lead = min(warm, a)
        seg = x[:, a - lead:b].double().numpy()
        for b_coef, a_coef in stages:
            # torchaudio's lfilter clamps each stage's output to [-1, 1] (clamp=True); so does this,
            # so that the two agree also on signals driven past full scale
            seg = np.clip(lfilter(b_coef, a_coef, seg, axis=-1), -1.0, 1.0)
        seg = torch.from_numpy(np.ascontiguousarray(seg[:, lead:]))
        out[:, first:last] = seg.square().unfold(-1, block, step).mean(-1)
    return out


def integrated_loudness(waveform: torch.Tensor, sample_rate: int) -> float:
    """LUFS of ``[C, T]`` (at most five channels are weighted, as BS.1770 defines);
    ``-inf`` for silence or a clip shorter than one 400 ms block."""
    x = waveform[:5]
    block = int(round(BLOCK_SECONDS * sample_rate))
    step = int(round(block * 0.25))
    if x.shape[-1] < block:
        return float("-inf")
    n_blocks = (x.shape[-1] - block) // step + 1
    energy = _k_weighted_block_energy(x, sample_rate, block, step, n_blocks)
    g = torch.tensor(CHANNEL_WEIGHTS[: x.shape[0]], dtype=torch.float64).unsqueeze(1)
    per_block = (g * energy).sum(0)
    loud = -0.691 + 10 * torch.log10(per_block.clamp_min(1e-300))
    gated = loud > -70.0
    if not bool(gated.any()):
        return float("-inf")
    rel = -0.691 + 10 * math.log10(float((g * energy[:, gated].mean(1, keepdim=True)).sum())) - 10.0
    gated &= loud > rel
    return float(-0.691 + 10 * math.log10(float((g * energy[:, gated].mean(1, keepdim=True)).sum())))
