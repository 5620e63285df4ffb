"""Synthetic videos whose motion happens at known frames (for the sync scores)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def jumping_square(num_frames: int, events: Sequence[int], height: int = 64, width: int = 96, size: int = 12,
                   seed: int = 0) -> np.ndarray:
    """uint8 RGB ``[N, H, W, 3]``: a bright square on a grey background that stands still
    and jumps to a new random place exactly at each frame in ``events`` (so the flow
    between frames ``k - 1`` and ``k`` is large only for ``k`` in ``events``)."""
    rng = np.random.default_rng(seed)
    frames = np.full((num_frames, height, width, 3), 40, dtype=np.uint8)
    y, x = 2, 2
    hits = set(int(k) for k in events)
    for k in range(num_frames):
        if k in hits:
            while True:
                ny, nx = int(rng.integers(2, height - size - 2)), int(rng.integers(2, width - size - 2))
                if abs(ny - y) + abs(nx - x) >= size:  # a real jump, not a one-pixel nudge
                    break
            y, x = ny, nx
        frames[k, y:y + size, x:x + size] = (230, 200, 120)
    return frames
