"""Coarse-grained CPU parallelism for recurrent networks: independent pieces of work
(items of a batch, directions of a bidirectional RNN) each run in their own thread with
few intra-op threads, instead of spreading every small op over all intra-op threads.

Why: PyTorch's CPU RNN kernels (native and oneDNN alike) advance one time step at a
time, and each step's work (a small matrix product and a few pointwise ops) is its own
OpenMP parallel region that ends in a barrier; so do LayerNorm and small matrix
products elsewhere. GNU OpenMP's threads spin while they wait, and when other processes
share the cores a waiting thread burns the time slice its partner needs, so each region
costs scheduler time slices instead of microseconds. BandIt v2 at the released size,
two 2-s items on the shared 2-core machine, in one process: 33–67 s with two intra-op
threads, 8.7 s with one, 4.4 s in two single-threaded threads, one item each (load ~3);
``bench/bench_demix.py --bandit-compare 2`` at load ~9: 148 s before, 29 s now
(docs/demix.md, "Speed on a CPU").

Threads here are started per call (no pool, so nested use cannot deadlock); ATen ops
release the GIL, so they run in parallel. Each worker sets its own intra-op thread
count (``torch.set_num_threads`` is per thread for OpenMP and MKL, but torch also keeps
it as the default for threads started later, so the caller's value is put back
afterwards) and the caller's grad / inference mode (both thread-local).
"""

from __future__ import annotations

import threading
from typing import Callable, Optional, Sequence, TypeVar

import torch
from torch import nn

T = TypeVar("T")

# below this many sequences per slice a slice's matrix products get too thin to be worth a thread
MIN_ROWS_PER_SLICE = 16


def needs_autograd(module: nn.Module, *tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (any(t.requires_grad for t in tensors)
                                        or any(p.requires_grad for p in module.parameters()))


def run_in_threads(tasks: Sequence[Callable[[], T]], threads_each: int = 1) -> list[T]:
    """Run each task in its own new thread with ``threads_each`` intra-op threads and the
    caller's grad / inference mode; returns the results in order, or raises the first
    task's error after all have finished."""
    caller_threads = torch.get_num_threads()
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()
    results: list = [None] * len(tasks)
    errors: list[Optional[BaseException]] = [None] * len(tasks)

    def work(i: int) -> None:
        try:
            if torch.get_num_threads() != threads_each:
                torch.set_num_threads(threads_each)
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                results[i] = tasks[i]()
        except BaseException as e:      # re-raised in the caller
            errors[i] = e

    workers = [threading.Thread(target=work, args=(i,), name=f"avsync-cpu-{i}", daemon=True)
               for i in range(len(tasks))]
    try:
        for w in workers:
            w.start()
    finally:
        for w in workers:
            if w.ident is not None:
                w.join()
        torch.set_num_threads(caller_threads)
    for e in errors:
        if e is not None:
            raise e
    return results


def split_rows(rows: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``[lo, hi)`` ranges of ``rows`` whose sizes differ by at most one."""
    bounds = [rows * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def run_items_in_threads(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, module: nn.Module,
                         threads: Optional[int] = None) -> torch.Tensor:
    """``fn(x)`` for a ``fn`` that treats the items of ``x`` (dim 0) independently:
    up to ``threads`` (default ``torch.get_num_threads()``) groups of items, each in
    its own thread with ``threads // groups`` intra-op threads, concatenated in order."""
    threads = torch.get_num_threads() if threads is None else threads
    groups = min(threads, x.shape[0])
    if groups < 2 or x.device.type != "cpu" or needs_autograd(module, x):
        return fn(x)
    parts = run_in_threads([lambda lo=lo, hi=hi: fn(x[lo:hi]) for lo, hi in split_rows(x.shape[0], groups)],
                           threads_each=threads // groups)
    return torch.cat(parts, dim=0)


def _kernel(rnn: nn.RNNBase):
    if isinstance(rnn, nn.GRU):
        return torch._VF.gru
    if isinstance(rnn, nn.LSTM):
        return torch._VF.lstm
    return torch._VF.rnn_tanh if rnn.nonlinearity == "tanh" else torch._VF.rnn_relu


def _direction_params(rnn: nn.RNNBase, reverse: bool, layer: int = 0) -> list[torch.Tensor]:
    sfx = f"_l{layer}" + ("_reverse" if reverse else "")
    names = [f"weight_ih{sfx}", f"weight_hh{sfx}"] + ([f"bias_ih{sfx}", f"bias_hh{sfx}"] if rnn.bias else [])
    return [getattr(rnn, n) for n in names]


def rnn_plan(rnn: nn.RNNBase, x: torch.Tensor, threads: int) -> list[tuple[bool, int, int]]:
    """The independent recurrences ``(reverse, first row, end row)`` :func:`run_rnn` runs
    at once for ``threads`` threads; empty when it calls ``rnn`` directly (one thread, not
    CPU, autograd, or a layout it does not handle: only ``batch_first``, and several layers
    only without dropout between them or in eval mode)."""
    if (threads < 2 or x.device.type != "cpu" or x.dim() != 3 or not rnn.batch_first
            or (rnn.num_layers > 1 and rnn.dropout and rnn.training)
            or getattr(rnn, "proj_size", 0) or needs_autograd(rnn, x)):
        return []
    dirs = [False, True] if rnn.bidirectional else [False]
    slices = max(1, min(threads // len(dirs), x.shape[0] // MIN_ROWS_PER_SLICE))
    if len(dirs) * slices < 2:
        return []
    return [(rev, lo, hi) for rev in dirs for lo, hi in split_rows(x.shape[0], slices)]


def run_rnn(rnn: nn.RNNBase, x: torch.Tensor, threads: Optional[int] = None) -> torch.Tensor:
    """``rnn(x)[0]`` for a ``batch_first`` GRU / LSTM / RNN from a zero state, layer by
    layer, each direction (and, with more than two threads, slice of the batch) one
    single-threaded recurrence in its own thread. With two threads and a bidirectional
    layer the output is the same as ``rnn(x)[0]`` (each direction is the same kernel on
    the same rows, the reverse one on the time-flipped input as the bidirectional kernel
    runs it; measured equal to the bit); slicing the batch changes matrix shapes, so the
    last bits may differ."""
    plan = rnn_plan(rnn, x, torch.get_num_threads() if threads is None else threads)
    if not plan:
        return rnn(x)[0]
    kernel, is_lstm, h = _kernel(rnn), isinstance(rnn, nn.LSTM), rnn.hidden_size
    for layer in range(rnn.num_layers):
        out = x.new_empty(x.shape[0], x.shape[1], h * (2 if rnn.bidirectional else 1))

        def one(reverse: bool, lo: int, hi: int, x=x, out=out, layer=layer) -> None:
            xs = x[lo:hi].flip(1) if reverse else x[lo:hi]
            h0 = xs.new_zeros(1, hi - lo, h)
            y = kernel(xs, (h0, h0) if is_lstm else h0, _direction_params(rnn, reverse, layer), rnn.bias, 1, 0.0,
                       False, False, True)[0]
            out[lo:hi, :, h if reverse else 0:(2 if reverse else 1) * h] = y.flip(1) if reverse else y

        run_in_threads([lambda task=task: one(*task) for task in plan])
        x = out
    return x
