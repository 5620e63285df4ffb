"""Swappable diffusers attention processors for SVD's temporal self-attention.

Generative Inbetweening (paper §4.1–4.3) runs SVD twice per evaluation: a forward
branch on ``z_t`` conditioned on the first frame, and a backward branch on
``flip(z_t)`` conditioned on the last frame whose 16 temporal self-attention layers
(``…temporal_transformer_blocks.0.attn1``) do not use their own attention maps but
the forward branch's maps rotated by 180° (both frame axes flipped), together with
their own value and output projections ``W_v + ΔW_v`` and ``W_o + ΔW_o``.

Each processor here has one job:

* :class:`PlainTemporalProcessor` — ordinary attention with explicit probabilities
  (softmax(QKᵀ·scale)), numerically the same path as the capture processor, so that
  variants which leave a layer alone compare like with like.
* :class:`CaptureProcessor` — ordinary attention that also stores its maps in a
  :class:`MapStore` (the first call of the two-call path).
* :class:`InjectRotatedProcessor` — uses the stored maps rotated by 180° with its own
  V and output projection (optionally with ΔW): the second call of the two-call path.
* :class:`FusedDualDirectionProcessor` — one call whose batch holds the forward
  samples in its first half and the backward samples, in the same order, in its
  second half: the layer computes the forward maps, uses them for the forward half,
  and hands them rotated to the backward half inside the same layer. Nothing is
  stored across layers and the backward branch needs no second UNet.

The input of a temporal attention layer is ``[B·S, F, C]`` (batch outer, then the
S = h·w spatial positions, F frames; see diffusers' ``TemporalBasicTransformerBlock``),
so "first half of the rows" is "first half of the samples".

ΔW is never merged into the UNet: the backward branch's ``base + ΔW`` tensors (the 16
layers' V and output projections, ~50 MB in fp16) are made once per run next to the
one set of base weights (:class:`MergedBackwardWeights`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Protocol

import torch
import torch.nn.functional as F

TEMPORAL_SELF_ATTENTION_SUFFIX = "temporal_transformer_blocks.0.attn1"


class BackwardWeights(Protocol):
    """What the processors need from backward-motion weights (``loaders.svd.BackwardMotionDelta``).

    A name it has no ΔW for gives ``base`` back only for biases (frozen in training)."""

    def backward_weights(self, name: str, base: torch.Tensor) -> torch.Tensor: ...

    def names(self) -> list[str]: ...


class MergedBackwardWeights:
    """``base + ΔW`` for every tensor the delta changes, computed once on the UNet's
    device and dtype, so that no model call re-adds (or re-uploads) ΔW in every layer."""

    def __init__(self, unet: torch.nn.Module, weights: BackwardWeights):
        params = dict(unet.named_parameters())
        self._merged = {n: weights.backward_weights(n, params[n]) for n in weights.names() if n in params}

    def names(self) -> list[str]:
        return sorted(self._merged)

    def backward_weights(self, name: str, base: torch.Tensor) -> torch.Tensor:
        merged = self._merged.get(name)
        if merged is None:
            if name.endswith(".bias"):
                return base
            raise KeyError(f"the backward-motion weights have no tensor '{name}'")
        return merged


# --------------------------------------------------------------------------------------
# Map conventions
# --------------------------------------------------------------------------------------

def rotate_maps_180(probs: torch.Tensor) -> torch.Tensor:
    """Rotate temporal attention maps by 180°: ``A'[..., N-1-j, N-1-k] = A[..., j, k]``.

    The last two axes are (query frame, key frame). Rotating is flipping both; it is
    what the paper's §4.1 describes and what the released code does
    (``torch.flip(dims=(-2, -1))``).
    """
    return torch.flip(probs, dims=(-2, -1))


def flip_frames(x: torch.Tensor, frame_dim: int = 0) -> torch.Tensor:
    """Reverse a video along its frame axis (the backward branch's view of ``z_t``)."""
    return torch.flip(x, dims=(frame_dim,))


# --------------------------------------------------------------------------------------
# Layer discovery and installation
# --------------------------------------------------------------------------------------

def temporal_self_attention_layers(unet) -> list[str]:
    """Module names of the temporal self-attention layers, in UNet order (16 in SVD)."""
    names = []
    for name in unet.attn_processors.keys():
        prefix = name[: -len(".processor")]
        if prefix.endswith(TEMPORAL_SELF_ATTENTION_SUFFIX):
            names.append(prefix)
    return names


def block_place(layer: str) -> str:
    """``"down"``, ``"mid"`` or ``"up"``: where in the UNet a layer sits."""
    if layer.startswith("down_blocks"):
        return "down"
    if layer.startswith("mid_block"):
        return "mid"
    if layer.startswith("up_blocks"):
        return "up"
    raise ValueError(f"not a UNet block layer: {layer}")


@contextmanager
def processors_installed(unet, make: Callable[[str], Optional[object]]) -> Iterator[dict]:
    """Install ``make(layer)`` on each temporal self-attention layer (None keeps the
    current one) for the duration of the block, then restore every original processor.

    The UNet may be shared (ComfyUI holds one model for many nodes), so nothing we
    install may outlive the sampling call.
    """
    originals = dict(unet.attn_processors)
    installed = {}
    procs = dict(originals)
    for layer in temporal_self_attention_layers(unet):
        proc = make(layer)
        if proc is not None:
            procs[layer + ".processor"] = proc
            installed[layer] = proc
    unet.set_attn_processor(procs)
    try:
        yield installed
    finally:
        unet.set_attn_processor(dict(originals))


# --------------------------------------------------------------------------------------
# Shared pieces of the processors
# --------------------------------------------------------------------------------------

def _check_plain_self_attention(attn, encoder_hidden_states, attention_mask) -> None:
    # SVD's temporal attn1 is plain self-attention on [B·S, F, C]; anything else means
    # these processors were installed on the wrong layer.
    if encoder_hidden_states is not None or attention_mask is not None:
        raise RuntimeError("temporal self-attention processor got cross-attention inputs or a mask")
    if attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_q is not None:
        raise RuntimeError("temporal self-attention processor does not support normalised attention")


def attention_maps(attn, x: torch.Tensor) -> torch.Tensor:
    """softmax(Q Kᵀ · scale) as ``[rows·heads, F, F]`` (rows outer, heads inner)."""
    q = attn.head_to_batch_dim(attn.to_q(x))
    k = attn.head_to_batch_dim(attn.to_k(x))
    return attn.get_attention_scores(q, k, None)


def _weight(weights: Optional[BackwardWeights], name: str, base: torch.Tensor) -> torch.Tensor:
    return base if weights is None else weights.backward_weights(name, base)


def project_values(attn, x: torch.Tensor, layer: str, weights: Optional[BackwardWeights]) -> torch.Tensor:
    """V = x (W_v [+ ΔW_v])ᵀ, split into heads: ``[rows·heads, F, d]``."""
    w = _weight(weights, f"{layer}.to_v.weight", attn.to_v.weight)
    return attn.head_to_batch_dim(F.linear(x, w, attn.to_v.bias))


def project_output(attn, h: torch.Tensor, layer: str, weights: Optional[BackwardWeights]) -> torch.Tensor:
    """Merge heads, then the output projection W_o [+ ΔW_o] (bias + ΔW_b where a bias ΔW is
    stored; the released weights have none: biases were frozen in training)."""
    h = attn.batch_to_head_dim(h)
    w = _weight(weights, f"{layer}.to_out.0.weight", attn.to_out[0].weight)
    b = attn.to_out[0].bias
    if b is not None:
        b = _weight(weights, f"{layer}.to_out.0.bias", b)
    h = F.linear(h, w, b)
    h = attn.to_out[1](h)  # dropout (identity at inference)
    if attn.residual_connection:
        raise RuntimeError("temporal self-attention with a residual connection is not SVD's")
    return h / attn.rescale_output_factor


# --------------------------------------------------------------------------------------
# The processors
# --------------------------------------------------------------------------------------

class PlainTemporalProcessor:
    """Ordinary temporal self-attention with explicit probabilities (optionally ΔW)."""

    def __init__(self, layer: str, weights: Optional[BackwardWeights] = None):
        self.layer = layer
        self.weights = weights

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        _check_plain_self_attention(attn, encoder_hidden_states, attention_mask)
        probs = attention_maps(attn, hidden_states)
        v = project_values(attn, hidden_states, self.layer, self.weights)
        return project_output(attn, torch.bmm(probs, v), self.layer, self.weights)


class MapStore(dict):
    """Temporal attention maps of one UNet call, by layer name (the two-call path)."""


class CaptureProcessor:
    """Ordinary temporal self-attention that also records its maps in ``store[layer]``."""

    def __init__(self, layer: str, store: MapStore):
        self.layer = layer
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        _check_plain_self_attention(attn, encoder_hidden_states, attention_mask)
        probs = attention_maps(attn, hidden_states)
        self.store[self.layer] = probs
        v = project_values(attn, hidden_states, self.layer, None)
        return project_output(attn, torch.bmm(probs, v), self.layer, None)


class InjectRotatedProcessor:
    """Temporal self-attention driven by another call's maps, rotated by 180°.

    Its own Q and K are not computed: the maps replace them. V and the output
    projection are its own, with ΔW added when ``weights`` is given.
    """

    def __init__(self, layer: str, store: MapStore, weights: Optional[BackwardWeights] = None):
        self.layer = layer
        self.store = store
        self.weights = weights

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        _check_plain_self_attention(attn, encoder_hidden_states, attention_mask)
        if self.layer not in self.store:
            raise RuntimeError(f"no captured attention maps for {self.layer}: run the forward call first")
        probs = rotate_maps_180(self.store[self.layer])
        v = project_values(attn, hidden_states, self.layer, self.weights)
        if probs.shape[0] != v.shape[0] or probs.shape[-1] != v.shape[1]:
            raise RuntimeError(
                f"{self.layer}: captured maps {tuple(probs.shape)} do not match this call's values {tuple(v.shape)}"
            )
        return project_output(attn, torch.bmm(probs.to(v.dtype), v), self.layer, self.weights)


class FusedDualDirectionProcessor:
    """Forward and backward branches in one call, maps handed over inside the layer.

    The batch is ``[forward samples…, backward samples…]`` with the two halves in the
    same order (e.g. [fwd-uncond, fwd-cond, bwd-uncond, bwd-cond]), so row r of the
    forward half and row r of the backward half are the same sample kind at the same
    spatial position. ``max_map_bytes`` bounds the transient map tensor by working
    through the rows in chunks (the result does not depend on it).
    """

    def __init__(self, layer: str, weights: Optional[BackwardWeights] = None, max_map_bytes: int = 256 << 20):
        self.layer = layer
        self.weights = weights
        self.max_map_bytes = int(max_map_bytes)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        _check_plain_self_attention(attn, encoder_hidden_states, attention_mask)
        rows, frames, _ = hidden_states.shape
        if rows % 2:
            raise RuntimeError(f"{self.layer}: fused dual-direction call needs an even batch, got {rows} rows")
        x_fwd, x_bwd = hidden_states.chunk(2, dim=0)
        half = rows // 2
        heads = attn.heads
        v_fwd = project_values(attn, x_fwd, self.layer, None)
        v_bwd = project_values(attn, x_bwd, self.layer, self.weights)
        out_fwd = torch.empty_like(v_fwd)
        out_bwd = torch.empty_like(v_bwd)
        map_bytes_per_row = heads * frames * frames * 4
        step = max(1, min(half, self.max_map_bytes // max(map_bytes_per_row, 1)))
        for r0 in range(0, half, step):
            r1 = min(half, r0 + step)
            probs = attention_maps(attn, x_fwd[r0:r1])
            a, b = r0 * heads, r1 * heads
            out_fwd[a:b] = torch.bmm(probs, v_fwd[a:b])
            out_bwd[a:b] = torch.bmm(rotate_maps_180(probs), v_bwd[a:b])
            del probs
        out_fwd = project_output(attn, out_fwd, self.layer, None)
        out_bwd = project_output(attn, out_bwd, self.layer, self.weights)
        return torch.cat([out_fwd, out_bwd], dim=0)
