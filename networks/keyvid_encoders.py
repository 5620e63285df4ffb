"""KeyVID's frozen encoders on transformers' CLIP modules.

* :class:`OpenCLIPTextEncoder` is ``lvdm/modules/encoders/condition.py:FrozenOpenCLIPEmbedder``
  with ``layer="penultimate"`` (OpenCLIP ViT-H-14 text tower): token + positional embedding,
  the causal transformer **without its last block** (``text_transformer_forward`` stops at
  ``len(resblocks) - layer_idx``), then ``ln_final`` — the reference *does* apply the final
  LayerNorm to the penultimate output (``encode_with_transformer``). transformers'
  ``CLIPTextModel`` built with one block fewer computes exactly that as ``last_hidden_state``
  (its ``final_layer_norm`` is OpenCLIP's ``ln_final``), and its causal mask is OpenCLIP's
  ``build_attention_mask``. Output: ``[B, 77, width]``.
* :class:`OpenCLIPImageEncoder` is ``condition.py:FrozenOpenCLIPImageEmbedderV2``: kornia's
  antialiased bicubic resize to 224 × 224 (``align_corners=True``), ``[-1, 1] → [0, 1]``, CLIP
  mean/std, then the vision tower's tokens after the last block — all 257 tokens, no
  ``ln_post``, no projection (``encode_with_vision_transformer``). transformers'
  ``CLIPVisionModel(WithProjection).last_hidden_state`` is exactly that.

:func:`kornia_resize` reproduces ``kornia.geometry.transform.resize`` (kornia 0.7.3, the
version KeyVID pins) without depending on kornia: for a downscale it first blurs with a
separable Gaussian (σ = (factor − 1) / 2, kernel ``max(4σ, 3)`` rounded up to odd, reflect
padding), then calls ``F.interpolate``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _gaussian_1d(size: int, sigma: float, dtype, device) -> torch.Tensor:
    # kornia.filters.kernels.gaussian: centred on size // 2 (+0.5 for even sizes), normalised
    x = torch.arange(size, dtype=dtype, device=device) - float(size // 2)
    if size % 2 == 0:
        x = x + 0.5
    g = torch.exp(-x.pow(2.0) / (2 * sigma ** 2))
    return g / g.sum()


def _blur_axis(x: torch.Tensor, kernel: torch.Tensor, dim: int) -> torch.Tensor:
    c = x.shape[1]
    k = kernel.numel()
    if dim == -1:
        w = kernel.view(1, 1, 1, k).expand(c, 1, 1, k)
        x = F.pad(x, (k // 2, k // 2, 0, 0), mode="reflect")
    else:
        w = kernel.view(1, 1, k, 1).expand(c, 1, k, 1)
        x = F.pad(x, (0, 0, k // 2, k // 2), mode="reflect")
    return F.conv2d(x, w, groups=c)


def kornia_resize(x: torch.Tensor, size: tuple[int, int], interpolation: str = "bicubic",
                  align_corners: bool = True, antialias: bool = True) -> torch.Tensor:
    """``kornia.geometry.resize(x, size, interpolation, align_corners, antialias)`` on ``[B, C, H, W]``."""
    h, w = x.shape[-2:]
    size = (int(size[0]), int(size[1]))
    if (h, w) == size:
        return x
    factors = (h / size[0], w / size[1])
    if antialias and max(factors) > 1:
        sigmas = (max((factors[0] - 1.0) / 2.0, 0.001), max((factors[1] - 1.0) / 2.0, 0.001))
        ks = [int(max(2.0 * 2 * sigmas[0], 3)), int(max(2.0 * 2 * sigmas[1], 3))]
        ks = [k + 1 if k % 2 == 0 else k for k in ks]
        # kornia's separable filter: along the width first, then the height
        x = _blur_axis(x, _gaussian_1d(ks[1], sigmas[1], x.dtype, x.device), -1)
        x = _blur_axis(x, _gaussian_1d(ks[0], sigmas[0], x.dtype, x.device), -2)
    return F.interpolate(x, size=size, mode=interpolation, align_corners=align_corners)


class OpenCLIPTextEncoder(nn.Module):
    """Token ids ``[B, 77]`` (OpenCLIP tokenizer: SOT … EOT, zero padded) → ``[B, 77, width]``."""

    def __init__(self, clip_text_model: nn.Module):
        super().__init__()
        self.model = clip_text_model  # transformers CLIPTextModel with (released blocks − 1) layers

    @property
    def context_length(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[-1] != self.context_length:
            raise ValueError(f"tokens: expected {self.context_length} per prompt, got {tokens.shape[-1]}")
        return self.model(input_ids=tokens.long()).last_hidden_state


class OpenCLIPImageEncoder(nn.Module):
    """Images ``[B, 3, H, W]`` in ``[-1, 1]`` → all ``1 + grid²`` tokens of the last block ``[B, 257, width]``."""

    def __init__(self, clip_vision_model: nn.Module, image_size: int = 224, antialias: bool = True):
        super().__init__()
        self.model = clip_vision_model  # transformers CLIPVisionModel(WithProjection)
        self.image_size = int(image_size)
        self.antialias = antialias
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        x = kornia_resize(image, (self.image_size, self.image_size), "bicubic", True, self.antialias)
        x = (x + 1.0) / 2.0
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(image)
        return self.model(pixel_values=x.to(next(self.model.parameters()).dtype)).last_hidden_state
