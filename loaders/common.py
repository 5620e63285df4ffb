"""Loading helpers every model family shares (moved here from ``loaders/svd.py`` and
``loaders/keyvid.py`` so that new families import them from one neutral place).

* :func:`_meta_module` builds a network on the ``meta`` device (no random init, no memory);
  :func:`_assign` then loads a state dict into it strictly (``assign=True``: the file's tensors
  become the parameters, no copy) and :func:`check_state_fits` names missing / unexpected /
  mis-shaped tensors first.
* :func:`_cast_all` reads a lazy mapping one tensor at a time in the wanted dtype;
  :class:`_View` is a lazy prefix-stripped view of a mapping.
* :func:`write_safetensors_streamed` writes a safetensors file one tensor at a time (temp name +
  rename, sha256 on the fly); :func:`sha256_file`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..core.errors import ModelFormatError


def _import_model_libraries() -> None:
    """Import the diffusers / transformers model modules before a meta-device build.

    Their modules load lazily on first use, and transformers' CLIP code pulls in torchaudio
    (when installed) as it does: inside ``torch.device("meta")`` every tensor those imports
    create at module level lands on the meta device for the rest of the process (torchaudio's
    ``compliance.kaldi.EPSILON``: every later kaldi fbank call in ComfyUI, ours or another
    pack's, would fail). Importing them outside the context creates those tensors normally."""
    import diffusers.models  # noqa: F401
    from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection  # noqa: F401


def _meta_module(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    _import_model_libraries()
    with torch.device("meta"):
        return build()


def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    """Load ``state`` into a meta-built module (exact key match) and check nothing stayed on meta."""
    check_state_fits(module.state_dict(), state, what)
    module.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers are not in the file: recreate the ones these networks have.
    for name, buf in list(module.named_buffers()):
        if buf.is_meta:
            if name.endswith("position_ids"):
                owner = module.get_submodule(name.rsplit(".", 1)[0])
                owner.register_buffer(
                    "position_ids", torch.arange(buf.shape[-1]).expand(tuple(buf.shape)), persistent=False
                )
            else:
                raise ModelFormatError(f"{what}: buffer {name} was not initialised")
    leftover = [n for n, p in module.named_parameters() if p.is_meta]
    if leftover:
        raise ModelFormatError(f"{what}: parameters left uninitialised: {', '.join(leftover[:4])}")
    return module.eval().requires_grad_(False)


def check_state_fits(own: Mapping[str, Any], state: Mapping[str, Any], what: str,
                     shown: Callable[[str], str] = lambda k: k) -> None:
    """Raise :class:`ModelFormatError` naming missing / unexpected / mis-shaped tensors unless
    ``state`` has exactly the names and shapes of ``own``. Values are tensors (meta ones do) or
    shape tuples; ``shown`` turns a name into the one the user's file has (e.g. with its prefix)."""
    def shape(v):
        return tuple(v.shape) if hasattr(v, "shape") else tuple(v)

    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ModelFormatError(
            f"{what}: the weights do not match the network built from the config"
            + (f"; missing {len(missing)} (e.g. {', '.join(shown(k) for k in missing[:4])})" if missing else "")
            + (f"; unexpected {len(unexpected)} (e.g. {', '.join(shown(k) for k in unexpected[:4])})"
               if unexpected else "")
        )
    bad = [k for k in sorted(state) if shape(state[k]) != shape(own[k])]
    if bad:
        k = bad[0]
        raise ModelFormatError(
            f"{what}: {len(bad)} tensors have the wrong shape, e.g. {shown(k)}: file {shape(state[k])} "
            f"vs network {shape(own[k])}"
        )


def _cast_all(state: Mapping, dtype: torch.dtype, names: Optional[Mapping[str, str]] = None) -> dict:
    """Read every tensor of ``state`` (optionally renamed via ``names``: new -> old) cast to ``dtype``.

    Only floating tensors are cast; each source tensor is read and converted on its own, so the
    peak is the converted model plus one tensor.
    """
    out = {}
    items = names.items() if names is not None else ((k, k) for k in state)
    for new, old in items:
        t = state[old]
        out[new] = t.to(dtype) if t.is_floating_point() else t
    return out


class _View(Mapping):
    def __init__(self, state: Mapping, prefix: str):
        self._state, self._prefix = state, prefix
        self._keys = [k[len(prefix):] for k in state if k.startswith(prefix)]

    def __getitem__(self, k):
        return self._state[self._prefix + k]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)



_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def write_safetensors_streamed(path, tensors: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype],
                               metadata: Mapping[str, str]) -> tuple[str, int]:
    """Write a safetensors file one tensor at a time (cast on the fly); return ``(sha256, bytes)``.

    The header is computed from shapes alone, so the peak is one converted tensor. The file is
    written to ``<name>.partial`` and renamed when complete: an error leaves no half-written file.
    """
    path = Path(path)
    names = sorted(tensors, key=lambda k: (-torch.empty((), dtype=dtypes[k]).element_size(), k))
    header: dict[str, Any] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    # a lazy mapping that knows its shapes (``shape(key)``) spares reading every tensor twice
    shape_of = tensors.shape if callable(getattr(tensors, "shape", None)) else (lambda k: tuple(tensors[k].shape))
    offset = 0
    for k in names:
        shape = [int(s) for s in shape_of(k)]
        size = math.prod(shape) * torch.empty((), dtype=dtypes[k]).element_size()
        header[k] = {"dtype": _ST_DTYPES[dtypes[k]], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    digest = hashlib.sha256()
    tmp = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            for chunk in (struct.pack("<Q", len(blob)), blob):
                f.write(chunk)
                digest.update(chunk)
            for k in names:
                t = tensors[k].detach().to(device="cpu", dtype=dtypes[k]).contiguous()
                if list(t.shape) != header[k]["shape"]:
                    raise ModelFormatError(f"{k}: tensor shape {list(t.shape)} differs from the announced "
                                           f"{header[k]['shape']}")
                raw = t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b""
                f.write(raw)
                digest.update(raw)
                del t
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest.hexdigest(), 8 + len(blob) + offset


def sha256_file(path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def count_indexed(keys, pattern: str) -> int:
    """How many numbered parts (``layers.0.…``, ``layers.1.…``) ``keys`` hold: one more than the largest
    index that ``pattern``'s first group captures at the start of a key (0 when none matches)."""
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0
