"""Per-family latent preview: a cheap RGB image of one denoised latent frame for ComfyUI's progress bar."""

from __future__ import annotations

from typing import Optional

import torch

# ComfyUI's SD1.x latent → RGB factors (comfy/latent_formats.py:SD15). SVD's and KeyVID's VAEs
# (SD's KL-f8) share that latent space. Rows: latent channels; columns: R, G, B.
SD_LATENT_RGB_FACTORS = torch.tensor([
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
])


def latent_preview(x0_frame: torch.Tensor, max_size: int = 512, factors: torch.Tensor = SD_LATENT_RGB_FACTORS):
    """One denoised latent frame ``[C, h, w]`` → ``("JPEG", PIL image, max size)``, the form ComfyUI shows."""
    from PIL import Image

    rgb = x0_frame.float().cpu().permute(1, 2, 0) @ factors
    rgb = ((rgb + 1.0) / 2.0).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    return ("JPEG", Image.fromarray(rgb), max_size)


class LatentPreview:
    """Preview of a family's latents: the middle frame of the first sample.

    ``frame_axis``/``channel_axis`` locate frames and channels in the sampler's latents
    (SVD inbetweening: ``[F, C, h, w]`` → 0 and 1, no batch; KeyVID: ``[B, C, T, h, w]`` →
    2 and 1 with ``batch_axis`` 0).
    """

    def __init__(self, frame_axis: int, channel_axis: int, batch_axis: Optional[int] = None,
                 factors: torch.Tensor = SD_LATENT_RGB_FACTORS, max_size: int = 512):
        self.frame_axis, self.channel_axis, self.batch_axis = frame_axis, channel_axis, batch_axis
        self.factors, self.max_size = factors, max_size

    def frame(self, x0: torch.Tensor) -> torch.Tensor:
        """``[C, h, w]`` of the middle frame of the first sample."""
        axes = {self.frame_axis: x0.shape[self.frame_axis] // 2}
        if self.batch_axis is not None:
            axes[self.batch_axis] = 0
        for axis in sorted(axes, reverse=True):
            x0 = x0.select(axis, axes[axis])
        channel = self.channel_axis - sum(1 for a in axes if a < self.channel_axis)
        return x0.movedim(channel, 0)

    def __call__(self, x0: torch.Tensor):
        return latent_preview(self.frame(x0), self.max_size, self.factors)
