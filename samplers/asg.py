"""Audio Sync Guidance settings (the ``AVSYNC_GUIDANCE`` socket) and how they become a guidance object.

Syncphony (``shared/papers/syncphony.txt`` §3.3, eq. 6, App. B) adds an *off-sync* prediction —
every condition real, the network's audio cross-attention layers skipped — and pushes the
result away from it::

    eq. 6:   ε̃ = ε(c) + w_a·(ε(c) − ε_off-sync(c)) + w_t·(ε(c) − ε(c_∅))

AVSync applies it around whatever guidance a pipeline already uses. With KeyVID's
four-condition CFG (``samplers/core/guidance.py:MultiConditionCFG``) the step's prediction is::

    out = e_u + s_img(e_i − e_u) + s_txt(e_it − e_i) + s_aud(e_c − e_it) + w_a(e_c − e_off-sync)
    out = rescale_noise_cfg(out, e_c, 0.7)

It differs from eq. 6 in the CFG part only: KeyVID's CFG has three terms (image, text,
audio) where eq. 6 has one (text), and KeyVID's guidance rescale (0.7) is applied after the
ASG term, as it is after KeyVID's own CFG. The off-sync branch joins the same batched model
call (five passes in one call: ``samplers/core/guidance.py:evaluate_branches``) and is not
computed at all outside [start, end) or when w_a = 0.

This module holds the user-facing settings (:class:`AudioSyncGuidanceSettings`), the
layer-selection syntax (:func:`parse_layers`), the check a pipeline calls before sampling
(:func:`check_guidance`) and the wrapper (:func:`with_audio_sync_guidance`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence, Tuple

import torch.nn as nn

from ..core.errors import InputError
from .core.guidance import AudioSyncGuidance, LinearGuidance

DEFAULT_SCALE = 2.0          # Syncphony's w_a; the paper finds 4 over-exaggerates motion
ALL = "all"

_TOKEN = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_layers(text: str) -> Optional[Tuple[int, ...]]:
    """``"all"`` → None (every audio layer); ``"8-15"``, ``"12,13,14"``, ``"0-3, 9"`` → the
    audio-layer indices (forward order, shallow → deep, 0-based, ranges inclusive), sorted and
    without repeats. Raises ``ValueError`` with what was expected."""
    text = (text or "").strip().lower()
    if text in ("", ALL):
        return None
    chosen = set()
    for part in text.split(","):
        m = _TOKEN.match(part)
        if m is None:
            raise ValueError(f"'{part.strip()}' is not an index or a range a-b; write 'all', '8-15' or '12,13,14'")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"range '{part.strip()}' runs backwards; write the smaller index first")
        chosen.update(range(lo, hi + 1))
    return tuple(sorted(chosen))


def resolve_layers(layers: Optional[Sequence[int]], count: int, what: str = "the model") -> Tuple[int, ...]:
    """The chosen audio-layer indices checked against a model with ``count`` audio layers."""
    if count == 0:
        raise ValueError(f"{what} has no audio layers, so Audio Sync Guidance cannot skip any; "
                         f"remove the guidance input or use an audio-conditioned model")
    if layers is None:
        return tuple(range(count))
    bad = [i for i in layers if not 0 <= i < count]
    if bad:
        raise ValueError(f"audio layer {bad[0]} does not exist: {what} has {count} audio layers (0-{count - 1})")
    return tuple(layers)


@dataclass(frozen=True)
class AudioSyncGuidanceSettings:
    """What the ``AVSYNC_GUIDANCE`` socket carries: Syncphony's scale ``w_a``, the step range
    [start, end) as fractions of sampling, and which audio layers the off-sync branch skips
    (``layers``: None = all, else forward-order indices; see :func:`parse_layers`)."""

    w_a: float = DEFAULT_SCALE
    start: float = 0.0
    end: float = 1.0
    layers: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        if not self.w_a >= 0.0:
            raise ValueError(f"w_a must be ≥ 0, got {self.w_a}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"need 0 ≤ start ≤ end ≤ 1, got start {self.start}, end {self.end}")

    @classmethod
    def from_text(cls, w_a: float, start: float, end: float, layers: str) -> "AudioSyncGuidanceSettings":
        return cls(float(w_a), float(start), float(end), parse_layers(layers))

    @property
    def enabled(self) -> bool:
        """False when the guidance can change nothing (w_a = 0 or an empty step range)."""
        return self.w_a != 0.0 and self.end > self.start

    def wrap(self, inner: LinearGuidance) -> LinearGuidance:
        """The ``AVSYNC_GUIDANCE`` protocol of ``samplers/keyvid.py:apply_guidance``: ``inner``
        wrapped in :class:`AudioSyncGuidance` (the skip patch is ``audio_layers_off`` on the
        chosen layers of whatever network the branches run on); ``inner`` itself when the
        settings can change nothing. Call :meth:`check` on the network first."""
        if not self.enabled:
            return inner
        from ..networks.audio_layers import audio_layers_off

        skip = partial(_skip, audio_layers_off, None if self.layers is None else list(self.layers))
        return AudioSyncGuidance(inner, self.w_a, skip, self.start, self.end)

    def check(self, net: nn.Module, input_name: str = "guidance", what: str = "the model") -> None:
        """Before sampling: ``net`` has audio layers, and the chosen ones (:func:`check_guidance`)."""
        check_guidance(self, net, input_name, what)

    def describe(self) -> str:
        which = "all audio layers" if self.layers is None else f"audio layers {_ranges(self.layers)}"
        return f"ASG w_a={self.w_a:g}, steps {self.start:g}-{self.end:g} of sampling, skipping {which}"


def _ranges(idx: Sequence[int]) -> str:
    out, run = [], [idx[0]]
    for i in idx[1:]:
        if i == run[-1] + 1:
            run.append(i)
        else:
            out.append(run)
            run = [i]
    out.append(run)
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in out)


def count_audio_layers(net: nn.Module) -> int:
    from ..networks.audio_layers import list_audio_layers

    return len(list_audio_layers(net))


def check_guidance(settings: Optional[AudioSyncGuidanceSettings], net: nn.Module, input_name: str = "guidance",
                   what: str = "the model") -> None:
    """Before sampling: a guidance input needs a network with audio layers, and its layer
    selection must exist there. Raises :class:`InputError` naming ``input_name``."""
    if settings is None:
        return
    try:
        resolve_layers(settings.layers, count_audio_layers(net), what)
    except ValueError as err:
        raise InputError(input_name, str(err)) from None


def with_audio_sync_guidance(inner: LinearGuidance, settings: Optional[AudioSyncGuidanceSettings],
                             net: nn.Module) -> LinearGuidance:
    """``inner`` wrapped for ``settings`` after checking them against ``net``. Without settings,
    or when they can change nothing (w_a = 0), ``inner`` itself is returned, so the run is the
    one without ASG bit for bit."""
    if settings is None:
        return inner
    settings.check(net)
    return settings.wrap(inner)


def _skip(switch, layers, net, mask):
    return switch(net, layers, samples=mask)
