"""KeyVID's released checkpoints: conversion to per-component safetensors, and loading.

The release (HF ``RyanWW/KeyVID``, notes A6) is two PyTorch Lightning ``.ckpt`` files of
``lvdm.models.ddpm3d.LatentVisualAudioDiffusion`` (~15.6 GB fp32 each):

* ``KeyVID/keyframe_generation/generator_checkpoint.ckpt`` — the keyframe generator;
* ``KeyVID/interpolation/epoch=3669-step=58720.ckpt`` — the interpolator that
  ``scripts/generation.sh`` uses.

``ckpt["state_dict"]`` holds every sub-module under its attribute name; this module splits
it into components (released names, prefix removed) and writes each as safetensors:

=====================  ======================================  ===============================
component              released prefix                          network it loads into
=====================  ======================================  ===============================
``unet``  (per role)   ``model.diffusion_model.``              ``networks.keyvid_unet.KeyVIDUNet``
``image_proj`` (role)  ``image_proj_model.``                   ``networks.keyvid_resampler.Resampler``
``vae``                ``first_stage_model.``                  diffusers ``AutoencoderKL``
``text_encoder``       ``cond_stage_model.model.``             transformers ``CLIPTextModel``
``image_encoder``      ``embedder.model.visual.``              transformers ``CLIPVisionModelWithProjection``
``imagebind_audio``    ``imagebind_model.modality_{preprocessors,trunks}.audio.``  ImageBind audio trunk
``schedule``           ``betas``, ``alphas_cumprod``, …, ``scale_arr``  (kept fp32, for the sampler)
=====================  ======================================  ===============================

Dropped on purpose (counted and reported by the converter): ``audio_proj_model.*``
(``AudioResampler.forward`` raises ``NotImplementedError``; only its attributes are used),
``embedder.model.*`` outside ``visual.`` (``FrozenOpenCLIPImageEmbedderV2`` deletes only
``model.transformer``, so the text tower's embeddings, ``ln_final``, ``text_projection`` and
``logit_scale`` stay in the checkpoint unused), and every ImageBind modality, head and
post-processor other than the audio preprocessor and trunk (``ImageBindModel.forward_audio``
returns the trunk output). Anything else is an error that names the key.

Components that both checkpoints hold (``vae``, ``text_encoder``, ``image_encoder``,
``imagebind_audio``, ``schedule``) are compared tensor by tensor and stored once
(``keyvid_<component>.safetensors``); one that differs is stored for its role
(``keyvid_<role>_<component>.safetensors``) and the differing tensors are named.

The interpolator's ImageBind does not come from its checkpoint: the released pipeline
(``scripts/evaluation/asva/pipeline_audio_cond_animation_freenoise_inpainting_new.py:
load_model_checkpoint``) drops every ``imagebind_model`` key and calls
``LatentVisualAudioDiffusion.load_pretrained_imagebind_model``, which loads
``imagebind_huge.pth`` (facebookresearch/ImageBind, CC-BY-NC 4.0) with the audio positional
embedding stretched by ``ddpm3d.py:interpolate_pos_embed`` (bilinear, 12 × 19 → 12 × 48, the
CLS row kept). The converter does the same from ``--imagebind imagebind_huge.pth``.

Each UNet file's metadata names its companion files (and their sha256), so a loader needs
only the UNet file's name. Writing is streamed: the checkpoint is memory-mapped
(``torch.load(mmap=True, weights_only=True)``) and each tensor is cast and written on its own,
so converting holds one tensor at a time, not the checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from .. import compat
from ..core.errors import InputError, MissingModelError, ModelFormatError
from ..core.modules import module_bytes
from .common import (
    _ST_DTYPES,
    _assign,
    _cast_all,
    _meta_module,
    _View,
    check_state_fits,
    sha256_file,
    write_safetensors_streamed,
)
from .model_files import ModelFileSpec, register
from .svd import (
    DTYPES,
    OPENCLIP_VIT_H_HEAD_DIM,
    _is_vae_1x1_attention,
    auto_precision,
    build_clip_from_openclip,
    infer_clip_config,
    openclip_resblocks_to_transformers,
    parse_dtype,
    svd_vae_key_map,
)

__all__ = [
    "ROLES", "COMPONENTS", "KeyVIDModel", "convert_checkpoints", "load_keyvid", "load_component",
    "read_lightning_checkpoint", "split_checkpoint", "parse_dtype", "auto_precision",
]

ROLES = ("generator", "interpolator")
FOLDER = "avsync_keyvid"
FORMAT_TAG = "avsync_keyvid"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."
IMAGE_PREFIX = "embedder.model."
IMAGE_PROJ_PREFIX = "image_proj_model."
AUDIO_PROJ_PREFIX = "audio_proj_model."
IMAGEBIND_PREFIX = "imagebind_model."
IMAGEBIND_AUDIO_PARTS = ("modality_preprocessors.audio.", "modality_trunks.audio.")

#: ``ddpm3d.py:DDPM.register_schedule`` / ``LatentDiffusion.__init__`` persistent buffers
#: (``lvlb_weights`` is not persistent; ``scale_factor`` is a buffer only with ``scale_by_std``).
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "scale_arr",
)

#: component -> (stored per role?, what it is, for messages)
COMPONENTS: dict[str, tuple[bool, str]] = {
    "unet": (True, "KeyVID UNet (model.diffusion_model.*)"),
    "image_proj": (True, "image Resampler (image_proj_model.*)"),
    "vae": (False, "KL VAE (first_stage_model.*)"),
    "text_encoder": (False, "OpenCLIP ViT-H text encoder (cond_stage_model.model.*)"),
    "image_encoder": (False, "OpenCLIP ViT-H image encoder (embedder.model.visual.*)"),
    "imagebind_audio": (False, "ImageBind audio preprocessor + trunk (imagebind_model.modality_*.audio.*)"),
    "schedule": (False, "diffusion schedule buffers (betas, alphas_cumprod, ..., scale_arr)"),
}
_RELEASED_PREFIX = {
    "unet": UNET_PREFIX, "image_proj": IMAGE_PROJ_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_PREFIX,
    "image_encoder": IMAGE_PREFIX, "imagebind_audio": IMAGEBIND_PREFIX, "schedule": "",
}

# --------------------------------------------------------------------------------------
# Facts about the release (configs/inference/keyframe_{generation,interpolation}.yaml)
# --------------------------------------------------------------------------------------

#: ``first_stage_config.params`` (both yamls).
RELEASED_VAE_PARAMS: dict[str, Any] = {
    "embed_dim": 4,
    "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                 "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0},
}
RELEASED_SCALE_FACTOR = 0.18215
#: ``image_proj_stage_config.params`` (both yamls).
RELEASED_IMAGE_PROJ_PARAMS: dict[str, Any] = {
    "dim": 1024, "depth": 4, "dim_head": 64, "heads": 12, "num_queries": 16, "embedding_dim": 1280,
    "output_dim": 1024, "ff_mult": 4, "video_length": 48,
}
#: ``audio_proj_stage_config.params.video_length``: ``LatentVisualAudioDiffusion.__init__`` picks the
#: ImageBind audio stride from it (``networks.imagebind_audio.keyvid_diffusion_audio_config``).
RELEASED_AUDIO_VIDEO_LENGTH = 48
OPENCLIP_TEXT_HEAD_DIM = 64  # ViT-H-14 text: width 1024, 16 heads

DEFAULT_FILENAMES = {
    ("generator", "unet"): "keyvid_generator_unet.safetensors",
    ("interpolator", "unet"): "keyvid_interpolator_unet.safetensors",
}


def component_filename(component: str, role: Optional[str] = None) -> str:
    """``keyvid_<component>.safetensors`` when shared, ``keyvid_<role>_<component>.safetensors`` per role."""
    return f"keyvid_{role}_{component}.safetensors" if role else f"keyvid_{component}.safetensors"


RELEASE_REPO = "https://huggingface.co/RyanWW/KeyVID"
RELEASE_FILES = {
    "generator": "KeyVID/keyframe_generation/generator_checkpoint.ckpt",
    "interpolator": "KeyVID/interpolation/epoch=3669-step=58720.ckpt",
}
IMAGEBIND_URL = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"
CONVERT_COMMAND = ("avsync convert keyvid generator_checkpoint.ckpt 'epoch=3669-step=58720.ckpt' "
                   "--imagebind imagebind_huge.pth --out models/avsync/keyvid --dtype fp16")
SOURCE = (f"{RELEASE_REPO} ({RELEASE_FILES['generator']} and {RELEASE_FILES['interpolator']}) plus "
          f"imagebind_huge.pth ({IMAGEBIND_URL}, facebookresearch/ImageBind, CC-BY-NC 4.0) for the interpolator; "
          f"convert them once with: {CONVERT_COMMAND}")

SPECS = {
    role: register(ModelFileSpec(
        key=f"keyvid_{role}", filename=DEFAULT_FILENAMES[(role, "unet")], folder=FOLDER, source=SOURCE,
        description=f"KeyVID {role} UNet; its companion files (VAE, encoders, resampler, ImageBind audio, "
                    f"schedule) are named in its metadata and live in the same folder",
    ))
    for role in ROLES
}


#: The companion files ``avsync info`` lists (their default names: shared components stored once).
COMPANION_SPECS = {
    (comp, role): register(ModelFileSpec(
        key=f"keyvid_{role}_{comp}" if role else f"keyvid_{comp}", filename=component_filename(comp, role),
        folder=FOLDER, source=SOURCE, description=f"KeyVID {COMPONENTS[comp][1]}" + (f", {role}" if role else
                                                                                     ", shared by both stages"),
    ))
    for comp, (per_role, _) in COMPONENTS.items() if comp != "unet"
    for role in (ROLES if per_role else (None,))
}


def released_config(role: str) -> dict:
    """The configuration of one released model, in the released yaml's ``model.params`` layout."""
    from ..networks.keyvid_unet import GENERATOR_UNET_PARAMS, INTERPOLATOR_UNET_PARAMS

    unet = GENERATOR_UNET_PARAMS if role == "generator" else INTERPOLATOR_UNET_PARAMS
    return {
        "unet_config": {"params": dict(unet)},
        "first_stage_config": {"params": json.loads(json.dumps(RELEASED_VAE_PARAMS))},
        "image_proj_stage_config": {"params": dict(RELEASED_IMAGE_PROJ_PARAMS)},
        "audio_proj_stage_config": {"params": {"video_length": RELEASED_AUDIO_VIDEO_LENGTH}},
        "scale_factor": RELEASED_SCALE_FACTOR,
    }


def read_config_file(path) -> dict:
    """``model.params`` of a released-style yaml (``configs/inference/keyframe_*.yaml``) or json."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ModelFormatError(f"{path}: cannot read the config ({err.strerror})") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:
        raise ModelFormatError(f"{path}: not a yaml/json config ({err})") from None
    params = (data or {}).get("model", {}).get("params") if isinstance(data, dict) else None
    if not isinstance(params, dict) or "unet_config" not in params:
        raise ModelFormatError(f"{path}: expected model.params.unet_config (the layout of the released "
                               f"configs/inference/keyframe_generation.yaml)")
    return params


def _imagebind_audio_config(model_params: dict, state: Mapping[str, torch.Tensor]):
    """The trunk's :class:`~avsync.networks.imagebind_audio.LocalizerConfig` in the diffusion
    configuration: stride from ``audio_proj_stage_config.params.video_length``, width and depth
    from the tensors, ImageBind's 64-wide heads."""
    from ..networks.imagebind_audio import AUDIO_STEM, count_audio_blocks, default_heads, keyvid_diffusion_audio_config

    video_length = int(model_params.get("audio_proj_stage_config", {}).get("params", {}).get(
        "video_length", RELEASED_AUDIO_VIDEO_LENGTH))
    proj = state.get(AUDIO_STEM + "rgbt_stem.proj.weight")
    if proj is None:
        raise ModelFormatError(f"ImageBind audio: missing tensor '{AUDIO_STEM}rgbt_stem.proj.weight'")
    d = int(proj.shape[0])
    try:
        return keyvid_diffusion_audio_config(video_length, embed_dim=d, num_blocks=count_audio_blocks(state),
                                             num_heads=default_heads(d))
    except ValueError as err:
        raise ModelFormatError(f"audio_proj_stage_config: {err}") from None


# --------------------------------------------------------------------------------------
# Reading the released checkpoint
# --------------------------------------------------------------------------------------

def read_lightning_checkpoint(path, what: str = "a KeyVID checkpoint (Lightning .ckpt of RyanWW/KeyVID)",
                              required_prefixes=(UNET_PREFIX,)) -> dict[str, torch.Tensor]:
    """The tensors of a Lightning ``.ckpt`` (``ckpt["state_dict"]``) or a bare state dict, through the
    one checked reader (``loaders/checked_file.py:load_pickled_checked``): ``weights_only=True``,
    memory-mapped, so no tensor's data is read until it is used."""
    from .checked_file import load_pickled_checked

    return load_pickled_checked(path, what=what, required_prefixes=required_prefixes,
                                family_hint=f"the released files are listed at {RELEASE_REPO}; the .ckpt files are "
                                            f"~15.6 GB: is the download complete?")


@dataclass
class SplitCheckpoint:
    """One checkpoint's tensors per component (released names, prefix removed)."""

    source: str
    role: str
    components: dict[str, dict[str, torch.Tensor]]
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason -> released keys


_DROP_AUDIO_PROJ = "audio_proj_model.* (AudioResampler: never called at inference)"
_DROP_EMBEDDER_TEXT = "embedder.model.* outside visual. (text-tower leftovers of FrozenOpenCLIPImageEmbedderV2)"
_DROP_IMAGEBIND_OTHER = "imagebind_model.* other than the audio preprocessor and trunk"
_DROP_IMAGEBIND_INTERP = "imagebind_model.* of the interpolator (the release rebuilds it from imagebind_huge.pth)"


def _classify(key: str) -> tuple[Optional[str], str]:
    """``(component, stored name)`` or ``(None, drop reason)``; raises for an unknown key."""
    for comp, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("text_encoder", TEXT_PREFIX),
                         ("image_proj", IMAGE_PROJ_PREFIX)):
        if key.startswith(prefix):
            return comp, key[len(prefix):]
    if key.startswith(IMAGE_PREFIX):
        rest = key[len(IMAGE_PREFIX):]
        return ("image_encoder", rest) if rest.startswith("visual.") else (None, _DROP_EMBEDDER_TEXT)
    if key.startswith(IMAGEBIND_PREFIX):
        rest = key[len(IMAGEBIND_PREFIX):]
        return ("imagebind_audio", rest) if rest.startswith(IMAGEBIND_AUDIO_PARTS) else (None, _DROP_IMAGEBIND_OTHER)
    if key.startswith(AUDIO_PROJ_PREFIX):
        return None, _DROP_AUDIO_PROJ
    if key in SCHEDULE_BUFFERS:
        return "schedule", key
    raise KeyError(key)


def split_checkpoint(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> SplitCheckpoint:
    """Sort a released state dict into components; the role is read from the UNet's keys
    (only the generator has ``frame_idx_embedding``). Unknown keys are an error naming them."""
    components: dict[str, dict[str, torch.Tensor]] = {c: {} for c in COMPONENTS}
    dropped: dict[str, list[str]] = {}
    unknown = []
    for key, t in state.items():
        try:
            comp, name = _classify(key)
        except KeyError:
            unknown.append(key)
            continue
        if comp is None:
            dropped.setdefault(name, []).append(key)
        else:
            components[comp][name] = t
    if unknown:
        raise ModelFormatError(
            f"{source}: {len(unknown)} tensors belong to no KeyVID component: {', '.join(sorted(unknown)[:8])}"
            + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
            + ". Is this a KeyVID (LatentVisualAudioDiffusion) checkpoint?"
        )
    if not components["unet"]:
        raise ModelFormatError(f"{source}: no model.diffusion_model.* tensors: not a KeyVID checkpoint")
    role = "generator" if any(k.startswith("frame_idx_embedding.") for k in components["unet"]) else "interpolator"
    if role == "interpolator" and components["imagebind_audio"]:
        dropped.setdefault(_DROP_IMAGEBIND_INTERP, []).extend(IMAGEBIND_PREFIX + k for k in components["imagebind_audio"])
        components["imagebind_audio"] = {}
    return SplitCheckpoint(source=source, role=role, components=components, dropped=dropped)


def imagebind_audio_from_pretrained(state: Mapping[str, torch.Tensor], model_params: dict,
                                    source: str = "imagebind_huge.pth") -> dict[str, torch.Tensor]:
    """The audio preprocessor + trunk of ``imagebind_huge.pth`` as ``load_pretrained_imagebind_model``
    leaves them: positional embedding stretched to the diffusion configuration's token grid."""
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    audio = {k: v for k, v in state.items() if k.startswith(IMAGEBIND_AUDIO_PARTS)}
    if not audio:
        raise ModelFormatError(f"{source}: no modality_preprocessors.audio.* / modality_trunks.audio.* tensors: "
                               f"not ImageBind's imagebind_huge.pth ({IMAGEBIND_URL})")
    from ..networks.imagebind_audio import stretch_pos_embed

    key = "modality_preprocessors.audio.pos_embedding_helper.pos_embed"
    if key not in audio:
        raise ModelFormatError(f"{source}: missing {key}")
    cfg = _imagebind_audio_config(model_params, audio)
    f, t = cfg.token_grid
    if audio[key].shape[1] != f * t + 1:
        audio[key] = stretch_pos_embed(audio[key], t, f)
    return audio


# --------------------------------------------------------------------------------------
# What each component must contain (released names), checked before anything is written
# --------------------------------------------------------------------------------------

def _meta_like(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # tensors read from the mmap'ed checkpoint expose shape/dtype without reading data
    return {k: torch.empty(tuple(v.shape), dtype=v.dtype, device="meta") for k, v in state.items()}


def _openclip_resblock_layout(prefix: str, layers: int, width: int, hidden: int) -> dict[str, tuple]:
    out = {}
    for i in range(layers):
        b = f"{prefix}transformer.resblocks.{i}."
        out.update({
            b + "ln_1.weight": (width,), b + "ln_1.bias": (width,),
            b + "attn.in_proj_weight": (3 * width, width), b + "attn.in_proj_bias": (3 * width,),
            b + "attn.out_proj.weight": (width, width), b + "attn.out_proj.bias": (width,),
            b + "ln_2.weight": (width,), b + "ln_2.bias": (width,),
            b + "mlp.c_fc.weight": (hidden, width), b + "mlp.c_fc.bias": (hidden,),
            b + "mlp.c_proj.weight": (width, hidden), b + "mlp.c_proj.bias": (width,),
        })
    return out


def _count_blocks(keys: Iterable[str], pattern_prefix: str) -> int:
    import re

    rx = re.compile(re.escape(pattern_prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def _shape(state: Mapping, key: str, what: str) -> tuple:
    if key not in state:
        raise ModelFormatError(f"{what}: missing tensor '{key}'")
    return tuple(state[key].shape)


def text_encoder_layout(state: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
    """The OpenCLIP text tower's tensors (``cond_stage_model.model.*`` minus the prefix), sized from
    ``state``: what ``open_clip.CLIP`` minus ``visual`` holds (``attn_mask`` is not persistent)."""
    what = "text encoder"
    vocab, width = _shape(state, "token_embedding.weight", what)
    ctx = _shape(state, "positional_embedding", what)[0]
    hidden = _shape(state, "transformer.resblocks.0.mlp.c_fc.weight", what)[0]
    proj = _shape(state, "text_projection", what)[1]
    layers = _count_blocks(state, "transformer.resblocks.")
    out = {"token_embedding.weight": (vocab, width), "positional_embedding": (ctx, width),
           "ln_final.weight": (width,), "ln_final.bias": (width,), "text_projection": (width, proj),
           "logit_scale": ()}
    out.update(_openclip_resblock_layout("", layers, width, hidden))
    return out


def image_encoder_layout(state: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
    """The OpenCLIP image tower (``embedder.model.visual.*`` minus ``embedder.model.``)."""
    what = "image encoder"
    width = _shape(state, "visual.class_embedding", what)[0]
    conv = _shape(state, "visual.conv1.weight", what)
    tokens = _shape(state, "visual.positional_embedding", what)[0]
    hidden = _shape(state, "visual.transformer.resblocks.0.mlp.c_fc.weight", what)[0]
    proj = _shape(state, "visual.proj", what)[1]
    layers = _count_blocks(state, "visual.transformer.resblocks.")
    out = {"visual.class_embedding": (width,), "visual.conv1.weight": conv,
           "visual.positional_embedding": (tokens, width), "visual.ln_pre.weight": (width,),
           "visual.ln_pre.bias": (width,), "visual.ln_post.weight": (width,), "visual.ln_post.bias": (width,),
           "visual.proj": (width, proj)}
    out.update(_openclip_resblock_layout("visual.", layers, width, hidden))
    return out


def imagebind_audio_layout(state: Mapping[str, torch.Tensor], model_params: dict) -> dict[str, tuple]:
    """ImageBind's audio preprocessor + trunk in the diffusion configuration, released names
    (``networks.imagebind_audio.released_audio_trunk_keys``) with the shapes of the trunk built
    on the meta device."""
    from ..networks.imagebind_audio import ImageBindAudioTrunk, audio_trunk_key, released_audio_trunk_keys

    cfg = _imagebind_audio_config(model_params, state)
    own = _meta_module(lambda: ImageBindAudioTrunk(cfg)).state_dict()
    return {k: tuple(own[audio_trunk_key(k)].shape) for k in released_audio_trunk_keys(cfg)}


def schedule_layout(state: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
    n = _shape(state, "betas", "schedule")[0]
    out = {k: (n,) for k in SCHEDULE_BUFFERS}
    out["scale_arr"] = _shape(state, "scale_arr", "schedule")  # 400-step ramp + num_timesteps
    return out


def _module_layout(component: str, model_params: dict) -> dict[str, tuple]:
    """Released names and shapes of a component built from its config on the meta device."""
    if component == "unet":
        module = _meta_module(lambda: _unet_class().from_released_params(model_params["unet_config"]["params"]))
        return {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if component == "image_proj":
        params = model_params["image_proj_stage_config"]["params"]
        module = _meta_module(lambda: _resampler_class()(**params))
        return {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if component == "vae":
        vae = _meta_module(lambda: _build_vae_module(vae_diffusers_config(model_params)))
        own = vae.state_dict()
        out = {}
        for new, old in svd_vae_key_map(own.keys(), keep_quant_convs=True).items():
            shape = tuple(own[new].shape)
            out[old] = shape + (1, 1) if _is_vae_1x1_attention(old) else shape
        return out
    raise KeyError(component)


def expected_layout(component: str, state: Mapping[str, torch.Tensor], model_params: dict) -> dict[str, tuple]:
    if component == "text_encoder":
        return text_encoder_layout(state)
    if component == "image_encoder":
        return image_encoder_layout(state)
    if component == "imagebind_audio":
        return imagebind_audio_layout(state, model_params)
    if component == "schedule":
        return schedule_layout(state)
    return _module_layout(component, model_params)


def check_component(component: str, state: Mapping[str, torch.Tensor], model_params: dict, source: str) -> None:
    """Strict check of one component's released names and shapes; the error names the tensors
    with their released prefix, as they appear in the checkpoint."""
    prefix = _RELEASED_PREFIX[component]
    what = f"{source}: {COMPONENTS[component][1]}"
    if not state:
        raise ModelFormatError(f"{what}: the checkpoint has none of these tensors")
    try:
        layout = expected_layout(component, state, model_params)
    except ModelFormatError as err:
        raise ModelFormatError(f"{source}: {err}") from None
    check_state_fits(layout, state, what, shown=lambda k: prefix + k)


# --------------------------------------------------------------------------------------
# Streamed safetensors writing
# --------------------------------------------------------------------------------------

def _target_dtype(component: str, t: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    # the schedule stays fp32 (it is arithmetic, not weights); non-float tensors keep their type
    if component == "schedule" or not t.is_floating_point():
        return t.dtype
    return dtype


# --------------------------------------------------------------------------------------
# Reading converted files (one function, so that a checked reader can replace it)
# --------------------------------------------------------------------------------------

def open_component_file(path, what: str) -> tuple[Mapping[str, torch.Tensor], dict]:
    """``(lazy tensors, metadata)`` of a converted KeyVID file, through the one checked reader
    (``loaders/checked_file.py:open_checked``): a missing, truncated or foreign file is a
    :class:`ModelFormatError` naming the file and the conversion command."""
    from .checked_file import open_checked

    path = Path(path)
    hint = f"made by `{CONVERT_COMMAND}`"
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise ModelFormatError(f"{path}: the KeyVID nodes load only .safetensors files {hint}; pickled checkpoints "
                               f"(.ckpt/.pth) are converted first")
    state = open_checked(path, what=f"the KeyVID {what}", family_hint=hint)
    meta = dict(state.metadata)
    if meta.get("format") != FORMAT_TAG:
        raise ModelFormatError(f"{path}: not a KeyVID file made by `avsync convert keyvid` "
                               f"(metadata format={meta.get('format')!r}); convert with `{CONVERT_COMMAND}`")
    return state, meta


# --------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------

@dataclass
class WrittenFile:
    path: Path
    component: str
    role: Optional[str]      # None: shared by both roles
    sha256: str
    size: int
    reused: bool = False     # an identical file was already in the folder


@dataclass
class ConversionReport:
    files: list[WrittenFile]
    roles: dict[str, str]                      # role -> source checkpoint
    shared: dict[str, str]                     # component -> "identical in both" / "generator only" / ...
    dropped: dict[str, dict[str, int]]         # role -> reason -> count
    lines: list[str] = field(default_factory=list)


def _first_difference(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                      cast: Optional[torch.dtype] = None) -> list[str]:
    """Names whose tensors differ (shape or any value; ``cast`` converts ``a`` first)."""
    diffs = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if cast is not None and x.is_floating_point():
            x = x.to(cast)
        if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
            diffs.append(k)
    return diffs


def _describe(diffs: list[str], prefix: str) -> str:
    return ", ".join(prefix + d for d in diffs[:5]) + (f" and {len(diffs) - 5} more" if len(diffs) > 5 else "")


def convert_checkpoints(checkpoints: list, out_dir, dtype="fp16", imagebind: Optional[str] = None,
                        configs: Optional[dict] = None, log: Callable[[str], None] = print,
                        overwrite: bool = False, stage: Optional[Callable[[Path], Path]] = None) -> ConversionReport:
    """Convert one or both released checkpoints into ``out_dir``; see the module docstring.

    ``configs``: role -> ``model.params`` dict (default: the released yamls'). Every check runs
    before the first byte is written, including that no file would be overwritten unless
    ``overwrite`` (shared files already in the folder are compared, not overwritten).
    ``stage(final) -> temporary path`` lets a caller write every file under a temporary name and
    rename them all at the end (``cli/common.py:staged_outputs``); without it each file is
    renamed into place as soon as it is complete.
    """
    dtype = parse_dtype(dtype)
    dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
    out_dir = Path(out_dir)
    if not checkpoints:
        raise ModelFormatError("give the generator and/or interpolator checkpoint")
    splits: dict[str, SplitCheckpoint] = {}
    for path in checkpoints:
        split = split_checkpoint(read_lightning_checkpoint(path), Path(path).name)
        if split.role in splits:
            raise ModelFormatError(f"{Path(path).name} and {splits[split.role].source} are both {split.role} "
                                   f"checkpoints; give one generator and/or one interpolator")
        splits[split.role] = split
    params = {role: (configs or {}).get(role) or released_config(role) for role in splits}

    if "interpolator" in splits:
        if not imagebind:
            raise ModelFormatError(
                "the interpolator's ImageBind audio trunk is not taken from its checkpoint: the release drops those "
                "keys and rebuilds ImageBind from imagebind_huge.pth with a stretched positional embedding. Pass "
                f"--imagebind imagebind_huge.pth ({IMAGEBIND_URL}; facebookresearch/ImageBind, weights CC-BY-NC 4.0)")
        ib_state = read_lightning_checkpoint(
            imagebind, what=f"ImageBind-huge weights (imagebind_huge.pth, {IMAGEBIND_URL})",
            required_prefixes=IMAGEBIND_AUDIO_PARTS)
        splits["interpolator"].components["imagebind_audio"] = imagebind_audio_from_pretrained(
            ib_state, params["interpolator"], Path(imagebind).name)

    # 1. strict checks of every component of every checkpoint (shapes only: nothing is read yet)
    for role, split in splits.items():
        for comp in COMPONENTS:
            source = split.source if not (role == "interpolator" and comp == "imagebind_audio") else Path(imagebind).name
            check_component(comp, split.components[comp], params[role], source)

    log(f"checked {', '.join(f'{r} ({s.source})' for r, s in splits.items())}: every component matches its network")

    # 2. shared components: stored once when identical, else per role (and the differences named)
    plan: list[tuple[str, Optional[str], Mapping[str, torch.Tensor], str]] = []  # comp, role, tensors, source
    shared_report: dict[str, str] = {}
    lines: list[str] = []
    companions: dict[str, dict[str, str]] = {role: {} for role in splits}
    for comp, (per_role, what) in COMPONENTS.items():
        if per_role:
            for role, split in splits.items():
                plan.append((comp, role, split.components[comp], split.source))
                companions[role][comp] = component_filename(comp, role)
            continue
        roles = list(splits)
        first = roles[0]
        ref = splits[first].components[comp]
        shared_path = out_dir / component_filename(comp)
        existing = None
        if shared_path.is_file():
            existing, meta = open_component_file(shared_path, what)
            file_dtype = next(iter(existing.values())).dtype if len(existing) else dtype
            if comp != "schedule" and file_dtype != dtype:
                raise ModelFormatError(
                    f"{shared_path}: already holds the {what} in {file_dtype}; convert with the same --dtype "
                    f"({dtype_name} requested) or into another --out folder")
        for role in roles:
            tensors = splits[role].components[comp]
            if existing is not None:
                diffs = _first_difference(tensors, existing, cast=None if comp == "schedule" else dtype)
                against = f"{shared_path.name} already in the folder"
            elif role != first:
                diffs = _first_difference(tensors, ref)
                against = f"the {first}'s"
            else:
                diffs = []
                against = ""
            if not diffs:
                companions[role][comp] = shared_path.name
                if role == first and existing is None:
                    plan.append((comp, None, tensors, splits[role].source))
                continue
            companions[role][comp] = component_filename(comp, role)
            plan.append((comp, role, tensors, splits[role].source))
            lines.append(f"{what}: the {role}'s differs from {against} in {len(diffs)} tensors "
                         f"({_describe(diffs, _RELEASED_PREFIX[comp])}); stored separately as "
                         f"{component_filename(comp, role)}")
        if existing is not None:
            same = [r for r in roles if companions[r][comp] == shared_path.name]
            shared_report[comp] = f"identical to {shared_path.name} already in the folder: " + (", ".join(same) or "none")
        elif len(roles) == 2:
            same = companions[roles[1]][comp] == shared_path.name
            shared_report[comp] = "identical in both checkpoints (stored once)" if same else "differs (stored per role)"
        else:
            shared_report[comp] = f"{first} only"

    clobbered = [fname for comp, role, _, _ in plan
                 if (out_dir / (fname := component_filename(comp, role))).exists()]
    if clobbered and not overwrite:
        raise InputError("--out", f"{out_dir} already holds {', '.join(clobbered)}; pass --force to overwrite")

    # 3. write (UNet files last: their metadata names the companions and their sha256)
    written: list[WrittenFile] = []
    plan.sort(key=lambda p: p[0] == "unet")
    sha_of: dict[str, str] = {}
    for comp, role, tensors, source in plan:
        fname = component_filename(comp, role)
        meta = {"format": FORMAT_TAG, "component": comp, "role": role or "shared", "dtype": dtype_name,
                "source": source}
        cfg_role = role or next(r for r in splits if companions[r].get(comp) == fname)
        meta["config"] = json.dumps(_component_config(comp, params[cfg_role], tensors))
        if comp == "unet":
            meta["companions"] = json.dumps(companions[role])
            meta["companion_sha256"] = json.dumps({c: sha_of.get(f) or sha256_file(out_dir / f)
                                                   for c, f in companions[role].items() if c != "unet"})
        dtypes = {k: _target_dtype(comp, t, dtype) for k, t in tensors.items()}
        log(f"writing {out_dir / fname} ({len(tensors)} tensors, {COMPONENTS[comp][1]})")
        target = stage(out_dir / fname) if stage is not None else out_dir / fname
        digest, size = write_safetensors_streamed(target, tensors, dtypes, meta)
        sha_of[fname] = digest
        written.append(WrittenFile(out_dir / fname, comp, role, digest, size))
    names = {w.path.name for w in written}
    for role in splits:
        for comp, fname in companions[role].items():
            if fname not in names:  # an identical shared file already in the folder
                names.add(fname)
                path = out_dir / fname
                written.append(WrittenFile(path, comp, None, sha_of.get(fname) or sha256_file(path),
                                           path.stat().st_size, reused=True))
    dropped = {role: {reason: len(keys) for reason, keys in split.dropped.items()} for role, split in splits.items()}
    return ConversionReport(files=written, roles={r: s.source for r, s in splits.items()}, shared=shared_report,
                            dropped=dropped, lines=lines)


def _component_config(component: str, model_params: dict, tensors: Mapping[str, torch.Tensor]) -> dict:
    """What the loader needs besides tensor shapes (head widths, scale factor, ...)."""
    if component == "unet":
        return {"unet_params": model_params["unet_config"]["params"]}
    if component == "image_proj":
        return {"params": model_params["image_proj_stage_config"]["params"]}
    if component == "vae":
        return {"params": model_params["first_stage_config"]["params"],
                "scale_factor": float(model_params.get("scale_factor", RELEASED_SCALE_FACTOR))}
    if component == "text_encoder":
        return {"head_dim": OPENCLIP_TEXT_HEAD_DIM, "layer": "penultimate"}
    if component == "image_encoder":
        return {"head_dim": OPENCLIP_VIT_H_HEAD_DIM, "image_size": 224, "antialias": True}
    if component == "imagebind_audio":
        return {"trunk": _imagebind_audio_config(model_params, tensors).to_dict()}
    return {}


# --------------------------------------------------------------------------------------
# Building the networks
# --------------------------------------------------------------------------------------

def _unet_class():
    from ..networks.keyvid_unet import KeyVIDUNet

    return KeyVIDUNet


def _resampler_class():
    from ..networks.keyvid_resampler import Resampler

    return Resampler


def vae_diffusers_config(model_params: dict) -> dict:
    """diffusers ``AutoencoderKL`` config of the released ``first_stage_config.params``."""
    p = model_params["first_stage_config"]["params"]
    dd = p["ddconfig"]
    if dd.get("attn_resolutions"):
        raise ModelFormatError("first_stage_config: attention inside the VAE levels is not part of the SD KL VAE layout")
    if int(p.get("embed_dim", dd["z_channels"])) != int(dd["z_channels"]):
        raise ModelFormatError("first_stage_config: embed_dim != z_channels has no diffusers AutoencoderKL counterpart")
    channels = [int(dd["ch"]) * int(m) for m in dd["ch_mult"]]
    return {
        "in_channels": int(dd["in_channels"]), "out_channels": int(dd["out_ch"]),
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "block_out_channels": channels, "layers_per_block": int(dd["num_res_blocks"]),
        "latent_channels": int(dd["z_channels"]), "norm_num_groups": 32, "act_fn": "silu",
        "sample_size": int(dd.get("resolution", 256)),
        "scaling_factor": float(model_params.get("scale_factor", RELEASED_SCALE_FACTOR)),
    }


def _build_vae_module(cfg: dict):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(cfg)


def build_vae(state: Mapping[str, torch.Tensor], model_params: dict, dtype: torch.dtype):
    """diffusers ``AutoencoderKL`` from ``first_stage_model.*`` tensors (prefix removed)."""
    vae = _meta_module(lambda: _build_vae_module(vae_diffusers_config(model_params)))
    key_map = svd_vae_key_map(vae.state_dict().keys(), keep_quant_convs=True)
    missing = sorted(set(key_map.values()) - set(state))
    if missing:
        raise ModelFormatError(f"KeyVID VAE: missing first_stage_model.{missing[0]} (and {len(missing) - 1} more)")
    tensors = {}
    for new, old in key_map.items():
        t = state[old]
        if _is_vae_1x1_attention(old):
            t = t.reshape(t.shape[0], t.shape[1])
        tensors[new] = t.to(dtype) if t.is_floating_point() else t
    return _assign(vae, tensors, "KeyVID VAE")


def _clip_text_config(state: Mapping[str, torch.Tensor], head_dim: int) -> dict:
    layout = text_encoder_layout(state)
    vocab, width = layout["token_embedding.weight"]
    if width % head_dim:
        raise ModelFormatError(f"text encoder: width {width} is not a multiple of the head width {head_dim}")
    layers = _count_blocks(state, "transformer.resblocks.")
    return {
        "vocab_size": vocab, "hidden_size": width, "intermediate_size": layout["transformer.resblocks.0.mlp.c_fc.weight"][0],
        "num_hidden_layers": layers - 1,  # layer="penultimate": the last block is never run
        "num_attention_heads": width // head_dim, "max_position_embeddings": layout["positional_embedding"][0],
        "hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": layout["text_projection"][1],
        "attention_dropout": 0.0, "dropout": 0.0, "pad_token_id": 0,
        # OpenCLIP's <start_of_text> / <end_of_text> (only the pooled output, unused here, reads them)
        # (a tiny test vocabulary gets transformers' legacy eos id 2: the pooled output then takes the argmax)
        "bos_token_id": 49406 if vocab > 49407 else 1, "eos_token_id": 49407 if vocab > 49407 else 2,
    }


#: text-tower tensors a penultimate-layer encoder never uses (checked present, not loaded)
def _unused_text_keys(layers: int) -> set[str]:
    last = f"transformer.resblocks.{layers - 1}."
    return {k for k in _openclip_resblock_layout("", layers, 1, 1) if k.startswith(last)} | {"text_projection",
                                                                                          "logit_scale"}


def build_text_encoder(state: Mapping[str, torch.Tensor], config: dict, dtype: torch.dtype):
    """``FrozenOpenCLIPEmbedder(layer="penultimate")`` on transformers' ``CLIPTextModel``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..networks.keyvid_encoders import OpenCLIPTextEncoder

    cfg = _clip_text_config(state, int(config.get("head_dim", OPENCLIP_TEXT_HEAD_DIM)))
    model = _meta_module(lambda: CLIPTextModel(CLIPTextConfig(**cfg)))
    layers = cfg["num_hidden_layers"] + 1
    unused = _unused_text_keys(layers)
    used = {k: state[k] for k in state if k not in unused}
    cast = (lambda t: t.to(dtype))
    # transformers < 5 nests the transformer as ``text_model.``; 5.x does not
    p = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    tensors = openclip_resblocks_to_transformers(used, f"{p}encoder.layers.", cast, "OpenCLIP text-encoder")
    top = {"token_embedding.weight": "embeddings.token_embedding.weight",
           "positional_embedding": "embeddings.position_embedding.weight",
           "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
    for old, new in top.items():
        tensors[p + new] = cast(state[old])
    return OpenCLIPTextEncoder(_assign(model, tensors, "KeyVID text encoder")).eval().requires_grad_(False)


def build_image_encoder(state: Mapping[str, torch.Tensor], config: dict, dtype: torch.dtype):
    """``FrozenOpenCLIPImageEmbedderV2`` on transformers' ``CLIPVisionModelWithProjection``
    (the conversion is the SVD loader's: ``loaders/svd.py:build_clip_from_openclip``)."""
    from ..networks.keyvid_encoders import OpenCLIPImageEncoder

    visual = _View(state, "visual.")
    head_dim = int(config.get("head_dim", OPENCLIP_VIT_H_HEAD_DIM))
    clip = build_clip_from_openclip(visual, dtype, head_dim)
    size = infer_clip_config(visual, head_dim)["image_size"]
    return OpenCLIPImageEncoder(clip, image_size=int(config.get("image_size", size)),
                                antialias=bool(config.get("antialias", True))).eval().requires_grad_(False)


def build_image_proj(state: Mapping[str, torch.Tensor], config: dict, dtype: torch.dtype):
    module = _meta_module(lambda: _resampler_class()(**config["params"]))
    return _assign(module, _cast_all(state, dtype), "KeyVID image resampler")


def build_unet(state: Mapping[str, torch.Tensor], config: dict, dtype: torch.dtype):
    module = _meta_module(lambda: _unet_class().from_released_params(config["unet_params"]))
    return _assign(module, _cast_all(state, dtype), "KeyVID UNet")


def build_imagebind_audio(state: Mapping[str, torch.Tensor], config: dict, dtype: torch.dtype):
    """ImageBind's audio preprocessor + trunk in the diffusion configuration, from released-layout
    tensors (``modality_preprocessors.audio.*``, ``modality_trunks.audio.*``), strictly
    (``networks.imagebind_audio.build_audio_trunk_from_released``)."""
    from ..networks.imagebind_audio import LocalizerConfig, build_audio_trunk_from_released

    cfg = LocalizerConfig(**config["trunk"])
    return build_audio_trunk_from_released(_cast_all(state, dtype), cfg, prefix="").to(dtype).eval().requires_grad_(False)


_BUILDERS = {
    "unet": build_unet, "image_proj": build_image_proj, "vae": None, "text_encoder": build_text_encoder,
    "image_encoder": build_image_encoder, "imagebind_audio": build_imagebind_audio,
}


def load_component(path, component: str, dtype=torch.float32):
    """One converted file as its network (eval mode, on the CPU), strictly: every tensor the
    network has must be in the file and nothing else. The schedule loads as a dict of fp32 tensors."""
    dtype = parse_dtype(dtype)
    path = Path(path)
    state, meta = open_component_file(path, COMPONENTS.get(component, ("", component))[1])
    if meta.get("component") != component:
        raise ModelFormatError(f"{path}: holds the KeyVID {meta.get('component')!r} component, not {component!r}")
    config = json.loads(meta.get("config", "{}"))
    try:
        if component == "schedule":
            check_component("schedule", state, {}, path.name)
            return {k: state[k].float() for k in state}
        if component == "vae":
            params = {"first_stage_config": {"params": config["params"]}, "scale_factor": config["scale_factor"]}
            check_component("vae", _meta_like_lazy(state), params, path.name)
            return build_vae(state, params, dtype)
        if component in ("text_encoder", "image_encoder"):
            check_component(component, _meta_like_lazy(state), {}, path.name)
        elif component == "imagebind_audio":
            check_component(component, _meta_like_lazy(state), _imagebind_params(config), path.name)
        elif component == "unet":
            check_component("unet", _meta_like_lazy(state), {"unet_config": {"params": config["unet_params"]}},
                            path.name)
        elif component == "image_proj":
            check_component("image_proj", _meta_like_lazy(state),
                            {"image_proj_stage_config": {"params": config["params"]}}, path.name)
        return _BUILDERS[component](state, config, dtype)
    except ModelFormatError:
        raise
    except Exception as err:  # a truncated tensor inside an intact header, ...
        raise ModelFormatError(f"{path.name}: cannot load the KeyVID {component} ({err})") from None


def _imagebind_params(config: dict) -> dict:
    """The ``model.params`` fragment that selects the stored trunk's stride (for the layout check)."""
    from ..networks.imagebind_audio import LocalizerConfig, keyvid_diffusion_audio_config

    stride = LocalizerConfig(**config["trunk"]).stride
    for video_length in (12, 48, 60):
        if keyvid_diffusion_audio_config(video_length).stride == stride:
            return {"audio_proj_stage_config": {"params": {"video_length": video_length}}}
    raise ModelFormatError(f"ImageBind audio stride {stride} is not one of the released configurations")


_ST_TORCH = {v: k for k, v in _ST_DTYPES.items()}


def _meta_like_lazy(state) -> dict:
    """Meta tensors of a checked safetensors mapping's shapes and dtypes: nothing is read."""
    return {k: torch.empty(state.shape(k), dtype=_ST_TORCH.get(state.dtype_name(k), torch.float32), device="meta")
            for k in state}


# --------------------------------------------------------------------------------------
# The prompt tokenizer (not part of the checkpoints)
# --------------------------------------------------------------------------------------

TOKENIZER_FILES = ("vocab.json", "merges.txt")
TOKENIZER_SOURCE = ("the CLIP BPE vocabulary (vocab.json and merges.txt, MIT): inside ComfyUI its own copy "
                    "comfy/sd1_tokenizer is used; otherwise copy those two files from ComfyUI's comfy/sd1_tokenizer "
                    "or from https://huggingface.co/openai/clip-vit-large-patch14 into models/avsync/keyvid/tokenizer/")


class OpenCLIPTokenizer:
    """``open_clip.tokenize`` (what ``FrozenOpenCLIPEmbedder.forward`` calls) on transformers'
    ``CLIPTokenizer``: ``<start_of_text>`` (49406), the BPE tokens, ``<end_of_text>`` (49407),
    then zeros up to 77; a longer prompt keeps its first 75 tokens and ends with ``<end_of_text>``.
    open_clip pads with id 0 (which is also the token ``!``), not with ``<end_of_text>`` as CLIP's
    own tokenizer does; the padding is written here rather than by declaring ``!`` the pad token,
    which would make the tokenizer swallow every ``!`` of a prompt."""

    def __init__(self, folder, context_length: int = 77):
        from transformers import CLIPTokenizer

        # from_pretrained on the folder: the constructor's file arguments differ between transformers 4 and 5
        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=context_length)
        self.context_length = context_length
        if self.tokenizer.convert_tokens_to_ids("!") != 0 or self.tokenizer.bos_token_id != 49406:
            raise ModelFormatError(f"{folder}: not the CLIP BPE vocabulary ('!' is not token 0)")

    def __call__(self, prompts) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        rows = self.tokenizer(prompts, truncation=True, max_length=self.context_length).input_ids
        out = torch.zeros(len(rows), self.context_length, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return out


def openclip_tokenizer(folder=None) -> OpenCLIPTokenizer:
    """The prompt tokenizer, from ``folder``, ``models/avsync/keyvid/tokenizer/`` or ComfyUI's
    ``comfy/sd1_tokenizer`` (first found); a :class:`MissingModelError` says where to get it."""
    candidates = [Path(folder)] if folder else []
    candidates += [p / "tokenizer" for p in compat.model_folder_paths(FOLDER)]
    comfy_dir = compat.clip_bpe_tokenizer_dir()
    if comfy_dir is not None:
        candidates.append(comfy_dir)
    for d in candidates:
        if all((d / f).is_file() for f in TOKENIZER_FILES):
            return OpenCLIPTokenizer(d)
    raise MissingModelError("tokenizer/vocab.json + merges.txt", FOLDER, candidates, TOKENIZER_SOURCE)


# --------------------------------------------------------------------------------------
# The model that travels on the sockets
# --------------------------------------------------------------------------------------

@dataclass
class KeyVIDModel:
    """A KeyVID generator or interpolator: every network under ComfyUI's memory management.

    The value of the ``AVSYNC_KEYVID_MODEL`` (``role == "generator"``) and
    ``AVSYNC_KEYVID_INTERP_MODEL`` (``role == "interpolator"``) sockets: one class, two socket
    types, so that a workflow cannot wire the interpolator into the keyframe generator.
    """

    role: str
    unet: compat.ManagedModel
    vae: compat.ManagedModel
    text_encoder: compat.ManagedModel
    image_encoder: compat.ManagedModel
    image_proj: compat.ManagedModel
    imagebind_audio: compat.ManagedModel
    schedule: dict
    config: dict              # component -> its config (unet_params, vae params + scale_factor, ...)
    dtype: torch.dtype
    source: str
    files: dict = field(default_factory=dict)  # component -> path

    @property
    def scale_factor(self) -> float:
        return float(self.config["vae"]["scale_factor"])

    def managed(self) -> dict[str, compat.ManagedModel]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder,
                "image_encoder": self.image_encoder, "image_proj": self.image_proj,
                "imagebind_audio": self.imagebind_audio}

    def weight_bytes(self) -> dict[str, int]:
        return {k: module_bytes(m.module) for k, m in self.managed().items()}

    def __repr__(self) -> str:
        return f"KeyVIDModel(role={self.role!r}, source={self.source!r}, dtype={self.dtype})"


def companion_paths(unet_path, search: Optional[Callable[[str], Optional[Path]]] = None) -> dict[str, Path]:
    """The files a UNet file names in its metadata, found beside it (or through ``search``);
    a missing one is a :class:`MissingModelError` naming the file, the folder and the converter command."""
    unet_path = Path(unet_path)
    _, meta = open_component_file(unet_path, "UNet")
    if meta.get("component") != "unet":
        raise ModelFormatError(f"{unet_path}: holds the KeyVID {meta.get('component')!r} component; pick the "
                               f"{' or '.join(DEFAULT_FILENAMES[(r, 'unet')] for r in ROLES)} file (made by `{CONVERT_COMMAND}`)")
    companions = json.loads(meta.get("companions", "{}"))
    out = {"unet": unet_path}
    for comp in COMPONENTS:
        if comp == "unet":
            continue
        name = companions.get(comp)
        if not name:
            raise ModelFormatError(f"{unet_path.name}: names no {comp} file; convert again with `{CONVERT_COMMAND}`")
        found = unet_path.parent / name
        if not found.is_file() and search is not None:
            found = search(name) or found
        if not found.is_file():
            searched = [unet_path.parent] + [p for p in compat.model_folder_paths(FOLDER) if p != unet_path.parent]
            raise MissingModelError(name, FOLDER, searched, SOURCE,
                                    extra=f"{unet_path.name} needs it (its {COMPONENTS[comp][1]})")
        out[comp] = found
    return out


def load_keyvid(unet_path, dtype=torch.float16, role: Optional[str] = None,
                search: Optional[Callable[[str], Optional[Path]]] = None) -> KeyVIDModel:
    """Load a converted KeyVID generator or interpolator from its UNet file (companions beside it).

    ``role`` (optional) must match the file's; every component loads strictly.
    """
    dtype = parse_dtype(dtype)
    unet_path = Path(unet_path)
    if not unet_path.is_file():
        raise MissingModelError(unet_path.name, FOLDER, [unet_path.parent], SOURCE)
    _, meta = open_component_file(unet_path, "UNet")
    file_role = meta.get("role")
    if role is not None and file_role != role:
        raise ModelFormatError(f"{unet_path}: a KeyVID {file_role} UNet, but a {role} was asked for "
                               f"(pick {DEFAULT_FILENAMES[(role, 'unet')]})")
    files = companion_paths(unet_path, search)
    loaded = {comp: load_component(path, comp, dtype) for comp, path in files.items()}
    configs = {comp: json.loads(open_component_file(path, comp)[1].get("config", "{}")) for comp, path in files.items()}
    src = str(unet_path)

    def wrap(comp):
        return compat.manage_model(loaded[comp], {"kind": f"keyvid_{comp}", "role": file_role, "source": str(files[comp])})

    return KeyVIDModel(
        role=file_role, unet=wrap("unet"), vae=wrap("vae"), text_encoder=wrap("text_encoder"),
        image_encoder=wrap("image_encoder"), image_proj=wrap("image_proj"), imagebind_audio=wrap("imagebind_audio"),
        schedule=loaded["schedule"], config=configs, dtype=dtype, source=src, files={k: str(v) for k, v in files.items()},
    )
