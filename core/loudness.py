"""Integrated loudness (ITU-R BS.1770-4, LUFS) of long signals in bounded memory.

Same definition as ``torchaudio.functional.loudness`` (K-weighting by two biquads,
400 ms blocks every 100 ms, absolute gate at -70 LUFS, relative gate 10 LU below the
gated mean, channel weights 1, 1, 1, 1.41, 1.41), but the signal is K-weighted in
segments with a warm-up margin (the filters' transients die out within a few ms), so
memory does not grow with the file's length.
"""

from __future__ import annotations

import math

import torch

BLOCK_SECONDS = 0.4
STEP_SECONDS = 0.1
WARMUP_SECONDS = 0.5
CHANNEL_WEIGHTS = (1.0, 1.0, 1.0, 1.41, 1.41)


def _k_weighted_block_energy(x: torch.Tensor, sample_rate: int, block: int, step: int, n_blocks: int,
                             segment_blocks: int = 600) -> torch.Tensor:
    """Mean square per channel of every K-weighted block: ``[C, n_blocks]``."""
    import torchaudio.functional as AF

    warm = int(WARMUP_SECONDS * sample_rate)
    out = torch.empty(x.shape[0], n_blocks, dtype=torch.float64)
    for first in range(0, n_blocks, segment_blocks):
        last = min(n_blocks, first + segment_blocks)
        a = first * step
        b = (last - 1) * step + block
        lead = min(warm, a)
        seg = x[:, a - lead:b].double()
        seg = AF.treble_biquad(seg, sample_rate, 4.0, 1500.0, 1 / math.sqrt(2))
        seg = AF.highpass_biquad(seg, sample_rate, 38.0, 0.5)[:, lead:]
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
