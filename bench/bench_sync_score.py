"""Sync score speed (``python bench/bench_sync_score.py [--quick]``).

Scores a rendered 10-s, 24-fps, 512×320 clip (three squares that move and jump, clicks on
the audio at the jumps, 48 kHz stereo) with ``core.sync_metrics.score_sync`` on 2 threads
(torch and OpenCV), and prints the time, the real-time factor (seconds of video per second
of work; goal >= 2x on CPU) and the share spent in optical flow, for the published
full-resolution Farneback flow and for the flow on frames shrunk to 256 px
(``flow_max_side=256``). Best of --repeats runs after a warm-up.
"""

from __future__ import annotations

import argparse
import sys
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

    from avsync.core.sync_metrics import motion_trajectory, score_sync

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    frames, wav = render()
    n = len(frames)
    print(f"{SECONDS:g}-s clip, {n} frames at {FPS} fps, {WIDTH}x{HEIGHT}, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f} (other processes share these cores: times are upper bounds)")
    full_total = None
    for side in (0, 256):
        total = best_of(lambda: score_sync(frames, n, FPS, wav, SR, flow_max_side=side), repeats)
        flow = best_of(lambda: motion_trajectory(frames, max_side=side), repeats)
        label = "full-resolution flow (published AV-Align)" if side == 0 else f"flow at {side} px (flow_max_side)"
        rtf = SECONDS / total
        print(f"  {label:44s} {total:6.2f} s = {rtf:5.2f}x real time (goal >= 2x: {'met' if rtf >= 2 else 'NOT met'}),"
              f" optical flow {100 * flow / total:3.0f}% of it")
        name = "score 10 s 512x320, " + ("full-res flow" if side == 0 else f"flow {side} px")
        if side == 0:
            full_total = total
            row(name, rtf, "x real time", note=f"flow {100 * flow / total:.0f}% of the time")
        else:
            row(name, rtf, "x real time", ratio=total / full_total, vs="full-res flow",
                note=f"flow {100 * flow / total:.0f}% of the time")


if __name__ == "__main__":
    main()
