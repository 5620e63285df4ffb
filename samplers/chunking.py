"""Chunked overlap-add over long signals, with bounded memory and a progress bar.

Any per-chunk processor that maps ``[C, L]`` to ``[S, C, L]`` (S outputs, e.g. the
three demix stems) runs on a long ``[C, T]`` signal chunk by chunk. Neighbouring
chunks overlap and are cross-faded with linear ramps that sum to exactly one, so an
identity processor reproduces the input exactly and a processor's edge effects are
faded out. The working memory is one chunk (plus what the processor needs for it),
whatever the length of the signal; only the ``[S, C, T]`` result grows with T, and a
caller that streams to disk can pass ``sink`` instead and keep nothing.

Progress is reported once per chunk through :class:`compat.Progress`, which is
where ComfyUI notices Cancel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from .. import compat

ChunkProcessor = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ChunkPlan:
    """Where chunks start and how long they are: ``step = chunk - overlap``."""

    total: int
    chunk: int
    overlap: int

    @classmethod
    def make(cls, total: int, chunk: int, overlap: int) -> "ChunkPlan":
        if chunk < 1:
            raise ValueError(f"chunk must be at least one sample, got {chunk}")
        chunk = min(int(chunk), max(int(total), 1))
        overlap = max(0, min(int(overlap), chunk // 2))  # only neighbours overlap
        return cls(int(total), chunk, overlap)

    @property
    def step(self) -> int:
        return self.chunk - self.overlap

    @property
    def num_chunks(self) -> int:
        if self.total <= self.chunk:
            return 1
        return 1 + math.ceil((self.total - self.chunk) / self.step)

    def bounds(self) -> Iterator[tuple[int, int]]:
        """``(start, end)`` of each chunk. The last one may be shorter than ``chunk`` but is
        always longer than ``overlap``, so only neighbours ever overlap."""
        for k in range(self.num_chunks):
            start = k * self.step
            yield start, min(start + self.chunk, self.total)


def crossfade_weights(start: int, end: int, prev_end: Optional[int], next_start: Optional[int]) -> torch.Tensor:
    """Weights ``[end - start]`` of one chunk: a linear ramp up over the overlap with the
    previous chunk and down over the overlap with the next one. Ramps of neighbours
    cover the same samples and sum to one there."""
    w = torch.ones(end - start, dtype=torch.float64)
    if prev_end is not None and prev_end > start:
        n = prev_end - start
        w[:n] = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    if next_start is not None and next_start < end:
        n = end - next_start
        w[end - start - n:] *= 1.0 - (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return w


def run_overlap_add(process: ChunkProcessor, waveform: torch.Tensor, chunk: int, overlap: int,
                    num_outputs: int, desc: str = "chunks", sink: Optional[Callable[[int, torch.Tensor], None]] = None,
                    out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Run ``process`` over ``waveform`` ``[C, T]`` in overlapping chunks.

    ``process(x [C, L]) -> [num_outputs, C, L]``. Returns ``[num_outputs, C, T]``
    (written into ``out`` if given), or, with ``sink``, calls ``sink(start, block)``
    with finished, non-overlapping blocks in order and returns None (bounded memory
    end to end).
    """
    if waveform.dim() != 2:
        raise ValueError(f"waveform must be [C, T], got {tuple(waveform.shape)}")
    c, t = waveform.shape
    plan = ChunkPlan.make(t, chunk, overlap)
    spans = list(plan.bounds())
    if sink is None and out is None:
        out = torch.zeros(num_outputs, c, t, dtype=waveform.dtype, device=waveform.device)
    progress = compat.Progress(len(spans), desc)
    pending: Optional[torch.Tensor] = None  # the faded-out tail of the previous chunk (sink mode)
    for k, (start, end) in enumerate(spans):
        compat.check_interrupted()
        y = process(waveform[:, start:end])
        if y.shape != (num_outputs, c, end - start):
            raise RuntimeError(f"chunk processor returned {tuple(y.shape)}, expected {(num_outputs, c, end - start)}")
        prev_end = spans[k - 1][1] if k > 0 else None
        next_start = spans[k + 1][0] if k + 1 < len(spans) else None
        w = crossfade_weights(start, end, prev_end, next_start).to(y.dtype).to(y.device)
        y = y * w
        if sink is None:
            out[:, :, start:end] += y.to(out.device)
        else:
            if pending is not None:
                n = pending.shape[-1]
                y[:, :, :n] += pending
            keep = (end - next_start) if next_start is not None and next_start < end else 0
            done = y[:, :, : y.shape[-1] - keep]
            if done.shape[-1]:
                sink(start, done)
            pending = y[:, :, y.shape[-1] - keep:].clone() if keep else None
        progress.update(1)
    return out
