"""SDE DPM++(2M) for zero-SNR v-prediction, as MTV's released SAT code runs it.

Reference: ``suimuc/MTV_Framework`` (commit 5704fe6), ``mtv/sgm/modules/diffusionmodules/``:
``sampling.py:VPSDEDPMPP2MSampler`` (with ``VideoDDIMSampler.prepare_sampling_loop`` / ``denoise``),
``discretizer.py:ZeroSNRDDPMDiscretization`` + ``generate_roughly_equally_spaced_steps``,
``denoiser.py:DiscreteDenoiser`` with ``denoiser_scaling.py:VideoScaling``, and ``guiders.py:DynamicCFG``,
configured by ``configs/cogvideox_5b.yaml`` (``num_idx: 1000``, ``quantize_c_noise: False``,
``shift_scale: 1.0``, 50 steps).

Released arithmetic, kept operation for operation in float32 (the fixture in ``tests/data/mtv/solver``
checks it):

* ᾱ: the sqrt-linear betas ``linspace(√0.00085, √0.012, 1000)²`` (float64, the same as KeyVID's:
  :func:`.ddim.sqrt_linear_betas`), ``cumprod`` in float64, stored as float32 — the
  :class:`.ddim.DiffusionSchedule` *before* any zero-SNR rescale (:func:`mtv_schedule`).
* Steps: ``generate_roughly_equally_spaced_steps`` = ``floor(linspace(999, 0, S, endpoint=False))``,
  999 first. For S = 50 (MTV_Framework) and 20 (MTVCraft) this equals :func:`.ddim.ddim_timesteps`'s
  ``uniform_trailing`` (999, 979, …, 19); for some S (3: 999, 666, **333** vs 332) it does not.
* The solver's √ᾱ: ᾱ at the S steps (float32), ``sqrt`` in float32, **then** the zero-terminal-SNR
  rescale over those S values (shift by the last, scale so the first — t = 19 for 50 steps — keeps
  its value), a 1 appended after the last step.
* The denoiser: its table is the same rescale over all 1000 ᾱ; it snaps the solver's √ᾱ to the
  nearest table entry and uses the snapped value for ``c_skip = √ᾱ`` and ``c_out = −√(1 − ᾱ)``:
  ``x̂₀ = v·c_out + x·c_skip``. The snap moves √ᾱ by up to 5.2e-4 (11 of 50 steps land on the
  table entry of t − 1); the 50-step rescale itself differs from the full-table one by up to 6.2e-4. The network itself sees the step's integer timestep
  (``c_noise = idx``, not quantized: ``quantize_c_noise: False``), which :meth:`DPMPP2MSDE.timestep`
  returns.
* Per step, with λ = log √(ᾱ/(1 − ᾱ)), h = λ_next − λ, r = h_last/h: ``x_next = m1·x − m2·D +
  σ·z`` with m1 = √((1 − ᾱ_next)/(1 − ᾱ))·e^{−h}, m2 = expm1(−2h)·√ᾱ_next, σ = √(1 − ᾱ_next)·√(1 − e^{−2h}),
  D = x̂₀ on the first step, ``(1 + 1/2r)·x̂₀ − 1/2r·x̂₀_prev`` after. Draws, as released: one at the
  first step, **two** at every middle step (the first-order candidate is computed with its own draw
  and discarded), none at the last, which returns x̂₀ itself. No initial noise scaling.
* The first step is at ᾱ = 0 (λ = −∞): m1 = 0, m2 = −√ᾱ_next, σ = √(1 − ᾱ_next), as the float32
  ``inf`` arithmetic gives it; the second step's r is ∞, so it is first order too.

Guidance is the core's :class:`.guidance.CFG` on v with :data:`MTV_CFG_SCALE` = 3.5: the release
applies ``uc + 3.5·(c − uc)`` to x̂₀ (``DynamicCFG.__call__`` computes the config's cosine schedule,
``scale: 6, exp: 5``, then overwrites it with 3.5), which equals CFG on v because x̂₀ is affine in v
with the same ``c_skip·x`` for both branches (equal up to float rounding; tests measure it).

``arithmetic="diffusers"`` is diffusers' ``CogVideoXDPMScheduler`` (``scheduling_dpm_cogvideox.py``)
as CogVideoX-5B's ``scheduler_config.json`` sets it up (``scaled_linear`` betas = the same sqrt-linear,
``rescale_betas_zero_snr``, ``snr_shift_scale`` 1.0, ``trailing``, ``v_prediction``,
``set_alpha_to_one``): the zero-SNR rescale over the full 1000-step table in float64, x̂₀ and the
multipliers from that table's ᾱ at the step (no snap), the "previous" ᾱ at ``t − 1000 // S``, and one
(unused) draw at the last step as well. It is close to the released arithmetic, not equal
(docs/sampling.md gives the measured difference).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .ddim import DDPM_TIMESTEPS, DiffusionSchedule, ddim_timesteps, sqrt_linear_betas

MTV_STEPS = 50
MTV_CFG_SCALE = 3.5          # guiders.py:DynamicCFG.__call__ hard-codes it; the config's scale 6 / exp 5 are unused
ARITHMETICS = ("released", "diffusers")


def mtv_schedule() -> DiffusionSchedule:
    """MTV's training schedule before the zero-SNR rescale (the solver rescales, see the module doc):
    1000 sqrt-linear betas 0.00085 → 0.012, ᾱ in float64 stored as float32."""
    return DiffusionSchedule.keyvid(zero_snr=False, dynamic_rescale=False)


def released_timesteps(steps: int, timesteps: int = DDPM_TIMESTEPS) -> np.ndarray:
    """``discretizer.py:generate_roughly_equally_spaced_steps``, ascending (19, 39, …, 999 for 50)."""
    if steps < 1 or steps > timesteps:
        raise ValueError(f"steps must be between 1 and {timesteps}, got {steps}")
    if steps == timesteps:       # ZeroSNRDDPMDiscretization.get_sigmas takes the whole table
        return np.arange(timesteps)
    return np.linspace(timesteps - 1, 0, steps, endpoint=False).astype(int)[::-1].copy()


def zero_snr_sqrt_alphas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """√ᾱ shifted so that the last is 0 and scaled so that the first keeps its value, in the dtype given
    (``ZeroSNRDDPMDiscretization.get_sigmas`` in float32; diffusers' ``rescale_zero_terminal_snr`` is
    the square of this in float64). Ascending timestep order in and out."""
    a = alphas_cumprod.sqrt()
    first, last = a[0].clone(), a[-1].clone()
    a -= last
    a *= first / (first - last)
    return a


def _float64_alphas_cumprod(schedule: DiffusionSchedule) -> torch.Tensor:
    """The float64 ᾱ behind ``schedule``'s float32 table: recomputed from the sqrt-linear betas when the
    table is MTV's (diffusers keeps ᾱ in float64), else the float32 values widened."""
    exact = torch.from_numpy(np.cumprod(1.0 - sqrt_linear_betas(schedule.timesteps)))
    if torch.equal(exact.to(torch.float32), schedule.alphas_cumprod):
        return exact
    return schedule.alphas_cumprod.double()


class DPMPP2MSDE:
    """The solver of :mod:`avsync.samplers.core.loop` for MTV: SDE DPM++(2M), zero-SNR v-prediction
    (see the module doc). ``schedule``: the schedule *before* the zero-SNR rescale (default
    :func:`mtv_schedule`). ``timestep(i)`` is the integer DDPM timestep the network sees (999 first);
    the network's output is v. Stateful: step 0 forgets the previous run's x̂₀."""

    def __init__(self, schedule: Optional[DiffusionSchedule] = None, steps: int = MTV_STEPS,
                 arithmetic: str = "released"):
        if arithmetic not in ARITHMETICS:
            raise ValueError(f"arithmetic must be one of {ARITHMETICS}, got {arithmetic!r}")
        schedule = schedule if schedule is not None else mtv_schedule()
        if float(schedule.alphas_cumprod[-1]) == 0.0:
            raise ValueError("DPMPP2MSDE needs the schedule before the zero-SNR rescale (it rescales as the "
                             "release does); pass mtv_schedule() or DiffusionSchedule.keyvid(zero_snr=False)")
        self.schedule = schedule
        self.steps = int(steps)
        self.arithmetic = arithmetic
        n = schedule.timesteps
        if arithmetic == "released":
            ascending = released_timesteps(self.steps, n)
            # ZeroSNRDDPMDiscretization.get_sigmas on the S chosen steps; VideoDDIMSampler appends a 1
            solver_sqrt = zero_snr_sqrt_alphas(schedule.alphas_cumprod[torch.from_numpy(ascending)].clone())
            self.sqrt_alphas = torch.cat([solver_sqrt.flip(0), torch.ones(1)])
            # DiscreteDenoiser: the 1000-entry table (flip=True: index = timestep) and the snap of each step
            self.table = zero_snr_sqrt_alphas(schedule.alphas_cumprod.clone())
            self.snapped_index = torch.stack([(s.view(1) - self.table[:, None]).abs().argmin(dim=0)[0]
                                              for s in self.sqrt_alphas[:-1]])
            self.snapped_sqrt_alphas = self.table[self.snapped_index]
        else:
            ascending = ddim_timesteps(self.steps, n, "uniform_trailing")
            self.alphas_cumprod64 = zero_snr_sqrt_alphas(_float64_alphas_cumprod(schedule)) ** 2
        self.timesteps = torch.from_numpy(ascending[::-1].copy()).long()   # loop order: 999 first
        self._previous_x0: Optional[torch.Tensor] = None

    # -- the solver protocol ------------------------------------------------------------------

    def evaluations(self) -> int:
        return self.steps

    def initial(self, noise: torch.Tensor) -> torch.Tensor:
        """The unit-variance draw is x_T as it is (zero SNR: no scaling)."""
        return noise.to(torch.float32)

    def timestep(self, i: int) -> torch.Tensor:
        return self.timesteps[i].clone()

    def repeats(self, i: int) -> int:
        return 0

    def draws(self, i: int) -> int:
        """Noise draws step ``i`` takes from the noise source (released: 1, 2, …, 2, 0)."""
        if i == self.steps - 1:
            return 0 if self.arithmetic == "released" else 1
        return 1 if i == 0 else 2

    def denoised(self, x: torch.Tensor, v: torch.Tensor, i: int) -> torch.Tensor:
        """x̂₀ from the (guided) v prediction at loop step ``i``."""
        x, v = x.to(torch.float32), v.to(torch.float32)
        if self.arithmetic == "released":
            # DiscreteDenoiser.forward: snapped √ᾱ, VideoScaling, network(x·1)·c_out + x·c_skip
            sigma = (x.new_ones([x.shape[0]]) * self.snapped_sqrt_alphas[i].to(x.device))
            sigma = sigma[(...,) + (None,) * (x.ndim - 1)]
            c_skip = sigma
            c_out = -((1 - sigma ** 2) ** 0.5)
            return v * c_out + x * c_skip
        a_t = self.alphas_cumprod64[int(self.timesteps[i])]
        return (a_t ** 0.5) * x - ((1 - a_t) ** 0.5) * v

    def step(self, x: torch.Tensor, v: torch.Tensor, i: int, noise):
        """One DPM++(2M) SDE update with v-prediction ``v``; returns (x_next, x̂₀)."""
        if i == 0:
            self._previous_x0 = None
        x = x.to(torch.float32)
        x0 = self.denoised(x, v, i)
        if self.arithmetic == "released":
            x_next = self._released_update(x, x0, i, noise)
        else:
            x_next = self._diffusers_update(x, x0, i, noise)
        self._previous_x0 = x0
        return x_next, x0

    # -- the two arithmetics ---------------------------------------------------------------------

    def _released_update(self, x, x0, i, noise):
        """``VPSDEDPMPP2MSampler.sampler_step`` after ``denoise``: float32 per-sample coefficients."""
        if i == self.steps - 1:                    # idx == 1: the last step returns x̂₀, no draw
            return x0
        s_in = x.new_ones([x.shape[0]])
        sq = self.sqrt_alphas.to(x.device)
        a, a_next = s_in * sq[i], s_in * sq[i + 1]
        a_prev = None if i == 0 else s_in * sq[i - 1]
        h, r = _released_h_r(a, a_next, a_prev)
        mult1 = ((1 - a_next ** 2) / (1 - a ** 2)) ** 0.5 * (-h).exp()
        mult2 = (-2 * h).expm1() * a_next
        mult_noise = (1 - a_next ** 2) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5
        dims = (...,) + (None,) * (x.ndim - 1)
        mult1, mult2, mult_noise = mult1[dims], mult2[dims], mult_noise[dims]
        x_standard = mult1 * x - mult2 * x0 + mult_noise * noise.renoise(x.shape).to(x.device)
        if self._previous_x0 is None:
            return x_standard
        mult3, mult4 = (1 + 1 / (2 * r))[dims], (1 / (2 * r))[dims]
        denoised_d = mult3 * x0 - mult4 * self._previous_x0
        return mult1 * x - mult2 * denoised_d + mult_noise * noise.renoise(x.shape).to(x.device)

    def _diffusers_update(self, x, x0, i, noise):
        """``CogVideoXDPMScheduler.step`` (float64 0-d coefficients, as diffusers computes them)."""
        ac = self.alphas_cumprod64
        t = int(self.timesteps[i])
        prev_t = t - DDPM_TIMESTEPS // self.steps
        a_t = ac[t]
        a_prev = ac[prev_t] if prev_t >= 0 else torch.tensor(1.0)        # set_alpha_to_one
        a_back = ac[int(self.timesteps[i - 1])] if i > 0 else None
        lamb = ((a_t / (1 - a_t)) ** 0.5).log()
        lamb_next = ((a_prev / (1 - a_prev)) ** 0.5).log()
        h = lamb_next - lamb
        mult1 = ((1 - a_prev) / (1 - a_t)) ** 0.5 * (-h).exp()
        mult2 = (-2 * h).expm1() * a_prev ** 0.5
        mult_noise = (1 - a_prev) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5
        prev_sample = mult1 * x - mult2 * x0 + mult_noise * noise.renoise(x.shape).to(x.device)
        if self._previous_x0 is None or prev_t < 0:
            return prev_sample
        lamb_back = ((a_back / (1 - a_back)) ** 0.5).log()
        r = (lamb - lamb_back) / h
        mult3, mult4 = 1 + 1 / (2 * r), 1 / (2 * r)
        denoised_d = mult3 * x0 - mult4 * self._previous_x0
        return mult1 * x - mult2 * denoised_d + mult_noise * noise.renoise(x.shape).to(x.device)


def _released_h_r(a, a_next, a_prev):
    """``VPSDEDPMPP2MSampler.get_variables`` (float32, per sample): h = λ_next − λ and r = h_last / h."""
    def lam(s):
        ac = s ** 2
        return ((ac / (1 - ac)) ** 0.5).log()

    lamb = lam(a)
    h = lam(a_next) - lamb
    if a_prev is None:
        return h, None
    return h, (lamb - lam(a_prev)) / h


class KeepCleanFrames:
    """MTV's window hand-over around any solver: the first ``clean_latents.shape[frame_axis]`` frames
    are clean latents (the previous window's last frames, VAE-encoded), imposed on the initial noise
    and after every step — so the network sees them clean before every step and the result ends
    with them — and never re-noised (``VPSDEDPMPP2MSampler.__call__`` with ``latent_frame_mask``,
    ``sdedit=False``; the release overwrites the noise in ``diffusion_video.py:sample`` first).
    The solver's own x̂₀ history is not touched. The network must know how many leading frames are
    clean (the released DiT gives them the t = 0 AdaLN embedding): :attr:`clean_frames`, or
    :func:`clean_frames_of` on any solver, is what the BranchModel passes as ``clean_frames``."""

    def __init__(self, solver, clean_latents: torch.Tensor, frame_axis: int = 1):
        self.solver = solver
        self.clean_latents = clean_latents.to(torch.float32)
        self.frame_axis = int(frame_axis)
        self.clean_frames = int(clean_latents.shape[frame_axis])

    @property
    def steps(self) -> int:
        return self.solver.steps

    def __getattr__(self, name):           # renoise_std, timesteps, … of the wrapped solver
        if name == "solver":
            raise AttributeError(name)
        return getattr(self.solver, name)

    def latent_frame_mask(self, frames: int) -> torch.Tensor:
        """The release's ``latent_frame_mask``: True for frames being generated, False for clean ones."""
        mask = torch.ones(frames, dtype=torch.bool)
        mask[:self.clean_frames] = False
        return mask

    def impose(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[self.frame_axis] < self.clean_frames:
            raise ValueError(f"{self.clean_frames} clean frames do not fit a latent of "
                             f"{x.shape[self.frame_axis]} frames")
        x = x.clone()
        x.narrow(self.frame_axis, 0, self.clean_frames).copy_(self.clean_latents.to(x.device))
        return x

    def evaluations(self) -> int:
        return self.solver.evaluations()

    def initial(self, noise: torch.Tensor) -> torch.Tensor:
        return self.impose(self.solver.initial(noise))

    def timestep(self, i: int) -> torch.Tensor:
        return self.solver.timestep(i)

    def repeats(self, i: int) -> int:
        return self.solver.repeats(i)

    def step(self, x: torch.Tensor, pred: torch.Tensor, i: int, noise):
        x_next, x0 = self.solver.step(x, pred, i, noise)
        return self.impose(x_next), x0


def clean_frames_of(solver) -> int:
    """Leading clean latent frames a solver keeps (0 unless it is a :class:`KeepCleanFrames`)."""
    return int(getattr(solver, "clean_frames", 0))
