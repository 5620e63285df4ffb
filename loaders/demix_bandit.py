"""BandIt v2 model files: the released Lightning checkpoints (``kwatcharasupat/bandit-v2``,
weights on Zenodo record 12701995), their conversion to safetensors, and building
:class:`~avsync.networks.bandit_v2.BanditV2` from a converted file.

A released ``.ckpt`` is a PyTorch Lightning checkpoint of ``src/system/system.py:System``:
``{"epoch", "global_step", "pytorch-lightning_version", "state_dict", "loops",
"callbacks", "optimizer_states", "lr_schedulers"}``, all plain containers, tensors and
numbers, so ``torch.load(weights_only=True)`` reads it with no allowlisting (checked on a
checkpoint written by ``pytorch_lightning`` 2.6.6's ``Trainer.save_checkpoint``). Its
``state_dict`` holds

* ``model.*``: the network (``src/models/bandit/bandit.py:Bandit``), including three kinds
  of derived tensors that conversion *checks* and then drops: the STFT windows
  (``stft.window``, ``istft.window``: periodic Hann), the per-band frequency weights
  (``mask_estim.<stem>.freq_weights/<i>``, float64: they pin down the band layout, which
  depends on n_fft and the band count only, not on the rate) and the ``combined.*`` aliases of each
  mask MLP (the same tensors registered twice);
* ``inference_handler.scaled_window``: ``hann_window(chunk) / (chunk / (2 hop))`` of the
  chunker it was evaluated with, from which the chunk and hop are read.

The converted file holds the remaining ``state_dict`` keys (without ``model.``) and the
metadata ``avsync_family = "bandit_v2"`` and ``avsync_config`` (the JSON of
:class:`~avsync.networks.bandit_v2.BanditV2Config`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch

from ..core.errors import ModelFormatError

FAMILY = "bandit_v2"
REQUIRED_PREFIXES = ("band_split.norm_fc_modules.", "tf_model.seqband.", "mask_estim.")
_ALIAS = re.compile(r"^(mask_estim\.[^.]+\.norm_mlp\.\d+\.)combined\.(0|1\.0|2\.0)\.(weight|bias)$")
_ALIAS_TARGET = {"0": "norm", "1.0": "hidden.0", "2.0": "output.0"}
_FREQ_WEIGHTS = re.compile(r"^mask_estim\.([^.]+)\.freq_weights/(\d+)$")


def looks_like_bandit(keys) -> bool:
    return any(k.startswith(("band_split.norm_fc_modules.", "model.band_split.norm_fc_modules.")) for k in keys)


def split_lightning_state(sd: dict) -> tuple[dict, dict]:
    """``(network state, other System state)``: the ``model.`` prefix removed (and a
    ``torch.compile`` ``_orig_mod.`` prefix, should a checkpoint carry one)."""
    if not any(k.startswith("model.") for k in sd):
        return dict(sd), {}
    net, other = {}, {}
    for k, v in sd.items():
        if k.startswith("model."):
            k = k[len("model."):]
            net[k.replace("_orig_mod.", "")] = v
        else:
            other[k] = v
    return net, other


def chunking_from_window(scaled_window: torch.Tensor, sample_rate: int) -> tuple[float, float]:
    """Chunk and hop in seconds from the chunker's stored ``hann / (chunk / (2 hop))``."""
    chunk = int(scaled_window.shape[-1])
    scaler = 1.0 / float(scaled_window.double().max())
    hop = round(chunk / (2.0 * scaler))
    return chunk / sample_rate, hop / sample_rate


def canonical_state(sd: dict, net, path) -> dict:
    """Check the derived tensors against what ``net``'s config builds, drop them, and
    return the state that :class:`BanditV2` loads strictly."""
    from ..core.stft import hann

    out = {}
    n_fft = net.config.n_fft
    for k, v in sd.items():
        if k in ("stft.window", "istft.window"):
            if v.shape != (n_fft,) or not torch.allclose(v.double(), hann(n_fft).double(), atol=1e-6):
                raise ModelFormatError(f"{path}: {k} is not a periodic Hann window of {n_fft} samples; "
                                       f"this is not a released BandIt v2 STFT")
            continue
        m = _FREQ_WEIGHTS.match(k)
        if m:
            i = int(m.group(2))
            ours = net.freq_weights[i] if i < len(net.freq_weights) else None
            if ours is None or v.shape != ours.shape or not torch.allclose(v.double(), ours.double(), atol=1e-6):
                raise ModelFormatError(
                    f"{path}: band {i}'s stored frequency weights ({k}) do not match the musical band layout of "
                    f"n_fft {n_fft} with {net.config.n_bands} bands; not a released BandIt v2 layout")
            continue
        m = _ALIAS.match(k)
        if m:
            target = f"{m.group(1)}{_ALIAS_TARGET[m.group(2)]}.{m.group(3)}"
            if target in sd and not torch.equal(sd[target], v):
                raise ModelFormatError(f"{path}: {k} differs from {target} (they are one module in the reference)")
            if target not in sd:
                out[target] = v
            continue
        out[k] = v
    return out


def config_and_state(raw: dict, path, sample_rate: int, stems: Optional[list] = None, hop_length: int = 512):
    """``(config, state)`` of a released checkpoint's tensors (``model.`` prefixed or not)."""
    from ..networks.bandit_v2 import BanditV2, config_from_state_dict

    sd, other = split_lightning_state(raw)
    missing = [p for p in REQUIRED_PREFIXES if not any(k.startswith(p) for k in sd)]
    if missing:
        raise ModelFormatError(f"{path}: not a BandIt v2 checkpoint (no tensors under {', '.join(missing)})")
    if stems:
        stored = list(dict.fromkeys(k.split(".")[1] for k in sd if k.startswith("mask_estim.")))
        if sorted(stems) != sorted(stored):
            raise ModelFormatError(f"{path}: its stems are {', '.join(stored)}; --sources can only reorder them, "
                                   f"got {', '.join(stems)}")
    fixed = {"hop_length": int(hop_length)}
    if "inference_handler.scaled_window" in other:
        fixed["chunk_seconds"], fixed["hop_seconds"] = chunking_from_window(other["inference_handler.scaled_window"],
                                                                            sample_rate)
    try:
        cfg = config_from_state_dict(sd, sample_rate=sample_rate, stems=stems, **fixed)
    except (KeyError, IndexError, ValueError) as err:
        raise ModelFormatError(f"{path}: not a BandIt v2 state dict (cannot read its sizes: {err})") from None
    try:
        net = BanditV2(cfg)
    except ValueError as err:
        raise ModelFormatError(f"{path}: BandIt v2 config {cfg.to_dict()} does not build: {err}") from None
    return cfg, canonical_state(sd, net, path), net


def load_strict(net: torch.nn.Module, sd: dict, path) -> None:
    try:
        missing, unexpected = net.load_state_dict(sd, strict=False)
    except RuntimeError as err:   # shape mismatches
        first = str(err).strip().splitlines()
        raise ModelFormatError(f"{path}: does not match the BandIt v2 layout of its config "
                               f"({' '.join(first[1:3]).strip()[:300]})") from None
    if missing or unexpected:
        raise ModelFormatError(f"{path}: does not match the BanditV2 layout (missing: {missing[:5]}, "
                               f"unexpected: {unexpected[:5]})")


def convert(raw: dict, src: Path, dst: Path, sample_rate: int, stems: Optional[list] = None,
            hop_length: int = 512) -> Path:
    from safetensors.torch import save_file

    cfg, sd, net = config_and_state(raw, src, sample_rate, stems, hop_length)
    load_strict(net, sd, src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(dst),
              metadata={"avsync_family": FAMILY, "avsync_config": json.dumps(cfg.to_dict())})
    return dst


def build(sd: dict, meta: dict, path):
    """``(net, config)`` of a converted file's tensors and metadata."""
    from ..networks.bandit_v2 import BanditV2, BanditV2Config

    if "avsync_config" in meta:
        try:
            cfg = BanditV2Config(**json.loads(meta["avsync_config"]))
        except (TypeError, ValueError) as err:
            raise ModelFormatError(f"{path}: bad avsync_config metadata for BandIt v2 ({err})") from None
        net = BanditV2(cfg)
        sd = canonical_state(sd, net, path)
    else:    # a state dict converted by another tool (e.g. a plain state_dict export): released defaults
        cfg, sd, net = config_and_state(sd, path, 48000)
    load_strict(net, sd, path)
    return net, cfg
