"""Guidance as objects: which condition branches a step needs, and how to combine them.

A **branch** says which conditions are real (the others are given as their null
version) and, optionally, a network **patch** applied while it runs: a callable
``(net, sample_mask) -> ContextManager`` that changes the network for the samples of the
model-call batch where ``sample_mask`` is True and restores it on exit (e.g.
``networks/audio_layers.py:audio_layers_off(net, layers, samples=mask)``). The core never
needs to know what a patch does.

A **guidance object** answers two questions per step: ``branches(step, steps)`` (what to
evaluate) and ``combine(preds, step, steps)`` (the prediction the solver gets, from a dict
branch name → prediction). :func:`evaluate_branches` runs the branches — all those whose
inputs have the same shapes in **one** model call, concatenated along the batch and split
after, each patch entered with the mask of its branches' rows. A new guidance method is a
new class here; the loop does not change.

Compared with the anchors: diffusers' guiders (``src/diffusers/guiders/``) also name their
branches (``num_conditions``), prepare inputs, patch models (``prepare_models`` /
``cleanup_models``) and combine (``forward``); here input preparation belongs to the model
family (:class:`BranchModel`), patches are context managers so that a cancelled run cannot
leave a model patched, and there is no state between steps.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, Mapping, Optional, Protocol, Sequence

import torch

Patch = Callable[[torch.nn.Module, torch.Tensor], ContextManager]

IMAGE, TEXT, AUDIO = "image", "text", "audio"


@dataclass(frozen=True)
class Branch:
    name: str
    real: frozenset = frozenset()          # conditions given for real; the others are null
    patch: Optional[Patch] = None          # applied to this branch's rows of the model call


class Guidance(Protocol):
    def branches(self, step: int, steps: int) -> Sequence[Branch]: ...
    def combine(self, preds: Mapping[str, torch.Tensor], step: int, steps: int) -> torch.Tensor: ...


class BranchModel(Protocol):
    """What a model family provides to run branches: the network patches act on, each
    branch's condition inputs (batch-first tensors; cached by the family if costly), and
    the network call on a batch of them. ``t`` is the solver's timestep as given (a 0-d
    tensor: one time for the whole call); the family expands it to the call's batch."""

    net: torch.nn.Module

    def inputs(self, branch: Branch) -> Dict[str, torch.Tensor]: ...
    def __call__(self, x: torch.Tensor, t: torch.Tensor, inputs: Dict[str, torch.Tensor]) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------
# Running branches
# --------------------------------------------------------------------------------------

def _shape_key(inputs: Mapping[str, torch.Tensor]):
    return tuple(sorted((k, tuple(v.shape[1:]), v.dtype) for k, v in inputs.items()))


def evaluate_branches(model: BranchModel, x: torch.Tensor, t: torch.Tensor, branches: Sequence[Branch],
                      batched: bool = True, on_call: Optional[Callable[[int], None]] = None) -> Dict[str, torch.Tensor]:
    """Predictions of every branch at (x, t). ``batched``: branches whose inputs have equal
    shapes share one model call; otherwise one call per branch. ``on_call(n)`` is told the
    number of branches of each model call (tests and benchmarks count with it)."""
    prepared = [(b, model.inputs(b)) for b in branches]
    if batched:
        groups: Dict[tuple, list] = {}
        for b, inp in prepared:
            groups.setdefault(_shape_key(inp), []).append((b, inp))
        calls = list(groups.values())
    else:
        calls = [[p] for p in prepared]
    out: Dict[str, torch.Tensor] = {}
    bsz = x.shape[0]
    for group in calls:
        n = len(group)
        keys = group[0][1].keys()
        inputs = {k: torch.cat([inp[k] for _, inp in group]) if n > 1 else group[0][1][k] for k in keys}
        xs = torch.cat([x] * n) if n > 1 else x
        with ExitStack() as stack:
            for patch in dict.fromkeys(b.patch for b, _ in group if b.patch is not None):
                mask = torch.tensor([b.patch is patch for b, _ in group for _ in range(bsz)], device=x.device)
                stack.enter_context(patch(model.net, mask))
            pred = model(xs, t, inputs)
        if on_call is not None:
            on_call(n)
        for j, (b, _) in enumerate(group):
            out[b.name] = pred[j * bsz:(j + 1) * bsz]
    return out


def guided_predictor(model: BranchModel, guidance: "Guidance", steps: int, batched: bool = True,
                     on_call: Optional[Callable[[int], None]] = None):
    """``predict(x, t, step)`` for :func:`avsync.samplers.core.loop.sample`: the guided prediction."""

    def predict(x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        preds = evaluate_branches(model, x, t, guidance.branches(step, steps), batched=batched, on_call=on_call)
        return guidance.combine(preds, step, steps)

    return predict


# --------------------------------------------------------------------------------------
# Guidance methods
# --------------------------------------------------------------------------------------

def rescale_noise_cfg(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """``utils_diffusion.py:rescale_noise_cfg`` (Lin et al. 2024 §3.4): match the guided prediction's std
    to the conditional one's (std over all non-batch dims, unbiased, per sample), mixed by ``rescale``."""
    dims = list(range(1, cond.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return rescale * rescaled + (1 - rescale) * guided


class LinearGuidance:
    """Base of guidance whose result is a linear mix of branch predictions (:meth:`mix`),
    optionally followed by a correction that needs the full-condition prediction
    (:meth:`finish`). Wrappers such as :class:`AudioSyncGuidance` add terms to the mix."""

    full = "cond"   # the branch with every condition real

    def branches(self, step: int, steps: int) -> Sequence[Branch]:
        raise NotImplementedError

    def mix(self, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, out: torch.Tensor, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return out

    def combine(self, preds: Mapping[str, torch.Tensor], step: int, steps: int) -> torch.Tensor:
        return self.finish(self.mix(preds), preds)


class Unguided(LinearGuidance):
    """One branch with every condition real."""

    def __init__(self, conditions: Sequence[str] = ()):
        self._branch = Branch(self.full, frozenset(conditions))

    def branches(self, step, steps):
        return [self._branch]

    def mix(self, preds):
        return preds[self.full]


class CFG(LinearGuidance):
    """Classifier-free guidance ``uncond + s·(cond − uncond)``. ``scale`` may be a tensor that
    broadcasts against the prediction (per-frame scales)."""

    def __init__(self, scale, conditions: Sequence[str] = ()):
        self.scale = scale
        self._branches = [Branch("uncond"), Branch(self.full, frozenset(conditions))]

    def branches(self, step, steps):
        return self._branches

    def mix(self, preds):
        uncond, cond = preds["uncond"], preds[self.full]
        return uncond + self.scale * (cond - uncond)


class MultiConditionCFG(LinearGuidance):
    """KeyVID's four-condition CFG (paper App. G; ``ddim_multiplecond.py:DDIMSampler.p_sample_ddim``)::

        out = e_u + s_img·(e_i − e_u) + s_txt·(e_it − e_i) + s_aud·(e_c − e_it)
        out = rescale_noise_cfg(out, e_c, rescale)            (when rescale > 0; 0.7 in the release)

    with e_u: nothing real (empty text, zero-image tokens, null audio); e_i: image;
    e_it: image + text; e_c: all three. All four share ``c_concat``.

    As in the release, ``s_txt == 1`` switches guidance off entirely (one branch, e_c),
    whatever ``s_img`` and ``s_aud`` are: the release tests only the text scale.
    """

    def __init__(self, s_img: float = 2.0, s_txt: float = 7.5, s_aud: float = 7.5, rescale: float = 0.7):
        self.s_img, self.s_txt, self.s_aud, self.rescale = float(s_img), float(s_txt), float(s_aud), float(rescale)
        self._branches = [Branch("e_u"), Branch("e_i", frozenset({IMAGE})), Branch("e_it", frozenset({IMAGE, TEXT})),
                          Branch(self.full, frozenset({IMAGE, TEXT, AUDIO}))]

    @property
    def guided(self) -> bool:
        return self.s_txt != 1.0

    def branches(self, step, steps):
        return self._branches if self.guided else self._branches[-1:]

    def mix(self, preds):
        if not self.guided:
            return preds[self.full]
        e_u, e_i, e_it, e_c = preds["e_u"], preds["e_i"], preds["e_it"], preds[self.full]
        return e_u + self.s_img * (e_i - e_u) + self.s_txt * (e_it - e_i) + self.s_aud * (e_c - e_it)

    def finish(self, out, preds):
        if self.guided and self.rescale > 0.0:
            return rescale_noise_cfg(out, preds[self.full], self.rescale)
        return out


def step_in_range(step: int, steps: int, start: float, end: float) -> bool:
    """Is loop step ``step`` (0-based, of ``steps``) inside the fraction range [start, end)?"""
    return start * steps <= step < end * steps


class AudioSyncGuidance(LinearGuidance):
    """Syncphony's Audio Sync Guidance (§3.3, eq. 6) on top of ``inner``: one more branch,
    ``off_sync`` — every condition real, the network's audio layers skipped by ``skip_audio``
    (a :data:`Patch`) — and ``w_a·(e_c − e_off)`` added to the inner mix before its finish.
    With KeyVID's four-condition CFG::

        out = e_u + s_img(e_i − e_u) + s_txt(e_it − e_i) + s_aud(e_c − e_it) + w_a(e_c − e_off)
        out = rescale_noise_cfg(out, e_c, 0.7)

    (eq. 6 has one CFG term, ``w_t(ε(c) − ε(c_∅))``; KeyVID's CFG has three.) Only steps in
    [start, end) as fractions of sampling get the extra branch; elsewhere, and when
    ``w_a == 0``, this is exactly ``inner`` (the branch is not evaluated).
    """

    off = "off_sync"

    def __init__(self, inner: LinearGuidance, w_a: float, skip_audio: Patch, start: float = 0.0, end: float = 1.0):
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"need 0 ≤ start ≤ end ≤ 1, got start {start}, end {end}")
        self.inner, self.w_a, self.skip_audio, self.start, self.end = inner, float(w_a), skip_audio, start, end
        self.full = inner.full

    def active(self, step: int, steps: int) -> bool:
        return self.w_a != 0.0 and step_in_range(step, steps, self.start, self.end)

    def branches(self, step, steps):
        inner = list(self.inner.branches(step, steps))
        if not self.active(step, steps):
            return inner
        full = next(b for b in inner if b.name == self.full)
        return inner + [Branch(self.off, full.real, self.skip_audio)]

    def combine(self, preds, step, steps):
        if self.off not in preds:
            return self.inner.combine(preds, step, steps)
        out = self.inner.mix(preds) + self.w_a * (preds[self.full] - preds[self.off])
        return self.inner.finish(out, preds)
