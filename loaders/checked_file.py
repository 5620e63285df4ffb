"""One checked way to open a model file, so that every loader reports a broken file the same way.

A model file can be empty (a failed download), truncated (an interrupted copy), garbage
(an HTML error page saved as ``.safetensors``), a pickled checkpoint renamed to
``.safetensors``, or a good file of the wrong family (an SD image checkpoint where SVD-XT
was expected). Read directly, each of these surfaces as a different library error
(``SafetensorError: header too small``, ``KeyError``, a shape mismatch deep inside
``load_state_dict``). Here each becomes one :class:`~avsync.core.errors.ModelFormatError`
that names the file, what is wrong with it and what was expected.

* :func:`open_checked` — a safetensors file, checked before anything is read, returned
  as a lazy read-only mapping (memory-mapped; a tensor is read when it is accessed, in
  the dtype it is stored in). Shapes and dtypes are available from the header without
  reading any tensor (:meth:`CheckedSafetensors.shape`).
* :func:`load_pickled_checked` — a pickled PyTorch checkpoint (``.pth``/``.ckpt``/``.bin``),
  read with ``torch.load(weights_only=True)`` for the converters; unwraps
  ``state_dict`` / ``model`` / ``module`` nesting and returns the tensors.

The safetensors layout (https://github.com/huggingface/safetensors, README "Format"): 8 bytes
little-endian header length ``N``, ``N`` bytes of UTF-8 JSON (``name -> {dtype, shape,
data_offsets}`` plus optional ``__metadata__``: str -> str), then the data buffer, which
the tensors' ``data_offsets`` must cover exactly.

Usage (what other loaders should call)::

    from .checked_file import open_checked
    state = open_checked(path, what="SVD-XT single file (svd_xt.safetensors)",
                         required_prefixes=("model.diffusion_model.", "first_stage_model."),
                         family_hint="download svd_xt.safetensors from ...")
    state.metadata            # the file's __metadata__ (dict of str)
    state.shape("some.key")   # from the header, nothing read
    state["some.key"]         # read now, stored dtype
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Optional

import torch

from ..core.errors import ModelFormatError

# bytes per element of each safetensors dtype (F4 / F6 types are sub-byte: size not checked)
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8,
}
# safetensors refuses headers over 100 MB (safetensors/src/tensor.rs: MAX_HEADER_SIZE)
MAX_HEADER_BYTES = 100_000_000

# Families recognised by their tensor names, to tell a user *what* they gave instead (first match wins).
_FAMILIES = (
    (("model.diffusion_model.time_stack", "model.diffusion_model.input_blocks.0.0.time_stack"),
     "a Stable Video Diffusion single-file checkpoint"),
    (("model.diffusion_model.joint_blocks",), "a Stable Diffusion 3 checkpoint"),
    (("model.diffusion_model.double_blocks",), "a Flux checkpoint"),
    (("conditioner.embedders.1.model.",), "a Stable Diffusion XL checkpoint"),
    (("model.diffusion_model.",), "a Stable Diffusion (ldm layout) checkpoint"),
    (("imagebindMoodel.",), "KeyVID's keyframe localizer"),
    (("_encoders.", "_cross_net."), "an MRX demix model"),
    (("band_split.norm_fc_modules.", "model.band_split.norm_fc_modules."), "a BandIt demix model"),
    (("down_blocks.", "up_blocks.", "conv_in."), "a diffusers UNet or VAE"),
    (("encoder.down.", "decoder.up."), "a VAE"),
    (("vision_model.", "text_model."), "a CLIP (transformers) encoder"),
    (("lora_unet_", "lora_te_"), "a LoRA"),
)


def describe_family(keys: Iterable[str]) -> Optional[str]:
    """A short guess at what a file holds, from its tensor names (None if unknown)."""
    keys = list(keys)
    for prefixes, name in _FAMILIES:
        if any(k.startswith(prefixes) for k in keys):
            return name
    if any(".lora_down." in k or ".lora_A." in k for k in keys):
        return "a LoRA"
    return None


def _fail(path: Path, problem: str, what: str, family_hint: Optional[str]) -> ModelFormatError:
    msg = f"{path}: {problem}; expected {what}"
    if family_hint:
        msg += f" ({family_hint})"
    return ModelFormatError(msg)


def _check_path(path: Path, what: str, family_hint: Optional[str]) -> int:
    """The file's size, after refusing a missing path, a directory and an empty file."""
    if not path.exists():
        raise _fail(path, "no such file", what, family_hint)
    if path.is_dir():
        raise _fail(path, "is a directory, not a file", what, family_hint)
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as err:
        raise _fail(path, f"cannot be read ({err.strerror or err})", what, family_hint) from None
    if size == 0:
        raise _fail(path, "the file is empty (0 bytes: an interrupted download?)", what, family_hint)
    return size


def _sniff(head: bytes) -> Optional[str]:
    """What a non-safetensors file looks like, from its first bytes."""
    if head.startswith(b"PK\x03\x04"):
        return "a pickled PyTorch checkpoint (zip), not safetensors: convert it with `avsync convert` first"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickled checkpoint, not safetensors: convert it with `avsync convert` first"
    if head.startswith(b"GGUF"):
        return "a GGUF file, not safetensors"
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype", b"<html", b"<?xml")):
        return "an HTML/XML page (a failed download?), not safetensors"
    if stripped.startswith(b"version https://git-lfs"):
        return "a git LFS pointer (the weights were not pulled), not safetensors"
    return None


def read_safetensors_header(path, *, what: str = "a safetensors file", family_hint: Optional[str] = None) -> dict:
    """The parsed, checked header of a safetensors file (``__metadata__`` included).

    Checks, without reading any tensor: the length field fits the file, the header is
    JSON of the documented shape, every tensor's byte range fits its dtype and shape,
    and the tensors cover the data buffer exactly (a truncated or padded file fails).
    """
    path = Path(path)
    size = _check_path(path, what, family_hint)
    with open(path, "rb") as f:
        head = f.read(8)
        sniffed = _sniff(head + f.read(56))
        if sniffed:
            raise _fail(path, f"is {sniffed}", what, family_hint)
        if size < 8:
            raise _fail(path, f"is only {size} bytes, too short for a safetensors header", what, family_hint)
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise _fail(path, f"is not a safetensors file (its header length field says {n} bytes; the file has "
                              f"{size} bytes)", what, family_hint)
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _fail(path, "is not a safetensors file (its header is not JSON)", what, family_hint) from None
    if not isinstance(header, dict):
        raise _fail(path, "is not a safetensors file (its header is not a JSON object)", what, family_hint)
    data_bytes = size - 8 - n
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise _fail(path, "has a malformed __metadata__ (must map strings to strings)", what, family_hint)
            continue
        try:
            dtype, shape, (start, stop) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
            start, stop = int(start), int(stop)
        except (KeyError, TypeError, ValueError):
            raise _fail(path, f"has a malformed header entry for tensor '{name}'", what, family_hint) from None
        if not 0 <= start <= stop or any(s < 0 for s in shape):
            raise _fail(path, f"has an invalid byte range or shape for tensor '{name}'", what, family_hint)
        per = _DTYPE_BYTES.get(dtype)
        if per is not None and (stop - start) != per * math.prod(shape):
            raise _fail(path, f"tensor '{name}' ({dtype} {shape}) needs {per * math.prod(shape)} bytes but its "
                              f"header gives {stop - start}", what, family_hint)
        end = max(end, stop)
    if end > data_bytes:
        raise _fail(path, f"is truncated: its header describes {end + 8 + n} bytes but the file has {size} "
                          f"({end - data_bytes} missing: an interrupted download or copy?)", what, family_hint)
    if end < data_bytes:
        raise _fail(path, f"has {data_bytes - end} bytes after the last tensor (damaged or not written by "
                          f"safetensors)", what, family_hint)
    return header


class CheckedSafetensors(Mapping):
    """Read-only ``name -> tensor`` over one checked safetensors file, read on access (memory-mapped).

    Tensors keep their stored dtype. ``metadata`` is the file's ``__metadata__``; ``shape``
    and ``dtype_name`` answer from the header without reading."""

    def __init__(self, path: Path, header: dict, what: str, family_hint: Optional[str]):
        from safetensors import safe_open

        self.path = path
        self.what = what
        self._family_hint = family_hint
        self.metadata: dict[str, str] = dict(header.get("__metadata__") or {})
        self._info = {k: v for k, v in header.items() if k != "__metadata__"}
        try:
            self._handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as err:  # the header passed our checks; anything left is still the file's fault
            raise _fail(path, f"cannot be opened as safetensors ({err})", what, family_hint) from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self._info[key]["shape"])

    def dtype_name(self, key: str) -> str:
        return self._info[key]["dtype"]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._info:
            raise KeyError(key)
        try:
            return self._handle.get_tensor(key)
        except Exception as err:  # e.g. a dtype this torch cannot hold
            raise _fail(self.path, f"tensor '{key}' cannot be read ({err})", self.what, self._family_hint) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._info)

    def __len__(self) -> int:
        return len(self._info)

    def __contains__(self, key: object) -> bool:
        return key in self._info

    def __repr__(self) -> str:
        return f"CheckedSafetensors({self.path.name}: {len(self)} tensors)"


def _check_family(path: Path, keys: list[str], what: str, required_prefixes: Iterable[str],
                  family_hint: Optional[str]) -> None:
    required = [p for p in required_prefixes]
    missing = [p for p in required if not any(k.startswith(p) for k in keys)]
    if not keys and required:
        raise _fail(path, "holds no tensors", what, family_hint)
    if missing:
        looks = describe_family(keys)
        shown = ", ".join(f"{p}*" for p in missing)
        problem = f"has no tensors under {shown}" + (f"; it looks like {looks}" if looks else "")
        raise _fail(path, problem, what, family_hint)


def open_checked(path, *, what: str, required_prefixes: Iterable[str] = (),
                 family_hint: str | None = None) -> Mapping[str, torch.Tensor]:
    """Open a safetensors model file after checking it; a lazy :class:`CheckedSafetensors`.

    ``what`` says what was expected ("SVD-XT single file (svd_xt.safetensors)"); it ends every
    error message. Each of ``required_prefixes`` must start at least one tensor name (the
    family check: a file of another family fails with a guess at what it is).
    ``family_hint`` is added to every error (where to get the right file, how to convert).
    Raises :class:`~avsync.core.errors.ModelFormatError` for a missing, empty, truncated,
    garbage or wrong-family file; nothing has been read into memory by then.
    """
    path = Path(os.fspath(path))
    header = read_safetensors_header(path, what=what, family_hint=family_hint)
    _check_family(path, [k for k in header if k != "__metadata__"], what, required_prefixes, family_hint)
    return CheckedSafetensors(path, header, what, family_hint)


def load_pickled_checked(path, *, what: str, required_prefixes: Iterable[str] = (),
                         family_hint: str | None = None, mmap: bool = True,
                         safe_globals: Iterable = ()) -> dict[str, torch.Tensor]:
    """The tensors of a pickled PyTorch checkpoint, read with ``torch.load(weights_only=True)``.

    Unwraps ``{"state_dict": ...}`` (Lightning), ``{"model": ...}`` / ``{"module": ...}`` nesting;
    non-tensor entries are dropped. Same checks and errors as :func:`open_checked`.
    ``safe_globals``: extra globals the weights-only unpickler may build for this file only
    (``torch.serialization.safe_globals``; e.g. the numpy RNG state DeepSpeed saves, see
    ``loaders/mtv.py:sat_safe_globals``).
    """
    path = Path(os.fspath(path))
    size = _check_path(path, what, family_hint)
    with open(path, "rb") as f:
        head = f.read(64)
    sniffed = _sniff(head)
    if sniffed and "pickled" not in sniffed:
        raise _fail(path, f"is {sniffed.replace(', not safetensors', '')}, not a pickled PyTorch checkpoint",
                    what, family_hint)
    if size >= 10 and head[8:10] in (b'{"', b"{ "):
        raise _fail(path, "is a safetensors file, not a pickled checkpoint: give it to the loader directly",
                    what, family_hint)
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap and head.startswith(b"PK"))
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _fail(path, f"cannot be read as a weights-only PyTorch checkpoint ({first[:300]})", what,
                    family_hint) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise _fail(path, f"holds a {type(obj).__name__}, not a state dict", what, family_hint)
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state:
        raise _fail(path, "holds no tensors", what, family_hint)
    _check_family(path, list(state), what, required_prefixes, family_hint)
    return state

