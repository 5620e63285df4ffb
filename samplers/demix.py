"""Run a demixer (the ``dsp`` separator or a neural model) over a whole clip, chunk
by chunk: ``[C, T]`` at any rate in, ``[3, C, T]`` stems (speech, effects, music) at
the same rate, length and channel count out."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..core.audio import resample
from ..core.demix_dsp import STEMS, demix_dsp
from ..core.loudness import integrated_loudness
from .chunking import run_overlap_add

METHODS = ("auto", "dsp", "model")
REFERENCE_LUFS = -27.0   # the reference separate.py brings input to DnR's average loudness


def input_gain(waveform: torch.Tensor, sample_rate: int, target_lufs: float = REFERENCE_LUFS) -> float:
    """Gain that brings the clip's integrated loudness (ITU-R BS.1770) to ``target_lufs``,
    as the reference ``separate.py`` does with pyloudnorm; 1.0 when loudness is
    undefined (shorter than one 400 ms gating block, or silent)."""
    lufs = integrated_loudness(waveform, int(sample_rate))
    if not math.isfinite(lufs):
        return 1.0
    return float(10.0 ** ((target_lufs - lufs) / 20.0))


def _fit(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.shape[-1] >= n:
        return x[..., :n]
    return torch.nn.functional.pad(x, (0, n - x.shape[-1]))


def model_chunk_processor(model, sample_rate: int, gain: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """``[C, L]`` at ``sample_rate`` → ``[3, C, L]`` stems through a loaded neural model:
    gain, resample to the model's rate, pad to its minimum length, run, undo all three."""
    order = [model.stem_index(s) for s in STEMS]

    def process(chunk: torch.Tensor) -> torch.Tensor:
        net = model.managed.load()
        device = next(net.parameters()).device
        length = chunk.shape[-1]
        x = resample(chunk * gain, sample_rate, model.sample_rate)
        n = x.shape[-1]
        x = _fit(x, max(n, model.min_length))
        with torch.inference_mode():
            y = net(x.unsqueeze(0).to(device))[0].float().cpu()
        y = _fit(resample(y[..., :n].contiguous(), model.sample_rate, sample_rate), length) / gain
        return y[order]

    return process


def demix(waveform: torch.Tensor, sample_rate: int, method: str = "auto", model=None,
          chunk_seconds: float = 20.0, overlap: float = 0.1,
          sink: Optional[Callable[[int, torch.Tensor], None]] = None) -> Optional[torch.Tensor]:
    """Split ``[C, T]`` into ``[3, C, T]`` in :data:`STEMS` order.

    ``method``: ``dsp`` (no weights), ``model`` (``model`` is required) or ``auto``
    (the model when given, else dsp). Chunks of ``chunk_seconds`` overlap by
    ``overlap`` of a chunk and are cross-faded. With ``sink`` the stems are handed over
    block by block (see :func:`~.chunking.run_overlap_add`) and nothing is returned.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    use_model = method == "model" or (method == "auto" and model is not None)
    if use_model and model is None:
        raise ValueError("method 'model' needs a demix model")
    x = waveform.to(torch.float32)
    chunk = max(1, int(round(chunk_seconds * sample_rate)))
    ov = int(round(min(max(overlap, 0.0), 0.5) * chunk))
    if use_model:
        process = model_chunk_processor(model, sample_rate, input_gain(x, sample_rate))
        desc = f"demix ({model.family})"
    else:
        def process(c: torch.Tensor) -> torch.Tensor:
            return demix_dsp(c, sample_rate)
        desc = "demix (dsp)"
    try:
        return run_overlap_add(process, x, chunk, ov, len(STEMS), desc=desc, sink=sink)
    finally:
        if use_model:
            model.managed.offload()
