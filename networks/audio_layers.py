"""Audio layers: the audio branch of a cross-attention, switchable per call and per sample.

A network marks each module whose forward adds an audio term (KeyVID's spatial
``attn2``: ``out = Attn_text + Attn_img + (tanh β + 1)·Attn_audio``) by giving it an
:class:`AudioLayerInfo` in ``audio_layer_info`` and by honouring ``audio_off``
(see :class:`AudioSwitch`). Callers never touch those attributes; they use

* :func:`list_audio_layers` — every audio layer in forward order, with the block it sits
  in (``input``/``middle``/``output``, block index, resolution level), so a subset can be
  picked by block index or depth;
* :func:`audio_layers_off` — a context manager that switches chosen layers off for chosen
  samples of the model-call batch and always restores them.

Audio Sync Guidance builds an "off-sync" prediction this way: the same batched call holds
normal branches next to a branch whose audio layers are off. With nothing switched off, a
layer runs exactly the code it runs outside the context manager (bit-identical output).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn


@dataclass(frozen=True)
class AudioLayerInfo:
    """Where an audio layer sits. ``index`` is its position in forward order;
    ``section`` is ``"input"``, ``"middle"`` or ``"output"``; ``block`` the index inside
    ``input_blocks``/``output_blocks`` (0 for the middle block); ``level`` the UNet
    resolution level (0 = full latent resolution, deeper levels are coarser); ``name``
    the module's qualified name inside the network (filled in by :func:`list_audio_layers`)."""

    index: int
    section: str
    block: int
    level: int
    name: str = ""


class AudioSwitch:
    """Per-layer switch state. ``off`` is ``None`` (layer on), ``True`` (off for every
    sample) or a bool tensor ``[B]`` over the model-call batch (True = off for that sample)."""

    __slots__ = ("off",)

    def __init__(self):
        self.off: Union[None, bool, torch.Tensor] = None

    def apply(self, out: torch.Tensor, audio_term_fn) -> torch.Tensor:
        """``out + audio_term_fn()`` with the switch applied. ``out`` has ``B·T`` rows in
        ``(b t)`` order (the UNet folds frames into the batch), so a per-sample mask over
        ``B`` is repeated over each sample's ``T`` rows."""
        off = self.off
        if off is None:
            return out + audio_term_fn()
        if off is True:
            return out
        rows = out.shape[0]
        if rows % off.numel():
            raise ValueError(f"audio_layers_off: samples mask has {off.numel()} entries, "
                             f"which does not divide the {rows} attention rows of this call")
        keep = ~off.to(out.device).repeat_interleave(rows // off.numel())
        if not bool(keep.any()):
            return out
        shape = (rows,) + (1,) * (out.dim() - 1)
        return torch.where(keep.view(shape), out + audio_term_fn(), out)


def _audio_modules(net: nn.Module) -> list[tuple[str, nn.Module]]:
    found = [(name, m) for name, m in net.named_modules() if getattr(m, "audio_layer_info", None) is not None]
    found.sort(key=lambda nm: nm[1].audio_layer_info.index)
    return found


def list_audio_layers(net: nn.Module) -> list[AudioLayerInfo]:
    """Every audio layer of ``net`` in forward order, with its qualified module name."""
    out = []
    for name, m in _audio_modules(net):
        info = m.audio_layer_info
        out.append(AudioLayerInfo(info.index, info.section, info.block, info.level, name))
    return out


LayerSelector = Union[None, Iterable[Union[str, int, AudioLayerInfo]]]


def _select(net: nn.Module, layers: LayerSelector) -> list[nn.Module]:
    mods = _audio_modules(net)
    if not mods:
        raise ValueError(f"{type(net).__name__} has no audio layers")
    if layers is None:
        return [m for _, m in mods]
    by_name = {name: m for name, m in mods}
    by_index = {m.audio_layer_info.index: m for _, m in mods}
    chosen = []
    for sel in layers:
        if isinstance(sel, AudioLayerInfo):
            sel = sel.name
        if isinstance(sel, bool):
            raise TypeError("audio_layers_off: layers must be names, indices or AudioLayerInfo, not bool")
        if isinstance(sel, int):
            if sel not in by_index:
                raise ValueError(f"audio_layers_off: no audio layer with index {sel} "
                                 f"(valid: 0..{len(mods) - 1})")
            chosen.append(by_index[sel])
        elif sel in by_name:
            chosen.append(by_name[sel])
        else:
            raise ValueError(f"audio_layers_off: no audio layer named {sel!r}")
    return chosen


@contextmanager
def audio_layers_off(net: nn.Module, layers: LayerSelector = None,
                     samples: Optional[Union[torch.Tensor, Sequence[bool]]] = None) -> Iterator[list[AudioLayerInfo]]:
    """Switch the audio term of ``layers`` (None = all; or names / forward-order indices /
    :class:`AudioLayerInfo` from :func:`list_audio_layers`) off for ``samples`` (a bool
    mask over the model-call batch ``B``; None = every sample). Restores the previous
    state on exit, also on error. Nested use is allowed; the inner state wins while it
    is active. Yields the infos of the switched layers."""
    chosen = _select(net, layers)
    if samples is None:
        off: Union[bool, torch.Tensor] = True
    else:
        off = torch.as_tensor(samples)
        if off.dtype != torch.bool or off.dim() != 1:
            raise ValueError("audio_layers_off: samples must be a 1-D bool mask over the model-call batch")
        off = off.clone()
    saved = [m.audio_switch.off for m in chosen]
    try:
        for m in chosen:
            m.audio_switch.off = off
        names = {id(m) for m in chosen}
        yield [i for i, (_, m) in zip(list_audio_layers(net), _audio_modules(net)) if id(m) in names]
    finally:
        for m, s in zip(chosen, saved):
            m.audio_switch.off = s
