"""DDIM for zero-SNR v-prediction, as KeyVID's released sampler computes it.

Reference: ``XingruiWang/KeyVID`` (commit 0341618) ``lvdm/models/samplers/ddim_multiplecond.py:DDIMSampler``
(``make_schedule``, ``p_sample_ddim``), ``lvdm/models/utils_diffusion.py`` (``make_beta_schedule``,
``make_ddim_timesteps``, ``make_ddim_sampling_parameters``, ``rescale_zero_terminal_snr``) and
``lvdm/models/ddpm3d.py`` (``DDPM.register_schedule``, ``predict_start_from_z_and_v``,
``predict_eps_from_z_and_v``, the ``scale_arr`` of ``LatentDiffusion.__init__``), with the values of
``configs/inference/keyframe_generation.yaml``.

Released arithmetic, kept here operation for operation (the parity fixture in
``tests/data/sampling`` checks it):

* betas: "linear" = sqrt-linear (``linspace(√0.00085, √0.012, 1000)²``) in float64, then
  ``rescale_zero_terminal_snr`` in float64; ``alphas_cumprod`` and its square roots are
  computed in float64 and stored as float32 buffers.
* ``ᾱ_t`` and ``ᾱ_prev`` are read from the float32 ``alphas_cumprod``; σ_t is computed in
  float64 from those float32 values (``1 − ᾱ_t`` is taken in float32 first, as the release's
  torch/numpy mix does) and rounded to float32 where it is used.
* v → ε and x0 use the float32 ``sqrt_alphas_cumprod`` / ``sqrt_one_minus_alphas_cumprod``
  at the step's timestep; x0 is multiplied by ``scale_arr[t_prev] / scale_arr[t]`` (dynamic
  rescale: ``scale_arr`` is a linear ramp 1.0 → 0.7 over the first 400 timesteps, then flat).
* ``x_prev = √ᾱ_prev·x0 + √(1 − ᾱ_prev − σ_t²)·ε + σ_t·z`` in float32, one draw z per step
  (also on the last step, and also when η = 0, as the release does).

One deliberate difference: ``1 − ᾱ_prev − σ_t²`` is clamped at 0 before the square root.
Mathematically it is ≥ 0; in the release's float32 it can round to −6e-8 (at η = 1 with 25
steps, for one step) and the release then produces NaN. Where the release's value is ≥ 0
(every step of KeyVID's 90-step η = 1 schedule) the result is identical.

**The zero-SNR first step.** The trailing schedule starts at t = 999, where ᾱ_T = 0
exactly: the network input is pure noise, ``ε = x`` and ``x0 = −v`` (the v-prediction
is the negated clean sample), and with η = 1 σ_T = √(1 − ᾱ_prev), so the first step adds
no ε direction (``1 − ᾱ_prev − σ² = 0``) and all of its stochasticity is the fresh draw —
mathematically. In the release's float32 the difference rounds to 2⁻²⁴ for 3 steps (6e-8;
0 for 90 steps), leaving √(2⁻²⁴) ≈ 2.4e-4 of ε = x in the first step; this port keeps that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

KEYVID_LINEAR_START = 0.00085
KEYVID_LINEAR_END = 0.012
DDPM_TIMESTEPS = 1000
DYNAMIC_RESCALE_BASE = 0.7
DYNAMIC_RESCALE_TURNING_STEP = 400
SPACINGS = ("uniform_trailing", "uniform")


def sqrt_linear_betas(timesteps: int = DDPM_TIMESTEPS, start: float = KEYVID_LINEAR_START,
                      end: float = KEYVID_LINEAR_END) -> np.ndarray:
    """``utils_diffusion.py:make_beta_schedule("linear")``: ``linspace(√start, √end)²`` in float64."""
    return (torch.linspace(start ** 0.5, end ** 0.5, timesteps, dtype=torch.float64) ** 2).numpy()


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """``utils_diffusion.py:rescale_zero_terminal_snr`` (Lin et al. 2024, Alg. 1), float64: shift and
    scale √ᾱ so that the last timestep has ᾱ = 0 and the first keeps its value."""
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - betas, axis=0))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = np.concatenate([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def dynamic_rescale_arr(timesteps: int = DDPM_TIMESTEPS, base_scale: float = DYNAMIC_RESCALE_BASE,
                        turning_step: int = DYNAMIC_RESCALE_TURNING_STEP) -> torch.Tensor:
    """``ddpm3d.py:LatentDiffusion`` ``scale_arr``: ``linspace(1, base, turning_step)`` then ``timesteps``
    values of ``base`` (length timesteps + turning_step, float32)."""
    arr = np.concatenate((np.linspace(1.0, base_scale, turning_step), np.full(timesteps, base_scale)))
    return torch.tensor(arr, dtype=torch.float32)


@dataclass
class DiffusionSchedule:
    """The float32 buffers ``ddpm3d.py:DDPM.register_schedule`` keeps and the sampler reads."""

    alphas_cumprod: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    scale_arr: Optional[torch.Tensor] = None   # dynamic rescale; None = off

    @property
    def timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @classmethod
    def keyvid(cls, zero_snr: bool = True, dynamic_rescale: bool = True) -> "DiffusionSchedule":
        """KeyVID's generator and interpolator: 1000 sqrt-linear betas 0.00085 → 0.012, zero terminal SNR,
        dynamic rescale with base 0.7."""
        betas = sqrt_linear_betas()
        if zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
        f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        return cls(f32(alphas_cumprod), f32(np.sqrt(alphas_cumprod)), f32(np.sqrt(1.0 - alphas_cumprod)),
                   dynamic_rescale_arr(len(betas)) if dynamic_rescale else None)


def ddim_timesteps(steps: int, timesteps: int = DDPM_TIMESTEPS, spacing: str = "uniform_trailing") -> np.ndarray:
    """``utils_diffusion.py:make_ddim_timesteps``, ascending. ``uniform_trailing`` (KeyVID): ``round(arange(T, 0, −T/S))``
    − 1, e.g. 10, 21, 32, …, 988, 999 for 90 steps — it ends at T−1, where ᾱ = 0 under zero SNR.
    ``uniform``: ``arange(0, T, T//S) + 1``."""
    if steps < 1 or steps > timesteps:
        raise ValueError(f"DDIM steps must be between 1 and {timesteps}, got {steps}")
    if spacing == "uniform_trailing":
        c = timesteps / steps
        out = np.flip(np.round(np.arange(timesteps, 0, -c))).astype(np.int64) - 1
    elif spacing == "uniform":
        out = np.asarray(list(range(0, timesteps, timesteps // steps))) + 1
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    return out


def ddim_parameters(alphas_cumprod: torch.Tensor, timesteps: np.ndarray, eta: float):
    """``utils_diffusion.py:make_ddim_sampling_parameters`` on the float32 ``alphas_cumprod``:
    (σ float64, ᾱ_t float32, ᾱ_prev float64), one per DDIM step in ascending order."""
    ts = torch.as_tensor(np.asarray(timesteps))
    alphas = alphas_cumprod[ts]
    alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[ts[:-1]]]).double()
    # as the release's torch/numpy mix evaluates it: (1 − ᾱ_t) in float32, the rest in float64
    sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas).double() * (1 - alphas.double() / alphas_prev))
    return sigmas, alphas, alphas_prev


@dataclass
class KeyframeReplacement:
    """KeyVID interpolator's "inpainting": after the DDIM update of loop steps 0 … ``until_step``
    (the release's ``end_step``, default 0: the first step only), the keyframe slots of ``x_prev`` are
    set to ``√ᾱ_prev·z_kf + √(1 − ᾱ_prev)·(σ_t·z)/σ_t`` — the keyframe latents noised to the next
    level with the step's own draw z (``ddim_multiplecond.py:DDIMSampler.p_sample_ddim``, ``x_keyframe``
    branch). ``latents`` ``[B, C, K, h, w]``; ``indices`` the K frame indices (the release uses the
    first sample's indices for the whole batch)."""

    latents: torch.Tensor
    indices: Sequence[int]
    until_step: int = 0
    frame_axis: int = 2


def replace_keyframes(x_prev: torch.Tensor, noise: torch.Tensor, draw: torch.Tensor, a_prev: torch.Tensor,
                      sigma_t: torch.Tensor, kf: KeyframeReplacement) -> torch.Tensor:
    """Apply :class:`KeyframeReplacement` to ``x_prev`` (in place; returned). ``noise`` = σ_t·z is divided
    back by σ_t as the release does; at σ_t = 0 (η = 0), where the release divides 0 by 0, z is used."""
    idx = torch.as_tensor(list(kf.indices), dtype=torch.long, device=x_prev.device)
    axis = kf.frame_axis
    z_kf = kf.latents.to(x_prev.device, torch.float32)
    if float(sigma_t) > 0:   # left to right, as the release writes it
        known = a_prev.sqrt() * z_kf + (1 - a_prev).sqrt() * noise.index_select(axis, idx) / sigma_t
    else:
        known = a_prev.sqrt() * z_kf + (1 - a_prev).sqrt() * draw.index_select(axis, idx)
    x_prev.index_copy_(axis, idx, known)
    return x_prev


class DDIMV:
    """The solver of :mod:`avsync.samplers.core.loop` for zero-SNR v-prediction DDIM (see the module doc).

    ``timestep(i)`` is the integer DDPM timestep of loop step i (descending: 999 first with
    ``uniform_trailing``); the network's output is v. Per step one ``noise.renoise`` draw.
    """

    def __init__(self, schedule: DiffusionSchedule, steps: int, eta: float = 1.0, spacing: str = "uniform_trailing",
                 keyframes: Optional[KeyframeReplacement] = None, temperature: float = 1.0):
        if eta < 0:
            raise ValueError(f"eta must be ≥ 0, got {eta}")
        self.schedule = schedule
        self.steps = int(steps)
        self.eta = float(eta)
        self.timesteps = ddim_timesteps(self.steps, schedule.timesteps, spacing)
        sig, a, a_prev = ddim_parameters(schedule.alphas_cumprod, self.timesteps, self.eta)
        # torch.full(size, value) in the release: float32 scalars
        self.sigmas = sig.to(torch.float32)
        self.alphas_prev = a_prev.to(torch.float32)
        if schedule.scale_arr is not None:
            s = schedule.scale_arr[torch.as_tensor(self.timesteps)]
            self.scale = s
            self.scale_prev = torch.cat([s[:1], s[:-1]])
        else:
            self.scale = self.scale_prev = None
        self.keyframes = keyframes
        self.temperature = float(temperature)

    def evaluations(self) -> int:
        return self.steps

    def _index(self, i: int) -> int:
        """Loop step i → index into the ascending DDIM arrays (the release's ``index``)."""
        return self.steps - i - 1

    def initial(self, noise: torch.Tensor) -> torch.Tensor:
        return noise.to(torch.float32)

    def timestep(self, i: int) -> torch.Tensor:
        return torch.tensor(int(self.timesteps[self._index(i)]), dtype=torch.long)

    def repeats(self, i: int) -> int:
        return 0

    def step(self, x: torch.Tensor, v: torch.Tensor, i: int, noise):
        """One DDIM update with v-prediction ``v``; returns (x_prev, pred_x0)."""
        device = x.device
        k = self._index(i)
        t = int(self.timesteps[k])
        x = x.to(torch.float32)
        v = v.to(torch.float32)
        sq_a = self.schedule.sqrt_alphas_cumprod[t].to(device)
        sq_1m = self.schedule.sqrt_one_minus_alphas_cumprod[t].to(device)
        e_t = sq_a * v + sq_1m * x                                 # predict_eps_from_z_and_v
        pred_x0 = sq_a * x - sq_1m * v                             # predict_start_from_z_and_v
        if self.scale is not None:
            pred_x0 = pred_x0 * (self.scale_prev[k] / self.scale[k]).to(device)
        a_prev = self.alphas_prev[k].to(device)
        sigma_t = self.sigmas[k].to(device)
        dir_xt = (1.0 - a_prev - sigma_t ** 2).clamp(min=0).sqrt() * e_t
        draw = noise.renoise(x.shape).to(device)
        step_noise = sigma_t * draw * self.temperature
        x_prev = a_prev.sqrt() * pred_x0 + dir_xt + step_noise
        if self.keyframes is not None and i <= self.keyframes.until_step:
            replace_keyframes(x_prev, step_noise, draw, a_prev, sigma_t, self.keyframes)
        return x_prev, pred_x0
