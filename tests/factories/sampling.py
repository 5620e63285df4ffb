"""A tiny deterministic conditional video denoiser for sampling-core tests and fixtures.

It stands in for KeyVID's UNet in the parity fixture of ``tests/data/sampling`` (the
released ``DDIMSampler`` calls it through a stand-in ``apply_model``) and in our tests
(called through the sampling core's branch batching). It takes the same inputs as the
real model, at toy sizes:

* ``x`` ``[B, C, T, H, W]`` noisy latents, ``t`` ``[B]`` integer DDPM timesteps;
* ``c_concat`` ``[B, C, T, H, W]`` (channel-concatenated with ``x``),
* ``c_crossattn`` ``[B, L, D]`` (text + image tokens), ``c_audio`` ``[B, T, La, Da]``.

Every sample of the batch is computed independently (convolutions and per-sample
reductions), so batching branches must not change a sample's output beyond float
rounding. The audio term goes through ``audio_layer``, a module that the test patch
:func:`audio_off` can switch off for chosen samples, like the networks engineer's
``networks/audio_layers.py:audio_layers_off``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

C, T, H, W = 4, 3, 4, 4
D_CTX, L_CTX = 8, 4 + 2 * T      # 4 "text" tokens + 2 "image" tokens per frame
D_AUD, L_AUD = 6, 2


def timestep_features(t: torch.Tensor, dim: int = 8) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class AudioLayer(nn.Module):
    """The audio term; ``skip`` (a bool per sample, or None) zeroes it for those samples."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D_AUD, C)
        self.skip = None

    def forward(self, audio: torch.Tensor) -> torch.Tensor:   # [B, T, La, Da] -> [B, C, T, 1, 1]
        out = self.proj(audio.mean(dim=2)).permute(0, 2, 1)[..., None, None]
        if self.skip is not None:
            out = out * (~self.skip).to(out.dtype).view(-1, 1, 1, 1, 1)
        return out


class TinyVideoDenoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2 * C, C, kernel_size=3, padding=1)
        self.time = nn.Linear(8, C)
        self.ctx = nn.Linear(D_CTX, C)
        self.audio_layer = AudioLayer()

    def forward(self, x, t, c_concat, c_crossattn, c_audio):
        h = self.conv(torch.cat([x, c_concat], dim=1))
        h = h + self.time(timestep_features(t))[:, :, None, None, None]
        h = h + self.ctx(c_crossattn.mean(dim=1))[:, :, None, None, None]
        h = h + self.audio_layer(c_audio)
        return h + 0.5 * torch.tanh(h)


def make_denoiser(seed: int = 0) -> TinyVideoDenoiser:
    torch.manual_seed(seed)
    net = TinyVideoDenoiser().eval().requires_grad_(False)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.5)
    return net


@contextmanager
def audio_off(net: TinyVideoDenoiser, sample_mask: torch.Tensor):
    """Skip the audio term for the samples of ``sample_mask`` (restored on exit, also on errors)."""
    layer = net.audio_layer
    before = layer.skip
    layer.skip = sample_mask.clone()
    try:
        yield net
    finally:
        layer.skip = before


def make_conditions(seed: int = 1, batch: int = 1, frames: int = T) -> dict:
    """Real and null conditions of the four KeyVID branches (``frames`` frames)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(batch, *shape, generator=g)

    return {
        "text": r(4, D_CTX), "null_text": r(4, D_CTX),
        "image": r(2 * frames, D_CTX), "null_image": r(2 * frames, D_CTX),
        "audio": r(frames, L_AUD, D_AUD), "null_audio": r(frames, L_AUD, D_AUD),
        "concat": r(C, frames, H, W),
    }


class TinyKeyVIDBranches:
    """A KeyVID-style :class:`BranchModel` over the tiny denoiser: text + image tokens in
    ``c_crossattn``, audio tokens, and the shared ``c_concat``; a null condition replaces each
    condition the branch does not make real (the release's ``uc`` / ``uc_2`` / ``uc_3``)."""

    def __init__(self, net, conds, concat):
        self.net, self.c, self.concat = net, conds, concat

    def inputs(self, branch):
        pick = lambda name: self.c[name] if name in branch.real else self.c["null_" + name]  # noqa: E731
        return {"c_crossattn": torch.cat([pick("text"), pick("image")], 1),
                "c_audio": pick("audio"), "c_concat": self.concat}

    def __call__(self, x, t, inputs):
        return self.net(x, t.expand(x.shape[0]), inputs["c_concat"], inputs["c_crossattn"], inputs["c_audio"])


def make_branch_model(seed: int = 3, batch: int = 2, frames: int = T) -> TinyKeyVIDBranches:
    """The tiny denoiser (weights of seed 0) with seeded conditions, as a branch model."""
    conds = make_conditions(seed, batch, frames)
    return TinyKeyVIDBranches(make_denoiser(0), conds, conds["concat"])
