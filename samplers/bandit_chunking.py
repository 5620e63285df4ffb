"""BandIt v2's chunked inference: fixed-length chunks on a fixed hop, weighted by a
Hann window and overlap-added; exactly the scheme its released models were evaluated with.

The reference (``kwatcharasupat/bandit-v2``, ``src/system/inference_handler.py:
StandardTensorChunkedInferenceHandler``, with ``configs/inference/chunked-tensor.yaml``:
8 s chunks, 1 s hop) differs from :mod:`.chunking` (linear cross-fades between
neighbours only), so it gets its own chunker here:

* the signal is padded in front by ``2 × (chunk − hop)`` samples (14 s), by reflection
  (``F.pad(mode="reflect")``) as far as the signal allows and with zeros beyond, and at
  the end by reflection and zeros up to its (generous) end-pad formula;
* every chunk is a full ``chunk`` samples, even past the signal's ends (padding), and the
  network's output for it is multiplied by ``hann_window(chunk) / (chunk / (2 hop))``
  (periodic Hann, which sums to ``chunk / (2 hop)`` on that hop) and overlap-added;
* the result is cut back to the signal's span.

Chunks that lie wholly inside the padding only feed samples that are cut away; they are
skipped here (the reference computes and discards them), which changes no output sample.
Input arrives block by block and finished output leaves as soon as no later chunk
touches it, so memory is bounded: two chunks plus one batch of hops of input (the end
reflection reaches back up to one chunk), the batch's chunks and one chunk of output,
whatever the length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch

from .. import compat
from .chunking import ChunkProcessor, pull_blocks


@dataclass(frozen=True)
class BanditChunkPlan:
    """The reference's padding arithmetic for a signal of ``total`` samples."""

    total: int
    chunk: int
    hop: int

    def __post_init__(self):
        if self.chunk < 1 or not 1 <= self.hop <= self.chunk:
            raise ValueError(f"need 1 <= hop <= chunk, got chunk {self.chunk}, hop {self.hop}")

    @property
    def front_pad(self) -> int:
        return 2 * (self.chunk - self.hop)

    @property
    def _ref_chunks(self) -> int:     # inference_handler.py:_get_n_chunks
        return int(math.ceil((self.total + 2 * self.front_pad - self.chunk) / self.hop)) + 1

    @property
    def end_pad(self) -> int:         # _get_end_pad_samples (it ignores the front pad: pads generously)
        return (self._ref_chunks - 1) * self.hop + self.chunk - self.total

    @property
    def front_reflect(self) -> int:   # _pad_and_unfold: reflection is capped at n - 1, zeros beyond
        return min(self.front_pad, self.total - 1)

    @property
    def end_reflect(self) -> int:
        return min(self.front_pad + self.end_pad, self.total - 1)

    @property
    def chunk_indices(self) -> range:
        """The chunks (on the padded signal) that touch at least one output sample."""
        f, n = self.front_pad, self.total
        first = max(0, (f - self.chunk) // self.hop + 1)
        last = -(-(f + n) // self.hop) - 1
        unfolded = (n + 2 * f + self.end_pad - self.chunk) // self.hop + 1   # what the reference unfolds
        return range(first, min(last, unfolded - 1) + 1)


def _source_indices(q: torch.Tensor, n: Optional[int], front_reflect: int, end_reflect: int):
    """Signal index and validity of padded positions ``q`` (signal coordinates)."""
    idx = q.clone()
    valid = torch.ones_like(q, dtype=torch.bool)
    front = q < 0
    idx[front] = -q[front]
    valid[front] = -q[front] <= front_reflect
    if n is not None:
        end = q > n - 1
        d = q[end] - (n - 1)
        idx[end] = (n - 1) - d
        valid[end] = d <= end_reflect
    return idx, valid


def bandit_overlap_add_stream(process: ChunkProcessor, blocks: Iterable[torch.Tensor], chunk: int, hop: int,
                              num_outputs: int, desc: str = "chunks", expected_total: Optional[int] = None,
                              batch: int = 1) -> Iterator[tuple[int, torch.Tensor]]:
    """BandIt v2's chunked overlap-add over ``[C, n]`` blocks of one signal.

    ``process(x [C, chunk]) -> [num_outputs, C, chunk]`` must treat channels independently
    (BandIt's released ``in_channels=1``): up to ``batch`` chunks go through one call
    stacked along the channel axis, as the reference batches ``inference_batch_size``
    chunks (one long recurrence over many short ones is much faster on a CPU). Yields
    finished output blocks ``(start, [num_outputs, C, n])`` in order; their concatenation
    equals the reference's ``StandardTensorChunkedInferenceHandler`` on the whole signal.
    ``expected_total`` only sizes the progress bar.
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    source = iter(blocks)
    pieces: list[torch.Tensor] = []
    base = 0            # signal index of the first held input sample
    held = 0
    exhausted = False
    n: Optional[int] = None
    window: Optional[torch.Tensor] = None
    acc: Optional[torch.Tensor] = None     # output of padded positions [q_lo, q_lo + chunk)
    f = 2 * (chunk - hop)
    k = max(0, (f - chunk) // hop + 1)
    plan_total = None
    if expected_total:
        plan_total = len(BanditChunkPlan(expected_total, chunk, hop).chunk_indices)
    progress = compat.Progress(plan_total or 1, desc)
    done = 0
    while True:
        compat.check_interrupted()
        q_last = (k + batch - 1) * hop - f
        need = max(q_last + chunk, 1 - (k * hop - f)) + 1
        if not exhausted:
            held, exhausted = pull_blocks(source, pieces, held, lambda h: base + h >= need)
        if exhausted:
            n = base + held
            if n == 0:
                return
        if len(pieces) > 1:
            pieces = [torch.cat(pieces, dim=-1)]
        buf = pieces[0]
        ks = list(range(k, k + batch))
        if n is not None:
            plan = BanditChunkPlan(n, chunk, hop)
            ks = [j for j in ks if j <= plan.chunk_indices[-1]]
            if not ks:
                break
            fr, er = plan.front_reflect, plan.end_reflect
        else:   # the end is not in reach yet: only front reflection, and the signal is longer than it
            fr, er = f, 0
        c = buf.shape[0]
        xs = []
        for j in ks:
            lo = j * hop - f - base
            if lo >= 0 and lo + chunk <= held and (n is None or j * hop - f + chunk <= n):
                xs.append(buf[:, lo:lo + chunk])       # wholly inside the signal: a plain slice, no padding
                continue
            idx, valid = _source_indices(torch.arange(j * hop - f, j * hop - f + chunk), n, fr, er)
            local = idx - base
            if bool(((local < 0) | (local >= held))[valid].any()):
                raise RuntimeError("bandit chunker: input buffer does not cover the chunk (internal error)")
            xs.append(buf[:, local.clamp(0, max(held - 1, 0))] * valid.to(buf.dtype))
        y = process(torch.cat(xs, dim=0))
        if y.shape != (num_outputs, c * len(ks), chunk):
            raise RuntimeError(f"chunk processor returned {tuple(y.shape)}, expected "
                               f"{(num_outputs, c * len(ks), chunk)}")
        if window is None:
            window = (torch.hann_window(chunk)[None, None, :] / (chunk / (2 * hop))).to(y.dtype)
            acc = torch.zeros(num_outputs, c, chunk, dtype=y.dtype)
        for i, j in enumerate(ks):
            q_lo = j * hop - f
            acc += y[:, i * c:(i + 1) * c].to(acc.device) * window
            done += 1
            # positions before the next chunk's start are final
            lo, hi = max(q_lo, 0), q_lo + hop if n is None else min(q_lo + hop, n)
            if hi > lo:
                yield lo, acc[:, :, lo - q_lo: hi - q_lo].clone()
            acc = torch.cat([acc[:, :, hop:], torch.zeros_like(acc[:, :, :hop])], dim=-1)
        progress.update_absolute(done, max(done + 1, plan_total or 0))
        k = ks[-1] + 1
        keep_from = max(0, k * hop - f - chunk)        # the end reflection reaches back one chunk
        if keep_from > base:
            drop = min(keep_from - base, held)
            pieces = [buf[:, drop:]]
            held -= drop
            base += drop
        else:
            pieces = [buf]
    progress.update_absolute(done, done)


def run_bandit_overlap_add(process: ChunkProcessor, waveform: torch.Tensor, chunk: int, hop: int, num_outputs: int,
                           desc: str = "chunks", sink: Optional[Callable[[int, torch.Tensor], None]] = None,
                           out: Optional[torch.Tensor] = None, batch: int = 1) -> Optional[torch.Tensor]:
    """:func:`bandit_overlap_add_stream` on a whole ``[C, T]`` signal: returns
    ``[num_outputs, C, T]`` (into ``out`` if given), or hands blocks to ``sink``."""
    if waveform.dim() != 2:
        raise ValueError(f"waveform must be [C, T], got {tuple(waveform.shape)}")
    c, t = waveform.shape
    if sink is None and out is None:
        out = torch.zeros(num_outputs, c, t, dtype=waveform.dtype, device=waveform.device)
    for start, block in bandit_overlap_add_stream(process, [waveform], chunk, hop, num_outputs, desc, expected_total=t,
                                                  batch=batch):
        if sink is None:
            out[:, :, start:start + block.shape[-1]] = block.to(out.device)
        else:
            sink(start, block)
    return out
