"""``AVSYNC_TIMELINE``: the exact mapping between audio samples and video frames.

Rounding rule (documented in the README): with ``fps`` and ``sample_rate`` held as
exact rationals, frame ``k`` starts at sample ``floor(k * sample_rate / fps + 1/2)``
(round half up) and covers the samples up to the start of frame ``k + 1``. The
arithmetic is exact (``fractions.Fraction``), so there is no drift however long the
audio is: frame 86 400 of a one-hour 24 fps timeline starts exactly at second 3600.
A timeline has ``floor(num_samples * fps / sample_rate)`` whole frames; a trailing
part-frame of audio is not a frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Union

from .errors import InputError

Number = Union[int, float, Fraction]


def as_fps(fps: Number, name: str = "fps") -> Fraction:
    """An exact frame rate. NTSC rates typed as decimals (23.976, 29.97, 59.94)
    become their true value n*1000/1001; other floats are taken to 1/1000 precision."""
    if isinstance(fps, Fraction):
        value = fps
    else:
        if isinstance(fps, float) and (math.isnan(fps) or math.isinf(fps)):
            raise InputError(name, f"must be a finite number of frames per second, got {fps}")
        value = Fraction(fps).limit_denominator(1000)
        for base in (24, 30, 48, 60, 120):
            ntsc = Fraction(base * 1000, 1001)
            if abs(float(fps) - float(ntsc)) < 0.0015:
                value = ntsc
                break
    if value <= 0:
        raise InputError(name, f"must be greater than 0 frames per second, got {float(value):g}")
    return value


@dataclass(frozen=True)
class Timeline:
    """Video frames laid over a stretch of audio.

    ``start`` is where the stretch begins in the source file (seconds, for display
    and for the loader); sample 0 of the AUDIO that travels with this timeline is
    frame 0's first sample.
    """

    fps: Fraction
    sample_rate: int
    num_samples: int
    start: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "fps", as_fps(self.fps))
        if int(self.sample_rate) <= 0:
            raise InputError("sample_rate", f"must be > 0, got {self.sample_rate}")
        if int(self.num_samples) < 0:
            raise InputError("num_samples", f"must be >= 0, got {self.num_samples}")
        object.__setattr__(self, "sample_rate", int(self.sample_rate))
        object.__setattr__(self, "num_samples", int(self.num_samples))

    # -- derived sizes -----------------------------------------------------------------
    @property
    def duration(self) -> float:
        """Length of the audio in seconds."""
        return self.num_samples / self.sample_rate

    @property
    def num_frames(self) -> int:
        """Whole frames covered by the audio."""
        return (self.num_samples * self.fps.numerator) // (self.sample_rate * self.fps.denominator)

    @property
    def samples_per_frame(self) -> Fraction:
        return Fraction(self.sample_rate) / self.fps

    # -- exact mapping -----------------------------------------------------------------
    def frame_start_sample(self, frame: int) -> int:
        """First sample of ``frame`` (round half up of ``frame * sample_rate / fps``)."""
        return math.floor(Fraction(int(frame)) * self.samples_per_frame + Fraction(1, 2))

    def frame_of_sample(self, sample: int) -> int:
        """The frame that contains ``sample`` (inverse of :meth:`frame_start_sample`)."""
        # largest k with frame_start_sample(k) <= sample
        k = math.floor((Fraction(int(sample)) + Fraction(1, 2)) / self.samples_per_frame)
        while self.frame_start_sample(k) > sample:
            k -= 1
        while self.frame_start_sample(k + 1) <= sample:
            k += 1
        return k

    def frame_time(self, frame: int) -> float:
        """Time of ``frame`` in seconds from the start of the audio (exact up to float)."""
        return float(Fraction(int(frame)) / self.fps)

    def frame_times(self):
        """Time of every frame in seconds (``k / fps`` from exact rationals), as a float64 array."""
        import numpy as np

        k = np.arange(self.num_frames, dtype=np.float64)
        return k * self.fps.denominator / self.fps.numerator

    def frame_bounds(self):
        """Sample boundaries of every frame: ``num_frames + 1`` integers."""
        import numpy as np

        n = self.num_frames
        k = np.arange(n + 1, dtype=np.int64)
        # exact integer arithmetic: floor((2*k*sr*den + num) / (2*num))
        num, den = self.fps.numerator, self.fps.denominator
        return (2 * k * self.sample_rate * den + num) // (2 * num)

    def with_sample_rate(self, sample_rate: int) -> "Timeline":
        """The same stretch of audio at another sample rate (after resampling)."""
        n = round(self.num_samples * int(sample_rate) / self.sample_rate)
        return Timeline(self.fps, int(sample_rate), n, self.start)

    def to_dict(self) -> dict:
        return {
            "fps": float(self.fps),
            "fps_fraction": f"{self.fps.numerator}/{self.fps.denominator}",
            "sample_rate": self.sample_rate,
            "num_samples": self.num_samples,
            "num_frames": self.num_frames,
            "start": self.start,
            "duration": self.duration,
        }

    def __str__(self) -> str:
        return (
            f"Timeline({self.num_frames} frames at {float(self.fps):g} fps, "
            f"{self.duration:.3f} s at {self.sample_rate} Hz, start {self.start:g} s)"
        )
