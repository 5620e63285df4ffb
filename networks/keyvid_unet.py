"""KeyVID's video UNet (keyframe generator and motion interpolator), as released.

Rebuilds ``lvdm/modules/networks/openaimodel3d_v4.py:UNetModel`` (generator) and
``openaimodel3d_v4_freenoise.py:UNetModel`` (interpolator) of XingruiWang/KeyVID — a
DynamiCrafter-512 UNet with audio — so that the released checkpoints load strictly:
``state_dict()`` keys equal the checkpoint's ``model.diffusion_model.*`` keys with that
prefix removed, quirks included (the ``temopral_conv`` typo, ``init_attn``,
``fps_embedding``, ``frame_idx_embedding`` for the generator only, ``audio_proj_2``,
``attn2.{to_k_ip,to_v_ip,to_k_ap,to_v_ap,beta}`` in every spatial transformer).

What it computes (code-faithful; the paper's formula differs where noted):

* embeddings: ``time_embed(sin(t))`` + ``fps_embedding(sin(fs))`` + (generator)
  ``frame_idx_embedding(sin(frame_idx[:, f]))`` per frame; ``sin`` is
  ``lvdm/models/utils_diffusion.py:timestep_embedding`` (cos half first). As in the
  release, a 0-dim ``fs`` tensor skips the fps term and ``fs`` of shape ``[B, T]`` embeds
  per frame.
* context: exactly ``77 + 16·T`` tokens (77 text tokens, repeated per frame, then 16 image
  tokens per frame); anything else raises, as the release does. ``c_audio [B, T, L, 768]``
  goes through ``audio_proj_2`` and is **L2-normalised**, then appended after each frame's
  93 text+image tokens for every spatial transformer
  (``openaimodel3d_v4.py:TimestepEmbedSequential.forward``).
* spatial cross-attention (``lvdm/modules/attention.py:CrossAttention.forward``, the
  explicit einsum path — never the xformers/flash path, which drops the audio branch):
  ``Attn(q, text) + 1.0·Attn(q, image) + (tanh β + 1)·Attn(q, audio)``, each branch its
  own softmax (SDPA here). The paper writes learnable λ for image and audio; the released
  configs learn only the audio one (no ``alpha`` key). The audio term of every spatial
  cross-attention is an *audio layer* (:mod:`avsync.networks.audio_layers`).
* temporal attention: self-attention only, no positional encoding (``frame_idx`` is
  passed as ``position`` and ignored because ``full_temporal_length`` is unset). The
  interpolator's FreeNoise windows (``context_next``) never reach attention in the
  release (``**kwargs`` swallows them), so the interpolator attends over all frames; this
  module does the same and accepts and ignores such keyword arguments.

Mixed precision: ``normalization`` GroupNorms (ResBlock in/out, final ``out``) compute in
fp32 as ``lvdm/basics.py:GroupNormSpecific`` does; everything else runs in the weights'
dtype.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import ModelFormatError
from .audio_layers import AudioLayerInfo, AudioSwitch

UNET_PREFIX = "model.diffusion_model."   # the UNet's keys in the released Lightning checkpoints

TEXT_CONTEXT_LEN = 77    # lvdm/modules/attention.py:CrossAttention(text_context_len=77)
IMAGE_CONTEXT_LEN = 16   # ... image_context_len=16: image tokens per frame
AUDIO_TOKEN_DIM = 768    # openaimodel3d_v4.py:UNetModel.audio_proj_2 = nn.Linear(768, 1024)

# configs/inference/keyframe_generation.yaml: model.params.unet_config.params
GENERATOR_UNET_PARAMS: dict[str, Any] = {
    "in_channels": 8, "out_channels": 4, "model_channels": 320,
    "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
    "dropout": 0.1, "num_head_channels": 64, "transformer_depth": 1, "context_dim": 1024,
    "use_linear": True, "use_checkpoint": True, "temporal_conv": True, "use_swin_block": False,
    "temporal_attention": True, "temporal_selfatt_only": True, "use_relative_position": False,
    "use_causal_attention": False, "temporal_length": 12, "addition_attention": True,
    "image_cross_attention": True, "audio_cross_attention": True,
    "audio_cross_attention_scale_learnable": True, "default_fs": 10, "fs_condition": True,
    "add_frame_idx": True, "use_qformer": False,
}
# configs/inference/keyframe_interpolation.yaml: identical except add_frame_idx
# (target openaimodel3d_v4_freenoise.UNetModel, same layout)
INTERPOLATOR_UNET_PARAMS: dict[str, Any] = {**GENERATOR_UNET_PARAMS, "add_frame_idx": False}

# Released constructor arguments this port accepts, with the only values it supports
# where the release has other (unused by KeyVID) code paths.
_FIXED_VALUES = {
    "use_swin_block": False, "temporal_selfatt_only": True, "use_relative_position": False,
    "use_causal_attention": False, "use_qformer": False, "use_scale_shift_norm": False,
    "resblock_updown": False, "use_fp16": False, "dims": 2, "conv_resample": True,
    "full_temporal_length": None, "image_cross_attention_scale_learnable": False,
    "add_audio_condition": False, "tempspatial_aware": False,
}
_ACCEPTED = {
    "in_channels", "out_channels", "model_channels", "attention_resolutions", "num_res_blocks",
    "channel_mult", "dropout", "num_heads", "num_head_channels", "transformer_depth",
    "context_dim", "use_linear", "use_checkpoint", "temporal_conv", "temporal_attention",
    "temporal_length", "addition_attention", "image_cross_attention", "audio_cross_attention",
    "audio_cross_attention_scale_learnable", "default_fs", "fs_condition", "add_frame_idx",
} | set(_FIXED_VALUES)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """``lvdm/models/utils_diffusion.py:timestep_embedding`` (``repeat_only=False``):
    ``[cos(t·f), sin(t·f)]`` with ``f = exp(-ln(max_period)·i/half)``, computed in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """``lvdm/basics.py:GroupNormSpecific``: GroupNorm computed in fp32 (also with bf16/fp16
    weights, which the release never had: it upcasts only the input)."""

    def forward(self, x):
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).type(x.dtype)


def _mlp(dim_in: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, dim), nn.SiLU(), nn.Linear(dim, dim))


def _heads(q, k, v, heads):
    def split(t):
        b, n, d = t.shape
        return t.view(b, n, heads, d // heads).transpose(1, 2)
    return split(q), split(k), split(v)


def _attend(q, k, v, heads):
    """Multi-head softmax attention (scale ``dim_head**-0.5``), ``[b, n, h·d]`` in and out."""
    q, k, v = _heads(q, k, v, heads)
    o = F.scaled_dot_product_attention(q, k, v)
    b, h, n, d = o.shape
    return o.transpose(1, 2).reshape(b, n, h * d)


class SelfAttention(nn.Module):
    """``CrossAttention`` used as self-attention (spatial ``attn1``, temporal attn1/attn2):
    only ``to_q/to_k/to_v/to_out.0`` keys."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x):
        return self.to_out(_attend(self.to_q(x), self.to_k(x), self.to_v(x), self.heads))


class TextImageAudioAttention(nn.Module):
    """Spatial ``attn2`` with separate text / image / audio keys and values
    (``lvdm/modules/attention.py:CrossAttention.forward``, image+audio branch):
    ``to_out(A(q,text) + 1.0·A(q,image) + (tanh β + 1)·A(q,audio))``.

    Context rows are split by position: ``[:77]`` text, ``[77:93]`` image, ``[93:]`` audio.
    The audio term is an audio layer (switchable through :mod:`audio_layers`)."""

    def __init__(self, dim: int, context_dim: int, heads: int, dim_head: int, dropout: float = 0.0,
                 audio: bool = True, audio_scale_learnable: bool = True):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.has_audio = audio
        self.audio_scale_learnable = audio_scale_learnable
        if audio and audio_scale_learnable:
            self.beta = nn.Parameter(torch.tensor(0.0))
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.to_k_ip = nn.Linear(context_dim, inner, bias=False)
        self.to_v_ip = nn.Linear(context_dim, inner, bias=False)
        if audio:
            self.to_k_ap = nn.Linear(context_dim, inner, bias=False)
            self.to_v_ap = nn.Linear(context_dim, inner, bias=False)
            nn.init.zeros_(self.to_k_ap.weight)   # as released: the audio branch starts at 0
            nn.init.zeros_(self.to_v_ap.weight)
            self.audio_switch = AudioSwitch()
        self.audio_layer_info: Optional[AudioLayerInfo] = None   # set by KeyVIDUNet

    def audio_scale(self) -> torch.Tensor | float:
        return torch.tanh(self.beta) + 1 if self.audio_scale_learnable else 1.0

    def forward(self, x, context):
        q = self.to_q(x)
        n_txt, n_img = TEXT_CONTEXT_LEN, TEXT_CONTEXT_LEN + IMAGE_CONTEXT_LEN
        if self.has_audio:
            text, image, audio = context[:, :n_txt], context[:, n_txt:n_img], context[:, n_img:]
        else:   # image-only branch of the release: everything after the text is image
            text, image, audio = context[:, :n_txt], context[:, n_txt:], None
        out = _attend(q, self.to_k(text), self.to_v(text), self.heads)
        out = out + 1.0 * _attend(q, self.to_k_ip(image), self.to_v_ip(image), self.heads)
        if audio is not None:
            def audio_term():
                return _attend(q, self.to_k_ap(audio), self.to_v_ap(audio), self.heads) * self.audio_scale()
            out = self.audio_switch.apply(out, audio_term)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """``attention.py:FeedForward(glu=True)``: keys ``net.0.proj``, ``net.2``."""

    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x):
        return self.net(x)


class TransformerBlock(nn.Module):
    """``attention.py:BasicTransformerBlock``: self-attn, cross-attn (or a second
    self-attn in temporal blocks), GEGLU feed-forward, each pre-LayerNorm + residual."""

    def __init__(self, dim, heads, dim_head, dropout, attn2: nn.Module):
        super().__init__()
        self.attn1 = SelfAttention(dim, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = attn2
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context=None):
        x = self.attn1(self.norm1(x)) + x
        x = (self.attn2(self.norm2(x), context) if context is not None else self.attn2(self.norm2(x))) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """``attention.py:SpatialTransformer`` (``use_linear``): over ``[(b t), c, h, w]``."""

    def __init__(self, channels, heads, dim_head, depth, context_dim, use_linear, dropout,
                 audio, audio_scale_learnable):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.use_linear = use_linear
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner, heads, dim_head, dropout,
                             TextImageAudioAttention(inner, context_dim, heads, dim_head, dropout,
                                                     audio=audio, audio_scale_learnable=audio_scale_learnable))
            for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)
        _zero(self.proj_out)

    def forward(self, x, context):
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)
        if self.use_linear:
            x = self.proj_in(x)
        for blk in self.transformer_blocks:
            x = blk(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class TemporalTransformer(nn.Module):
    """``attention.py:TemporalTransformer`` (self-attention only, no relative position,
    not causal): over ``[b, c, t, h, w]``, attention along ``t`` per pixel."""

    def __init__(self, channels, heads, dim_head, depth, use_linear, dropout=0.0):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.use_linear = use_linear
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv1d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner, heads, dim_head, dropout, SelfAttention(inner, heads, dim_head, dropout))
            for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv1d(inner, channels, 1)
        _zero(self.proj_out)

    def forward(self, x):
        b, c, t, h, w = x.shape
        x_in = x
        x = self.norm(x)
        x = x.permute(0, 3, 4, 1, 2).reshape(b * h * w, c, t)   # (b h w) c t
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.transpose(1, 2)                                   # (b h w) t c
        if self.use_linear:
            x = self.proj_in(x)
        for blk in self.transformer_blocks:
            x = blk(x)
        if self.use_linear:
            x = self.proj_out(x)                                # (b h w) t c
            x = x.reshape(b, h, w, t, c).permute(0, 4, 3, 1, 2)
        else:
            x = self.proj_out(x.transpose(1, 2))                # (b h w) c t
            x = x.reshape(b, h, w, c, t).permute(0, 3, 4, 1, 2)
        return x + x_in


class TemporalConvBlock(nn.Module):
    """``openaimodel3d_v4.py:TemporalConvBlock``: four (GroupNorm, SiLU, [Dropout],
    Conv3d (3,1,1)) stages plus identity; ``conv4`` zero-initialised."""

    def __init__(self, channels, dropout=0.1):
        super().__init__()
        k, p = (3, 1, 1), (1, 0, 0)
        self.conv1 = nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv3d(channels, channels, k, padding=p))
        self.conv2 = nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(), nn.Dropout(dropout),
                                   nn.Conv3d(channels, channels, k, padding=p))
        self.conv3 = nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(), nn.Dropout(dropout),
                                   nn.Conv3d(channels, channels, k, padding=p))
        self.conv4 = nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(), nn.Dropout(dropout),
                                   nn.Conv3d(channels, channels, k, padding=p))
        _zero(self.conv4[-1])

    def forward(self, x):
        return x + self.conv4(self.conv3(self.conv2(self.conv1(x))))


class ResBlock(nn.Module):
    """``openaimodel3d_v4.py:ResBlock`` (no scale-shift norm, no up/down): GroupNorm-SiLU-
    conv, + emb, GroupNorm-SiLU-Dropout-conv, skip; then (optionally) the temporal conv
    block over ``[b, c, t, h, w]`` — key ``temopral_conv`` (sic)."""

    def __init__(self, channels, emb_channels, dropout, out_channels=None, temporal_conv=False):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(GroupNorm32(32, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(32, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        _zero(self.out_layers[-1])
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        if temporal_conv:
            self.temopral_conv = TemporalConvBlock(out_channels, dropout=0.1)   # sic: released key name
        self.has_temporal_conv = temporal_conv

    def forward(self, x, emb, batch_size):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        h = self.skip_connection(x) + self.out_layers(h)
        if self.has_temporal_conv:
            bt, c, hh, ww = h.shape
            t = bt // batch_size
            h5 = h.view(batch_size, t, c, hh, ww).transpose(1, 2)
            h = self.temopral_conv(h5).transpose(1, 2).reshape(bt, c, hh, ww)
        return h


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class EmbedSequential(nn.ModuleList):
    """``openaimodel3d_v4.py:TimestepEmbedSequential``: runs its layers on ``[(b t), c, h, w]``
    and hands each kind the inputs it takes (audio tokens appended to the spatial
    context; temporal layers see ``[b, c, t, h, w]``)."""

    def forward(self, x, emb, context, c_audio, batch_size):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, batch_size)
            elif isinstance(layer, SpatialTransformer):
                ctx = torch.cat([context, c_audio], dim=1) if c_audio is not None else context
                x = layer(x, ctx)
            elif isinstance(layer, TemporalTransformer):
                bt, c, h, w = x.shape
                t = bt // batch_size
                x5 = x.view(batch_size, t, c, h, w).transpose(1, 2)
                x = layer(x5).transpose(1, 2).reshape(bt, c, h, w)
            else:
                x = layer(x)
        return x


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class KeyVIDUNet(nn.Module):
    """The KeyVID generator / interpolator UNet. Build with :meth:`from_released_params`."""

    def __init__(self, *, in_channels: int, out_channels: int, model_channels: int,
                 attention_resolutions, num_res_blocks: int, channel_mult, num_head_channels: int = -1,
                 num_heads: int = -1, transformer_depth: int = 1, context_dim: int = 1024,
                 use_linear: bool = True, dropout: float = 0.0, temporal_conv: bool = True,
                 temporal_attention: bool = True, temporal_length: Optional[int] = None,
                 addition_attention: bool = True, image_cross_attention: bool = True,
                 audio_cross_attention: bool = True, audio_cross_attention_scale_learnable: bool = True,
                 default_fs: int = 4, fs_condition: bool = True, add_frame_idx: bool = False):
        super().__init__()
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("either num_heads or num_head_channels has to be set")
        if not image_cross_attention:
            raise ValueError("image_cross_attention=False is not a KeyVID configuration")
        self.in_channels, self.out_channels, self.model_channels = in_channels, out_channels, model_channels
        self.temporal_length = temporal_length
        self.default_fs = default_fs
        self.fs_condition = fs_condition
        self.add_frame_idx = add_frame_idx
        self.addition_attention = addition_attention
        self.audio_cross_attention = audio_cross_attention
        emb_dim = model_channels * 4

        def heads_for(ch):
            if num_head_channels == -1:
                heads, dim_head = num_heads, ch // num_heads
            else:
                heads, dim_head = ch // num_head_channels, num_head_channels
            if heads < 1 or heads * dim_head != ch:
                raise ValueError(f"{ch} channels do not split into heads (num_heads {num_heads}, "
                                 f"num_head_channels {num_head_channels})")
            return heads, dim_head

        audio_layers: list[tuple[TextImageAudioAttention, str, int, int]] = []

        def spatial(ch, section, block, level):
            heads, dim_head = heads_for(ch)
            st = SpatialTransformer(ch, heads, dim_head, transformer_depth, context_dim, use_linear, dropout,
                                    audio=audio_cross_attention,
                                    audio_scale_learnable=audio_cross_attention_scale_learnable)
            for blk in st.transformer_blocks:
                audio_layers.append((blk.attn2, section, block, level))
            return st

        def temporal(ch):
            heads, dim_head = heads_for(ch)
            return TemporalTransformer(ch, heads, dim_head, transformer_depth, use_linear, dropout)

        def res(ch_in, ch_out=None):
            return ResBlock(ch_in, emb_dim, dropout, ch_out, temporal_conv=temporal_conv)

        # registration order follows the release, so state_dict() lists keys in its order
        self.time_embed = _mlp(model_channels, emb_dim)
        if fs_condition:
            self.fps_embedding = _mlp(model_channels, emb_dim)
            _zero(self.fps_embedding[-1])
        if add_frame_idx:
            self.frame_idx_embedding = _mlp(model_channels, emb_dim)
            _zero(self.frame_idx_embedding[-1])
        self.audio_proj_2 = nn.Linear(AUDIO_TOKEN_DIM, context_dim)

        self.input_blocks = nn.ModuleList([EmbedSequential([nn.Conv2d(in_channels, model_channels, 3, padding=1)])])
        if addition_attention:
            # openaimodel3d_v4.py: TemporalTransformer(model_channels, n_heads=8, d_head=num_head_channels),
            # Conv1d projections (use_linear not passed)
            self.init_attn = EmbedSequential([TemporalTransformer(
                model_channels, 8, num_head_channels if num_head_channels != -1 else model_channels // 8,
                transformer_depth, use_linear=False, dropout=dropout)])
        chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(spatial(ch, "input", len(self.input_blocks), level))
                    if temporal_attention:
                        layers.append(temporal(ch))
                self.input_blocks.append(EmbedSequential(layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(EmbedSequential([Downsample(ch)]))
                chans.append(ch)
                ds *= 2
        deepest = len(channel_mult) - 1
        middle: list[nn.Module] = [res(ch), spatial(ch, "middle", 0, deepest)]
        if temporal_attention:
            middle.append(temporal(ch))
        middle.append(res(ch))
        self.middle_block = EmbedSequential(middle)

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(spatial(ch, "output", len(self.output_blocks), level))
                    if temporal_attention:
                        layers.append(temporal(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(layers))
        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1))
        _zero(self.out[-1])

        if audio_cross_attention:
            for index, (attn, section, block, level) in enumerate(audio_layers):
                attn.audio_layer_info = AudioLayerInfo(index, section, block, level)
        # plain tuple (not registered as submodules) to check per-sample switches per call
        self.__dict__["_audio_attn"] = tuple(a for a, *_ in audio_layers) if audio_cross_attention else ()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_released_params(cls, params: Mapping[str, Any]) -> "KeyVIDUNet":
        """Build from the released yaml's ``model.params.unet_config.params`` dict
        (:data:`GENERATOR_UNET_PARAMS` / :data:`INTERPOLATOR_UNET_PARAMS`, or a tiny
        variant). Training-only switches (``use_checkpoint``) are ignored; code paths of the
        release that no KeyVID config uses are refused by name."""
        params = dict(params)
        unknown = sorted(set(params) - _ACCEPTED)
        if unknown:
            raise ValueError(f"KeyVIDUNet: unknown unet_config params {unknown}")
        for key, value in _FIXED_VALUES.items():
            if key in params and params.pop(key) != value:
                raise ValueError(f"KeyVIDUNet: unet_config param {key}={value!r} is the only supported value")
        params.pop("use_checkpoint", None)
        params["attention_resolutions"] = list(params["attention_resolutions"])
        params["channel_mult"] = list(params["channel_mult"])
        return cls(**params)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor] = None,
                c_audio: Optional[torch.Tensor] = None, features_adapter=None, fs: Optional[torch.Tensor] = None,
                frame_idx: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """``openaimodel3d_v4.py:UNetModel.forward``, same arguments.

        x ``[B, C_in, T, H, W]``; timesteps ``[B]``; context ``[B, 77 + 16·T, context_dim]``;
        c_audio ``[B, T, L, 768]`` (raw ImageBind tokens; ``audio_proj_2`` + L2 norm here);
        fs ``[B]`` (or ``[B, T]``; a 0-dim tensor skips the fps term, as released);
        frame_idx ``[B, T]`` 24-fps indices (generator only; ignored when the net has no
        ``frame_idx_embedding``). Extra keyword arguments (``context_next``, ...) are
        accepted and ignored, as the release does. Returns ``[B, C_out, T, H, W]``."""
        if features_adapter is not None:
            raise ValueError("KeyVIDUNet: features_adapter is not supported")
        if frame_idx is None:
            frame_idx = fs
        b, _, t, hh, ww = x.shape
        for attn in self._audio_attn:
            off = attn.audio_switch.off
            if isinstance(off, torch.Tensor) and off.numel() != b:
                raise ValueError(f"audio_layers_off: samples mask has {off.numel()} entries but the model "
                                 f"call has batch size {b}")
        if self.fs_condition and fs is None:
            raise ValueError("KeyVIDUNet: fs (frames per second, [B]) is required")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).type(x.dtype))

        if context is None:
            raise ValueError("KeyVIDUNet: context is required ([B, 77 + 16·T, context_dim])")
        l_context = context.shape[1]
        if l_context != TEXT_CONTEXT_LEN + t * IMAGE_CONTEXT_LEN:
            raise ValueError(f"context has {l_context} tokens; KeyVID needs exactly "
                             f"77 + 16·T = {TEXT_CONTEXT_LEN + t * IMAGE_CONTEXT_LEN} for T = {t}")
        text = context[:, :TEXT_CONTEXT_LEN].repeat_interleave(t, dim=0)
        image = context[:, TEXT_CONTEXT_LEN:].reshape(b * t, IMAGE_CONTEXT_LEN, context.shape[-1])
        context = torch.cat([text, image], dim=1)
        emb = emb.repeat_interleave(t, dim=0)

        if c_audio is None:
            raise ValueError("KeyVIDUNet: c_audio is required ([B, T, L, 768] ImageBind tokens)")
        if c_audio.dim() != 4 or c_audio.shape[0] != b or c_audio.shape[1] != t:
            raise ValueError(f"c_audio must be [B={b}, T={t}, L, {AUDIO_TOKEN_DIM}], got {tuple(c_audio.shape)}")
        c_audio = F.normalize(self.audio_proj_2(c_audio), dim=-1).flatten(0, 1)   # [(b t), L, context_dim]

        x = x.transpose(1, 2).reshape(b * t, -1, hh, ww)     # b c t h w -> (b t) c h w

        if self.fs_condition and fs.ndim:
            if fs.ndim == 1:
                fs_embed = self.fps_embedding(timestep_embedding(fs, self.model_channels).type(x.dtype))
                fs_embed = fs_embed.repeat_interleave(t, dim=0)
            else:
                fs_embed = torch.stack([self.fps_embedding(timestep_embedding(fs[:, f], self.model_channels)
                                                           .type(x.dtype)) for f in range(fs.shape[1])], dim=1)
                fs_embed = fs_embed.flatten(0, 1)
            emb = emb + fs_embed
        if self.add_frame_idx:
            idx_embed = torch.stack([self.frame_idx_embedding(timestep_embedding(frame_idx[:, f], self.model_channels)
                                                              .type(x.dtype)) for f in range(frame_idx.shape[1])], dim=1)
            emb = emb + idx_embed.flatten(0, 1)

        h = x
        hs = []
        for i, module in enumerate(self.input_blocks):
            h = module(h, emb, context, c_audio, b)
            if i == 0 and self.addition_attention:
                h = self.init_attn(h, emb, context, None, b)
            hs.append(h)
        h = self.middle_block(h, emb, context, c_audio, b)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context, c_audio, b)
        y = self.out(h)
        return y.reshape(b, t, -1, hh, ww).transpose(1, 2)


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` whose key starts with ``prefix``, with the prefix removed
    (other components' keys are left out). ``prefix=""`` keeps everything."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_released_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], prefix: str = UNET_PREFIX,
                             what: Optional[str] = None) -> nn.Module:
    """Load the ``prefix``-ed tensors of a released state dict (e.g. a Lightning
    checkpoint's ``state_dict``, or a converted file) into ``module`` **strictly**:
    raises :class:`~avsync.core.errors.ModelFormatError` naming every missing and every
    unexpected key (with the prefix, as they appear in the file) and every shape
    mismatch. Returns ``module``."""
    what = what or type(module).__name__
    ours = strip_prefix(state, prefix)
    expected = module.state_dict()
    missing = [prefix + k for k in expected if k not in ours]
    unexpected = [prefix + k for k in ours if k not in expected]
    shapes = [f"{prefix + k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
              for k, v in ours.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if shapes:
        problems.append(f"wrong shapes: {', '.join(shapes)}")
    if problems:
        raise ModelFormatError(f"{what}: the state dict does not fit ({'; '.join(problems)})")
    module.load_state_dict(ours, strict=True)
    return module
