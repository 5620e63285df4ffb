"""Demixer speed and memory (plain script: ``python bench/bench_demix.py [--quick]``).

1. Real-time factor (seconds of audio per second of wall time; higher is faster) of
   each method on 44.1 kHz stereo, with torch limited to 2 threads:
   ``dsp``, and MRX at the released size (random weights: speed does not depend on
   them). The goal for dsp is >= 20x.
2. Peak anonymous resident memory (heap and tensors, sampled every 2 ms) against
   input length, each run in a fresh process, above the level after one chunk's work:
   chunked with a streaming sink (what ``avsync demix`` could do for any length),
   chunked into a full-length result (what the node returns), and one unchunked pass
   (the naive path). Printed as MB above the process baseline and as a ratio to the
   unchunked pass.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from _report import row  # noqa: E402  (bench/ is the script's folder)


def _signal(seconds: float, sr: int = 44100):
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from tests.factories import audio as A

    times = list(np.arange(0.3, seconds, 0.7))
    left = A.chord(duration=seconds, sr=sr) + A.speech_like(seconds, sr) + A.clicks(times, seconds, sr, amp=0.4)
    right = A.chord((246.94, 311.13, 369.99), seconds, sr) + A.speech_like(seconds, sr) + \
        A.clicks(times, seconds, sr, amp=0.4)
    return torch.tensor(np.stack([left, right]), dtype=torch.float32)


def rtf(method: str, seconds: float, repeats: int = 3) -> float:
    import torch

    from avsync.samplers.demix import demix

    torch.set_num_threads(2)
    x = _signal(seconds)
    model = None
    if method == "mrx":
        from avsync import compat
        from avsync.loaders.demix import DemixModel
        from avsync.networks.mrx import MRX

        net = MRX().eval().requires_grad_(False)
        model = DemixModel("mrx", compat.manage_model(net), 44100, ("music", "speech", "sfx"), net.min_length, "bench")
    demix(x[:, :44100], 44100, "dsp" if model is None else "model", model)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        demix(x, 44100, "dsp" if model is None else "model", model, chunk_seconds=20.0)
        best = min(best, time.perf_counter() - t0)
    return seconds / best


def _anon_mb() -> float:
    """Resident anonymous memory of this process (heap and tensors; not the mapped
    libraries, which the kernel may drop and re-read under memory pressure)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def _memory_child(mode: str, seconds: float) -> None:
    """Runs in a subprocess: prints {baseline_mb, peak_mb} of anonymous resident memory,
    sampled every 2 ms while the demixer runs."""
    import threading

    import torch

    from avsync.samplers.demix import demix

    torch.set_num_threads(2)
    one = _signal(20.0)
    n = int(seconds * 44100)
    x = one.repeat(1, int(seconds) // 20 + 1)[:, :n].contiguous()
    demix(one, 44100, "dsp", chunk_seconds=20.0, sink=lambda start, block: None)  # warm-up: one chunk
    base = _anon_mb()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _anon_mb())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    if mode == "sink":
        demix(x, 44100, "dsp", chunk_seconds=20.0, sink=lambda start, block: None)
    elif mode == "chunked":
        demix(x, 44100, "dsp", chunk_seconds=20.0)
    else:
        demix(x, 44100, "dsp", chunk_seconds=seconds + 1)
    done.set()
    t.join()
    print(json.dumps({"baseline_mb": base, "peak_mb": max(peak[0], _anon_mb())}))


def memory(mode: str, seconds: float) -> float:
    # A fixed mmap threshold makes glibc hand large freed blocks back to the OS at once;
    # with its default (a threshold that grows after each large free) the resident size
    # creeps up with the number of chunks through fragmentation, not through anything held.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(seconds)], capture_output=True, text=True,
                         check=True, cwd=ROOT, env=env)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["peak_mb"] - r["baseline_mb"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="shorter inputs, no MRX")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _memory_child(args.child[0], float(args.child[1]))
        return
    seconds = 20.0 if args.quick else 60.0
    print(f"real-time factor, 44.1 kHz stereo, {seconds:g} s, 2 threads (higher is faster)")
    r = rtf("dsp", seconds)
    print(f"  dsp          {r:8.1f}x real time   (goal >= 20x: {'met' if r >= 20 else 'NOT met'})")
    row(f"demix dsp, {seconds:g} s 44.1 kHz stereo", r, "x real time")
    if not args.quick:
        r_mrx = rtf("mrx", 10.0, repeats=1)
        print(f"  mrx (512x3)  {r_mrx:8.2f}x real time   (dsp is {r / r_mrx:.0f}x faster)")
        row("demix mrx (released size), 10 s", r_mrx, "x real time")
    lengths = (40, 80, 160) if args.quick else (40, 80, 160, 320, 640)
    print("peak anonymous memory above the one-chunk baseline (MB) against input length, dsp, 20 s chunks")
    print(f"  {'seconds':>8} {'input':>7} {'sink':>8} {'chunked':>8} {'one pass':>9} {'sink/one':>9}")
    for s in lengths:
        sink, chunked, whole = memory("sink", s), memory("chunked", s), memory("whole", s)
        mb = s * 44100 * 2 * 4 / 2**20
        print(f"  {s:8d} {mb:7.1f} {sink:8.1f} {chunked:8.1f} {whole:9.1f} {sink / max(whole, 1e-9):9.2f}")
        row(f"demix dsp memory, {s} s, chunked (streaming sink)", sink, "MB above baseline",
            ratio=sink / max(whole, 1e-9), vs="one unchunked pass", peak_mb=sink)


if __name__ == "__main__":
    main()
