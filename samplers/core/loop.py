"""The one sampling loop: solver steps over a prediction function, with progress, cancel and preview.

Roles (every generator composes the same pieces):

* a **noise source** (:mod:`.noise`) gives the initial latents and every per-step draw;
* a **solver** (:class:`Solver`: :class:`.edm.EulerEDM`, :class:`.ddim.DDIMV`) turns
  predictions into the next sample and says which time the network sees;
* a **prediction function** ``predict(x, t, step)`` — usually
  :func:`.guidance.guided_predictor` (a model family's branches combined by a guidance
  object), or a family's own wrapper (dual-direction fusion);
* a **preview** (:class:`.preview.LatentPreview`) for the progress bar.

Cancel is checked before every model evaluation (ComfyUI's Cancel, or
``compat.request_interrupt``); patches and processors are context managers, so a cancelled
run leaves no model patched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch

from ... import compat
from .noise import NoiseSource


class Solver(Protocol):
    steps: int

    def evaluations(self) -> int: ...
    def initial(self, noise: torch.Tensor) -> torch.Tensor: ...
    def timestep(self, i: int) -> torch.Tensor: ...
    def repeats(self, i: int) -> int: ...
    def step(self, x: torch.Tensor, pred: torch.Tensor, i: int, noise: NoiseSource): ...


@dataclass
class SamplingTrace:
    """What happened during a run (tests and benchmarks read it)."""

    evaluations: int = 0
    renoise_stds: list = field(default_factory=list)   # (step, repeat, std)
    model_calls: list = field(default_factory=list)    # branches per model call, in order

    def count_call(self, branches: int) -> None:
        self.model_calls.append(branches)


@torch.no_grad()
def sample(predict: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], solver: Solver, noise: NoiseSource,
           shape=None, device="cpu", initial: Optional[torch.Tensor] = None,
           progress: Optional[compat.Progress] = None, preview: Optional[Callable] = None,
           trace: Optional[SamplingTrace] = None) -> torch.Tensor:
    """Run ``solver`` from unit-variance ``initial`` noise (drawn from ``noise`` with ``shape`` when None);
    returns the float32 sample. ``progress`` is advanced once per model evaluation (with a preview of the
    denoised estimate when ``preview`` is given)."""
    if initial is None:
        initial = noise.initial(shape)
    x = solver.initial(initial.to(device))
    trace = trace if trace is not None else SamplingTrace()
    for i in range(solver.steps):
        for r in range(1 + solver.repeats(i)):
            compat.check_interrupted()
            if r:
                trace.renoise_stds.append((i, r - 1, float(solver.renoise_std(i))))
                x = solver.renoise(x, i, noise.renoise(x.shape))
            pred = predict(x, solver.timestep(i).to(device), i)
            x, x0 = solver.step(x, pred, i, noise)
            trace.evaluations += 1
            if progress is not None:
                progress.update(1, preview=preview(x0) if preview is not None else None)
    return x
