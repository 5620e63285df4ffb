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
from typing import Callable, Iterable, Iterator, Optional

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


def pull_blocks(source: Iterator[torch.Tensor], pieces: list, held: int,
                enough: Callable[[int], bool]) -> tuple[int, bool]:
    """Append ``[C, n]`` blocks from ``source`` to ``pieces`` until ``enough(held)``
    (``held``: samples in ``pieces``); returns ``(held, exhausted)``."""
    while not enough(held):
        try:
            b = next(source)
        except StopIteration:
            return held, True
        if b.dim() != 2:
            raise ValueError(f"input blocks must be [C, n], got {tuple(b.shape)}")
        if b.shape[-1]:
            pieces.append(b)
            held += b.shape[-1]
    return held, False


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


def overlap_add_stream(process: ChunkProcessor, blocks: Iterable[torch.Tensor], chunk: int, overlap: int,
                       num_outputs: int, desc: str = "chunks", expected_total: Optional[int] = None,
                       ) -> Iterator[tuple[int, torch.Tensor]]:
    """Overlap-add over input that arrives block by block (e.g. from a decoder).

    ``blocks`` yields ``[C, n]`` pieces of one signal in order. Yields finished,
    non-overlapping output blocks ``(start, [num_outputs, C, n])`` in order, each as
    soon as it is final: chunk k's output is yielded before any input past chunk k
    (plus at most one block of look-ahead, to learn whether another chunk follows) is
    pulled. Held at any time: one chunk of input, one chunk of output and the faded
    tail of the previous chunk, whatever the length of the signal. The chunks are
    those of :class:`ChunkPlan` for the total length, so the result equals that of
    :func:`run_overlap_add` on the whole signal. ``expected_total`` only sizes the
    progress bar.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least one sample, got {chunk}")
    source = iter(blocks)
    pieces: list[torch.Tensor] = []
    held = 0                 # samples in ``pieces``
    base = 0                 # absolute index of the first held sample
    exhausted = False
    prev_end: Optional[int] = None
    pending: Optional[torch.Tensor] = None  # the faded-out tail of the previous chunk
    plan_chunks = None
    if expected_total is not None and expected_total > 0:
        plan_chunks = ChunkPlan.make(expected_total, chunk, overlap).num_chunks
    progress = compat.Progress(plan_chunks or 1, desc)
    done_chunks = 0
    while True:
        compat.check_interrupted()
        if not exhausted:   # one sample past the chunk tells whether another follows
            held, exhausted = pull_blocks(source, pieces, held, lambda h: h > chunk)
        if held == 0:
            break
        if len(pieces) > 1:
            pieces = [torch.cat(pieces, dim=-1)]
        buf = pieces[0]
        last = exhausted and held <= chunk
        if prev_end is None:
            # as ChunkPlan.make: a signal shorter than a chunk is one chunk; overlap at most half a chunk
            chunk = held if last else chunk
            overlap = max(0, min(int(overlap), chunk // 2))
        start, end = base, base + min(chunk, held)
        next_start = None if last else start + chunk - overlap
        y = process(buf[:, : end - start])
        c = buf.shape[0]
        if y.shape != (num_outputs, c, end - start):
            raise RuntimeError(f"chunk processor returned {tuple(y.shape)}, expected {(num_outputs, c, end - start)}")
        w = crossfade_weights(start, end, prev_end, next_start).to(y.dtype).to(y.device)
        y = y * w
        if pending is not None:
            y[:, :, : pending.shape[-1]] += pending
        keep = (end - next_start) if next_start is not None and next_start < end else 0
        done = y[:, :, : y.shape[-1] - keep]
        pending = y[:, :, y.shape[-1] - keep:].clone() if keep else None
        done_chunks += 1
        progress.update_absolute(done_chunks, max(done_chunks + (0 if last else 1), plan_chunks or 0))
        if done.shape[-1]:
            yield start, done
        if last:
            break
        step = next_start - start
        pieces = [buf[:, step:]]
        held -= step
        base += step
        prev_end = end


def run_overlap_add(process: ChunkProcessor, waveform: torch.Tensor, chunk: int, overlap: int,
                    num_outputs: int, desc: str = "chunks", sink: Optional[Callable[[int, torch.Tensor], None]] = None,
                    out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Run ``process`` over ``waveform`` ``[C, T]`` in overlapping chunks.

    ``process(x [C, L]) -> [num_outputs, C, L]``. Returns ``[num_outputs, C, T]``
    (written into ``out`` if given), or, with ``sink``, calls ``sink(start, block)``
    with finished, non-overlapping blocks in order and returns None (bounded memory
    end to end). See :func:`overlap_add_stream` for input that arrives in blocks.
    """
    if waveform.dim() != 2:
        raise ValueError(f"waveform must be [C, T], got {tuple(waveform.shape)}")
    c, t = waveform.shape
    if sink is None and out is None:
        out = torch.zeros(num_outputs, c, t, dtype=waveform.dtype, device=waveform.device)
    for start, block in overlap_add_stream(process, [waveform], chunk, overlap, num_outputs, desc, expected_total=t):
        if sink is None:
            out[:, :, start:start + block.shape[-1]] = block.to(out.device)
        else:
            sink(start, block)
    return out
