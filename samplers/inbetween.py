"""Dual-directional sampling with SVD-XT (Generative Inbetweening, paper Alg. 2, §4.1–4.4).

Faithful to the released code (``jeanne-wang/svd_keyframe_interpolation``,
``FrameInterpolationWithNoiseInjectionPipeline``) by default:

* forward branch: ``z_t`` with the first frame's conditioning; its 16 temporal
  self-attention maps drive the backward branch;
* backward branch: ``flip(z_t)`` with the last frame's conditioning, the forward maps
  rotated 180° and ``W_{v,o} + ΔW``;
* classifier-free guidance per branch (constant 2.0 — the released default; the
  per-frame linear ramp of ``--weighted_average`` is an option), flip back, fuse
  0.5/0.5 (the per-frame linear weights of ``--weighted_average`` are an option);
* Euler on the Karras σ schedule 700 → 0.002, 50 steps; re-noise by √(σ_i²−σ_{i+1}²)
  and repeat the step 5 times over the first half of the steps;
* conditioning with noise augmentation 0.02 from one noise tensor shared by both
  frames, unscaled ``mode()`` VAE latents, zero uncond, time ids [fps−1, 127, 0.02].

Unlike the reference, every random draw comes from one ``torch.Generator`` seeded with
the node's seed (the reference re-noises from the global RNG), in this order:
conditioning-augmentation noise, initial latents, then re-noise draws. With a CPU
generator the first two equal the reference's draws for the same seed.

The two branches (and their CFG halves) run as one batched UNet call whose temporal
attention layers hand the forward maps to the backward samples inside the layer
(:class:`FusedEvaluator`); :class:`TwoCallEvaluator` is the straightforward version
(forward call storing maps, then backward call) kept for parity and benchmarks.

On the sampling core (``samplers/core``, docs/sampling.md): the noise source, the Euler
solver with re-noise-and-repeat, the loop (progress, cancel, preview), chunked decoding and
the memory check are the core's; what stays here is SVD's conditioning and the
dual-direction evaluator, a denoiser wrapper whose per-direction guidance is the core's
:class:`~avsync.samplers.core.guidance.CFG` with per-frame scales.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from .. import compat
from ..core.errors import InputError
from ..core.modules import module_bytes, param_count
from ..networks.temporal_attention import (
    CaptureProcessor,
    FusedDualDirectionProcessor,
    InjectRotatedProcessor,
    MapStore,
    MergedBackwardWeights,
    PlainTemporalProcessor,
    block_place,
    flip_frames,
    processors_installed,
    temporal_self_attention_layers,
)
from .core import edm
from .core.decode import decode_latents  # noqa: F401  (part of this module's interface)
from .core.guidance import CFG
from .core.loop import SamplingTrace, sample
from .core.memory import MemoryEstimate, memory_budget
from .core.memory import check_memory as check_family_memory
from .core.noise import NoiseSource, SeededNoise
from .core.preview import LatentPreview, latent_preview  # noqa: F401

VARIANTS = ("full", "no_finetune", "trf")
VARIANT_HELP = {
    "full": "rotated forward maps in all 16 temporal self-attention layers + backward-motion ΔW (the paper's method)",
    "no_finetune": "rotated maps in the up blocks only, base weights (paper Table 1 'Ours w/o FT')",
    "trf": "TRF-style baseline: average of the forward generation and the time-reversed forward "
           "generation from the last frame; no rotation, base weights",
}
CFG_SCHEDULES = ("constant", "linear")
FUSE_MODES = ("average", "weighted")
EXECUTIONS = ("fused", "two_call")



# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------

@dataclass
class InbetweenSettings:
    num_frames: int = 25
    width: int = 1024
    height: int = 576
    steps: int = 50
    cfg: float = 2.0                 # constant scale; the mean of the linear ramp
    cfg_schedule: str = "constant"   # "linear": per frame from min_cfg to 2·cfg − min_cfg
    min_cfg: float = 1.0
    fuse: str = "average"            # "weighted": per-frame weights 1 → 0 for the forward branch
    renoise_repeats: int = 5
    renoise_ratio: float = 0.5
    fps: int = 7
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    decode_chunk_size: int = 8
    variant: str = "full"
    execution: str = "fused"

    def validate(self) -> "InbetweenSettings":
        """Raise :class:`InputError` naming the input for any value the sampler cannot use."""
        if self.num_frames < 3:
            raise InputError("frames", f"needs at least 3 frames (first, one in between, last), got {self.num_frames}")
        for name, v in (("width", self.width), ("height", self.height)):
            if v < 8 or v % 8:
                raise InputError(name, f"must be a positive multiple of 8 px, got {v}")
        if self.steps < 1:
            raise InputError("steps", f"must be at least 1, got {self.steps}")
        if self.cfg < 0:
            raise InputError("cfg", f"must be ≥ 0, got {self.cfg}")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise InputError("cfg_schedule", f"must be one of {CFG_SCHEDULES}, got {self.cfg_schedule!r}")
        if self.cfg_schedule == "linear" and self.min_cfg > self.cfg:
            raise InputError("min_cfg", f"must not exceed cfg ({self.cfg}) for the linear schedule, got {self.min_cfg}")
        if self.fuse not in FUSE_MODES:
            raise InputError("fuse", f"must be one of {FUSE_MODES}, got {self.fuse!r}")
        if self.renoise_repeats < 0:
            raise InputError("renoise_repeats", f"must be ≥ 0, got {self.renoise_repeats}")
        if not 0.0 <= self.renoise_ratio <= 1.0:
            raise InputError("renoise_ratio", f"must be between 0 and 1, got {self.renoise_ratio}")
        if self.fps < 1:
            raise InputError("fps", f"must be at least 1, got {self.fps}")
        if self.decode_chunk_size < 1:
            raise InputError("decode_chunk_size", f"must be at least 1, got {self.decode_chunk_size}")
        if self.variant not in VARIANTS:
            raise InputError("variant", f"must be one of {VARIANTS}, got {self.variant!r}")
        if self.execution not in EXECUTIONS:
            raise InputError("execution", f"must be one of {EXECUTIONS}, got {self.execution!r}")
        return self

    def evaluations(self) -> int:
        return edm.model_evaluations(self.steps, self.renoise_ratio, self.renoise_repeats)


# Randomness: every draw from one seeded generator (core/noise.py:SeededNoise), in this
# order: conditioning-augmentation noise, initial latents, then re-noise draws in loop order.


# --------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------

@dataclass
class KeyframeConditioning:
    """One keyframe's conditioning: CLIP image embedding ``[1, 1, D]`` and the unscaled
    VAE ``mode()`` latent ``[1, 4, h, w]`` of the noise-augmented image."""

    embeds: torch.Tensor
    latent: torch.Tensor


def prepare_keyframe(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """IMAGE ``[H, W, 3]`` (0..1) → ``[1, 3, height, width]`` in 0..1, stretched like the
    reference's PIL resize when the size differs (bicubic, antialiased)."""
    x = image.to(torch.float32).permute(2, 0, 1)[None]
    if x.shape[-2:] != (height, width):
        x = torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp(0.0, 1.0)
    return x


def clip_pixels(image01: torch.Tensor, mean, std) -> torch.Tensor:
    """CLIP input as SVD's pipeline makes it: antialiased resize to 224 in [−1, 1], then normalise."""
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
        _resize_with_antialiasing,
    )

    x = image01 * 2.0 - 1.0
    x = _resize_with_antialiasing(x, (224, 224))
    x = (x + 1.0) / 2.0
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def encode_keyframes(image_encoder, vae, first01: torch.Tensor, last01: torch.Tensor, aug_noise: torch.Tensor,
                     noise_aug_strength: float, mean, std) -> tuple[KeyframeConditioning, KeyframeConditioning]:
    """CLIP embeddings and noise-augmented VAE latents of both keyframes.

    ``aug_noise`` is one tensor shared by both frames, as in the reference.
    """
    out = []
    enc_param = next(image_encoder.parameters())
    vae_dtype = next(vae.parameters()).dtype
    # as SVD's pipeline does: an fp16 VAE whose config asks for it encodes in fp32
    upcast = vae_dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.to(torch.float32)
    try:
        vae_param = next(vae.parameters())
        for img in (first01, last01):
            pix = clip_pixels(img, mean, std).to(enc_param.device, enc_param.dtype)
            embeds = image_encoder(pix).image_embeds.unsqueeze(1)
            x = img * 2.0 - 1.0 + noise_aug_strength * aug_noise
            latent = vae.encode(x.to(vae_param.device, vae_param.dtype)).latent_dist.mode()
            out.append(KeyframeConditioning(embeds=embeds.float(), latent=latent.float()))
    finally:
        if upcast:
            vae.to(vae_dtype)
    return out[0], out[1]


# --------------------------------------------------------------------------------------
# One dual-branch evaluation: x at σ → fused v
# --------------------------------------------------------------------------------------

@dataclass
class BranchInputs:
    """What the UNet needs besides the noisy latents, for both branches, CFG included."""

    embeds_fwd: torch.Tensor      # [n, 1, D]   n = 2 with CFG ([uncond, cond]) else 1
    embeds_bwd: torch.Tensor
    latents_fwd: torch.Tensor     # [n, F, 4, h, w]  keyframe latent repeated over frames
    latents_bwd: torch.Tensor
    time_ids: torch.Tensor        # [n, 3]
    cfg_fwd: Optional[torch.Tensor]   # per-frame scale [F, 1, 1, 1] in the branch's own order, None = no CFG
    cfg_bwd: Optional[torch.Tensor]
    fuse_weight: torch.Tensor | float  # weight of the forward branch (scalar or [F, 1, 1, 1])


def cfg_scales(settings: InbetweenSettings) -> torch.Tensor:
    """Per-frame guidance scale in a branch's own frame order ``[F]``.

    "constant": ``cfg`` everywhere (the release's default is the mean of its 1 → 3 ramp, 2.0).
    "linear": from ``min_cfg`` to ``2·cfg − min_cfg`` (the release's ``--weighted_average``,
    1 → 3 with the defaults), so both schedules have the same mean.
    """
    f = settings.num_frames
    if settings.cfg_schedule == "constant":
        return torch.full((f,), float(settings.cfg))
    return torch.linspace(settings.min_cfg, 2 * settings.cfg - settings.min_cfg, f)


def fuse_weights(settings: InbetweenSettings) -> torch.Tensor | float:
    """Weight of the forward branch: 0.5 ("average") or per frame 1 → 0 ("weighted")."""
    if settings.fuse == "average":
        return 0.5
    return torch.linspace(1, 0, settings.num_frames).view(-1, 1, 1, 1)


def build_branch_inputs(first: KeyframeConditioning, last: KeyframeConditioning, settings: InbetweenSettings,
                        device, dtype) -> BranchInputs:
    scales = cfg_scales(settings)
    use_cfg = bool(scales.max() > 1)
    f = settings.num_frames

    def branch(c: KeyframeConditioning):
        emb = c.embeds.to(device, dtype)
        lat = c.latent.to(device, dtype).unsqueeze(1).repeat(1, f, 1, 1, 1)
        if use_cfg:
            emb = torch.cat([torch.zeros_like(emb), emb])
            lat = torch.cat([torch.zeros_like(lat), lat])
        return emb, lat

    e_f, l_f = branch(first)
    e_b, l_b = branch(last)
    n = e_f.shape[0]
    time_ids = torch.tensor([[settings.fps - 1, settings.motion_bucket_id, settings.noise_aug_strength]],
                            dtype=dtype, device=device).repeat(n, 1)
    s = scales.view(-1, 1, 1, 1).to(device, torch.float32) if use_cfg else None
    w = fuse_weights(settings)
    if isinstance(w, torch.Tensor):
        w = w.to(device, torch.float32)
    return BranchInputs(e_f, e_b, l_f, l_b, time_ids, s, s, w)


def _guided(v: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """v ``[n, F, C, h, w]`` → guided ``[F, C, h, w]``: plain CFG (core/guidance.py:CFG) with a
    per-frame scale, or the single conditional prediction."""
    v = v.float()
    if scale is None:
        return v[0]
    return CFG(scale).mix({"uncond": v[0], CFG.full: v[1]})


def _fuse(v_fwd: torch.Tensor, v_bwd_flipped_back: torch.Tensor, w) -> torch.Tensor:
    return w * v_fwd + (1 - w) * v_bwd_flipped_back


def rotated_layer(variant: str, layer: str) -> bool:
    """Does the backward branch use the forward maps rotated in this layer?"""
    if variant == "full":
        return True
    if variant == "no_finetune":
        return block_place(layer) == "up"
    return False


def require_backward_weights(variant: str, weights) -> None:
    if variant == "full" and weights is None:
        raise InputError("backward_weights", "the 'full' variant needs backward-motion weights "
                                             "(connect AVSyncBackwardMotionLoader, or pick variant 'no_finetune' or 'trf')")


def _unet_dtype(unet) -> torch.dtype:
    return next(unet.parameters()).dtype


class DualDirectionEvaluator:
    """Base: turns x at σ into the fused v (CFG per branch, flip back, fuse)."""

    def __init__(self, unet, inputs: BranchInputs, variant: str, backward_weights=None):
        require_backward_weights(variant, backward_weights)
        self.unet = unet
        self.inputs = inputs
        self.variant = variant
        self.weights = MergedBackwardWeights(unet, backward_weights) if variant == "full" else None
        self.layers = temporal_self_attention_layers(unet)

    def branch_inputs(self, x: torch.Tensor, sigma: torch.Tensor):
        """Scaled, CFG-doubled model inputs of both branches: ``[n, F, 8, h, w]`` each."""
        dtype = _unet_dtype(self.unet)
        xin = edm.scale_input(x, sigma)
        n = self.inputs.embeds_fwd.shape[0]
        fwd = torch.cat([xin.unsqueeze(0).expand(n, *xin.shape).to(dtype), self.inputs.latents_fwd], dim=2)
        xb = flip_frames(xin, 0)
        bwd = torch.cat([xb.unsqueeze(0).expand(n, *xb.shape).to(dtype), self.inputs.latents_bwd], dim=2)
        return fwd, bwd

    def combine(self, v_fwd: torch.Tensor, v_bwd: torch.Tensor) -> torch.Tensor:
        g_f = _guided(v_fwd, self.inputs.cfg_fwd)
        g_b = _guided(v_bwd, self.inputs.cfg_bwd)
        return _fuse(g_f, flip_frames(g_b, 0), self.inputs.fuse_weight)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def installed(self):
        """A context for a whole run in which the evaluator may keep its processors installed."""
        return nullcontext()


class FusedEvaluator(DualDirectionEvaluator):
    """One UNet call on [fwd-uncond, fwd-cond, bwd-uncond, bwd-cond]; maps handed over per layer."""

    _active = False

    def _processor(self, layer: str):
        if rotated_layer(self.variant, layer):
            return FusedDualDirectionProcessor(layer, self.weights)
        return PlainTemporalProcessor(layer)

    @contextmanager
    def installed(self):
        # The processors are the same for every call of a run; installing and restoring
        # them walks the whole UNet (~25 ms), so a run does it once instead of per call.
        with processors_installed(self.unet, self._processor):
            self._active = True
            try:
                yield self
            finally:
                self._active = False

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if not self._active:
            with self.installed():
                return self(x, sigma)
        fwd, bwd = self.branch_inputs(x, sigma)
        n = fwd.shape[0]
        t = edm.c_noise(sigma).to(fwd.device)
        emb = torch.cat([self.inputs.embeds_fwd, self.inputs.embeds_bwd])
        ids = torch.cat([self.inputs.time_ids, self.inputs.time_ids])
        v = self.unet(torch.cat([fwd, bwd]), t, encoder_hidden_states=emb, added_time_ids=ids, return_dict=False)[0]
        return self.combine(v[:n], v[n:])


class TwoCallEvaluator(DualDirectionEvaluator):
    """Forward call capturing maps, then backward call injecting them rotated.

    ``backward_unet``: a separate UNet for the backward branch with ΔW already merged
    (the reference's memory layout; only the benchmark uses it). Default: the same
    UNet, ΔW applied on the fly.
    """

    def __init__(self, unet, inputs: BranchInputs, variant: str, backward_weights=None, backward_unet=None):
        super().__init__(unet, inputs, variant, backward_weights)
        self.backward_unet = backward_unet
        if backward_unet is not None:
            self.weights = None  # merged into the copy

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        fwd, bwd = self.branch_inputs(x, sigma)
        t = edm.c_noise(sigma).to(fwd.device)
        store = MapStore()

        def capture(layer):
            return CaptureProcessor(layer, store) if rotated_layer(self.variant, layer) else PlainTemporalProcessor(layer)

        def inject(layer):
            if rotated_layer(self.variant, layer):
                return InjectRotatedProcessor(layer, store, self.weights)
            return PlainTemporalProcessor(layer)

        with processors_installed(self.unet, capture):
            v_fwd = self.unet(fwd, t, encoder_hidden_states=self.inputs.embeds_fwd,
                              added_time_ids=self.inputs.time_ids, return_dict=False)[0]
        bunet = self.backward_unet if self.backward_unet is not None else self.unet
        with processors_installed(bunet, inject):
            v_bwd = bunet(bwd, t, encoder_hidden_states=self.inputs.embeds_bwd,
                          added_time_ids=self.inputs.time_ids, return_dict=False)[0]
        store.clear()
        return self.combine(v_fwd, v_bwd)


def make_evaluator(unet, inputs: BranchInputs, settings: InbetweenSettings, backward_weights=None):
    cls = FusedEvaluator if settings.execution == "fused" else TwoCallEvaluator
    return cls(unet, inputs, settings.variant, backward_weights)


# --------------------------------------------------------------------------------------
# The sampling loop
# --------------------------------------------------------------------------------------

PREVIEW = LatentPreview(frame_axis=0, channel_axis=1)   # latents [F, 4, h, w]: the middle frame


def make_solver(settings: InbetweenSettings) -> edm.EulerEDM:
    return edm.EulerEDM(settings.steps, settings.renoise_repeats, settings.renoise_ratio)


@torch.no_grad()
def sample_latents(evaluate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape, settings: InbetweenSettings,
                   noise: NoiseSource, device, initial: Optional[torch.Tensor] = None,
                   progress: Optional[compat.Progress] = None, trace: Optional[SamplingTrace] = None,
                   preview: bool = False) -> torch.Tensor:
    """Euler on Karras σ with per-step re-noise-and-repeat (core/loop.py:sample with
    core/edm.py:EulerEDM); returns float32 latents ``[F, 4, h, w]``.

    ``evaluate(x, σ)``: the fused dual-direction v (a denoiser wrapper: both directions,
    their CFG and the fusion happen inside it). ``preview``: hand the progress bar an RGB
    preview of the middle frame's denoised estimate. ``initial``: unit-variance initial
    noise (drawn from ``noise`` when None), scaled by √(σ_max²+1) as diffusers'
    ``init_noise_sigma`` does.
    """
    return sample(lambda x, sigma, i: evaluate(x, sigma), make_solver(settings), noise, shape, device,
                  initial=initial, progress=progress, preview=PREVIEW if preview else None, trace=trace)


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def size_multiple(unet, vae) -> int:
    """Pixel sizes must divide into the UNet's coarsest level: 64 for SVD (8× VAE, 3 downsamplings)."""
    return vae_scale_factor(vae) * 2 ** (len(unet.config.block_out_channels) - 1)


def check_size(settings: InbetweenSettings, unet, vae) -> None:
    m = size_multiple(unet, vae)
    for name, v in (("width", settings.width), ("height", settings.height)):
        if v % m:
            raise InputError(name, f"must be a multiple of {m} px for this model, got {v}")


# --------------------------------------------------------------------------------------
# Memory estimate
# --------------------------------------------------------------------------------------

# Live UNet activations at the peak, in units of one full-resolution feature map
# (block_out_channels[0] channels at latent size) per sample-frame. Counted for SVD: the
# skip connections kept for the up path (~5.5 maps) plus the working set of a
# level-0 transformer block (GEGLU feed-forward 8×, attention q/k/v/out 4×).
UNET_ACTIVATION_MAPS = 18.0
# Live VAE-decoder activations per decoded frame, in full-resolution maps of
# block_out_channels[0] (128 in SVD) channels.
DECODER_ACTIVATION_MAPS = 6.0


def estimate_peak_memory(settings: InbetweenSettings, unet_params: int, vae_params: int, unet_channels: int,
                         decoder_channels: int, bytes_per_value: int, vae_factor: int = 8,
                         temporal_heads: Optional[list[tuple[int, int]]] = None) -> MemoryEstimate:
    """Peak device memory (bytes) of the sampling and decoding stages, which never overlap
    (the UNet is offloaded before decoding).

    ``temporal_heads``: (downsampling level, heads) per temporal self-attention layer;
    the two-call path stores the forward maps of these layers.
    """
    h, w = settings.height // vae_factor, settings.width // vae_factor
    cfg = 2 if cfg_scales(settings).max() > 1 else 1
    batch_frames = 2 * cfg * settings.num_frames
    act = UNET_ACTIVATION_MAPS * batch_frames * h * w * unet_channels * bytes_per_value
    maps = 0
    if settings.execution == "two_call":
        act /= 2  # one branch per call
        for level, heads in temporal_heads or []:
            positions = (h // 2 ** level) * (w // 2 ** level)
            maps += cfg * positions * heads * settings.num_frames ** 2 * bytes_per_value
    else:
        # one layer's transient map chunk (FusedDualDirectionProcessor.max_map_bytes)
        maps = 256 << 20
    sampling = unet_params * bytes_per_value + int(act) + int(maps)
    chunk = min(settings.decode_chunk_size, settings.num_frames)
    decoding = vae_params * bytes_per_value + int(
        DECODER_ACTIVATION_MAPS * chunk * settings.height * settings.width * decoder_channels * bytes_per_value)
    return MemoryEstimate(sampling=sampling, decoding=decoding, maps=int(maps))


def svd_temporal_heads(unet) -> list[tuple[int, int]]:
    """(level, heads) of each temporal self-attention layer of a diffusers SVD UNet."""
    out = []
    for layer in temporal_self_attention_layers(unet):
        parts = layer.split(".")
        if parts[0] == "down_blocks":
            level = int(parts[1])
        elif parts[0] == "mid_block":
            level = len(unet.config.block_out_channels) - 1
        else:
            level = len(unet.config.block_out_channels) - 1 - int(parts[1])
        attn = unet.get_submodule(layer)
        out.append((level, attn.heads))
    return out


def estimate_for_models(settings: InbetweenSettings, unet, vae, dtype: torch.dtype) -> MemoryEstimate:
    return estimate_peak_memory(
        settings, param_count(unet), param_count(vae), unet.config.block_out_channels[0], vae.config.block_out_channels[0],
        torch.finfo(dtype).bits // 8, vae_scale_factor(vae), svd_temporal_heads(unet))


class InbetweenMemory:
    """SVD inbetweening's :class:`core.memory.MemoryModel`: the estimate, and the settings that would fit."""

    def __init__(self, estimate: Callable[[InbetweenSettings], MemoryEstimate], model_dtype: torch.dtype):
        self.estimate = estimate
        self.model_dtype = model_dtype

    def suggestions(self, settings: InbetweenSettings, free_bytes: int) -> list:
        est, estimate, out = self.estimate(settings), self.estimate, []
        if est.decoding > free_bytes:
            for c in (8, 4, 2, 1):
                if c < settings.decode_chunk_size and estimate(replace(settings, decode_chunk_size=c)).decoding <= free_bytes:
                    out.append(f"decode_chunk_size {c}")
                    break
        if est.sampling > free_bytes:
            for f in range(settings.num_frames - 1, 2, -1):
                if estimate(replace(settings, num_frames=f)).sampling <= free_bytes:
                    out.append(f"frames {f}")
                    break
            for wd, ht in ((768, 448), (640, 384), (512, 320), (384, 256), (256, 128)):
                if wd * ht < settings.width * settings.height and \
                        estimate(replace(settings, width=wd, height=ht)).sampling <= free_bytes:
                    out.append(f"width {wd} × height {ht}")
                    break
            if settings.execution == "fused" and estimate(replace(settings, execution="two_call")).sampling <= free_bytes:
                out.append("execution two_call")
        if self.model_dtype == torch.float32:
            out.append("load the SVD model in fp16 (halves weights and activations)")
        return out

    def culprit(self, settings: InbetweenSettings, est: MemoryEstimate, free_bytes: int) -> str:
        """The setting that fixes the stage that does not fit."""
        return "decode_chunk_size" if est.sampling <= free_bytes < est.decoding else "frames"


def check_memory(settings: InbetweenSettings, estimate: Callable[[InbetweenSettings], MemoryEstimate],
                 free_bytes: Optional[int], model_dtype: torch.dtype) -> None:
    """Stop before sampling when the estimated peak does not fit, suggesting settings that would."""
    check_family_memory(InbetweenMemory(estimate, model_dtype), settings, free_bytes)


# --------------------------------------------------------------------------------------
# Whole run
# --------------------------------------------------------------------------------------

def _image_stats(svd) -> tuple[tuple, tuple]:
    """CLIP normalisation of the loaded model (``SVDModel.image_processor_config``)."""
    cfg = svd.image_processor_config
    return tuple(cfg["mean"]), tuple(cfg["std"])


def check_backward_weights(unet, weights) -> None:
    """The ΔW must cover every temporal self-attention V and output projection."""
    names = set(weights.names())
    layers = temporal_self_attention_layers(unet)
    missing = [f"{layer}.{p}.weight" for layer in layers for p in ("to_v", "to_out.0") if f"{layer}.{p}.weight" not in names]
    if missing:
        raise InputError("backward_weights", f"the backward-motion weights do not match this SVD UNet: "
                                             f"{len(missing)} of {2 * len(layers)} tensors missing (first: {missing[0]})")


@torch.no_grad()
def generate_inbetween(svd, first_image: torch.Tensor, last_image: torch.Tensor, settings: InbetweenSettings,
                       backward_weights=None, seed: int = 0, noise: Optional[NoiseSource] = None,
                       free_bytes: Optional[int] = -1, trace: Optional[SamplingTrace] = None,
                       return_latents: bool = False):
    """First and last IMAGE frames ``[H, W, 3]`` → IMAGE ``[F, height, width, 3]``.

    ``svd`` holds ``unet``, ``vae``, ``image_encoder`` as ``compat.ManagedModel`` and
    ``dtype`` (``loaders.svd.SVDModel``). ``free_bytes=-1`` asks the device; None skips
    the memory check.
    """
    settings.validate()
    require_backward_weights(settings.variant, backward_weights)
    noise = noise if noise is not None else SeededNoise(seed)
    dtype = getattr(svd, "dtype", torch.float32)
    unet_m, vae_m, enc_m = svd.unet.module, svd.vae.module, svd.image_encoder.module
    if backward_weights is not None and settings.variant == "full":
        if hasattr(backward_weights, "check_against"):
            backward_weights.check_against(unet_m)
        check_backward_weights(unet_m, backward_weights)
    check_size(settings, unet_m, vae_m)
    if free_bytes == -1:
        free_bytes = memory_budget(svd.unet.load_device)
    check_memory(settings, lambda s: estimate_for_models(s, unet_m, vae_m, dtype), free_bytes, dtype)
    est = estimate_for_models(settings, unet_m, vae_m, dtype)
    unet_extra = max(0, est.sampling - module_bytes(unet_m, buffers=False))    # what ComfyUI must keep free besides weights
    vae_extra = max(0, est.decoding - module_bytes(vae_m, buffers=False))

    first01 = prepare_keyframe(first_image, settings.width, settings.height)
    last01 = prepare_keyframe(last_image, settings.width, settings.height)
    aug = noise.conditioning(first01.shape)

    progress = compat.Progress(settings.evaluations(), "AVSync inbetween")
    try:
        enc = svd.image_encoder.load()
        vae = svd.vae.load()
        mean, std = _image_stats(svd)
        c_first, c_last = encode_keyframes(enc, vae, first01, last01, aug, settings.noise_aug_strength, mean, std)
        svd.image_encoder.offload()

        factor = vae_scale_factor(vae)
        shape = (settings.num_frames, vae.config.latent_channels, settings.height // factor, settings.width // factor)
        initial = noise.initial(shape)
        svd.vae.offload()

        unet = svd.unet.load(memory_required=unet_extra)
        device = next(unet.parameters()).device
        inputs = build_branch_inputs(c_first, c_last, settings, device, _unet_dtype(unet))
        evaluate = make_evaluator(unet, inputs, settings, backward_weights)
        with evaluate.installed():
            latents = sample_latents(evaluate, shape, settings, noise, device, initial=initial, progress=progress,
                                     trace=trace, preview=compat.in_comfyui())
        svd.unet.offload()
        if return_latents:
            return latents
        vae = svd.vae.load(memory_required=vae_extra)
        frames = decode_latents(vae, latents, settings.decode_chunk_size)
    finally:
        for m in (svd.unet, svd.vae, svd.image_encoder):
            m.offload()
    return frames
