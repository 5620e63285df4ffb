"""Chunked VAE decoding: latents → IMAGE frames, a few frames at a time (memory), cancellable between chunks."""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch

from ... import compat


@torch.no_grad()
def decode_in_chunks(decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, chunk: int,
                     progress: Optional[compat.Progress] = None) -> torch.Tensor:
    """``decode`` (latent frames ``[n, C, h, w]`` → pixels ``[n, 3, H, W]`` in −1..1) over ``latents``
    ``[F, C, h, w]`` in chunks of ``chunk`` frames → IMAGE ``[F, H, W, 3]`` in 0..1 on the intermediate device."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    frames = []
    for i in range(0, latents.shape[0], chunk):
        frames.append(decode(latents[i: i + chunk]).float().to(compat.intermediate_device()))
        if progress is not None:
            progress.update(1)
        compat.check_interrupted()
    video = torch.cat(frames)
    return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def _takes_num_frames(vae) -> bool:
    try:
        return "num_frames" in inspect.signature(vae.decode).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, chunk: int, progress: Optional[compat.Progress] = None) -> torch.Tensor:
    """A diffusers VAE over latents ``[F, C, h, w]`` (scaled by ``vae.config.scaling_factor``) → IMAGE.
    A temporal decoder (SVD's ``AutoencoderKLTemporalDecoder``) is told each chunk's frame count."""
    p = next(vae.parameters())
    temporal = _takes_num_frames(vae)
    z = latents / vae.config.scaling_factor

    def decode(part):
        part = part.to(p.device, p.dtype)
        out = vae.decode(part, num_frames=part.shape[0]) if temporal else vae.decode(part)
        return out.sample

    return decode_in_chunks(decode, z, chunk, progress)
