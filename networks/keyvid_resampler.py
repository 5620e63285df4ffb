"""KeyVID's image-token Resampler (and the key layout of its unused audio twin).

``Resampler`` rebuilds ``lvdm/modules/encoders/resampler.py:Resampler`` (IP-Adapter's
Perceiver resampler, frame-wise): ``num_queries × video_length`` learned latents (16 × 48
in the released configs) cross-attend to the OpenCLIP ViT-H image tokens ``[B, 257,
1280]`` and give ``[B, 48·16, 1024]`` — 16 learned tokens for each frame of the 24-fps
grid. The generator keeps the 12 keyframe groups
(:func:`avsync.core.keyvid_tokens.select_keyframes`); the interpolator uses all 48.
``state_dict()`` keys equal the checkpoint's ``image_proj_model.*`` keys without that
prefix.

``AudioResamplerWeights`` has the same parameters as
``resampler.py:AudioResampler`` (``audio_proj_model.*`` in the checkpoint: latents
``[1, 576, 1024]``, ``proj_in`` 768→1024, ...). The release never runs it — its
``forward`` raises ``NotImplementedError`` and the UNet projects audio with its own
``audio_proj_2`` — so this class only gives the weights a strict home and has no
forward; KeyVID reads only its ``num_queries`` (12) and ``video_length`` (48).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn as nn

# configs/inference/keyframe_{generation,interpolation}.yaml (identical in both)
IMAGE_PROJ_PARAMS: dict[str, Any] = {"dim": 1024, "depth": 4, "dim_head": 64, "heads": 12, "num_queries": 16,
                                     "embedding_dim": 1280, "output_dim": 1024, "ff_mult": 4, "video_length": 48}
AUDIO_PROJ_PARAMS: dict[str, Any] = {"dim": 1024, "depth": 4, "dim_head": 64, "heads": 12, "num_queries": 12,
                                     "embedding_dim": 768, "output_dim": 1024, "ff_mult": 4, "video_length": 48}


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    """``resampler.py:FeedForward``: LayerNorm, Linear (no bias), GELU, Linear (no bias)."""
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class PerceiverAttention(nn.Module):
    """``resampler.py:PerceiverAttention``: latents attend to ``[image tokens; latents]``;
    the softmax runs in fp32 as released (``q·s @ (k·s)ᵀ`` with ``s = dim_head^-1/4``)."""

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)

        def heads(t):
            return t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)

        q, k, v = heads(q), heads(k), heads(v)
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        return self.to_out((weight @ v).permute(0, 2, 1, 3).reshape(b, n, -1))


class _ResamplerLayout(nn.Module):
    """Parameters shared by ``Resampler`` and ``AudioResampler`` (same registration order)."""

    def __init__(self, *, dim=1024, depth=8, dim_head=64, heads=16, num_queries=8, embedding_dim=768,
                 output_dim=1024, ff_mult=4, video_length=None):
        super().__init__()
        self.num_queries = num_queries        # per frame
        self.video_length = video_length
        total = num_queries * video_length if video_length is not None else num_queries
        self.latents = nn.Parameter(torch.randn(1, total, dim) / dim ** 0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), _feed_forward(dim, ff_mult)])
            for _ in range(depth))

    @classmethod
    def from_released_params(cls, params: Mapping[str, Any]):
        """Build from the released yaml's ``image_proj_stage_config.params`` (or
        ``audio_proj_stage_config.params``) dict."""
        return cls(**dict(params))


class Resampler(_ResamplerLayout):
    """``resampler.py:Resampler``: ``[B, N, embedding_dim]`` image tokens →
    ``[B, video_length·num_queries, output_dim]`` (frame-major: frame ``f`` owns rows
    ``16f … 16f+15``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.repeat(x.size(0), 1, 1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class AudioResamplerWeights(_ResamplerLayout):
    """Key layout of ``resampler.py:AudioResampler`` (checkpoint prefix
    ``audio_proj_model.``). **Unused by KeyVID**: the release's ``forward`` raises
    ``NotImplementedError``; this class exists so the checkpoint loads strictly and
    ``num_queries``/``video_length`` are available. It has no forward."""

    def forward(self, *args, **kwargs):
        raise NotImplementedError("audio_proj_model is not used by KeyVID (its released forward raises too); "
                                  "audio tokens come from ImageBind via avsync.core.keyvid_tokens")
