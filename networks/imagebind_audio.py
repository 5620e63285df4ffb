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

The same trunk also serves KeyVID's *diffusion* models in their own configuration
(``lvdm/models/ddpm3d.py:LatentVisualAudioDiffusion.__init__``; see
:func:`keyvid_diffusion_audio_config`): kernel 16, stride (10, 4) over a
``[1, 128, 204]`` fbank image → 12 frequency × 48 time tokens plus **one CLS token**
(577 tokens), positional embedding ``[1, 577, D]`` stretched bilinearly from the
pretrained 12 × 19 grid (:func:`stretch_pos_embed`, ``ddpm3d.py:interpolate_pos_embed``).
``ImageBindModel.forward_audio`` returns the trunk output — no head, no postprocessor,
no final norm — and that output is what the token plumbing
(:mod:`avsync.core.keyvid_tokens`) splits into per-frame tokens.

Released key names (``modality_preprocessors.audio.*``, ``modality_trunks.audio.*``,
under whatever prefix the file uses: ``imagebindMoodel.`` for the localizer,
``imagebind_model.`` for the diffusion checkpoints) map onto this module with
:func:`audio_trunk_key`; both the localizer loader and the KeyVID loaders use it.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class LocalizerConfig:
    embed_dim: int = 768
    num_blocks: int = 12
    num_heads: int = 12
    kernel_size: int = 16
    stride: Union[int, tuple[int, int]] = 4   # (frequency, time) when a pair
    num_mel_bins: int = 128
    target_frames: int = 198
    num_outputs: int = 48        # scores per window (2 s at 24 fps)
    head_dim: int = 16           # linear2 width
    mlp_ratio: int = 4
    num_cls_tokens: int = 0      # 1 in KeyVID's diffusion configuration

    def __post_init__(self):
        if isinstance(self.stride, (list, tuple)):   # JSON round trip gives a list
            object.__setattr__(self, "stride", tuple(int(s) for s in self.stride))

    @property
    def stride_pair(self) -> tuple[int, int]:
        return self.stride if isinstance(self.stride, tuple) else (self.stride, self.stride)

    @property
    def token_grid(self) -> tuple[int, int]:
        sf, st = self.stride_pair
        f = (self.num_mel_bins - self.kernel_size) // sf + 1
        t = (self.target_frames - self.kernel_size) // st + 1
        return f, t

    @property
    def num_patches(self) -> int:
        f, t = self.token_grid
        return f * t

    @property
    def num_tokens(self) -> int:
        """Patch tokens plus CLS tokens (the length of the positional embedding)."""
        return self.num_patches + self.num_cls_tokens

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
    """Patch stem (+ CLS token) + positional embedding + transformer blocks:
    ``[B, 1, mel, frames]`` → ``[B, tokens, D]`` (ImageBind's ``forward_audio``: the
    trunk output, without head/postprocessor). With a CLS token
    (``multimodal_preprocessors.py:RGBDTPreprocessor.tokenize_input_and_cls_pos``) the
    output is ``[CLS, patch tokens frequency-major]``."""

    def __init__(self, cfg: LocalizerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.proj = nn.Conv2d(1, d, kernel_size=cfg.kernel_size, stride=cfg.stride_pair, bias=False)
        self.stem_norm = nn.LayerNorm(d)
        if cfg.num_cls_tokens:
            self.cls_token = nn.Parameter(torch.randn(1, cfg.num_cls_tokens, d) * d ** -0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_tokens, d) * d ** -0.5)
        self.blocks = nn.ModuleList(_Block(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.num_blocks))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.proj(mel).flatten(2).transpose(1, 2)  # [B, F*T, D], frequency-major
        x = self.stem_norm(x)
        if self.cfg.num_cls_tokens:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
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


# ---------------------------------------------------------------- KeyVID diffusion configuration

# ImageBind-huge's pretrained audio grid (imagebind_huge.pth: kernel 16, stride 10, 204 frames):
# 12 frequency × 19 time patches + 1 CLS = 229 positional embeddings.
PRETRAINED_AUDIO_GRID = (12, 19)

# ddpm3d.py:LatentVisualAudioDiffusion.__init__: the patch stride follows audio_proj_model.video_length
_DIFFUSION_STRIDE = {12: 10, 48: (10, 4), 60: (10, 3)}


def keyvid_diffusion_audio_config(video_length: int = 48, embed_dim: int = 768, num_blocks: int = 12,
                                  num_heads: int = 12) -> LocalizerConfig:
    """The ImageBind audio trunk inside KeyVID's generator / interpolator
    (``ddpm3d.py:LatentVisualAudioDiffusion.__init__``: ``ImageBindModel(audio_stride=...,
    audio_target_len=204)``): kernel 16, stride (10, 4) for the released
    ``video_length`` 48, 204 fbank frames (not cropped), one CLS token → 1 + 12·48 = 577
    tokens. ``embed_dim``/``num_blocks``/``num_heads`` default to ImageBind-huge's audio
    trunk; tests pass tiny ones."""
    if video_length not in _DIFFUSION_STRIDE:
        raise ValueError(f"video_length must be one of {sorted(_DIFFUSION_STRIDE)} (ddpm3d.py), got {video_length}")
    return LocalizerConfig(embed_dim=embed_dim, num_blocks=num_blocks, num_heads=num_heads, kernel_size=16,
                           stride=_DIFFUSION_STRIDE[video_length], target_frames=204, num_cls_tokens=1)


def stretch_pos_embed(pos_embed: torch.Tensor, num_time_tokens: int, num_freq_tokens: int = 12) -> torch.Tensor:
    """``ddpm3d.py:interpolate_pos_embed``: keep the CLS row, view the rest as a
    ``num_freq_tokens × T_old`` grid (frequency-major) and resize it bilinearly
    (``align_corners=False``) to ``num_freq_tokens × num_time_tokens``. The release does
    this once when it loads ``imagebind_huge.pth`` (``[1, 229, D]`` → ``[1, 577, D]``)."""
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    b, n, d = grid.shape
    if n % num_freq_tokens:
        raise ValueError(f"pos_embed has {n} patch rows, not a multiple of {num_freq_tokens} frequency rows")
    grid = grid.reshape(b, num_freq_tokens, n // num_freq_tokens, d).permute(0, 3, 1, 2)   # b d q t
    grid = F.interpolate(grid, size=(num_freq_tokens, num_time_tokens), mode="bilinear", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(b, -1, d)], dim=1)


# ---------------------------------------------------------------- released key names

AUDIO_STEM = "modality_preprocessors.audio."
AUDIO_TRUNK = "modality_trunks.audio."
_STEM_KEYS = {
    "rgbt_stem.proj.weight": "proj.weight",
    "rgbt_stem.norm_layer.weight": "stem_norm.weight",
    "rgbt_stem.norm_layer.bias": "stem_norm.bias",
    "pos_embedding_helper.pos_embed": "pos_embed",
    "cls_token": "cls_token",
}
_BLOCK_PARTS = ("attn.in_proj_weight", "attn.in_proj_bias", "attn.bias_k", "attn.bias_v", "attn.out_proj.weight",
                "attn.out_proj.bias", "norm_1.weight", "norm_1.bias", "norm_2.weight", "norm_2.bias",
                "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(" + "|".join(re.escape(p) for p in _BLOCK_PARTS) + r")$")


def audio_trunk_key(key: str, prefix: str = "") -> Optional[str]:
    """The :class:`ImageBindAudioTrunk` parameter name of a released ImageBind key
    (``{prefix}modality_preprocessors.audio.*`` / ``{prefix}modality_trunks.audio.blocks.*``),
    or None for any other key (other modalities, heads, postprocessors)."""
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix):]
    if rest.startswith(AUDIO_STEM):
        return _STEM_KEYS.get(rest[len(AUDIO_STEM):])
    if rest.startswith(AUDIO_TRUNK):
        m = _BLOCK_RE.match(rest[len(AUDIO_TRUNK):])
        return f"blocks.{m.group(1)}.{m.group(2)}" if m else None
    return None


def released_audio_trunk_keys(cfg: LocalizerConfig, prefix: str = "") -> list[str]:
    """Every released key an :class:`ImageBindAudioTrunk` of ``cfg`` needs, in release order."""
    keys = [prefix + AUDIO_STEM + k for k in ("cls_token",)] if cfg.num_cls_tokens else []
    keys += [prefix + AUDIO_STEM + k for k in ("rgbt_stem.proj.weight", "rgbt_stem.norm_layer.weight",
                                               "rgbt_stem.norm_layer.bias", "pos_embedding_helper.pos_embed")]
    keys += [f"{prefix}{AUDIO_TRUNK}blocks.{i}.{p}" for i in range(cfg.num_blocks) for p in _BLOCK_PARTS]
    return keys


def count_audio_blocks(keys, prefix: str = "") -> int:
    """Number of audio trunk blocks named in ``keys`` (released layout)."""
    head = prefix + AUDIO_TRUNK
    found = {int(m.group(1)) for k in keys if k.startswith(head) and (m := _BLOCK_RE.match(k[len(head):]))}
    return len(found)


def audio_trunk_state_from_released(state: Mapping[str, torch.Tensor], cfg: LocalizerConfig,
                                    prefix: str = "imagebind_model.") -> dict[str, torch.Tensor]:
    """The trunk's state dict from released-layout tensors (other ImageBind modalities and
    the audio head/postprocessor are ignored — ``forward_audio`` does not use them).
    Raises ``KeyError`` naming every missing released key."""
    want = released_audio_trunk_keys(cfg, prefix)
    missing = [k for k in want if k not in state]
    if missing:
        raise KeyError(f"missing ImageBind audio tensors: {', '.join(missing)}")
    return {audio_trunk_key(k, prefix): state[k] for k in want}


def build_audio_trunk_from_released(state: Mapping[str, torch.Tensor], cfg: Optional[LocalizerConfig] = None,
                                    prefix: str = "imagebind_model.", num_heads: Optional[int] = None
                                    ) -> ImageBindAudioTrunk:
    """An :class:`ImageBindAudioTrunk` (eval mode) loaded strictly from released-layout
    keys. ``cfg`` defaults to :func:`keyvid_diffusion_audio_config` with the width and
    depth read from the tensors and ``num_heads`` (default: 64-wide heads, 12 for
    ImageBind-huge; the head count is not visible in the tensors). A positional embedding of the pretrained grid
    (``imagebind_huge.pth``: 229 rows) is stretched to ``cfg``'s grid with
    :func:`stretch_pos_embed`, as ``ddpm3d.py:load_pretrained_imagebind_model`` does."""
    if cfg is None:
        proj = state.get(prefix + AUDIO_STEM + "rgbt_stem.proj.weight")
        if proj is None:
            raise KeyError(f"missing ImageBind audio tensor {prefix + AUDIO_STEM}rgbt_stem.proj.weight")
        d = int(proj.shape[0])
        cfg = keyvid_diffusion_audio_config(embed_dim=d, num_blocks=count_audio_blocks(state, prefix),
                                            num_heads=num_heads or default_heads(d))
    ours = audio_trunk_state_from_released(state, cfg, prefix)
    pos = ours["pos_embed"]
    if pos.shape[1] != cfg.num_tokens:
        f, t = cfg.token_grid
        ours["pos_embed"] = stretch_pos_embed(pos, t, f)
    trunk = ImageBindAudioTrunk(cfg)
    trunk.load_state_dict(ours, strict=True)
    return trunk.eval()
