"""KeyVID's keyframe localizer: the released checkpoint, its conversion, loading.

The release is ``KeyVID/wav2motion/best_model_version1_with_skip.pth`` in the HF repo
``RyanWW/KeyVID``: a pickled plain ``state_dict`` of ``ScoreModel_mel`` (the attribute
is spelled ``imagebindMoodel``, and the spelling is part of every key). It holds the
*whole* ImageBind-huge (vision, text, depth, thermal, IMU too) of which the localizer
uses only the audio preprocessor and trunk, plus ``linear1/2/3`` and two unused
scalars ``ada_weight``/``ada_bias``.

``avsync convert localizer IN.pth OUT.safetensors`` loads it with
``weights_only=True`` and keeps exactly the tensors the localizer computes with,
under their released names; the network's shape (width, depth, patch stride) is
read back from the tensors and the head count is stored in the file's metadata.
Nodes read only the safetensors file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..core.errors import ModelFormatError
from ..networks.imagebind_audio import (AUDIO_STEM, AUDIO_TRUNK, KeyframeLocalizerNet, LocalizerConfig,
                                        audio_trunk_key, count_audio_blocks, default_heads, infer_stride,
                                        released_audio_trunk_keys)
from .checked_file import load_pickled_checked, open_checked
from .model_files import ModelFileSpec, register

FOLDER = "avsync_localizer"
SOURCE = ("https://huggingface.co/RyanWW/KeyVID (file KeyVID/wav2motion/best_model_version1_with_skip.pth), "
          "then run: avsync convert localizer best_model_version1_with_skip.pth keyvid_localizer.safetensors")

SPEC = register(ModelFileSpec(
    key="keyvid_localizer",
    filename="keyvid_localizer.safetensors",
    folder=FOLDER,
    source=SOURCE,
    description="KeyVID keyframe localizer (ImageBind audio trunk, k16/s4, + linear head); "
                "only needed for method=learned",
    size="~350 MB (audio branch only, fp32)",
))

PREFIX = "imagebindMoodel."  # sic: the released attribute name
STEM = PREFIX + AUDIO_STEM
TRUNK = PREFIX + AUDIO_TRUNK
HEAD_KEYS = ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias", "linear3.weight", "linear3.bias")
FORMAT_TAG = "avsync_keyvid_localizer"

# released name -> our module's name for the stem and head; trunk blocks (and the stem) are
# mapped by the shared networks.imagebind_audio.audio_trunk_key, which the KeyVID loaders use too
_FIXED = {
    **{PREFIX + AUDIO_STEM + k: "trunk." + audio_trunk_key(PREFIX + AUDIO_STEM + k, PREFIX)
       for k in ("rgbt_stem.proj.weight", "rgbt_stem.norm_layer.weight", "rgbt_stem.norm_layer.bias",
                 "pos_embedding_helper.pos_embed")},
    **{k: k for k in HEAD_KEYS},
}


def _rename(key: str) -> Optional[str]:
    if key in _FIXED:
        return _FIXED[key]
    if key.startswith(TRUNK):
        new = audio_trunk_key(key, PREFIX)
        return None if new is None else "trunk." + new
    return None


def used_keys(state: dict) -> dict:
    """The released tensors the localizer computes with (released names)."""
    return {k: v for k, v in state.items() if _rename(k) is not None}


def _unwrap(obj) -> dict:
    """A plain state dict, also from ``{'state_dict': ...}`` or a DataParallel ``module.`` prefix."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelFormatError("not a state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def config_from_state(state: dict, num_heads: Optional[int] = None) -> LocalizerConfig:
    """Read the network's shape back from released-layout tensors."""
    try:
        conv = state[STEM + "rgbt_stem.proj.weight"]
        pos = state[STEM + "pos_embedding_helper.pos_embed"]
        lin1, lin2 = state["linear1.weight"], state["linear2.weight"]
    except KeyError as err:
        raise ModelFormatError(f"missing tensor {err.args[0]} (is this KeyVID's best_model_version1_with_skip?)") from None
    num_blocks = count_audio_blocks(state, PREFIX)
    d = int(conv.shape[0])
    kernel = int(conv.shape[-1])
    tokens = int(pos.shape[1])
    try:
        stride = infer_stride(tokens, kernel)
    except ValueError as err:
        raise ModelFormatError(str(err)) from None
    return LocalizerConfig(embed_dim=d, num_blocks=num_blocks, num_heads=int(num_heads or default_heads(d)),
                           kernel_size=kernel, stride=stride, num_outputs=int(lin1.shape[0]),
                           head_dim=int(lin2.shape[0]))


def convert_checkpoint(src: str | Path, dst: str | Path, num_heads: Optional[int] = None) -> dict:
    """``.pth`` (pickled, loaded with ``weights_only=True``) → safetensors. Returns a summary."""
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    state = _unwrap(load_pickled_checked(src, what="KeyVID's released localizer checkpoint "
                                                  "(best_model_version1_with_skip.pth)", mmap=False))
    keep = used_keys(state)
    cfg = config_from_state(keep, num_heads)
    # the file must be able to build the network it describes
    missing = sorted(set(_expected_keys(cfg)) - set(keep))
    if missing:
        raise ModelFormatError(f"{src}: missing {len(missing)} tensors, e.g. {missing[:3]}")
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in keep.items()}
    meta = {"format": FORMAT_TAG, "config": json.dumps(cfg.to_dict()), "source_file": src.name}
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata=meta)
    return {"kept": len(keep), "dropped": len(state) - len(keep), "config": cfg.to_dict()}


def _expected_keys(cfg: LocalizerConfig) -> list[str]:
    return released_audio_trunk_keys(cfg, PREFIX) + list(HEAD_KEYS)


def load_localizer(path: str | Path, dtype: torch.dtype = torch.float32) -> KeyframeLocalizerNet:
    """Build the network from a converted safetensors file (eval mode, on CPU)."""
    path = Path(path)
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise ModelFormatError(f"{path.name}: the localizer loads safetensors only; convert the release with "
                               f"`avsync convert localizer IN.pth OUT.safetensors`")
    checked = open_checked(path, what="a converted KeyVID localizer (keyvid_localizer.safetensors)",
                           required_prefixes=(STEM, TRUNK, "linear1."), family_hint=f"get it from {SOURCE}")
    meta = checked.metadata
    state = {k: checked[k] for k in checked}
    if "config" in meta:
        cfg = LocalizerConfig(**json.loads(meta["config"]))
    else:
        cfg = config_from_state(state)
    renamed = {}
    for k, v in state.items():
        new = _rename(k)
        if new is not None:
            renamed[new] = v
    net = KeyframeLocalizerNet(cfg)
    try:
        result = net.load_state_dict(renamed, strict=False)
    except RuntimeError as err:  # shape mismatch
        raise ModelFormatError(f"{path.name}: tensors do not fit the localizer they describe ({err})") from None
    if result.missing_keys:
        raise ModelFormatError(f"{path.name}: missing {len(result.missing_keys)} localizer tensors "
                               f"(e.g. {result.missing_keys[:3]}); is it a converted KeyVID localizer?")
    return net.to(dtype).eval()
