"""Memory check before sampling: a per-family estimate, one check that stops with suggestions.

A family implements :class:`MemoryModel`: ``estimate(settings)`` (peak bytes of its stages)
and ``suggestions(settings, free_bytes)`` (settings that would fit, as the user would type
them) plus ``culprit(settings, estimate, free_bytes)`` (the input the error names).
:func:`check_memory` does the rest before any expensive work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from ... import compat
from ...core.errors import InputError


@dataclass
class MemoryEstimate:
    sampling: int
    decoding: int
    maps: int = 0  # attention maps held during sampling (family-specific; part of ``sampling``)

    @property
    def peak(self) -> int:
        """The stages never overlap (the denoiser is offloaded before decoding)."""
        return max(self.sampling, self.decoding)


class MemoryModel(Protocol):
    def estimate(self, settings) -> MemoryEstimate: ...
    def suggestions(self, settings, free_bytes: int) -> list: ...
    def culprit(self, settings, estimate: MemoryEstimate, free_bytes: int) -> str: ...


def memory_budget(device) -> Optional[int]:
    """Bytes a run may use on ``device``: inside ComfyUI the whole device (ComfyUI unloads
    other models on demand), outside it what is free now; None when unknown (CPU)."""
    device = torch.device(device)
    if device.type == "cuda" and compat.in_comfyui():
        return int(torch.cuda.get_device_properties(device).total_memory)
    return compat.free_memory_bytes(device)


def gib(n: int) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


def check_memory(family: MemoryModel, settings, free_bytes: Optional[int]) -> None:
    """Raise :class:`InputError` naming ``family.culprit`` when the estimated peak does not fit
    ``free_bytes`` (None = unknown: no check), with the family's suggestions."""
    if free_bytes is None:
        return
    est = family.estimate(settings)
    if est.peak <= free_bytes:
        return
    suggestions = family.suggestions(settings, free_bytes)
    hint = "; ".join(suggestions) if suggestions else "a device with more memory"
    raise InputError(
        family.culprit(settings, est, free_bytes),
        f"estimated peak memory {gib(est.peak)} (sampling {gib(est.sampling)}, decoding {gib(est.decoding)}) "
        f"exceeds the {gib(free_bytes)} available on the device. Settings that would fit: {hint}",
    )
