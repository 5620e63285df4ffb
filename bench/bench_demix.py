"""Demixer speed and memory (plain script: ``python bench/bench_demix.py [--quick]``).

1. Real-time factor (seconds of audio per second of wall time; higher is faster) of
   each method on 44.1 kHz stereo, with torch limited to 2 threads:
   ``dsp``, ``learned`` (the shipped network), and MRX at the released size (random
   weights: speed does not depend on them). The goal for dsp is >= 20x.
2. Peak anonymous resident memory (heap and tensors, sampled every 2 ms) against
   input length, each run in a fresh process, above the level after one chunk's work:
   chunked with a streaming sink (what ``avsync demix`` could do for any length),
   chunked into a full-length result (what the node returns), and one unchunked pass
   (the naive path). Printed as MB above the process baseline and as a ratio to the
   unchunked pass.
4. BandIt v2 at the released size (random weights; ``--bandit``, also part of the full
   run): the wall time of one network call on one 8 s chunk at 48 kHz, mono (one item)
   and stereo (two items, run in parallel threads), each measured in a fresh process
   together with its peak anonymous resident memory. Its chunker advances 1 s per chunk,
   so the real-time factor of stereo input is ``1 s / time per stereo chunk`` (resampling
   and overlap-add cost next to nothing). ``--bandit-compare SECONDS``: the network on
   two items of SECONDS as it ran before networks/cpu_threads.py (every op on all
   intra-op threads) and as it runs now, in one process, with the largest output
   difference. ``--bandit-file SECONDS``: a whole stereo input through the chunker (not
   in the full run: 10 s is 17 stereo chunks, minutes even on a quiet machine).
3. Peak resident memory of the command line, ``avsync demix FILE --out DIR`` (a
   subprocess, its /proc status sampled every 5 ms from outside), on 16-bit 44.1 kHz
   stereo WAV files of 60 s and 600 s (``--cli-only`` runs just this part). The goal:
   the two differ by less than 100 MB.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
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
    run = "model" if model is not None else method
    demix(x[:, :44100], 44100, run, model)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        demix(x, 44100, run, model, chunk_seconds=20.0)
        best = min(best, time.perf_counter() - t0)
    return seconds / best


class _PeakAnon:
    """Peak of :func:`_anon_mb` while the ``with`` body runs, sampled every ``interval`` s
    from a thread; ``base`` is the level on entry."""

    def __init__(self, interval: float):
        self.interval = interval

    def __enter__(self):
        import threading

        self.base = self.peak = _anon_mb()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._done.is_set():
            self.peak = max(self.peak, _anon_mb())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _anon_mb())
        return False


def _bandit_net():
    import torch

    from avsync.networks.bandit_v2 import BanditV2

    torch.set_num_threads(2)
    torch.manual_seed(0)
    return BanditV2().eval().requires_grad_(False)


def _bandit_child() -> None:
    """Runs in a subprocess: one released-size BandIt v2 call on one 8 s chunk at 48 kHz,
    mono (one item) and stereo (two items, what the chunker passes for stereo input);
    prints {seconds, baseline_mb, peak_mb} of each (anonymous resident memory)."""
    import torch

    net = _bandit_net()
    r = {"params": sum(p.numel() for p in net.parameters())}
    for name, channels in (("mono", 1), ("stereo", 2)):
        x = torch.randn(1, channels, net.config.chunk_samples) * 0.1
        with _PeakAnon(0.005) as mem:
            t0 = time.perf_counter()
            with torch.inference_mode():
                net(x)
            r[name] = {"seconds": time.perf_counter() - t0, "baseline_mb": mem.base, "peak_mb": mem.peak}
    print(json.dumps(r))


def _bandit_compare_child(seconds: float) -> None:
    """Runs in a subprocess: the released-size network on two ``seconds``-long items
    (one stereo input), first as it ran before (``nn.GRU`` called directly, all items in
    one batch, every op on both intra-op threads), then as it runs now
    (networks/cpu_threads.py), in the same process; prints both times and the largest
    difference of the outputs."""
    import torch

    import avsync.networks.bandit_v2 as bandit

    net = _bandit_net()
    x = torch.randn(1, 2, int(seconds * net.config.sample_rate)) * 0.1
    threaded = (bandit.run_items_in_threads, bandit.run_rnn)
    old = (lambda fn, items, module: fn(items), lambda rnn, z: rnn(z)[0])
    r, ys = {}, {}
    with torch.inference_mode():
        for name, (items_fn, rnn_fn) in (("before", old), ("after", threaded)):
            bandit.run_items_in_threads, bandit.run_rnn = items_fn, rnn_fn
            t0, c0 = time.perf_counter(), time.process_time()
            ys[name] = net(x)
            r[name] = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
    bandit.run_items_in_threads, bandit.run_rnn = threaded
    r["max_abs_diff"] = float((ys["before"] - ys["after"]).abs().max())
    print(json.dumps(r))


def _bandit_file_child(seconds: float) -> None:
    """Runs in a subprocess: ``demix(..., "bandit_v2")`` (the chunker: 8 s chunks on a
    1 s hop) on ``seconds`` of 48 kHz stereo noise with the released-size network."""
    import torch

    from avsync import compat
    from avsync.loaders.demix import BANDIT_CHUNK_BATCH, DemixModel
    from avsync.samplers.demix import demix

    net = _bandit_net()
    cfg = net.config
    model = DemixModel(family="bandit_v2", managed=compat.manage_model(net, {"family": "bandit_v2"}),
                       sample_rate=cfg.sample_rate, source_names=tuple(cfg.stems), min_length=net.min_length,
                       name="random released-size BandIt v2",
                       chunking={"kind": "bandit", "chunk_seconds": cfg.chunk_seconds,
                                 "hop_seconds": cfg.hop_seconds, "batch": BANDIT_CHUNK_BATCH},
                       loudness_normalize=False)
    x = torch.randn(2, int(seconds * cfg.sample_rate)) * 0.1
    with _PeakAnon(0.01) as mem:
        t0 = time.perf_counter()
        y = demix(x, cfg.sample_rate, "bandit_v2", model)
        wall = time.perf_counter() - t0
    assert y.shape == (3, 2, x.shape[1]) and bool(torch.isfinite(y).all())
    print(json.dumps({"seconds": wall, "baseline_mb": mem.base, "peak_mb": mem.peak}))


def _run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def bandit_table() -> None:
    r = _run_child("--bandit-child")
    print(f"BandIt v2, released size ({r['params'] / 1e6:.1f} M parameters, random weights), 2 threads")
    for name in ("mono", "stereo"):
        m = r[name]
        print(f"  one 8 s {name} chunk at 48 kHz: {m['seconds']:.1f} s; working memory "
              f"{m['peak_mb'] - m['baseline_mb']:.0f} MB above the loaded model (peak {m['peak_mb']:.0f} MB anonymous)")
    stereo = 1.0 / r["stereo"]["seconds"]
    print(f"  real-time factor, stereo (1 s hop per chunk): {stereo:.4f}x")
    row("demix bandit_v2 (released size), one 8 s mono chunk", r["mono"]["seconds"], "s", peak_mb=r["mono"]["peak_mb"])
    row("demix bandit_v2 (released size), one 8 s stereo chunk", r["stereo"]["seconds"], "s",
        peak_mb=r["stereo"]["peak_mb"])
    row("demix bandit_v2 (released size), stereo", stereo, "x real time")


def bandit_compare_table(seconds: float) -> None:
    r = _run_child("--bandit-compare-child", str(seconds))
    ratio = r["before"]["seconds"] / r["after"]["seconds"]
    print(f"BandIt v2, released size, two {seconds:g} s items (one stereo input), 2 threads, same process")
    for name in ("before", "after"):
        print(f"  {name:6s}: {r[name]['seconds']:7.1f} s wall, {r[name]['cpu_seconds']:7.1f} s CPU")
    print(f"  after is {ratio:.1f}x faster; outputs differ by at most {r['max_abs_diff']:.1e}")
    row(f"demix bandit_v2 (released size), 2 x {seconds:g} s items, threads per item", r["after"]["seconds"], "s",
        ratio=ratio, vs="intra-op threads per op (before)")


def mrx_compare_table(seconds: float) -> None:
    """MRX at the released size on ``seconds`` of 44.1 kHz stereo (random weights), its
    BLSTMs called directly (before) and through networks/cpu_threads.run_rnn (now: each
    direction single-threaded in its own thread), in the same process."""
    import torch

    import avsync.networks.mrx as mrx

    torch.set_num_threads(2)
    torch.manual_seed(0)
    net = mrx.MRX().eval().requires_grad_(False)
    x = torch.randn(1, 2, int(seconds * 44100)) * 0.1
    threaded, times, ys = mrx.run_rnn, {}, {}
    with torch.inference_mode():
        net(x[..., :44100])   # warm-up
        for name, fn in (("before", lambda rnn, z: rnn(z)[0]), ("after", threaded)):
            mrx.run_rnn = fn
            t0 = time.perf_counter()
            ys[name] = net(x)
            times[name] = time.perf_counter() - t0
    mrx.run_rnn = threaded
    diff = float((ys["before"] - ys["after"]).abs().max())
    print(f"MRX, released size, {seconds:g} s 44.1 kHz stereo, 2 threads, same process: before "
          f"{times['before']:.1f} s, after {times['after']:.1f} s ({times['before'] / times['after']:.2f}x); "
          f"outputs differ by at most {diff:.1e}")
    row(f"demix mrx (released size), {seconds:g} s, BLSTM directions in threads", seconds / times["after"],
        "x real time", ratio=times["before"] / times["after"], vs="BLSTM called directly (before)")


def bandit_file_table(seconds: float) -> None:
    r = _run_child("--bandit-file-child", str(seconds))
    rtf = seconds / r["seconds"]
    print(f"BandIt v2, released size, {seconds:g} s of 48 kHz stereo through its chunker, 2 threads: "
          f"{r['seconds']:.1f} s ({rtf:.4f}x real time), peak {r['peak_mb']:.0f} MB anonymous")
    row(f"demix bandit_v2 (released size), {seconds:g} s 48 kHz stereo file", rtf, "x real time",
        peak_mb=r["peak_mb"])


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
    import torch

    from avsync.samplers.demix import demix

    torch.set_num_threads(2)
    one = _signal(20.0)
    n = int(seconds * 44100)
    x = one.repeat(1, int(seconds) // 20 + 1)[:, :n].contiguous()
    demix(one, 44100, "dsp", chunk_seconds=20.0, sink=lambda start, block: None)  # warm-up: one chunk
    with _PeakAnon(0.002) as mem:
        if mode == "sink":
            demix(x, 44100, "dsp", chunk_seconds=20.0, sink=lambda start, block: None)
        elif mode == "chunked":
            demix(x, 44100, "dsp", chunk_seconds=20.0)
        else:
            demix(x, 44100, "dsp", chunk_seconds=seconds + 1)
    print(json.dumps({"baseline_mb": mem.base, "peak_mb": mem.peak}))


def memory(mode: str, seconds: float) -> float:
    # A fixed mmap threshold makes glibc hand large freed blocks back to the OS at once;
    # with its default (a threshold that grows after each large free) the resident size
    # creeps up with the number of chunks through fragmentation, not through anything held.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(seconds)], capture_output=True, text=True,
                         check=True, cwd=ROOT, env=env)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["peak_mb"] - r["baseline_mb"]


def _write_test_wav(path: Path, seconds: float, sr: int = 44100) -> None:
    """A long test file written chunk by chunk (20 s of the bench signal, repeated)."""
    from avsync.core.audio_io import WavWriter

    one = _signal(20.0, sr).numpy() * 0.5
    with WavWriter(path, sr, 2) as out:
        left = int(seconds * sr)
        while left > 0:
            out.write(one[:, :left])
            left -= one.shape[1]


def _status_mb(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def cli_memory(seconds: float, workdir: Path, extra: tuple = (), extra_env: tuple = ()) -> dict:
    """Peak VmRSS / RssAnon (MB) of ``python -m avsync demix`` on a ``seconds`` long file."""
    src = workdir / f"in_{int(seconds)}.wav"
    if not src.exists():
        _write_test_wav(src, seconds)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", **dict(extra_env)}
    # one output folder per length: the command refuses to overwrite stems without --force
    cmd = [sys.executable, "-m", "avsync", "demix", str(src), "--out", str(workdir / f"out_{int(seconds)}"), *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    peak = {"VmRSS": 0.0, "RssAnon": 0.0, "RssFile": 0.0, "RssShmem": 0.0}
    while proc.poll() is None:
        for k, v in _status_mb(proc.pid).items():
            peak[k] = max(peak[k], v)
        time.sleep(0.005)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"avsync demix failed: {proc.stderr.read().decode()[-2000:]}")
    return {**peak, "wall_s": wall}


def cli_table(lengths=(60, 600)) -> None:
    import tempfile

    print("peak resident memory of `avsync demix FILE --out DIR` (dsp, 20 s chunks; 16-bit 44.1 kHz stereo WAV)")
    print(f"  {'seconds':>8} {'file MB':>8} {'VmRSS MB':>9} {'RssAnon MB':>11} {'wall s':>7}")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="avsync-bench-demix-") as tmp:
        for s in lengths:
            r = rows[s] = cli_memory(s, Path(tmp))
            mb = (Path(tmp) / f"in_{int(s)}.wav").stat().st_size / 2**20
            print(f"  {s:8d} {mb:8.1f} {r['VmRSS']:9.1f} {r['RssAnon']:11.1f} {r['wall_s']:7.1f}")
    a, b = rows[lengths[0]], rows[lengths[-1]]
    diff = b["VmRSS"] - a["VmRSS"]
    print(f"  {lengths[-1]} s - {lengths[0]} s: {diff:+.1f} MB resident (goal < 100 MB: "
          f"{'met' if abs(diff) < 100 else 'NOT met'})")
    for s in lengths:
        row(f"avsync demix CLI peak resident memory, {s} s input", rows[s]["VmRSS"], "MB",
            ratio=rows[s]["VmRSS"] / rows[lengths[0]]["VmRSS"], vs=f"{lengths[0]} s input", peak_mb=rows[s]["VmRSS"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="shorter inputs, no MRX")
    p.add_argument("--cli-only", action="store_true", help="only the command line's memory against input length")
    p.add_argument("--bandit", action="store_true", help="only BandIt v2 at the released size (one mono and one stereo chunk)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--bandit-compare", type=float, metavar="SECONDS",
                   help="only BandIt v2 before / after the threading change, on two items of SECONDS (e.g. 2)")
    p.add_argument("--bandit-file", type=float, metavar="SECONDS",
                   help="only BandIt v2 over a whole stereo input of SECONDS through its chunker (10 s: 17 stereo chunks)")
    p.add_argument("--mrx-compare", type=float, metavar="SECONDS",
                   help="only MRX (released size) with its BLSTMs called directly vs. per direction in threads")
    p.add_argument("--bandit-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bandit-compare-child", type=float, help=argparse.SUPPRESS)
    p.add_argument("--bandit-file-child", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _memory_child(args.child[0], float(args.child[1]))
        return
    # parts run alone (option value, what it runs): subprocess children first, then the tables
    children = [(args.bandit_child, _bandit_child),
                (args.bandit_compare_child, lambda: _bandit_compare_child(args.bandit_compare_child)),
                (args.bandit_file_child, lambda: _bandit_file_child(args.bandit_file_child))]
    tables = [(args.cli_only, cli_table), (args.bandit, bandit_table),
              (args.bandit_compare, lambda: bandit_compare_table(args.bandit_compare)),
              (args.bandit_file, lambda: bandit_file_table(args.bandit_file)),
              (args.mrx_compare, lambda: mrx_compare_table(args.mrx_compare))]
    for i, (wanted, part) in enumerate(children + tables):
        if i == len(children):
            sys.path.insert(0, str(ROOT))
        if wanted:
            part()
            return
    seconds = 20.0 if args.quick else 60.0
    print(f"real-time factor, 44.1 kHz stereo, {seconds:g} s, 2 threads (higher is faster)")
    r = rtf("dsp", seconds)
    print(f"  dsp          {r:8.1f}x real time   (goal >= 20x: {'met' if r >= 20 else 'NOT met'})")
    row(f"demix dsp, {seconds:g} s 44.1 kHz stereo", r, "x real time")
    r_learned = rtf("learned", seconds)
    print(f"  learned      {r_learned:8.1f}x real time   (dsp, then the shipped 1.15 M-parameter network)")
    row(f"demix learned, {seconds:g} s 44.1 kHz stereo", r_learned, "x real time", ratio=r_learned / r, vs="dsp")
    if not args.quick:
        r_mrx = rtf("mrx", 10.0, repeats=1)
        print(f"  mrx (512x3)  {r_mrx:8.2f}x real time   (dsp is {r / r_mrx:.0f}x faster)")
        row("demix mrx (released size), 10 s", r_mrx, "x real time")
        bandit_table()
    lengths = (40, 80, 160) if args.quick else (40, 80, 160, 320, 640)
    print("peak anonymous memory above the one-chunk baseline (MB) against input length, dsp, 20 s chunks")
    print(f"  {'seconds':>8} {'input':>7} {'sink':>8} {'chunked':>8} {'one pass':>9} {'sink/one':>9}")
    for s in lengths:
        sink, chunked, whole = memory("sink", s), memory("chunked", s), memory("whole", s)
        mb = s * 44100 * 2 * 4 / 2**20
        print(f"  {s:8d} {mb:7.1f} {sink:8.1f} {chunked:8.1f} {whole:9.1f} {sink / max(whole, 1e-9):9.2f}")
        row(f"demix dsp memory, {s} s, chunked (streaming sink)", sink, "MB above baseline",
            ratio=sink / max(whole, 1e-9), vs="one unchunked pass", peak_mb=sink)
    cli_table()


if __name__ == "__main__":
    main()
