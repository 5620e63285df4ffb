"""A tiny random Stable Video Diffusion, saved in the real on-disk layouts.

The networks are the real diffusers / transformers classes with tiny configs: the UNet keeps
SVD's block structure (4 levels, 2 layers per block, cross-attention in the first three down
levels and the last three up levels, hence the same **16 temporal self-attention layers**);
the VAE keeps 4 levels (8x downscale, like the real one); the CLIP image tower takes 224x224
images like the real one. Every parameter is perturbed away from its constant initial value
(norm weights of 1, zero biases, mix factors) so that a wrong key mapping cannot hide.

Savers:

* :func:`save_tiny_svd_diffusers` - a diffusers folder (``unet/`` ``vae/`` ``image_encoder/``
  ``feature_extractor/`` ``model_index.json``), like stabilityai/stable-video-diffusion-img2vid-xt;
* :func:`save_tiny_svd_single_file` - one safetensors in the ldm layout of ``svd_xt.safetensors``
  (keys from the loader's own mapping, :func:`avsync.loaders.svd.svd_to_ldm_state_dict`; the
  key set is checked against ComfyUI's modules in ``tests/test_svd_loading.py``);
* :func:`save_tiny_finetuned_unet` - a "released fine-tuned UNet": the base UNet with only the
  16 temporal attn1 ``to_v`` / ``to_out.0`` weights changed (or, for refusal tests, one more tensor);
* :func:`save_tiny_backward_delta` - a ΔW file as ``avsync convert svd-backward`` writes it.

All of it takes well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from avsync.loaders import svd as svd_loader

TINY_UNET_CONFIG = dict(
    svd_loader.SVD_XT_UNET_CONFIG,
    sample_size=8,
    block_out_channels=[32, 32, 32, 32],
    num_attention_heads=[2, 2, 2, 2],      # head width 16
    cross_attention_dim=32,
    addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=12,
    num_frames=5,
)
TINY_UNET_HEAD_DIM = 16

TINY_VAE_CONFIG = dict(
    svd_loader.SVD_VAE_CONFIG,
    block_out_channels=[32, 32, 32, 32],
    layers_per_block=2,   # the ldm layout fixes 2 (its decoder mid block always has block_1 and block_2)
    sample_size=64,
)

TINY_CLIP_CONFIG = dict(
    svd_loader.SVD_CLIP_VISION_CONFIG,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=2,                 # head width 16
    num_hidden_layers=2,
    patch_size=32,
    image_size=224,
    projection_dim=32,
)
TINY_CLIP_HEAD_DIM = 16

TINY_METADATA = {
    svd_loader.META_UNET_HEAD_DIM: str(TINY_UNET_HEAD_DIM),
    svd_loader.META_CLIP_HEAD_DIM: str(TINY_CLIP_HEAD_DIM),
}


def _perturb(module: torch.nn.Module, gen: torch.Generator, scale: float = 0.05) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def tiny_svd_modules(seed: int = 0):
    """(unet, vae, image_encoder): random tiny SVD networks, fp32, eval mode."""
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNetSpatioTemporalConditionModel.from_config(TINY_UNET_CONFIG)
        vae = AutoencoderKLTemporalDecoder.from_config(TINY_VAE_CONFIG)
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP_CONFIG))
    for m in (unet, vae, clip):
        _perturb(m, gen)
    with torch.no_grad():
        # the ldm layout has no quant_conv: it must be the identity (it is in the released VAE)
        c = vae.quant_conv.weight.shape[0]
        vae.quant_conv.weight.copy_(torch.eye(c).reshape(c, c, 1, 1))
        vae.quant_conv.bias.zero_()
    return unet.eval().requires_grad_(False), vae.eval().requires_grad_(False), clip.eval().requires_grad_(False)


def tiny_svd_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> svd_loader.SVDModel:
    """A tiny :class:`SVDModel` built in memory (no files), as the loaders return it."""
    unet, vae, clip = tiny_svd_modules(seed)
    if dtype != torch.float32:
        unet, vae, clip = unet.to(dtype), vae.to(dtype), clip.to(dtype)
    return svd_loader._wrap(unet, vae, clip, svd_loader.CLIP_IMAGE_PROCESSOR,
                            dtype, f"tiny-svd(seed={seed})")


def save_tiny_svd_diffusers(folder, seed: int = 0) -> Path:
    """A tiny SVD as a diffusers folder; returns the folder."""
    return svd_loader.save_svd_diffusers(tiny_svd_model(seed), folder)


def save_tiny_svd_single_file(path, seed: int = 0, metadata: bool = True) -> Path:
    """A tiny SVD as one ldm-layout safetensors (``svd_xt.safetensors`` layout); returns the path.

    With ``metadata`` the file records the tiny head widths (not visible in shapes) so that
    ``load_svd_single_file(path)`` needs no arguments.
    """
    from safetensors.torch import save_file

    unet, vae, clip = tiny_svd_modules(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(svd_loader.svd_to_ldm_state_dict(unet, vae, clip), str(path),
              metadata=dict(TINY_METADATA) if metadata else None)
    return path


def backward_param_names(unet: torch.nn.Module) -> list[str]:
    """The UNet's temporal attn1 to_v / to_out.0 weight names (2 x 16 layers in SVD's structure)."""
    return sorted(n for n, _ in unet.named_parameters()
                  if svd_loader.is_backward_param(n) and n.endswith(".weight"))


def finetuned_unet_state(base_seed: int = 0, seed: int = 1, scale: float = 0.02,
                         also_change: Optional[str] = None) -> tuple[dict, dict, dict]:
    """(finetuned_state, base_state, expected_delta) with diffusers names, fp32.

    The "fine-tuned" UNet is the base plus random ΔW on the 16 temporal to_v / to_out.0 weights
    (as in the released backward-motion UNet); ``also_change`` names one more tensor to alter.
    """
    unet, _, _ = tiny_svd_modules(base_seed)
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    ft = {k: v.clone() for k, v in base.items()}
    delta = {}
    for name in backward_param_names(unet):
        d = torch.randn(base[name].shape, generator=gen) * scale
        ft[name] = base[name] + d
        delta[name] = ft[name] - base[name]
    if also_change is not None:
        ft[also_change] = ft[also_change] + 0.01
    return ft, base, delta


def save_unet_diffusers(state: dict, folder, config: Optional[dict] = None) -> Path:
    """A diffusers ``unet`` folder (config.json + diffusion_pytorch_model.safetensors)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(config or TINY_UNET_CONFIG, _class_name="UNetSpatioTemporalConditionModel")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def save_tiny_finetuned_unet(folder, base_seed: int = 0, seed: int = 1, scale: float = 0.02,
                             also_change: Optional[str] = None) -> tuple[Path, dict]:
    """A fine-tuned tiny UNet as a diffusers ``unet`` folder; returns (folder, expected ΔW)."""
    ft, _, delta = finetuned_unet_state(base_seed, seed, scale, also_change)
    return save_unet_diffusers(ft, folder), delta


def save_tiny_backward_delta(path, base_seed: int = 0, seed: int = 1, scale: float = 0.02,
                             dtype: torch.dtype = torch.float16) -> tuple[Path, dict]:
    """A ΔW file for the tiny SVD (as ``avsync convert svd-backward`` writes it); returns (path, ΔW fp32)."""
    ft, base, _ = finetuned_unet_state(base_seed, seed, scale)
    delta = svd_loader.compute_backward_delta(ft, base)
    return svd_loader.save_backward_delta(delta, path, dtype=dtype), delta


def seeded_ldm_weights(key_shapes: dict, seed: int) -> dict:
    """Random weights for an ldm-layout state dict, defined by key names, shapes and a seed only
    (independent of any library's initialisation), so that a parity fixture needs to store no weights.

    Keys are visited in sorted order, each drawing ``randn(shape)`` from one generator, then scaled:
    tensors with 2+ dims by 1/sqrt(fan_in) (fan_in = product of all dims but the first); 1-dim
    ``*.weight`` tensors (norm scales) become 1 + 0.1*x; other 1-dim tensors (biases) 0.1*x;
    ``mix_factor`` stays x.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in sorted(key_shapes):
        shape = tuple(key_shapes[k])
        x = torch.randn(shape, generator=g)
        if len(shape) >= 2:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            x = x / fan_in ** 0.5
        elif k.endswith("mix_factor"):
            pass
        elif k.endswith(".weight"):
            x = 1 + 0.1 * x
        else:
            x = 0.1 * x
        out[k] = x
    return out
