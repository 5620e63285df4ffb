"""Sync score speed (``python bench/bench_sync_score.py [--quick]``).

Scores a rendered 10-s, 24-fps, 512×320 clip (three squares that move and jump, clicks on
the audio at the jumps, 48 kHz stereo) with ``core.sync_metrics.score_sync`` on 2 threads
(torch and OpenCV), and prints the time, the real-time factor (seconds of video per second
of work; goal >= 2x on CPU), the share spent in optical flow (of the wall time and of the CPU time: the second
does not move with other jobs' load) and the CPU seconds, for the
published full-resolution Farneback flow and for the flow on frames shrunk to 256 px
(``flow_max_side=256``), each with the frame pairs one at a time (``workers=1``, the loop
before the thread pool) and in parallel (``flow_workers()``: OpenCV's thread count, here
--threads). Best of --repeats runs after a warm-up.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.factories
from _report import best_of, row  # noqa: E402

SECONDS, FPS, WIDTH, HEIGHT, SR = 10.0, 24, 512, 320, 48000


def render():
    from tests.factories import audio as A

    rng = np.random.default_rng(0)
    n = int(SECONDS * FPS)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    background = (60 + 40 * np.sin(xx / 17.0) * np.cos(yy / 23.0)).astype(np.uint8)[..., None].repeat(3, -1)
    frames = np.empty((n, HEIGHT, WIDTH, 3), np.uint8)
    pos = rng.uniform([0, 0], [HEIGHT - 40, WIDTH - 40], size=(3, 2))
    vel = rng.normal(0, 2, size=(3, 2))
    events = sorted(rng.choice(np.arange(6, n - 6), 18, replace=False).tolist())
    for k in range(n):
        if k in events:
            pos[k % 3] = rng.uniform([0, 0], [HEIGHT - 40, WIDTH - 40])
        pos = np.clip(pos + vel, 0, [HEIGHT - 40, WIDTH - 40])
        f = background.copy()
        for (y, x), c in zip(pos.astype(int), ((230, 80, 60), (80, 220, 90), (70, 90, 230))):
            f[y:y + 40, x:x + 40] = c
        frames[k] = f
    clicks = A.clicks([k / FPS for k in events], SECONDS, SR)
    wav = np.stack([clicks, clicks]).astype(np.float32) + 0.01 * rng.standard_normal((2, int(SECONDS * SR)),
                                                                                    dtype=np.float32)
    return frames, wav


def _timed(fn, repeats: int) -> tuple[float, float]:
    """Best wall time of ``repeats`` calls after a warm-up, and the CPU seconds (all threads of
    this process) of that fastest call: CPU time does not grow with other jobs' load, wall does."""
    fn()
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - t, time.process_time() - c))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one timed run instead of three")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    import os

    import cv2
    import torch

    from avsync.core.sync_metrics import flow_workers, motion_trajectory, score_sync

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    frames, wav = render()
    n = len(frames)
    workers = flow_workers()
    print(f"{SECONDS:g}-s clip, {n} frames at {FPS} fps, {WIDTH}x{HEIGHT}, {args.threads} threads "
          f"(flow: {workers} frame pairs at once), load average {os.getloadavg()[0]:.1f} "
          f"(other processes share these cores: wall times are upper bounds)")
    serial_total = {}
    for side in (0, 256):
        for w in (1, workers):
            total, cpu = _timed(lambda: score_sync(frames, n, FPS, wav, SR, flow_max_side=side, workers=w), repeats)
            flow, flow_cpu = _timed(lambda: motion_trajectory(frames, max_side=side, workers=w), repeats)
            res = "full-res flow (published AV-Align)" if side == 0 else f"flow at {side} px (flow_max_side)"
            how = "one pair at a time" if w == 1 else f"{w} pairs at once"
            rtf = SECONDS / total
            print(f"  {res + ', ' + how:58s} {total:6.2f} s = {rtf:5.2f}x real time "
                  f"(goal >= 2x: {'met' if rtf >= 2 else 'NOT met'}), optical flow {100 * flow / total:3.0f}% of it "
                  f"(of the CPU time: {100 * flow_cpu / cpu:3.0f}%), CPU {cpu:5.2f} s")
            name = f"score 10 s 512x320, {'full-res' if side == 0 else f'{side} px'} flow, {w} worker{'s' * (w > 1)}"
            note = f"flow {100 * flow / total:.0f}% of the time ({100 * flow_cpu / cpu:.0f}% of the CPU time), CPU {cpu:.1f} s"
            if w == 1:
                serial_total[side] = total
                row(name, rtf, "x real time", note=note)
            else:
                row(name, rtf, "x real time", ratio=total / serial_total[side], vs="one pair at a time", note=note)


if __name__ == "__main__":
    main()
