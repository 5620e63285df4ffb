"""Tiny MTV transformers for tests (random weights, fp32).

``tiny_mtv_config()`` is the parity size of the reference notes §7 / MTV_CONTRACT: 2 layers,
hidden 128 = 2 heads × 64, time embedding 512, wav2vec width 768, the released 13×60×90
latent and 49-frame audio windows (SAT hard-codes both), 2 audio tokens per latent frame and
a 32-wide audio projection. Fast tests override the latent and window sizes, e.g.
``tiny_mtv_config(latent_frames=3, latent_height=8, latent_width=8, audio_window_frames=9)``.
"""

from __future__ import annotations

import torch

from avsync.networks.mtv import MTVConfig, MTVTransformer

TINY = dict(num_layers=2, num_heads=2, head_dim=64, audio_tokens=2, audio_proj_hidden=32)
SMALL_LATENT = dict(latent_frames=3, latent_height=8, latent_width=8, audio_window_frames=9)


def tiny_mtv_config(**overrides) -> MTVConfig:
    return MTVConfig(**{**TINY, **overrides})


def _randomize(net: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    # Released init zeroes audio_music_adaLn and (SAT reinit) the AdaLN linears, which would
    # hide whole paths from a test; every parameter gets seeded noise instead.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(net.named_parameters()):
            if name.endswith("norm.weight") or name.endswith("layernorm.weight") or ".norm_q." in name \
                    or ".norm_k." in name or "norm1.norm.weight" in name or "norm2.norm.weight" in name:
                p.copy_(1.0 + std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def tiny_mtv_transformer(seed: int = 0, **overrides) -> MTVTransformer:
    """A tiny :class:`MTVTransformer` with every parameter seeded (eval mode, fp32)."""
    torch.manual_seed(seed)
    net = MTVTransformer(tiny_mtv_config(**overrides)).eval()
    _randomize(net, seed)
    return net


def tiny_mtv_inputs(config: MTVConfig, batch: int = 1, seed: int = 0, timestep: float = 500.0):
    """Seeded inputs for :meth:`MTVTransformer.forward`: latents, text, timestep and the audio
    streams (``speech2`` only for two speakers)."""
    g = torch.Generator().manual_seed(seed)
    c = config
    audio_shape = (batch, c.audio_window_frames, c.audio_context, c.audio_layers_per_frame, c.audio_dim)
    out = dict(
        latents=torch.randn(batch, c.latent_frames, c.in_channels, c.latent_height, c.latent_width, generator=g),
        text=torch.randn(batch, c.text_tokens, c.text_dim, generator=g),
        timestep=torch.full((batch,), float(timestep)),
        speech=torch.randn(audio_shape, generator=g),
        effects=torch.randn(audio_shape, generator=g),
        music=torch.randn(audio_shape, generator=g),
    )
    if c.speakers == 2:
        out["speech2"] = torch.randn(audio_shape, generator=g)
    return out


def sat_random_state_dict(shapes: dict, seed: int, std: float = 0.05) -> dict:
    """Seeded tensors for a SAT ``DiffusionTransformer`` state dict given its key → shape map
    (``tests/data/mtv/network/sat_keys.json``): key ``i`` in sorted order draws from
    ``torch.Generator().manual_seed(seed + i)``; LayerNorm weights are ``1 + std·N(0,1)``,
    everything else ``std·N(0,1)``. The parity fixture was made from exactly these tensors,
    so only the key list has to be stored."""
    out = {}
    for i, key in enumerate(sorted(shapes)):
        g = torch.Generator().manual_seed(seed + i)
        noise = std * torch.randn(tuple(shapes[key]), generator=g)
        is_norm_weight = key.endswith(".weight") and ("layernorm" in key or "norm_final" in key
                                                      or key.endswith(".norm.weight"))
        out[key] = 1.0 + noise if is_norm_weight else noise
    return out
