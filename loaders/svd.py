"""Stable Video Diffusion (SVD-XT) and the backward-motion weights of Generative Inbetweening.

Two on-disk layouts of SVD load into the same diffusers/transformers modules:

* a **diffusers folder** (``unet/``, ``vae/``, ``image_encoder/``, ``feature_extractor/``),
  as published at ``stabilityai/stable-video-diffusion-img2vid-xt``;
* the **single file** ``svd_xt.safetensors`` that ComfyUI users keep in
  ``models/checkpoints``. It is in Stability's generative-models ("ldm") layout:
  ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (temporal VAE) and
  ``conditioner.embedders.0.open_clip.model.visual.*`` (OpenCLIP ViT-H/14 image tower).
  diffusers cannot read it, so the key mapping lives here. The mapping facts come from
  ComfyUI's modules (``comfy/ldm/modules/diffusionmodules/openaimodel.py:VideoResBlock``,
  ``comfy/ldm/modules/attention.py:SpatialVideoTransformer``,
  ``comfy/ldm/modules/temporal_ae.py:VideoDecoder``, ``comfy/clip_vision.py:convert_to_transformers``)
  and diffusers' ``scripts/convert_svd_to_diffusers.py``.

Backward-motion weights: the released fine-tuned UNet of jeanne-wang/svd_keyframe_interpolation
is a full SVD-14 UNet in which only the 16 temporal self-attention ``to_v`` / ``to_out.0``
weights were trained. The released inference adds ΔW = W_finetuned − W_svd14 to SVD-XT.
AVSync stores ΔW alone (:class:`BackwardMotionDelta`, ~50 MB in fp16) and never builds a
second UNet: the sampler asks :meth:`BackwardMotionDelta.backward_weights` for the patched
tensors of the 16 layers it runs backward.

Every network is built on the ``meta`` device and the file's tensors are assigned in the
requested dtype one by one, so loading never holds a random-initialised copy or an fp32 copy
of a half-precision model.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from .. import compat
from ..core.errors import ModelFormatError
from ..core.modules import module_bytes
from .checked_file import load_pickled_checked, open_checked
from .common import _assign, _cast_all, _import_model_libraries, _meta_module, _View, check_state_fits  # noqa: F401
from .model_files import ModelFileSpec, register

# --------------------------------------------------------------------------------------
# Facts about the released models
# --------------------------------------------------------------------------------------

#: ``unet/config.json`` of stabilityai/stable-video-diffusion-img2vid-xt.
SVD_XT_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 96,
    "in_channels": 8,
    "out_channels": 4,
    "down_block_types": [
        "CrossAttnDownBlockSpatioTemporal",
        "CrossAttnDownBlockSpatioTemporal",
        "CrossAttnDownBlockSpatioTemporal",
        "DownBlockSpatioTemporal",
    ],
    "up_block_types": [
        "UpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
        "CrossAttnUpBlockSpatioTemporal",
    ],
    "block_out_channels": [320, 640, 1280, 1280],
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 768,
    "layers_per_block": 2,
    "cross_attention_dim": 1024,
    "transformer_layers_per_block": 1,
    "num_attention_heads": [5, 10, 20, 20],
    "num_frames": 25,
}

#: ``vae/config.json`` (AutoencoderKLTemporalDecoder) of SVD / SVD-XT.
SVD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 768,
    "scaling_factor": 0.18215,
    "force_upcast": True,
}

#: ``image_encoder/config.json`` (CLIPVisionModelWithProjection, OpenCLIP ViT-H/14 visual tower);
#: the same numbers as ComfyUI's ``comfy/clip_vision_config_h.json``.
SVD_CLIP_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 16,
    "num_hidden_layers": 32,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 1024,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "num_channels": 3,
    "attention_dropout": 0.0,
    "dropout": 0.0,
}

#: CLIP image normalisation (``feature_extractor/preprocessor_config.json``; OpenAI CLIP numbers).
CLIP_IMAGE_PROCESSOR: dict[str, Any] = {
    "size": 224,
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
}

# Head widths of the released networks: they are not visible in tensor shapes.
SVD_UNET_HEAD_DIM = 64      # ComfyUI: SVD_img2vid.unet_extra_config["num_head_channels"]
OPENCLIP_VIT_H_HEAD_DIM = 80  # ViT-H/14: width 1280, 16 heads

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "conditioner.embedders.0.open_clip.model.visual."

# Optional safetensors metadata for files whose head widths are not the released ones
# (AVSync's tiny test models); the released file has none and gets the defaults above.
META_UNET_HEAD_DIM = "avsync_unet_head_dim"
META_CLIP_HEAD_DIM = "avsync_clip_head_dim"

#: The tensors that the backward-motion fine-tune trained (biases were frozen; a bias is
#: accepted in a delta only if it actually differs).
BACKWARD_PARAM_RE = re.compile(
    r"^(?:down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+\."
    r"temporal_transformer_blocks\.0\.attn1\.(?:to_v\.weight|to_out\.0\.weight|to_out\.0\.bias)$"
)
DELTA_FORMAT = "avsync_svd_backward_delta"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name_or_dtype) -> torch.dtype:
    """``"fp16"`` / ``"bf16"`` / ``"fp32"`` (or a torch dtype) -> torch dtype."""
    if isinstance(name_or_dtype, torch.dtype):
        if name_or_dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {name_or_dtype}; use one of {', '.join(DTYPES)}")
        return name_or_dtype
    try:
        return DTYPES[str(name_or_dtype)]
    except KeyError:
        raise ValueError(f"unknown precision '{name_or_dtype}'; use one of {', '.join(DTYPES)}") from None


def auto_precision(device) -> str:
    """fp16 on CUDA (the released code's precision), bf16 on Apple MPS, fp32 elsewhere:
    half-precision convolutions on a CPU are many times slower than fp32."""
    kind = getattr(device, "type", str(device))
    return {"cuda": "fp16", "mps": "bf16"}.get(kind, "fp32")


# --------------------------------------------------------------------------------------
# Model files
# --------------------------------------------------------------------------------------

SVD_XT_FILE = register(ModelFileSpec(
    key="svd_xt",
    filename="svd_xt.safetensors",
    folder="checkpoints",
    source="https://huggingface.co/stabilityai/stable-video-diffusion-img2vid-xt (file svd_xt.safetensors; "
           "gated: accept the licence on the page first)",
    description="Stable Video Diffusion XT (25 frames) single-file checkpoint: UNet, temporal VAE, CLIP image encoder",
))
SVD_XT_DIFFUSERS = register(ModelFileSpec(
    key="svd_xt_diffusers",
    filename="stable-video-diffusion-img2vid-xt",
    folder="diffusers",
    source="https://huggingface.co/stabilityai/stable-video-diffusion-img2vid-xt (whole repository: "
           "model_index.json, unet/, vae/, image_encoder/, feature_extractor/; the .fp16 variant files suffice)",
    description="Stable Video Diffusion XT in diffusers format (alternative to svd_xt.safetensors)",
    is_dir=True,
))
SVD_BACKWARD_FILE = register(ModelFileSpec(
    key="svd_backward_delta",
    filename="svd_backward_motion_delta_fp16.safetensors",
    folder="avsync_svd_backward",
    source="make it once with `avsync convert svd-backward --finetuned svd_reverse_motion_with_attnflip/unet "
           "--base SVD14_UNET --out svd_backward_motion_delta_fp16.safetensors` from the released fine-tuned UNet "
           "of jeanne-wang/svd_keyframe_interpolation (Google Drive folder 1H7vgiNVbxSeeleyJOqhoyRbJ97kGWGOK, linked "
           "in its README; mirrored at https://huggingface.co/fffiloni/svd_keyframe_interpolation) and the SVD-14 UNet "
           "(https://huggingface.co/stabilityai/stable-video-diffusion-img2vid: unet/ or svd.safetensors)",
    description="Backward-motion weights of Generative Inbetweening as ΔW on the 16 temporal attn1 to_v/to_out.0 "
                "tensors (added to SVD-XT at run time)",
))


# --------------------------------------------------------------------------------------
# The values that travel on the sockets
# --------------------------------------------------------------------------------------

@dataclass
class SVDModel:
    """SVD-XT as diffusers/transformers modules, each under ComfyUI's memory management.

    The value of the ``AVSYNC_SVD_MODEL`` socket. ``unet`` wraps
    ``UNetSpatioTemporalConditionModel``, ``vae`` ``AutoencoderKLTemporalDecoder``,
    ``image_encoder`` transformers' ``CLIPVisionModelWithProjection``.
    """

    unet: compat.ManagedModel
    vae: compat.ManagedModel
    image_encoder: compat.ManagedModel
    image_processor_config: dict
    dtype: torch.dtype
    source: str
    config: dict

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of weights per component at the model's dtype."""
        return {
            "unet": module_bytes(self.unet.module),
            "vae": module_bytes(self.vae.module),
            "image_encoder": module_bytes(self.image_encoder.module),
        }

    def __repr__(self) -> str:  # shown in ComfyUI's debug output; keep it short
        return f"SVDModel(source={self.source!r}, dtype={self.dtype}, channels={self.config.get('block_out_channels')})"


@dataclass
class BackwardMotionDelta:
    """ΔW for the backward branch, keyed by diffusers UNet parameter names.

    The value of the ``AVSYNC_SVD_BACKWARD`` socket. The base weights stay in the one SVD-XT
    UNet; the backward branch uses ``base + ΔW`` for the 16 temporal ``attn1.to_v`` /
    ``attn1.to_out.0`` tensors only.
    """

    deltas: dict[str, torch.Tensor]
    source: str
    dtype: torch.dtype
    metadata: dict = field(default_factory=dict)

    def names(self) -> list[str]:
        return sorted(self.deltas)

    def backward_weights(self, unet_param_name: str, base_tensor: torch.Tensor) -> torch.Tensor:
        """``base + ΔW`` in the base tensor's dtype and device (summed in fp32). A bias with no
        stored ΔW is returned unchanged (biases were frozen in training)."""
        try:
            delta = self.deltas[unet_param_name]
        except KeyError:
            if unet_param_name.endswith(".bias"):
                return base_tensor
            raise KeyError(f"the backward-motion delta has no tensor '{unet_param_name}'") from None
        if delta.shape != base_tensor.shape:
            raise ModelFormatError(
                f"backward-motion delta '{unet_param_name}' has shape {tuple(delta.shape)} but the UNet's tensor "
                f"has {tuple(base_tensor.shape)}: the delta was made for a different model"
            )
        summed = base_tensor.detach().float() + delta.to(device=base_tensor.device, dtype=torch.float32)
        return summed.to(base_tensor.dtype)

    def check_against(self, unet: torch.nn.Module) -> None:
        """Raise :class:`ModelFormatError` unless every ΔW names a UNet tensor of the same shape."""
        params = dict(unet.named_parameters())
        problems = []
        for name, d in sorted(self.deltas.items()):
            if name not in params:
                problems.append(f"{name} (not in the UNet)")
            elif params[name].shape != d.shape:
                problems.append(f"{name} (delta {tuple(d.shape)} vs UNet {tuple(params[name].shape)})")
        if problems:
            raise ModelFormatError(
                f"backward-motion delta '{self.source}' does not fit this SVD UNet: " + "; ".join(problems[:6])
                + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
            )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.deltas.values())

    def __repr__(self) -> str:
        return f"BackwardMotionDelta(source={self.source!r}, tensors={len(self.deltas)}, dtype={self.dtype})"


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------



def _build_unet(config: dict):
    from diffusers import UNetSpatioTemporalConditionModel

    return _meta_module(lambda: UNetSpatioTemporalConditionModel.from_config(config))


def _build_vae(config: dict):
    from diffusers import AutoencoderKLTemporalDecoder

    return _meta_module(lambda: AutoencoderKLTemporalDecoder.from_config(config))


def _build_clip(config: dict):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    return _meta_module(lambda: CLIPVisionModelWithProjection(cfg))


class LazyStateDict(Mapping):
    """A read-only name -> tensor mapping over safetensors files (memory-mapped, read on access).

    Each file is opened through :func:`~avsync.loaders.checked_file.open_checked`, so an empty,
    truncated or garbage file fails with the same clear error as everywhere else."""

    def __init__(self, files: list[Path], rename: Optional[Callable[[str], Optional[str]]] = None, *,
                 what: str = "SVD weights (safetensors)", family_hint: Optional[str] = None):
        self._where: dict[str, tuple[Any, str]] = {}
        self.metadata: dict[str, str] = {}
        for f in files:
            h = open_checked(f, what=what, family_hint=family_hint)
            self.metadata.update(h.metadata)
            for k in h:
                new = rename(k) if rename else k
                if new is not None:
                    self._where[new] = (h, k)

    def __getitem__(self, key: str) -> torch.Tensor:
        h, k = self._where[key]
        return h[k]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


# --------------------------------------------------------------------------------------
# ldm (Stability generative-models / ComfyUI) <-> diffusers key mapping
# --------------------------------------------------------------------------------------

# diffusers ResnetBlock2D / TemporalResnetBlock names -> ldm ResBlock names
_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP_TO_LDM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _unet_resnet_suffix(rest: str) -> str:
    # spatial_res_block.norm1.weight -> in_layers.0.weight; temporal_res_block.* -> time_stack.*
    if rest.startswith("time_mixer."):
        return rest
    for prefix, ldm_prefix in (("spatial_res_block.", ""), ("temporal_res_block.", "time_stack.")):
        if rest.startswith(prefix):
            layer, _, param = rest[len(prefix):].rpartition(".")
            if layer in _RESNET_TO_LDM:
                return f"{ldm_prefix}{_RESNET_TO_LDM[layer]}.{param}"
    raise KeyError(rest)


def _unet_attention_suffix(rest: str) -> str:
    # The spatial transformer blocks keep their names; the temporal ones live in ``time_stack``.
    if rest.startswith("temporal_transformer_blocks."):
        return "time_stack." + rest[len("temporal_transformer_blocks."):]
    if rest.startswith("time_pos_embed.linear_1."):
        return "time_pos_embed.0." + rest[len("time_pos_embed.linear_1."):]
    if rest.startswith("time_pos_embed.linear_2."):
        return "time_pos_embed.2." + rest[len("time_pos_embed.linear_2."):]
    return rest


def svd_unet_key_map(diffusers_keys, layers_per_block: int) -> dict[str, str]:
    """diffusers ``UNetSpatioTemporalConditionModel`` key -> ldm ``UNetModel`` key (no prefix).

    Down level ``x`` holds ``layers_per_block`` (res, attention) pairs and a downsampler; an up
    level holds ``layers_per_block + 1`` pairs and an upsampler, which sits after the attention
    when the level has one (``output_blocks.N.2.conv``) and after the resnet otherwise (``N.1``).
    """
    keys = list(diffusers_keys)
    L = int(layers_per_block)
    up_has_attention = {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for k in keys:
        layer, _, param = k.rpartition(".")
        if layer in _UNET_TOP_TO_LDM:
            out[k] = f"{_UNET_TOP_TO_LDM[layer]}.{param}"
            continue
        m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)$", k)
        if m:
            x, kind, i, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            n = 1 + (L + 1) * x + i
            if kind == "resnets":
                out[k] = f"input_blocks.{n}.0.{_unet_resnet_suffix(rest)}"
            elif kind == "attentions":
                out[k] = f"input_blocks.{n}.1.{_unet_attention_suffix(rest)}"
            else:  # downsamplers.0.conv.*
                out[k] = f"input_blocks.{1 + (L + 1) * x + L}.0.op.{rest.split('.', 1)[1]}"
            continue
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", k)
        if m:
            kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
            if kind == "resnets":
                out[k] = f"middle_block.{2 * i}.{_unet_resnet_suffix(rest)}"
            else:
                out[k] = f"middle_block.1.{_unet_attention_suffix(rest)}"
            continue
        m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)$", k)
        if m:
            x, kind, i, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            n = (L + 1) * x + i
            if kind == "resnets":
                out[k] = f"output_blocks.{n}.0.{_unet_resnet_suffix(rest)}"
            elif kind == "attentions":
                out[k] = f"output_blocks.{n}.1.{_unet_attention_suffix(rest)}"
            else:  # upsamplers.0.conv.*
                c = 2 if x in up_has_attention else 1
                out[k] = f"output_blocks.{(L + 1) * x + L}.{c}.{rest}"
            continue
        raise KeyError(f"no ldm name known for SVD UNet key '{k}'")
    return out


_VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_RESNET_TO_LDM = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                      "conv_shortcut": "nin_shortcut"}
_VAE_TEMPORAL_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                        "conv2": "out_layers.3"}


def _vae_resnet_suffix(rest: str) -> str:
    if rest == "time_mixer.mix_factor":
        return "mix_factor"
    for prefix in ("spatial_res_block.", "temporal_res_block.", ""):
        if rest.startswith(prefix):
            layer, _, param = rest[len(prefix):].rpartition(".")
            if prefix == "temporal_res_block." and layer in _VAE_TEMPORAL_TO_LDM:
                return f"time_stack.{_VAE_TEMPORAL_TO_LDM[layer]}.{param}"
            if prefix != "temporal_res_block." and layer in _VAE_RESNET_TO_LDM:
                return f"{_VAE_RESNET_TO_LDM[layer]}.{param}"
    raise KeyError(rest)


def _vae_attention_suffix(rest: str) -> str:
    layer, _, param = rest.rpartition(".")
    return f"{_VAE_ATTN_TO_LDM[layer]}.{param}"


def svd_vae_key_map(diffusers_keys, keep_quant_convs: bool = False) -> dict[str, str]:
    """diffusers ``AutoencoderKLTemporalDecoder`` key -> ldm ``AutoencodingEngine`` key (no prefix).

    ``quant_conv`` has no counterpart (generative-models' ``AutoencodingEngine`` has none; the
    diffusers model's is the identity) and is left out of the map. ``keep_quant_convs`` maps
    ``quant_conv`` / ``post_quant_conv`` to themselves: the SD-style ``AutoencoderKL`` (diffusers
    ``AutoencoderKL`` <-> ldm/lvdm ``AutoencoderKL``, used by KeyVID) has both, and otherwise the
    same names as the temporal VAE's spatial layers.
    """
    keys = list(diffusers_keys)
    n_up = 1 + max((int(m.group(1)) for k in keys if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))), default=-1)
    top = {
        "encoder.conv_in": "encoder.conv_in", "encoder.conv_norm_out": "encoder.norm_out",
        "encoder.conv_out": "encoder.conv_out", "decoder.conv_in": "decoder.conv_in",
        "decoder.conv_norm_out": "decoder.norm_out", "decoder.conv_out": "decoder.conv_out",
        "decoder.time_conv_out": "decoder.conv_out.time_mix_conv",
    }
    out = {}
    for k in keys:
        layer, _, param = k.rpartition(".")
        if layer in ("quant_conv", "post_quant_conv") and keep_quant_convs:
            out[k] = k
            continue
        if layer == "quant_conv":
            continue
        if layer in top:
            out[k] = f"{top[layer]}.{param}"
            continue
        m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", k)
        if m:
            part, kind, i, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
            if kind == "resnets":
                if i > 1:
                    raise KeyError(f"{k}: the ldm VAE mid block has two resnets (layers_per_block must be 2)")
                out[k] = f"{part}.mid.block_{i + 1}.{_vae_resnet_suffix(rest)}"
            else:
                out[k] = f"{part}.mid.attn_1.{_vae_attention_suffix(rest)}"
            continue
        m = re.match(r"encoder\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.+)$", k)
        if m:
            x, kind, i, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            if kind == "resnets":
                out[k] = f"encoder.down.{x}.block.{i}.{_vae_resnet_suffix(rest)}"
            else:
                out[k] = f"encoder.down.{x}.downsample.{rest}"
            continue
        m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)$", k)
        if m:
            x, kind, i, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            level = n_up - 1 - x  # ldm numbers decoder levels from the finest one
            if kind == "resnets":
                out[k] = f"decoder.up.{level}.block.{i}.{_vae_resnet_suffix(rest)}"
            else:
                out[k] = f"decoder.up.{level}.upsample.{rest}"
            continue
        raise KeyError(f"no ldm name known for SVD VAE key '{k}'")
    return out


def _is_vae_1x1_attention(ldm_key: str) -> bool:
    # ldm's VAE attention uses 1x1 convolutions; diffusers uses linear layers.
    return bool(re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key))


_CLIP_LAYER_TO_OPENCLIP = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_CLIP_TOP_TO_OPENCLIP = {
    "vision_model.embeddings.class_embedding": "class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "positional_embedding",
    "vision_model.pre_layrnorm.weight": "ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "ln_pre.bias",
    "vision_model.post_layernorm.weight": "ln_post.weight",
    "vision_model.post_layernorm.bias": "ln_post.bias",
}


def openclip_resblocks_to_transformers(tensors: Mapping[str, torch.Tensor], layers_prefix: str,
                                       cast: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
                                       what: str = "OpenCLIP") -> dict:
    """OpenCLIP ``transformer.resblocks.N.*`` tensors -> transformers ``CLIPEncoderLayer`` names
    under ``layers_prefix`` (e.g. ``vision_model.encoder.layers.``); other keys are ignored.

    ``attn.in_proj_*`` splits into q/k/v. Shared by the image tower (SVD, KeyVID) and the text
    tower (KeyVID); the facts are those of ComfyUI's ``clip_vision.convert_to_transformers``.
    """
    inverse_layer = {v: k for k, v in _CLIP_LAYER_TO_OPENCLIP.items()}
    out = {}
    for k in tensors:
        if not k.startswith("transformer."):
            continue
        m = re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", k)
        if m:
            i, param = m.groups()
            q, k_, v = cast(tensors[k]).chunk(3, dim=0)
            base = f"{layers_prefix}{i}.self_attn."
            out[f"{base}q_proj.{param}"] = q.contiguous()
            out[f"{base}k_proj.{param}"] = k_.contiguous()
            out[f"{base}v_proj.{param}"] = v.contiguous()
            continue
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", k)
        if not m or m.group(2) not in inverse_layer:
            raise ModelFormatError(f"unexpected {what} tensor '{k}'")
        i, layer, param = m.groups()
        out[f"{layers_prefix}{i}.{inverse_layer[layer]}.{param}"] = cast(tensors[k])
    return out


def openclip_visual_to_transformers(visual: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype] = None) -> dict:
    """OpenCLIP ``visual.*`` tensors (prefix removed) -> ``CLIPVisionModelWithProjection`` state dict.

    ``attn.in_proj_*`` splits into q/k/v; ``proj`` ([width, dim]) is transposed into
    ``visual_projection.weight``. Same facts as ComfyUI's ``clip_vision.convert_to_transformers``.
    """
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    out = {}
    inverse_top = {v: k for k, v in _CLIP_TOP_TO_OPENCLIP.items()}
    for k in visual:
        if k in inverse_top:
            out[inverse_top[k]] = cast(visual[k])
        elif k == "proj":
            out["visual_projection.weight"] = cast(visual[k]).t().contiguous()
        elif not k.startswith("transformer."):
            raise ModelFormatError(f"unexpected OpenCLIP image-encoder tensor '{k}'")
    out.update(openclip_resblocks_to_transformers(visual, "vision_model.encoder.layers.", cast,
                                                  "OpenCLIP image-encoder"))
    return out


def transformers_to_openclip_visual(state: Mapping[str, torch.Tensor]) -> dict:
    """Inverse of :func:`openclip_visual_to_transformers`."""
    out = {}
    for k, t in state.items():
        if k in _CLIP_TOP_TO_OPENCLIP:
            out[_CLIP_TOP_TO_OPENCLIP[k]] = t
        elif k == "visual_projection.weight":
            out["proj"] = t.t().contiguous()
        elif k.endswith("position_ids"):
            continue
        else:
            m = re.match(r"vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", k)
            if not m:
                raise KeyError(f"no OpenCLIP name known for '{k}'")
            i, layer, param = m.groups()
            if layer in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                continue
            out[f"transformer.resblocks.{i}.{_CLIP_LAYER_TO_OPENCLIP[layer]}.{param}"] = t
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        base = f"vision_model.encoder.layers.{i}.self_attn."
        for param in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat(
                [state[f"{base}{p}_proj.{param}"] for p in ("q", "k", "v")], dim=0
            )
    return out


# --------------------------------------------------------------------------------------
# Config inference from ldm tensor shapes (so that tiny test models convert too)
# --------------------------------------------------------------------------------------

def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def infer_unet_config(ldm: Mapping[str, torch.Tensor], head_dim: Optional[int] = SVD_UNET_HEAD_DIM) -> dict:
    """diffusers UNet config from an ldm SVD UNet state dict (prefix removed).

    ``head_dim`` None gives one head per block: enough for key names and shapes (they do not
    depend on the head count), not for running the network.
    """
    keys = list(ldm)
    if "input_blocks.0.0.weight" not in ldm or not any(".time_stack." in k for k in keys):
        raise ModelFormatError("not an SVD UNet: no input_blocks.0.0 / time_stack tensors")
    op_blocks = _indices(keys, r"input_blocks\.(\d+)\.0\.op\.weight$")
    if not op_blocks:
        raise ModelFormatError("SVD UNet: no downsampler found (input_blocks.N.0.op)")
    L = op_blocks[0] - 1
    n_input = max(_indices(keys, r"input_blocks\.(\d+)\."))
    levels = (n_input - L) // (L + 1) + 1
    channels = [int(ldm[f"input_blocks.{1 + (L + 1) * x}.0.out_layers.3.weight"].shape[0]) for x in range(levels)]
    has_attn = [f"input_blocks.{1 + (L + 1) * x}.1.proj_in.weight" in ldm for x in range(levels)]
    heads = []
    for c in channels:
        if head_dim is None:
            heads.append(1)
            continue
        if c % head_dim:
            raise ModelFormatError(f"SVD UNet: width {c} is not a multiple of the head width {head_dim}")
        heads.append(c // head_dim)
    ctx_keys = [k for k in keys if k.endswith("time_stack.0.attn2.to_k.weight")]
    adm = int(ldm["label_emb.0.0.weight"].shape[1])
    cfg = dict(SVD_XT_UNET_CONFIG)
    cfg.update(
        in_channels=int(ldm["input_blocks.0.0.weight"].shape[1]),
        out_channels=int(ldm["out.2.weight"].shape[0]),
        block_out_channels=channels,
        layers_per_block=L,
        num_attention_heads=heads,
        cross_attention_dim=int(ldm[ctx_keys[0]].shape[1]) if ctx_keys else SVD_XT_UNET_CONFIG["cross_attention_dim"],
        projection_class_embeddings_input_dim=adm,
        addition_time_embed_dim=adm // 3,  # three added time ids: fps, motion bucket, noise augmentation
        down_block_types=["CrossAttnDownBlockSpatioTemporal" if a else "DownBlockSpatioTemporal" for a in has_attn],
        up_block_types=["CrossAttnUpBlockSpatioTemporal" if a else "UpBlockSpatioTemporal" for a in reversed(has_attn)],
    )
    return cfg


def infer_vae_config(ldm: Mapping[str, torch.Tensor]) -> dict:
    keys = list(ldm)
    levels = _indices(keys, r"encoder\.down\.(\d+)\.")
    if not levels or "decoder.conv_out.time_mix_conv.weight" not in ldm:
        raise ModelFormatError("not an SVD temporal VAE: no encoder.down.* / decoder.conv_out.time_mix_conv tensors")
    channels = [int(ldm[f"encoder.down.{x}.block.0.conv1.weight"].shape[0]) for x in levels]
    layers = len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\."))
    if layers != 2:
        # diffusers' TemporalDecoder gives its mid block ``layers_per_block`` resnets; ldm always has two
        raise ModelFormatError(f"SVD VAE: {layers} resnets per level; the temporal VAE layout needs 2")
    cfg = dict(SVD_VAE_CONFIG)
    cfg.update(
        in_channels=int(ldm["encoder.conv_in.weight"].shape[1]),
        out_channels=int(ldm["decoder.conv_out.weight"].shape[0]),
        block_out_channels=channels,
        down_block_types=["DownEncoderBlock2D"] * len(channels),
        layers_per_block=layers,
        latent_channels=int(ldm["encoder.conv_out.weight"].shape[0]) // 2,
    )
    return cfg


def infer_clip_config(visual: Mapping[str, torch.Tensor], head_dim: int = OPENCLIP_VIT_H_HEAD_DIM) -> dict:
    if "class_embedding" not in visual or "conv1.weight" not in visual:
        raise ModelFormatError("not an OpenCLIP image tower: no class_embedding / conv1 tensors")
    width = int(visual["class_embedding"].shape[0])
    patch = int(visual["conv1.weight"].shape[-1])
    grid = math.isqrt(int(visual["positional_embedding"].shape[0]) - 1)
    if width % head_dim:
        raise ModelFormatError(f"image encoder: width {width} is not a multiple of the head width {head_dim}")
    cfg = dict(SVD_CLIP_VISION_CONFIG)
    cfg.update(
        hidden_size=width,
        patch_size=patch,
        image_size=grid * patch,
        num_channels=int(visual["conv1.weight"].shape[1]),
        num_hidden_layers=len(_indices(visual, r"transformer\.resblocks\.(\d+)\.")),
        intermediate_size=int(visual["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        num_attention_heads=width // head_dim,
        projection_dim=int(visual["proj"].shape[1]),
    )
    return cfg


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

def _wrap(unet, vae, clip, processor: dict, dtype: torch.dtype, source: str) -> SVDModel:
    return SVDModel(
        unet=compat.manage_model(unet, {"kind": "svd_unet", "source": source}),
        vae=compat.manage_model(vae, {"kind": "svd_vae", "source": source}),
        image_encoder=compat.manage_model(clip, {"kind": "svd_image_encoder", "source": source}),
        image_processor_config=dict(processor),
        dtype=dtype,
        source=source,
        config=dict(unet.config),
    )


def build_unet_from_ldm(ldm: Mapping[str, torch.Tensor], dtype: torch.dtype, head_dim: int = SVD_UNET_HEAD_DIM):
    """A diffusers SVD UNet from an ldm-layout UNet state dict (prefix removed)."""
    cfg = infer_unet_config(ldm, head_dim)
    unet = _build_unet(cfg)
    key_map = svd_unet_key_map(unet.state_dict().keys(), cfg["layers_per_block"])
    _check_mapped_keys(ldm, key_map.values(), "SVD UNet (model.diffusion_model.*)")
    return _assign(unet, _cast_all(ldm, dtype, key_map), "SVD UNet")


def build_vae_from_ldm(ldm: Mapping[str, torch.Tensor], dtype: torch.dtype):
    cfg = infer_vae_config(ldm)
    vae = _build_vae(cfg)
    key_map = svd_vae_key_map(vae.state_dict().keys())
    _check_mapped_keys(ldm, key_map.values(), "SVD VAE (first_stage_model.*)")
    state = {}
    for new, old in key_map.items():
        t = ldm[old]
        if _is_vae_1x1_attention(old):
            t = t.reshape(t.shape[0], t.shape[1])
        state[new] = t.to(dtype)
    # generative-models' AutoencodingEngine has no quant_conv: it is the identity here.
    c = 2 * cfg["latent_channels"]
    state["quant_conv.weight"] = torch.eye(c, dtype=dtype).reshape(c, c, 1, 1)
    state["quant_conv.bias"] = torch.zeros(c, dtype=dtype)
    return _assign(vae, state, "SVD VAE")


def build_clip_from_openclip(visual: Mapping[str, torch.Tensor], dtype: torch.dtype,
                             head_dim: int = OPENCLIP_VIT_H_HEAD_DIM):
    cfg = infer_clip_config(visual, head_dim)
    clip = _build_clip(cfg)
    return _assign(clip, openclip_visual_to_transformers(visual, dtype), "SVD image encoder")


def _check_mapped_keys(ldm: Mapping, expected, what: str) -> None:
    expected = set(expected)
    have = set(ldm)
    missing, extra = sorted(expected - have), sorted(have - expected)
    if missing or extra:
        raise ModelFormatError(
            f"{what}: the file's tensors do not match the SVD layout"
            + (f"; missing {len(missing)} (e.g. {', '.join(missing[:4])})" if missing else "")
            + (f"; unexpected {len(extra)} (e.g. {', '.join(extra[:4])})" if extra else "")
        )


def _prefixed(state: Mapping[str, torch.Tensor], prefix: str) -> dict:
    """A lazy view of the tensors under ``prefix`` with the prefix removed."""
    return _View(state, prefix)


def load_svd_single_file(path, dtype=torch.float16, *, unet_head_dim: Optional[int] = None,
                         clip_head_dim: Optional[int] = None) -> SVDModel:
    """Load ``svd_xt.safetensors`` (ldm layout: UNet, temporal VAE, OpenCLIP image tower)."""
    path = Path(path)
    dtype = parse_dtype(dtype)
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise ModelFormatError(f"{path.name}: AVSync loads SVD single files only as .safetensors")
    state = open_checked(path, what="an SVD / SVD-XT single-file checkpoint (svd_xt.safetensors: UNet, VAE and "
                                    "image encoder)", required_prefixes=(UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX),
                         family_hint=f"get it from {SVD_XT_FILE.source}")
    meta = state.metadata
    unet_hd = unet_head_dim or int(meta.get(META_UNET_HEAD_DIM, SVD_UNET_HEAD_DIM))
    clip_hd = clip_head_dim or int(meta.get(META_CLIP_HEAD_DIM, OPENCLIP_VIT_H_HEAD_DIM))
    unet = build_unet_from_ldm(_prefixed(state, UNET_PREFIX), dtype, unet_hd)
    vae = build_vae_from_ldm(_prefixed(state, VAE_PREFIX), dtype)
    clip = build_clip_from_openclip(_prefixed(state, CLIP_PREFIX), dtype, clip_hd)
    return _wrap(unet, vae, clip, CLIP_IMAGE_PROCESSOR, dtype, str(path))


def _weight_files(folder: Path, stem: str) -> list[Path]:
    """safetensors weight files of one diffusers/transformers component (plain, fp16 variant, or sharded)."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (folder / name).is_file():
            return [folder / name]
    for name in (f"{stem}.safetensors.index.json", f"{stem}.safetensors.index.fp16.json",
                 f"{stem}.fp16.safetensors.index.json"):
        index = folder / name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / s for s in shards]
    return []


def _read_component(folder: Path, stem: str, what: str) -> tuple[dict, LazyStateDict]:
    cfg_path = folder / "config.json"
    files = _weight_files(folder, stem)
    if not cfg_path.is_file() or not files:
        pickled = sorted(p.name for p in folder.glob("*.bin")) if folder.is_dir() else []
        hint = (f" (found {', '.join(pickled)}: convert pickled weights to safetensors first)" if pickled else "")
        raise ModelFormatError(
            f"{folder}: {what} needs config.json and {stem}.safetensors (or its .fp16 variant){hint}"
        )
    return json.loads(cfg_path.read_text()), LazyStateDict(files, what=f"the {what} weights of an SVD diffusers folder")


def load_svd_diffusers(folder, dtype=torch.float16) -> SVDModel:
    """Load SVD(-XT) from a diffusers-format folder (safetensors weights only)."""
    folder = Path(folder)
    dtype = parse_dtype(dtype)
    if not folder.is_dir():
        raise ModelFormatError(f"{folder}: not a diffusers model folder")
    ucfg, ust = _read_component(folder / "unet", "diffusion_pytorch_model", "unet/")
    vcfg, vst = _read_component(folder / "vae", "diffusion_pytorch_model", "vae/")
    ccfg, cst = _read_component(folder / "image_encoder", "model", "image_encoder/")
    if ucfg.get("_class_name", "UNetSpatioTemporalConditionModel") != "UNetSpatioTemporalConditionModel":
        raise ModelFormatError(f"{folder}/unet: a {ucfg.get('_class_name')}, not an SVD UNet")
    unet = _assign(_build_unet(ucfg), _cast_all(ust, dtype), "SVD UNet")
    vae = _assign(_build_vae(vcfg), _cast_all(vst, dtype), "SVD VAE")
    cst_named = {k: k for k in cst if not k.endswith("position_ids")}
    clip = _assign(_build_clip(ccfg), _cast_all(cst, dtype, cst_named), "SVD image encoder")
    processor = dict(CLIP_IMAGE_PROCESSOR)
    pp = folder / "feature_extractor" / "preprocessor_config.json"
    if pp.is_file():
        p = json.loads(pp.read_text())
        size = p.get("crop_size", p.get("size", 224))
        if isinstance(size, dict):
            size = size.get("height", size.get("shortest_edge", 224))
        processor.update(size=int(size), mean=list(p.get("image_mean", processor["mean"])),
                         std=list(p.get("image_std", processor["std"])))
    return _wrap(unet, vae, clip, processor, dtype, str(folder))


def load_svd(path, dtype=torch.float16) -> SVDModel:
    """A diffusers folder or a single ``.safetensors`` file."""
    path = Path(path)
    return load_svd_diffusers(path, dtype) if path.is_dir() else load_svd_single_file(path, dtype)


# --------------------------------------------------------------------------------------
# diffusers -> ldm (writing single files: tests, round trips)
# --------------------------------------------------------------------------------------

def svd_to_ldm_state_dict(unet: torch.nn.Module, vae: torch.nn.Module, image_encoder: torch.nn.Module) -> dict:
    """The single-file (ldm) state dict of diffusers/transformers SVD modules.

    Refuses a VAE whose ``quant_conv`` is not the identity: the ldm layout has no place for it.
    """
    out = {}
    usd = unet.state_dict()
    for k, v in svd_unet_key_map(usd.keys(), unet.config.layers_per_block).items():
        out[UNET_PREFIX + v] = usd[k]
    vsd = vae.state_dict()
    qw, qb = vsd["quant_conv.weight"], vsd["quant_conv.bias"]
    c = qw.shape[0]
    if not (torch.equal(qw.reshape(c, c), torch.eye(c, dtype=qw.dtype)) and not qb.any()):
        raise ModelFormatError("this VAE's quant_conv is not the identity; the ldm layout cannot hold it")
    for k, v in svd_vae_key_map(vsd.keys()).items():
        t = vsd[k]
        out[VAE_PREFIX + v] = t.reshape(*t.shape, 1, 1) if _is_vae_1x1_attention(v) else t
    for k, v in transformers_to_openclip_visual(image_encoder.state_dict()).items():
        out[CLIP_PREFIX + k] = v
    return {k: v.detach().contiguous() for k, v in out.items()}


def save_svd_diffusers(model: SVDModel, out_dir) -> Path:
    """Write ``model`` as a diffusers folder (safetensors weights)."""
    from transformers import CLIPImageProcessor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.unet.module.save_pretrained(out_dir / "unet", safe_serialization=True)
    model.vae.module.save_pretrained(out_dir / "vae", safe_serialization=True)
    model.image_encoder.module.save_pretrained(out_dir / "image_encoder", safe_serialization=True)
    p = model.image_processor_config
    CLIPImageProcessor(
        size={"shortest_edge": p["size"]}, crop_size={"height": p["size"], "width": p["size"]},
        image_mean=p["mean"], image_std=p["std"], do_center_crop=True, resample=3,
    ).save_pretrained(out_dir / "feature_extractor")
    (out_dir / "model_index.json").write_text(json.dumps({
        "_class_name": "StableVideoDiffusionPipeline",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "unet": ["diffusers", "UNetSpatioTemporalConditionModel"],
        "vae": ["diffusers", "AutoencoderKLTemporalDecoder"],
    }, indent=2) + "\n")
    return out_dir


# --------------------------------------------------------------------------------------
# Backward-motion weights (ΔW)
# --------------------------------------------------------------------------------------

def is_backward_param(name: str) -> bool:
    return bool(BACKWARD_PARAM_RE.match(name))


def compute_backward_delta(finetuned_unet_state_dict: Mapping[str, torch.Tensor],
                           svd14_unet_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ΔW = W_finetuned − W_svd14 (fp32) on the temporal ``attn1.to_v`` / ``attn1.to_out.0`` tensors.

    Both state dicts use diffusers names. Raises :class:`ModelFormatError` if the two UNets do
    not have the same tensors, or if anything other than those temporal tensors differs (then the
    file is not the backward-motion fine-tune of this base, and adding ΔW to SVD-XT would be wrong).
    """
    ft, base = finetuned_unet_state_dict, svd14_unet_state_dict
    only_ft, only_base = sorted(set(ft) - set(base)), sorted(set(base) - set(ft))
    if only_ft or only_base:
        raise ModelFormatError(
            "the fine-tuned and base UNets do not have the same tensors"
            + (f"; only in the fine-tuned one: {', '.join(only_ft[:5])}" if only_ft else "")
            + (f"; only in the base: {', '.join(only_base[:5])}" if only_base else "")
        )
    deltas: dict[str, torch.Tensor] = {}
    other_diffs: list[str] = []
    for name in sorted(ft):
        a, b = ft[name], base[name]
        if a.shape != b.shape:
            other_diffs.append(f"{name} (shape {tuple(a.shape)} vs {tuple(b.shape)})")
            continue
        d = a.float() - b.float()
        changed = bool(d.any())
        if is_backward_param(name):
            # the trained weights always go in; a frozen bias only if it really moved
            if name.endswith(".weight") or changed:
                deltas[name] = d
        elif changed:
            other_diffs.append(f"{name} (max |Δ| {d.abs().max().item():.3g})")
    if other_diffs:
        raise ModelFormatError(
            f"the fine-tuned UNet differs from the base in {len(other_diffs)} tensors besides the temporal "
            f"attn1 to_v/to_out.0 weights, so it is not the backward-motion fine-tune of this base (wrong base: "
            f"it must be SVD-14, stabilityai/stable-video-diffusion-img2vid). Differing: "
            + "; ".join(other_diffs[:10]) + (f"; and {len(other_diffs) - 10} more" if len(other_diffs) > 10 else "")
        )
    if not deltas:
        raise ModelFormatError("the UNets have no temporal transformer attn1 to_v / to_out.0 tensors")
    if not any(bool(d.any()) for d in deltas.values()):
        raise ModelFormatError("the fine-tuned UNet is identical to the base: nothing to extract")
    return deltas


def save_backward_delta(deltas: Mapping[str, torch.Tensor], path, dtype=torch.float16,
                        metadata: Optional[dict] = None) -> Path:
    from safetensors.torch import save_file

    dtype = parse_dtype(dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": DELTA_FORMAT, "base": "stabilityai/stable-video-diffusion-img2vid",
            "applies_to": "stabilityai/stable-video-diffusion-img2vid-xt"}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    save_file({k: v.to(dtype).contiguous() for k, v in deltas.items()}, str(path), metadata=meta)
    return path


def load_backward_delta(path, dtype=None) -> BackwardMotionDelta:
    """Load a ΔW file written by ``avsync convert svd-backward``. ``dtype`` None keeps the file's."""
    path = Path(path)
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise ModelFormatError(f"{path.name}: backward-motion weights must be a .safetensors ΔW file "
                               f"(make one with `avsync convert svd-backward`)")
    state = open_checked(path, what="a backward-motion ΔW file (svd_backward_motion_delta_fp16.safetensors)",
                         family_hint="make it with `avsync convert svd-backward`")
    names = list(state)
    bad = [n for n in names if not is_backward_param(n)]
    if not names or bad:
        hint = ""
        if any(n.startswith(("down_blocks", "up_blocks", "conv_in", "model.diffusion_model")) for n in bad):
            hint = (" It looks like a whole UNet: turn it into a ΔW file with `avsync convert svd-backward "
                    "--finetuned THIS --base SVD14_UNET --out svd_backward_motion_delta_fp16.safetensors`.")
        raise ModelFormatError(
            f"{path.name}: not a backward-motion ΔW file (expected only temporal attn1 to_v/to_out.0 tensors"
            + (f"; found e.g. {', '.join(bad[:3])}" if bad else "; it is empty") + ")." + hint
        )
    file_dtype = state[names[0]].dtype
    dtype = parse_dtype(dtype) if dtype is not None else file_dtype
    deltas = {n: state[n].to(dtype) for n in names}
    return BackwardMotionDelta(deltas=deltas, source=str(path), dtype=dtype, metadata=dict(state.metadata))


# --------------------------------------------------------------------------------------
# Reading UNet weights for the converter (diffusers folder, safetensors, pickled, single file)
# --------------------------------------------------------------------------------------

def read_unet_state_dict(path) -> Mapping[str, torch.Tensor]:
    """A UNet's tensors with diffusers names, from any of the layouts users have.

    Accepts a diffusers model folder (with ``unet/``) or a ``unet`` folder itself, a
    ``.safetensors`` file (diffusers names, or an ldm single file such as ``svd.safetensors``),
    or a pickled ``.bin`` / ``.pt`` / ``.ckpt`` (loaded with ``weights_only=True``).
    """
    path = Path(path)
    if path.is_dir():
        folder = path / "unet" if (path / "unet").is_dir() else path
        files = _weight_files(folder, "diffusion_pytorch_model")
        if files:
            return LazyStateDict(files)
        for name in ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"):
            if (folder / name).is_file():
                return _load_pickled(folder / name)
        raise ModelFormatError(f"{path}: no diffusion_pytorch_model(.fp16).safetensors or .bin in {folder}")
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such file or folder; expected {_UNET_WHAT}")
    if path.suffix.lower() in (".safetensors", ".sft"):
        state: Mapping[str, torch.Tensor] = open_checked(path, what=_UNET_WHAT)
    else:
        state = _load_pickled(path)
    if any(k.startswith(UNET_PREFIX) for k in state):
        ldm = _prefixed(state, UNET_PREFIX)
        cfg = infer_unet_config(ldm, head_dim=None)  # only names are needed here
        key_map = svd_unet_key_map(_build_unet(cfg).state_dict().keys(), cfg["layers_per_block"])
        _check_mapped_keys(ldm, key_map.values(), f"{path.name} (model.diffusion_model.*)")
        return _Renamed(ldm, key_map)
    return state


class _Renamed(Mapping):
    def __init__(self, state: Mapping, new_to_old: dict):
        self._state, self._map = state, new_to_old

    def __getitem__(self, k):
        return self._state[self._map[k]]

    def __iter__(self):
        return iter(self._map)

    def __len__(self):
        return len(self._map)


_UNET_WHAT = "an SVD UNet (diffusers weights, an ldm single file, or a pickled .bin/.ckpt)"


def _load_pickled(path: Path) -> dict:
    return load_pickled_checked(path, what=_UNET_WHAT)


# --------------------------------------------------------------------------------------
# Memory estimates (for the sampler's "will it fit" check)
# --------------------------------------------------------------------------------------

def estimate_weight_bytes(dtype=torch.float16, unet_config: Optional[dict] = None,
                          vae_config: Optional[dict] = None, clip_config: Optional[dict] = None) -> dict[str, int]:
    """Bytes of weights per component at ``dtype`` (defaults: the released SVD-XT), counted on meta modules."""
    size = torch.empty((), dtype=parse_dtype(dtype)).element_size()
    counts = {
        "unet": _build_unet(unet_config or SVD_XT_UNET_CONFIG),
        "vae": _build_vae(vae_config or SVD_VAE_CONFIG),
        "image_encoder": _build_clip(clip_config or SVD_CLIP_VISION_CONFIG),
    }
    out = {k: sum(p.numel() for p in m.parameters()) * size for k, m in counts.items()}
    out["backward_delta"] = sum(
        p.numel() for n, p in counts["unet"].named_parameters() if is_backward_param(n) and n.endswith(".weight")
    ) * size
    return out
