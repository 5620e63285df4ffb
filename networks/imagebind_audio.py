"""ImageBind's audio trunk and KeyVID's keyframe-localizer head.

What KeyVID's localizer (``motion_scores/network/model.py:ScoreModel_mel``, model set
'1', built by ``init_imagebind``) computes, rebuilt from its parts:

* patch stem: ``Conv2d(1, D, kernel 16, stride 4, bias=False)`` over the
  ``[1, 128 mel, 198 frames]`` fbank image → 29 × 46 = 1334 tokens (flattened
  frequency-major), ``LayerNorm(D)`` (eps 1e-5); no CLS token; a learned positional
  embedding ``[1, 1334, D]`` added;
* trunk: ``num_blocks`` pre-norm blocks (LayerNorm eps 1e-6), multi-head attention
  with ``add_bias_kv`` (a learned key and value appended to the sequence), a GELU MLP
  of ratio 4; no final norm, no head (``forward_audio`` returns the trunk output);
* head: ``linear1`` mixes the 1334 tokens into 48 time steps, then
  ``linear3(relu(flatten(linear2(relu(h)))))`` plus the skip term ``mean_c(h)``;
  48 scores per 2-s window, no sigmoid.

Everything is sized by :class:`LocalizerConfig`, so tests build tiny models.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class LocalizerConfig:
    embed_dim: int = 768
    num_blocks: int = 12
    num_heads: int = 12
    kernel_size: int = 16
    stride: int = 4
    num_mel_bins: int = 128
    target_frames: int = 198
    num_outputs: int = 48        # scores per window (2 s at 24 fps)
    head_dim: int = 16           # linear2 width
    mlp_ratio: int = 4

    @property
    def token_grid(self) -> tuple[int, int]:
        f = (self.num_mel_bins - self.kernel_size) // self.stride + 1
        t = (self.target_frames - self.kernel_size) // self.stride + 1
        return f, t

    @property
    def num_tokens(self) -> int:
        f, t = self.token_grid
        return f * t

    def to_dict(self) -> dict:
        return asdict(self)


class _Attention(nn.Module):
    """``nn.MultiheadAttention(add_bias_kv=True)`` self-attention, as ImageBind's audio
    trunk uses it; parameter names match torch's so the checkpoint loads as is."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.bias_k = nn.Parameter(torch.zeros(1, 1, dim))
        self.bias_v = nn.Parameter(torch.zeros(1, 1, dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.normal_(self.bias_k, std=0.02)
        nn.init.normal_(self.bias_v, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        k = torch.cat([k, self.bias_k.expand(b, 1, d)], dim=1)
        v = torch.cat([v, self.bias_v.expand(b, 1, d)], dim=1)
        h = self.heads

        def split(t):
            return t.reshape(b, t.shape[1], h, d // h).transpose(1, 2)

        o = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.out_proj(o.transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm_1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.norm_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, dim * mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.norm_1(x))
        return x + self.mlp(self.norm_2(x))


class ImageBindAudioTrunk(nn.Module):
    """Patch stem + positional embedding + transformer blocks: ``[B, 1, mel, frames]``
    → ``[B, tokens, D]`` (ImageBind's ``forward_audio`` without head/postprocessor)."""

    def __init__(self, cfg: LocalizerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.proj = nn.Conv2d(1, d, kernel_size=cfg.kernel_size, stride=cfg.stride, bias=False)
        self.stem_norm = nn.LayerNorm(d)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_tokens, d) * d ** -0.5)
        self.blocks = nn.ModuleList(_Block(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.num_blocks))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.proj(mel).flatten(2).transpose(1, 2)  # [B, F*T, D], frequency-major
        x = self.stem_norm(x) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return x


class KeyframeLocalizerNet(nn.Module):
    """ImageBind audio trunk + KeyVID's ``linear1/2/3`` head with the mean skip term."""

    def __init__(self, cfg: LocalizerConfig = LocalizerConfig()):
        super().__init__()
        self.cfg = cfg
        self.trunk = ImageBindAudioTrunk(cfg)
        self.linear1 = nn.Linear(cfg.num_tokens, cfg.num_outputs)
        self.linear2 = nn.Linear(cfg.embed_dim, cfg.head_dim)
        self.linear3 = nn.Linear(cfg.head_dim * cfg.num_outputs, cfg.num_outputs)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """``[B, 1, mel, frames]`` normalised fbank → ``[B, num_outputs]`` raw scores."""
        tokens = self.trunk(mel)                                   # [B, N, D]
        h = self.linear1(tokens.transpose(1, 2)).transpose(1, 2)   # [B, 48, D]: mix across tokens
        out = self.linear2(F.relu(h))                              # [B, 48, 16]
        out = self.linear3(F.relu(out.flatten(1)))                 # [B, 48]
        return out + h.mean(dim=-1)                                # the "with_skip" term


def infer_stride(num_tokens: int, kernel: int, mel_bins: int = 128, frames: int = 198) -> int:
    """The patch stride that turns a ``mel_bins × frames`` image into ``num_tokens`` tokens."""
    for s in range(1, kernel + 1):
        if ((mel_bins - kernel) // s + 1) * ((frames - kernel) // s + 1) == num_tokens:
            return s
    raise ValueError(f"no stride gives {num_tokens} tokens with kernel {kernel} over {mel_bins}x{frames}")


def default_heads(embed_dim: int) -> int:
    """ImageBind uses 64-dim heads (768 → 12)."""
    return max(1, embed_dim // 64) if embed_dim % 64 == 0 else max(1, math.gcd(embed_dim, 8))
