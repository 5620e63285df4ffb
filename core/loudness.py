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
    return gated_loudness(energy)


def gated_loudness(energy: torch.Tensor) -> float:
    """BS.1770 gating of per-block, per-channel K-weighted mean squares ``[C, n_blocks]``:
    LUFS, or ``-inf`` when no block passes the absolute gate."""
    g = torch.tensor(CHANNEL_WEIGHTS[: energy.shape[0]], dtype=torch.float64).unsqueeze(1)
    per_block = (g * energy).sum(0)
    loud = -0.691 + 10 * torch.log10(per_block.clamp_min(1e-300))
    gated = loud > -70.0
    if not bool(gated.any()):
        return float("-inf")
    rel = -0.691 + 10 * math.log10(float((g * energy[:, gated].mean(1, keepdim=True)).sum())) - 10.0
    gated &= loud > rel
    return float(-0.691 + 10 * math.log10(float((g * energy[:, gated].mean(1, keepdim=True)).sum())))


class LoudnessMeter:
    """:func:`integrated_loudness` of a signal that arrives block by block (a decoder),
    in memory that does not grow with its length: the signal is K-weighted in
    segments that start ``WARMUP_SECONDS`` (rounded up to whole 100 ms steps) before
    their first gating block, as :func:`integrated_loudness` does inside one tensor,
    and only the per-block energies (10 per second) are kept."""

    def __init__(self, sample_rate: int, segment_seconds: float = 60.0):
        self.sample_rate = int(sample_rate)
        self.block = int(round(BLOCK_SECONDS * self.sample_rate))
        self.step = int(round(self.block * 0.25))
        self.lead = -(-int(WARMUP_SECONDS * self.sample_rate) // self.step) * self.step
        self.segment_blocks = max(1, int(segment_seconds * self.sample_rate) // self.step)
        self._held: list[torch.Tensor] = []   # the signal from ``_origin`` on
        self._held_len = 0
        self._origin = 0                       # absolute index of the first held sample
        self._next = 0                         # absolute start of the next gating block
        self._energies: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        """Append ``[C, n]`` samples (at most five channels are weighted)."""
        self._held.append(x[:5].double())
        self._held_len += x.shape[-1]
        if self._origin + self._held_len >= self._next + (self.segment_blocks - 1) * self.step + self.block:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        buf = torch.cat(self._held, dim=-1)
        end = self._origin + buf.shape[-1]
        n_blocks = (end - self._next - self.block) // self.step + 1 if end - self._next >= self.block else 0
        if not final:
            n_blocks = min(n_blocks, self.segment_blocks)
        if n_blocks > 0:
            skip = (self._next - self._origin) // self.step    # blocks inside the warm-up lead
            used = self._next - self._origin + (n_blocks - 1) * self.step + self.block
            energy = _k_weighted_block_energy(buf[:, :used], self.sample_rate, self.block, self.step, skip + n_blocks)
            self._energies.append(energy[:, skip:])
            self._next += n_blocks * self.step
        keep_from = max(self._origin, self._next - self.lead)
        self._held = [buf[:, keep_from - self._origin:]]
        self._held_len = end - keep_from
        self._origin = keep_from

    def lufs(self) -> float:
        """Integrated loudness of everything added; ``-inf`` for silence or under 400 ms."""
        if self._held_len:
            self._flush(final=True)
        if not self._energies:
            return float("-inf")
        return gated_loudness(torch.cat(self._energies, dim=-1))
