"""Noise sources: where every random draw of a sampling run comes from.

A run asks its source for three kinds of draws, in the order the run needs them:

* ``conditioning(shape)`` — noise that is part of the conditioning (SVD's noise augmentation);
* ``initial(shape)`` — the unit-variance initial latents (solvers scale them);
* ``renoise(shape)`` — a fresh draw added to the sample between model evaluations (EDM's
  re-noise-and-repeat, DDIM's η term).

:class:`SeededNoise` draws all of them from one seeded CPU generator (same seed → same
output on any device). :class:`InjectedNoise` hands out given tensors instead: that is
how a run is checked against a reference's own draws.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch


class NoiseSource(Protocol):
    def conditioning(self, shape) -> torch.Tensor: ...
    def initial(self, shape) -> torch.Tensor: ...
    def renoise(self, shape) -> torch.Tensor: ...


class SeededNoise:
    """All random draws of one run from ``torch.Generator(cpu).manual_seed(seed)``.

    Drawn on the CPU in float32 so that the same seed gives the same output on any device.
    The order of draws (the order the run asks for them) is part of the contract.
    """

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)
        self.draws = 0

    def _draw(self, shape) -> torch.Tensor:
        self.draws += 1
        return torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32)

    def conditioning(self, shape) -> torch.Tensor:
        return self._draw(shape)

    def initial(self, shape) -> torch.Tensor:
        return self._draw(shape)

    def renoise(self, shape) -> torch.Tensor:
        return self._draw(shape)


class InjectedNoise:
    """Given draws: ``initial`` once, then ``renoise`` draws in order; kinds not given
    come from ``fallback`` (a :class:`SeededNoise` of seed 0 unless told). Running out
    of given re-noise draws is an error, never a silent switch to fresh noise."""

    def __init__(self, initial: Optional[torch.Tensor] = None, renoise: Sequence[torch.Tensor] = (),
                 conditioning: Sequence[torch.Tensor] = (), fallback: Optional[NoiseSource] = None):
        self._initial = initial
        self._renoise = list(renoise)
        self._conditioning = list(conditioning)
        self._fallback = fallback if fallback is not None else SeededNoise(0)
        self.renoise_given = len(self._renoise)

    @staticmethod
    def _fit(t: torch.Tensor, shape) -> torch.Tensor:
        if t.numel() != torch.Size(shape).numel():
            raise ValueError(f"injected noise of shape {tuple(t.shape)} does not fit the draw {tuple(shape)}")
        return t.reshape(tuple(shape)).to(torch.float32)

    def conditioning(self, shape) -> torch.Tensor:
        if self._conditioning:
            return self._fit(self._conditioning.pop(0), shape)
        return self._fallback.conditioning(shape)

    def initial(self, shape) -> torch.Tensor:
        if self._initial is not None:
            t, self._initial = self._initial, None
            return self._fit(t, shape)
        return self._fallback.initial(shape)

    def renoise(self, shape) -> torch.Tensor:
        if not self._renoise:
            raise ValueError(f"all {self.renoise_given} injected re-noise draws are used up")
        return self._fit(self._renoise.pop(0), shape)


def anchor_interpolated_noise(x_T: torch.Tensor, keyframes: Sequence[int], frame_axis: int = 2,
                              last: Optional[int] = None) -> torch.Tensor:
    """KeyVID interpolator's initial noise: frames between anchors replaced by a blend of the anchors' noise.

    ``scripts/evaluation/asva/pipeline_audio_cond_animation_freenoise_inpainting_new.py:image_guided_synthesis``:
    the anchors are the keyframe indices plus the last frame (the release hard-codes 47,
    the last of its 48 frames; ``last`` defaults to the last frame). Every frame j strictly
    between consecutive anchors a < b becomes ``(j−a)/(b−a)·x[a] + (b−j)/(b−a)·x[b]`` —
    the weights are **swapped** relative to a lerp (the frame next to a takes mostly
    b's noise) and the blend is not variance-preserving. Both are what the released
    weights were sampled with, so they are kept. Frames before the first keyframe are
    left as drawn. Returns a new tensor; float32 arithmetic as in the release.
    """
    x = x_T.clone()
    frames = x.shape[frame_axis]
    anchors = [int(k) for k in keyframes] + [frames - 1 if last is None else int(last)]

    def frame(j):
        return x.select(frame_axis, j)

    left = anchors[0]
    for right in anchors[1:]:
        length = right - left
        for j in range(left + 1, right):
            frame(j).copy_((j - left) / length * frame(left) + (right - j) / length * frame(right))
        left = right
    return x
