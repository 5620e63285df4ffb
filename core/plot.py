"""A plot of a localizer result that reads at a glance (PIL + numpy only).

Top: the waveform (min/max per pixel column). Bottom: the motion-score curve with
peaks (red ▲), valleys (green ▼) and the chosen keyframes (blue lines through both
panels); dashed grey lines mark KeyVID clip boundaries; the time axis is in seconds.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

BG = (250, 250, 250)
AXIS = (90, 90, 90)
GRID = (220, 220, 220)
WAVE = (120, 120, 140)
CURVE = (30, 30, 30)
PEAK = (215, 40, 40)
VALLEY = (30, 150, 60)
KEY = (40, 90, 220)
CLIP = (160, 160, 160)
ONSET = (230, 140, 20)
OVERLAY = (240, 170, 90)
DEFAULT_LEGEND = (("peak", PEAK), ("valley", VALLEY), ("keyframe", KEY), ("clip", CLIP))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _nice_step(span: float, target: int = 10) -> float:
    raw = span / max(target, 1)
    if raw <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def render_plot(waveform: np.ndarray, sample_rate: int, curve: Sequence[float], fps: float,
                peaks: Sequence[int] = (), valleys: Sequence[int] = (), keyframes: Sequence[int] = (),
                clip_frames: Optional[int] = None, title: str = "", width: int = 1024, height: int = 512,
                onset_times: Sequence[float] = (), overlay: Optional[Sequence[float]] = None,
                legend: Sequence[tuple] = DEFAULT_LEGEND) -> np.ndarray:
    """An ``[H, W, 3]`` float image in [0, 1]. ``waveform`` is ``[T]`` or ``[C, T]``.

    ``onset_times`` (seconds) are drawn as orange lines through both panels at their exact
    time; ``overlay`` is a second per-frame curve drawn under ``curve`` on its own scale
    (the sync score plots audio onsets and the onset envelope over the motion energy);
    ``legend`` is ``(label, colour)`` pairs."""
    from PIL import Image, ImageDraw

    wav = np.asarray(waveform, dtype=np.float32)
    if wav.ndim == 2:
        wav = wav.mean(axis=0)
    curve = np.asarray(curve, dtype=np.float64)
    n = len(curve)
    duration = max(n / fps if fps > 0 else 0.0, len(wav) / sample_rate if sample_rate else 0.0, 1e-6)

    img = Image.new("RGB", (width, height), BG)
    d = ImageDraw.Draw(img)
    f_small, f_title = _font(12), _font(15)
    left, right, top, bottom = 48, 12, 28, 30
    gap = 10
    plot_w = width - left - right
    wave_h = int((height - top - bottom - gap) * 0.35)
    curve_top = top + wave_h + gap
    curve_h = height - bottom - curve_top

    def x_of_time(t):
        return left + (t / duration) * plot_w

    def x_of_frame(k):
        return x_of_time(k / fps)

    # time grid and labels
    step = _nice_step(duration)
    t = 0.0
    while t <= duration + 1e-9:
        x = x_of_time(t)
        d.line([(x, top), (x, height - bottom)], fill=GRID)
        label = f"{t:g}s"
        d.text((x - 3 * len(label), height - bottom + 6), label, fill=AXIS, font=f_small)
        t += step

    # clip boundaries
    if clip_frames and n > clip_frames:
        for k in range(clip_frames, n, clip_frames):
            x = x_of_frame(k)
            for y in range(top, height - bottom, 8):
                d.line([(x, y), (x, min(y + 4, height - bottom))], fill=CLIP)

    # waveform: min/max per column
    mid = top + wave_h / 2
    if len(wav):
        peak = float(np.abs(wav).max()) or 1.0
        cols = np.linspace(0, len(wav), plot_w + 1).astype(np.int64)
        for i in range(plot_w):
            a, b = cols[i], max(cols[i + 1], cols[i] + 1)
            seg = wav[a:min(b, len(wav))]
            if seg.size == 0:
                continue
            y0 = mid - float(seg.max()) / peak * (wave_h / 2 - 2)
            y1 = mid - float(seg.min()) / peak * (wave_h / 2 - 2)
            d.line([(left + i, y0), (left + i, y1)], fill=WAVE)
    d.rectangle([left, top, left + plot_w, top + wave_h], outline=AXIS)

    # curve panel
    d.rectangle([left, curve_top, left + plot_w, curve_top + curve_h], outline=AXIS)
    lo, hi = (float(curve.min()), float(curve.max())) if n else (0.0, 1.0)
    if not hi > lo:
        hi = lo + 1.0

    def y_of(v):
        return curve_top + curve_h - 6 - (v - lo) / (hi - lo) * (curve_h - 12)

    d.text((4, curve_top - 2), f"{hi:.2g}", fill=AXIS, font=f_small)
    d.text((4, curve_top + curve_h - 14), f"{lo:.2g}", fill=AXIS, font=f_small)
    for t_on in onset_times:
        x = x_of_time(t_on)
        d.line([(x, top), (x, curve_top + curve_h)], fill=ONSET, width=1)
    if overlay is not None and len(overlay) > 1:
        ov = np.asarray(overlay, dtype=np.float64)
        o_lo, o_hi = float(ov.min()), float(ov.max())
        o_hi = o_hi if o_hi > o_lo else o_lo + 1.0
        d.line([(x_of_time((k + 0.5) / fps), curve_top + curve_h - 6 - (v - o_lo) / (o_hi - o_lo) * (curve_h - 12))
                for k, v in enumerate(ov)], fill=OVERLAY, width=1)
    for k in keyframes:
        x = x_of_frame(k) + 0.5 * plot_w / max(duration * fps, 1)
        d.line([(x, top), (x, curve_top + curve_h)], fill=KEY, width=2)
    if n:
        half = 0.5 / fps
        pts = [(x_of_time(k / fps + half), y_of(curve[k])) for k in range(n)]
        if len(pts) > 1:
            d.line(pts, fill=CURVE, width=2)
        else:
            d.point(pts, fill=CURVE)
        r = 5
        for k in peaks:
            if 0 <= k < n:
                x, y = pts[k]
                d.polygon([(x - r, y - 3), (x + r, y - 3), (x, y - 3 - 2 * r)], fill=PEAK)
        for k in valleys:
            if 0 <= k < n:
                x, y = pts[k]
                d.polygon([(x - r, y + 3), (x + r, y + 3), (x, y + 3 + 2 * r)], fill=VALLEY)

    # title and legend
    d.text((left, 6), title, fill=CURVE, font=f_title)
    steps = [max(80, 24 + 7 * len(label)) for label, _ in legend]  # 80 px fits the default labels
    lx = width - right - sum(steps) - 10
    for (label, color), step_px in zip(legend, steps):
        d.rectangle([lx, 10, lx + 10, 20], fill=color)
        d.text((lx + 14, 7), label, fill=AXIS, font=f_small)
        lx += step_px
    return np.asarray(img, dtype=np.float32) / 255.0
