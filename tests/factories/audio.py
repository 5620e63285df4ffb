"""Synthetic audio with known content, for tests and benchmarks. Deterministic:
every function that draws noise takes a ``seed``."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np


def _t(duration: float, sr: int) -> np.ndarray:
    return np.arange(int(round(duration * sr)), dtype=np.float64) / sr


def tone(freq: float = 440.0, duration: float = 1.0, sr: int = 16000, amp: float = 0.5, phase: float = 0.0) -> np.ndarray:
    """A sine, ``[T]`` float64."""
    return amp * np.sin(2 * np.pi * freq * _t(duration, sr) + phase)


def chord(freqs: Sequence[float] = (220.0, 277.18, 329.63), duration: float = 1.0, sr: int = 16000,
          amp: float = 0.3, harmonics: int = 4) -> np.ndarray:
    """A sustained harmonic chord (music-like bed): each note with decaying harmonics."""
    t = _t(duration, sr)
    out = np.zeros_like(t)
    for f in freqs:
        for h in range(1, harmonics + 1):
            if f * h < sr / 2:
                out += np.sin(2 * np.pi * f * h * t) / h
    return amp * out / max(np.abs(out).max(), 1e-9)


def clicks(times: Iterable[float], duration: float = 2.0, sr: int = 16000, amp: float = 0.9,
           decay_ms: float = 8.0, seed: int = 0) -> np.ndarray:
    """Impacts at ``times`` (seconds): a noise burst with an exponential decay (a hit,
    a clang). Each onset is exactly at ``round(time * sr)``."""
    rng = np.random.default_rng(seed)
    out = np.zeros(int(round(duration * sr)))
    n = int(sr * decay_ms / 1000 * 6)
    env = np.exp(-np.arange(n) / (sr * decay_ms / 1000))
    for t0 in times:
        i = int(round(t0 * sr))
        if i >= len(out):
            continue
        burst = rng.standard_normal(n) * env
        m = min(n, len(out) - i)
        out[i:i + m] += amp * burst[:m] / np.abs(burst).max()
    return out


def noise(duration: float = 1.0, sr: int = 16000, amp: float = 0.1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return amp * rng.standard_normal(int(round(duration * sr)))


def speech_like(duration: float = 2.0, sr: int = 16000, amp: float = 0.4, f0: float = 120.0,
                syllable_rate: float = 4.0, seed: int = 0) -> np.ndarray:
    """A speech-like signal: a glottal pulse train with jittered pitch through three
    moving formant resonators, amplitude-modulated at a syllabic rate (~4 Hz)."""
    from scipy.signal import lfilter

    rng = np.random.default_rng(seed)
    n = int(round(duration * sr))
    t = np.arange(n) / sr
    pitch = f0 * (1 + 0.1 * np.sin(2 * np.pi * 0.7 * t) + 0.02 * rng.standard_normal(n).cumsum() / math.sqrt(n))
    phase = np.cumsum(pitch / sr)
    pulses = np.diff(np.floor(phase), prepend=0.0)
    src = pulses + 0.02 * rng.standard_normal(n)
    out = np.zeros(n)
    # formants for a few vowels, switched per syllable
    vowels = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480)]
    hop = int(sr / syllable_rate)
    for s in range(0, n, hop):
        seg = src[s:s + hop]
        f1, f2, f3 = vowels[(s // hop) % len(vowels)]
        y = np.zeros_like(seg)
        for fc, bw in ((f1, 80), (f2, 100), (f3, 120)):
            if fc >= sr / 2:
                continue
            r = math.exp(-math.pi * bw / sr)
            a = [1, -2 * r * math.cos(2 * math.pi * fc / sr), r * r]
            y += lfilter([1 - r], a, seg)
        out[s:s + hop] = y
    env = 0.5 * (1 - np.cos(2 * np.pi * syllable_rate * t)) ** 1.5
    out *= env
    return amp * out / max(np.abs(out).max(), 1e-9)


def multichannel(channels: int = 6, duration: float = 1.0, sr: int = 48000, amp: float = 0.3) -> np.ndarray:
    """``[C, T]``: channel ``c`` is a tone at 220*(c+1) Hz, so channels are told apart."""
    return np.stack([tone(220.0 * (c + 1), duration, sr, amp) for c in range(channels)])


def to_int(x: np.ndarray, dtype) -> np.ndarray:
    """Float in [-1, 1] to integer PCM, as a WAV writer would store it."""
    info = np.iinfo(dtype)
    return np.clip(np.round(x * info.max), info.min, info.max).astype(dtype)
