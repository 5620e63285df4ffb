"""Tiny KeyVID checkpoints in the released Lightning layout.

:func:`tiny_state_dict` builds every component of ``LatentVisualAudioDiffusion`` with tiny
configs and random weights, under the released prefixes (``model.diffusion_model.``,
``first_stage_model.``, ``cond_stage_model.model.``, ``embedder.model.``,
``image_proj_model.``, ``audio_proj_model.``, ``imagebind_model.``) plus the schedule
buffers; :func:`save_tiny_ckpt` wraps it in a Lightning-style dict (``state_dict``,
``epoch``, ``global_step``, ``hyper_parameters``, ...) and ``torch.save``\\ s it (zip
format, like Lightning). The UNet, resamplers and ImageBind trunk are AVSync's own networks
(their key layouts are checked against the release in ``tests/test_keyvid_networks.py``);
the OpenCLIP towers, the VAE and the leftovers the release carries (the image embedder's
text parts, ImageBind's other modalities and heads) are written with the names open_clip /
lvdm / ImageBind give them, sized explicitly here. Every tensor is random (no zero or
constant initial values survive), so a wrong mapping cannot hide.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from avsync.networks.keyvid_unet import GENERATOR_UNET_PARAMS, KeyVIDUNet

TINY_UNET = dict(GENERATOR_UNET_PARAMS, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                 attention_resolutions=[1], num_head_channels=16, context_dim=32, temporal_length=3,
                 dropout=0.0)
TINY_VAE = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3,
                                         "out_ch": 3, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
                                         "attn_resolutions": [], "dropout": 0.0}}
TINY_IMAGE_PROJ = {"dim": 32, "depth": 1, "dim_head": 16, "heads": 2, "num_queries": 16, "embedding_dim": 80,
                   "output_dim": 32, "ff_mult": 2, "video_length": 3}
TINY_AUDIO_PROJ = {"dim": 32, "depth": 1, "dim_head": 16, "heads": 2, "num_queries": 12, "embedding_dim": 64,
                   "output_dim": 32, "ff_mult": 2, "video_length": 48}
TEXT = {"vocab": 1000, "width": 64, "layers": 2, "ctx": 77, "proj": 32}          # 1 head of 64
VISION = {"width": 80, "layers": 1, "patch": 14, "grid": 16, "proj": 32}         # 1 head of 80, 224 px
AUDIO = {"width": 64, "layers": 1}                                               # 1 head of 64
PRETRAINED_AUDIO_TOKENS = 1 + 12 * 19   # imagebind_huge.pth: stride 10 over 204 frames
DIFFUSION_AUDIO_TOKENS = 1 + 12 * 48    # KeyVID: stride (10, 4)


@dataclass
class Sizes:
    """Every component's size; :data:`TINY` for tests, bigger ones for bench/bench_keyvid_models.py."""

    unet: dict = field(default_factory=lambda: dict(TINY_UNET))
    vae: dict = field(default_factory=lambda: copy.deepcopy(TINY_VAE))
    image_proj: dict = field(default_factory=lambda: dict(TINY_IMAGE_PROJ))
    audio_proj: dict = field(default_factory=lambda: dict(TINY_AUDIO_PROJ))
    text: dict = field(default_factory=lambda: dict(TEXT))
    vision: dict = field(default_factory=lambda: dict(VISION))
    audio: dict = field(default_factory=lambda: dict(AUDIO))
    padding_bytes: int = 0   # extra unused ImageBind (vision trunk) tensors, as the release carries


TINY = Sizes()


def tiny_model_params(role: str, sizes: Sizes = TINY) -> dict:
    """``model.params`` of a tiny released-style yaml (what ``--generator-config`` reads)."""
    return {
        "unet_config": {"params": dict(sizes.unet, add_frame_idx=(role == "generator"))},
        "first_stage_config": {"params": copy.deepcopy(sizes.vae)},
        "image_proj_stage_config": {"params": dict(sizes.image_proj)},
        "audio_proj_stage_config": {"params": dict(sizes.audio_proj)},
        "scale_factor": 0.18215,
    }


def _rand(g: torch.Generator, *shape) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=g) * 0.05


def _randomize(module: torch.nn.Module, g: torch.Generator) -> dict:
    return {k: _rand(g, *v.shape) + (1.0 if k.endswith("norm.weight") else 0.0)
            for k, v in module.state_dict().items()}


def _openclip_blocks(g, prefix: str, layers: int, width: int) -> dict:
    out = {}
    for i in range(layers):
        b = f"{prefix}transformer.resblocks.{i}."
        for name, shape in (("ln_1.weight", (width,)), ("ln_1.bias", (width,)),
                            ("attn.in_proj_weight", (3 * width, width)), ("attn.in_proj_bias", (3 * width,)),
                            ("attn.out_proj.weight", (width, width)), ("attn.out_proj.bias", (width,)),
                            ("ln_2.weight", (width,)), ("ln_2.bias", (width,)),
                            ("mlp.c_fc.weight", (4 * width, width)), ("mlp.c_fc.bias", (4 * width,)),
                            ("mlp.c_proj.weight", (width, 4 * width)), ("mlp.c_proj.bias", (width,))):
            out[b + name] = _rand(g, *shape) + (1.0 if name.endswith("weight") and name.startswith("ln") else 0.0)
    return out


def _text_tower(g, prefix: str, text: dict) -> dict:
    w = text["width"]
    out = {prefix + "token_embedding.weight": _rand(g, text["vocab"], w),
           prefix + "positional_embedding": _rand(g, text["ctx"], w),
           prefix + "ln_final.weight": 1 + _rand(g, w), prefix + "ln_final.bias": _rand(g, w),
           prefix + "text_projection": _rand(g, w, text["proj"]), prefix + "logit_scale": torch.tensor(4.6052)}
    out.update(_openclip_blocks(g, prefix, text["layers"], w))
    return out


def _vision_tower(g, prefix: str, vision: dict) -> dict:
    w, p = vision["width"], vision["patch"]
    out = {prefix + "class_embedding": _rand(g, w), prefix + "conv1.weight": _rand(g, w, 3, p, p),
           prefix + "positional_embedding": _rand(g, vision["grid"] ** 2 + 1, w),
           prefix + "ln_pre.weight": 1 + _rand(g, w), prefix + "ln_pre.bias": _rand(g, w),
           prefix + "ln_post.weight": 1 + _rand(g, w), prefix + "ln_post.bias": _rand(g, w),
           prefix + "proj": _rand(g, w, vision["proj"])}
    out.update(_openclip_blocks(g, prefix, vision["layers"], w))
    return out


def _vae(g, vae: dict) -> dict:
    """lvdm ``AutoencoderKL`` names (``ae_modules.Encoder/Decoder`` + quant convs) for a ddconfig."""
    dd = vae["ddconfig"]
    ch, mult, n = dd["ch"], dd["ch_mult"], dd["num_res_blocks"]
    out = {}

    def conv(name, cout, cin, k):
        out[name + ".weight"] = _rand(g, cout, cin, k, k)
        out[name + ".bias"] = _rand(g, cout)

    def norm(name, c):
        out[name + ".weight"] = 1 + _rand(g, c)
        out[name + ".bias"] = _rand(g, c)

    def resblock(name, cin, cout):
        norm(name + ".norm1", cin)
        conv(name + ".conv1", cout, cin, 3)
        norm(name + ".norm2", cout)
        conv(name + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(name + ".nin_shortcut", cout, cin, 1)

    def mid(part, c):
        resblock(f"{part}.mid.block_1", c, c)
        norm(f"{part}.mid.attn_1.norm", c)
        for q in ("q", "k", "v", "proj_out"):
            conv(f"{part}.mid.attn_1.{q}", c, c, 1)
        resblock(f"{part}.mid.block_2", c, c)

    z = dd["z_channels"]
    conv("encoder.conv_in", ch, 3, 3)
    cin = ch
    for level, m in enumerate(mult):
        for i in range(n):
            resblock(f"encoder.down.{level}.block.{i}", cin, ch * m)
            cin = ch * m
        if level != len(mult) - 1:
            conv(f"encoder.down.{level}.downsample.conv", cin, cin, 3)
    mid("encoder", cin)
    norm("encoder.norm_out", cin)
    conv("encoder.conv_out", 2 * z, cin, 3)
    conv("quant_conv", 2 * z, 2 * z, 1)
    conv("post_quant_conv", z, z, 1)
    top = ch * mult[-1]
    conv("decoder.conv_in", top, z, 3)
    mid("decoder", top)
    cin = top
    for level in reversed(range(len(mult))):
        for i in range(n + 1):
            resblock(f"decoder.up.{level}.block.{i}", cin, ch * mult[level])
            cin = ch * mult[level]
        if level != 0:
            conv(f"decoder.up.{level}.upsample.conv", cin, cin, 3)
    norm("decoder.norm_out", cin)
    conv("decoder.conv_out", 3, cin, 3)
    return out


def _imagebind(g, tokens: int, with_others: bool = True, audio: dict = AUDIO) -> dict:
    """ImageBind in its own names: the audio preprocessor + trunk, plus (like the release)
    other modalities' and the audio head's tensors that KeyVID never uses."""
    d = audio["width"]
    pre, trunk = "modality_preprocessors.audio.", "modality_trunks.audio."
    out = {pre + "cls_token": _rand(g, 1, 1, d), pre + "rgbt_stem.proj.weight": _rand(g, d, 1, 16, 16),
           pre + "rgbt_stem.norm_layer.weight": 1 + _rand(g, d), pre + "rgbt_stem.norm_layer.bias": _rand(g, d),
           pre + "pos_embedding_helper.pos_embed": _rand(g, 1, tokens, d)}
    for i in range(audio["layers"]):
        b = f"{trunk}blocks.{i}."
        for name, shape in (("attn.in_proj_weight", (3 * d, d)), ("attn.in_proj_bias", (3 * d,)),
                            ("attn.bias_k", (1, 1, d)), ("attn.bias_v", (1, 1, d)),
                            ("attn.out_proj.weight", (d, d)), ("attn.out_proj.bias", (d,)),
                            ("norm_1.weight", (d,)), ("norm_1.bias", (d,)), ("norm_2.weight", (d,)),
                            ("norm_2.bias", (d,)), ("mlp.fc1.weight", (4 * d, d)), ("mlp.fc1.bias", (4 * d,)),
                            ("mlp.fc2.weight", (d, 4 * d)), ("mlp.fc2.bias", (d,))):
            out[b + name] = _rand(g, *shape)
    if with_others:
        out["modality_heads.audio.0.weight"] = 1 + _rand(g, d)
        out["modality_heads.audio.2.weight"] = _rand(g, 16, d)
        out["modality_postprocessors.audio.1.log_logit_scale"] = torch.tensor(2.3)
        out["modality_trunks.vision.blocks.0.attn.in_proj_weight"] = _rand(g, 3 * 32, 32)
        out["modality_preprocessors.text.token_embedding.weight"] = _rand(g, 50, 32)
    return out


def _padding(g, nbytes: int) -> dict:
    """Unused ImageBind tensors (its vision trunk's MLPs: 1280 wide, 5120 hidden) worth ``nbytes`` in fp32."""
    out, i = {}, 1
    while nbytes > 0:
        out[f"modality_trunks.vision.blocks.{i}.mlp.fc1.weight"] = _rand(g, 5120, 1280)
        nbytes -= 5120 * 1280 * 4
        i += 1
    return out


def tiny_imagebind_huge(seed: int = 7, sizes: Sizes = TINY) -> dict:
    """A tiny ``imagebind_huge.pth``: bare ImageBind keys, pretrained audio grid (12 × 19 + CLS)."""
    return _imagebind(torch.Generator().manual_seed(seed), PRETRAINED_AUDIO_TOKENS, audio=sizes.audio)


def _schedule() -> dict:
    import numpy as np

    betas = torch.from_numpy(np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2).float()
    ac = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1), ac[:-1]])
    post_var = betas * (1 - prev) / (1 - ac)
    return {"betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": prev, "sqrt_alphas_cumprod": ac.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(), "log_one_minus_alphas_cumprod": (1 - ac).log(),
            "sqrt_recip_alphas_cumprod": ac.rsqrt(), "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(),
            "posterior_variance": post_var, "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
            "posterior_mean_coef1": betas * prev.sqrt() / (1 - ac),
            "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - ac),
            "scale_arr": torch.cat([torch.linspace(1.0, 0.7, 400), torch.full((1000,), 0.7)])}


def tiny_state_dict(role: str, seed: int = 0, shared_seed: int = 1, imagebind_huge: Optional[dict] = None,
                    sizes: Sizes = TINY) -> dict:
    """The released ``state_dict`` of a tiny generator / interpolator.

    Components both roles share (VAE, text and image towers, ImageBind, schedule) come from
    ``shared_seed``, the trained ones (UNet, resamplers) from ``seed``. The generator's ImageBind
    is ``imagebind_huge`` with the stretched positional embedding, as training left it.
    """
    from avsync.networks.imagebind_audio import stretch_pos_embed
    from avsync.networks.keyvid_resampler import AudioResamplerWeights, Resampler

    g = torch.Generator().manual_seed(seed)
    gs = torch.Generator().manual_seed(shared_seed)
    params = tiny_model_params(role, sizes)
    with torch.device("meta"):
        unet = KeyVIDUNet.from_released_params(params["unet_config"]["params"])
        image_proj = Resampler(**sizes.image_proj)
        audio_proj = AudioResamplerWeights(**sizes.audio_proj)
    state = {}
    state.update({"model.diffusion_model." + k: v for k, v in _randomize(unet, g).items()})
    state.update({"image_proj_model." + k: v for k, v in _randomize(image_proj, g).items()})
    state.update({"audio_proj_model." + k: v for k, v in _randomize(audio_proj, g).items()})
    state.update({"first_stage_model." + k: v for k, v in _vae(gs, sizes.vae).items()})
    text = _text_tower(gs, "", sizes.text)
    state.update({"cond_stage_model.model." + k: v for k, v in text.items()})
    # FrozenOpenCLIPImageEmbedderV2 deletes only model.transformer: the text embeddings stay
    state.update({"embedder.model." + k: v.clone() for k, v in text.items() if not k.startswith("transformer.")})
    state.update({"embedder.model." + k: v for k, v in _vision_tower(gs, "visual.", sizes.vision).items()})
    huge = dict(imagebind_huge if imagebind_huge is not None else tiny_imagebind_huge(sizes=sizes))
    if sizes.padding_bytes:
        huge.update(_padding(gs, sizes.padding_bytes))
    key = "modality_preprocessors.audio.pos_embedding_helper.pos_embed"
    huge[key] = stretch_pos_embed(huge[key], 48, 12)
    state.update({"imagebind_model." + k: v.clone() for k, v in huge.items()})
    state.update(_schedule())
    return state


def save_tiny_ckpt(path, role: str, state: Optional[dict] = None, seed: int = 0) -> Path:
    """A Lightning-style ``.ckpt`` (``torch.save`` zip) around :func:`tiny_state_dict`."""
    path = Path(path)
    state = state if state is not None else tiny_state_dict(role, seed=seed)
    ckpt = {"epoch": 3669, "global_step": 58720, "pytorch-lightning_version": "1.9.0", "state_dict": state,
            "loops": {}, "callbacks": {}, "optimizer_states": [], "lr_schedulers": [],
            "hyper_parameters": {"parameterization": "v", "timesteps": 1000, "select_keyframe": role == "generator"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def save_tiny_imagebind_huge(path, state: Optional[dict] = None) -> Path:
    path = Path(path)
    torch.save(state if state is not None else tiny_imagebind_huge(), path)
    return path


def write_tiny_configs(folder, sizes: Sizes = TINY) -> dict:
    """Tiny released-style yamls (json is yaml) for ``--generator-config`` / ``--interpolator-config``."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for role in ("generator", "interpolator"):
        p = folder / f"tiny_{role}.yaml"
        p.write_text(json.dumps({"model": {"target": "lvdm.models.ddpm3d.LatentVisualAudioDiffusion",
                                           "params": tiny_model_params(role, sizes)}}, indent=1))
        out[role] = p
    return out
