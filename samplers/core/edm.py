"""SVD's EDM v-prediction sampling pieces: Karras σ schedule, preconditioning, Euler.

These follow diffusers' ``EulerDiscreteScheduler`` as configured by SVD-XT's
``scheduler_config.json`` (v_prediction, ``timestep_type: continuous``,
``use_karras_sigmas: true``, σ 700 → 0.002, ``timestep_spacing: leading``), which is
what the Generative Inbetweening release samples with. The arithmetic is done in the
same order and precision (σ schedule in float64, then float32; Euler in float32) so
that results agree with the reference to float32 rounding.

With σ_data = 1 the EDM preconditioning is
``c_skip = 1/(σ²+1)``, ``c_out = −σ/√(σ²+1)``, ``c_in = 1/√(σ²+1)``, ``c_noise = ¼ ln σ``,
and the denoised estimate is ``x0 = c_skip·x + c_out·v``.
"""

from __future__ import annotations

import numpy as np
import torch

SVD_SIGMA_MIN = 0.002
SVD_SIGMA_MAX = 700.0
KARRAS_RHO = 7.0


def karras_sigmas(steps: int, sigma_min: float = SVD_SIGMA_MIN, sigma_max: float = SVD_SIGMA_MAX,
                  rho: float = KARRAS_RHO) -> torch.Tensor:
    """``steps`` Karras σ from ``sigma_max`` down to ``sigma_min``, then a final 0 (float32, length steps+1)."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    ramp = np.linspace(0, 1, steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    sigmas = torch.from_numpy(sigmas).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])


def init_noise_sigma(sigmas: torch.Tensor) -> torch.Tensor:
    """Scale of the initial noise: √(σ_max²+1) (diffusers' value for "leading" spacing)."""
    return (sigmas.max() ** 2 + 1) ** 0.5


def c_in(sigma: torch.Tensor) -> torch.Tensor:
    return 1 / ((sigma ** 2 + 1) ** 0.5)


def c_skip(sigma: torch.Tensor) -> torch.Tensor:
    return 1 / (sigma ** 2 + 1)


def c_out(sigma: torch.Tensor) -> torch.Tensor:
    return -sigma / (sigma ** 2 + 1) ** 0.5


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """The UNet's timestep input, ¼ ln σ (float32)."""
    return torch.as_tensor(0.25 * torch.as_tensor(sigma, dtype=torch.float32).log(), dtype=torch.float32)


def scale_input(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The network input ``c_in·x`` (written as diffusers' ``scale_model_input`` writes it)."""
    return x / ((sigma ** 2 + 1) ** 0.5)


def denoised_from_v(v: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 = c_out·v + c_skip·x."""
    return v * (-sigma / (sigma ** 2 + 1) ** 0.5) + (x / (sigma ** 2 + 1))


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One Euler step of the probability-flow ODE from σ to σ_next, in float32."""
    return euler_step_and_x0(x, v, sigma, sigma_next)[0]


def euler_step_and_x0(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor):
    """:func:`euler_step` and the denoised estimate it stepped towards."""
    x = x.to(torch.float32)
    x0 = denoised_from_v(v, x, sigma)
    derivative = (x - x0) / sigma
    return x + derivative * (sigma_next - sigma), x0


def renoise_std(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """Std of the noise that brings a sample at σ_next back to σ: √(σ² − σ_next²)."""
    return torch.sqrt(sigma ** 2 - sigma_next ** 2)


def renoise_steps(steps: int, ratio: float, repeats: int) -> int:
    """How many steps get re-noise-and-repeat: the first ``int(steps·ratio)`` (0 when repeats is 0)."""
    if repeats <= 0:
        return 0
    return min(steps, int(steps * ratio))


def model_evaluations(steps: int, ratio: float, repeats: int) -> int:
    """Evaluations of the (dual-branch) model for a whole run."""
    return steps + renoise_steps(steps, ratio, repeats) * max(repeats, 0)


class EulerEDM:
    """The solver of :mod:`avsync.samplers.core.loop` for EDM v-prediction: Euler on the
    Karras σ schedule, with optional re-noise-and-repeat of the first steps.

    The network's time input is σ itself (:meth:`timestep`); its preconditioning (``c_in``,
    ``c_noise``) belongs to the model family's denoiser, which receives σ.
    """

    def __init__(self, steps: int, renoise_repeats: int = 0, renoise_ratio: float = 0.0,
                 sigma_min: float = SVD_SIGMA_MIN, sigma_max: float = SVD_SIGMA_MAX):
        self.steps = int(steps)
        self.sigmas = karras_sigmas(self.steps, sigma_min, sigma_max)
        self.renoise_repeats = int(renoise_repeats)
        self.renoise_until = renoise_steps(self.steps, renoise_ratio, self.renoise_repeats)
        self._renoise_stds = [renoise_std(self.sigmas[i], self.sigmas[i + 1]) for i in range(self.renoise_until)]

    def evaluations(self) -> int:
        return self.steps + self.renoise_until * max(self.renoise_repeats, 0)

    def initial(self, noise: torch.Tensor) -> torch.Tensor:
        """Unit-variance noise → x at σ_max (scaled by diffusers' ``init_noise_sigma``)."""
        return noise.to(torch.float32) * init_noise_sigma(self.sigmas).to(noise.device)

    def timestep(self, i: int) -> torch.Tensor:
        return self.sigmas[i]

    def repeats(self, i: int) -> int:
        """How many times step ``i`` is re-noised and repeated after its first evaluation."""
        return self.renoise_repeats if i < self.renoise_until else 0

    def renoise_std(self, i: int) -> torch.Tensor:
        return self._renoise_stds[i]

    def renoise(self, x: torch.Tensor, i: int, draw: torch.Tensor) -> torch.Tensor:
        """Back from σ_{i+1} to σ_i: ``x + draw·√(σ_i² − σ_{i+1}²)``."""
        return x + draw.to(x.device) * self.renoise_std(i).to(x.device)

    def step(self, x: torch.Tensor, v: torch.Tensor, i: int, noise=None):
        """Returns (x at σ_{i+1}, denoised estimate); draws nothing."""
        device = x.device
        return euler_step_and_x0(x, v, self.sigmas[i].to(device), self.sigmas[i + 1].to(device))
