"""MTV on the sampling core: text + speech / effects / music → video, window after window.

Faithful to the released code (``suimuc/MTV_Framework@5704fe6``, docs/mtv.md; reference notes
``shared/reference/mtv-generation.md`` §1.5, §5):

* :class:`MTVBranchModel` — ``sgm/modules/diffusionmodules/sampling.py:VideoDDIMSampler.denoise`` +
  ``guiders.py:VanillaCFG.prepare_inputs``: the CFG batch is [uncond, cond]; uncond is the zero
  text embedding (``force_uc_zero_embeddings = ["txt"]``) and **zero wav2vec features** for every
  audio stream, given to the network *before* its audio projections (so their biases still act);
  the DiT sees the latents ‖ 16 zero channels (the I2V ``concat``, zero at inference,
  ``sample_video.py:sampling_main`` ``mask_image``); the first ``clean_frames`` latent frames get
  the t = 0 embedding (``latent_frame_mask``).
* :func:`window_plan` — ``sample_video.py:sampling_main``: ``times = max((N − 8) // 44, 1)``
  windows of 49 feature frames advancing by 44 (window t covers ``[44t, 44t + 49)``, zero-padded
  past the end); frames generated ``5 + 44·times``, so 3…46 trailing feature frames are never
  rendered; ``render_tail`` adds a last window aligned to the end (ours, not released).
* :func:`run_windows` — the hand-over: the previous window's decoded frames clamped to [0, 1],
  its last 5 rescaled to [−1, 1] and VAE-encoded (posterior **sample**) ×0.7 → 2 latent frames
  that overwrite the first 2 noise frames and are held clean by the solver
  (``KeepCleanFrames``); each new window drops its first 5 decoded frames; the video is cut to
  the speech length (``video[:, :vocal_length]``).
* :func:`generate_mtv` — the whole run: prompt and audio encoded once (T5 and wav2vec unloaded
  afterwards), windows sampled on the core loop (progress per model evaluation across all
  windows, Cancel before each, preview), optional ``AVSYNC_GUIDANCE`` (Audio Sync Guidance).

Seeds: one :class:`~avsync.samplers.core.noise.SeededNoise` for the whole run (one CPU generator,
so the same seed gives the same video on any device), drawn in run order: window 0's initial
noise ``[1, 13, 16, h, w]`` (as released: ``torch.randn`` on the CPU, fp32), its SDE draws, the
hand-over's VAE posterior draw, window 1's initial noise (all 13 frames are drawn; the first 2
are then overwritten, as released), … Nothing is re-seeded per window. The release draws the
SDE and posterior noise from the CUDA generator, so a release run's noise cannot be reproduced
bit for bit; ours is reproducible and device-independent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from .. import compat
from ..core.errors import InputError
from .core.dpmpp import ARITHMETICS, MTV_CFG_SCALE, MTV_STEPS
from .core.guidance import AUDIO, TEXT, Branch, CFG, guided_predictor
from .core.loop import SamplingTrace, sample
from .core.noise import NoiseSource, SeededNoise
from .core.preview import LatentPreview

FPS = 24                     # MTV extracts audio features and generates at 24 fps (sample_video.py L179-185)
WINDOW_FRAMES = 49           # L = (T − 1)·4 + 1 video frames per window
LATENT_FRAMES = 13           # T latent frames per window
OVERLAP_FRAMES = 5           # decoded frames handed to the next window (and dropped by it)
WINDOW_STRIDE = WINDOW_FRAMES - OVERLAP_FRAMES   # 44
CLEAN_LATENTS = 2            # the 5 hand-over frames encode to 2 latent frames (t = 0 embedding)
LATENT_CHANNELS = 16
ZERO_CHANNELS = 16           # the I2V concat channels, zero at inference and in training
HEIGHT, WIDTH = 480, 720     # hard-coded in sample_video.py L141
RELEASED_CFG = MTV_CFG_SCALE   # 3.5, guiders.py L74: the config's scale (6) is ignored by the released code
RELEASED_STEPS = MTV_STEPS     # 50, F: configs/cogvideox_5b.yaml (MTVCraft's variant runs 20)
STREAMS = ("speech", "effects", "music")
WINDOW_MODES = ("released", "render_tail")

# CogVideoX publishes no latent → RGB factors (ComfyUI 0.3.64 has no CogVideoX latent format):
# the preview shows latent channels 0, 1, 2 as false colour. It follows structure and motion,
# not true colours.
FALSE_COLOUR = torch.zeros(LATENT_CHANNELS, 3)
FALSE_COLOUR[0, 0] = FALSE_COLOUR[1, 1] = FALSE_COLOUR[2, 2] = 0.5
PREVIEW = LatentPreview(frame_axis=1, channel_axis=2, batch_axis=0, factors=FALSE_COLOUR)   # [B, T, C, h, w]


# --------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Window:
    """One window: feature frames ``[start, start + 49)`` (zero-padded past the features' end).

    ``handover`` is the first of the 5 frames of the previous window's decoded output that are
    encoded into this window's 2 clean latent frames (None for the first window; 44 = the last 5,
    as released). ``keep`` is the first of this window's 49 decoded frames that enters the video
    (0 for the first window, 5 after it, as released; more for a tail window that overlaps frames
    already rendered)."""

    index: int
    start: int
    handover: Optional[int]
    keep: int
    tail: bool = False
    frames: int = WINDOW_FRAMES

    @property
    def end(self) -> int:
        return self.start + self.frames

    @property
    def clean_frames(self) -> int:
        return 0 if self.handover is None else CLEAN_LATENTS

    @property
    def video_frames(self) -> tuple:
        """``(first, end)`` video frames this window contributes (before the cut to the speech length)."""
        return self.start + self.keep, self.end


@dataclass(frozen=True)
class WindowPlan:
    """The windows of one run. ``n_features``: the padded feature length N (= 1 + 48k, the
    released padding); ``length``: the speech length in frames (``ceil(seconds·24)``, the video
    is cut to it); ``rendered``: video frames the windows generate; ``frames``: the output length
    ``min(rendered, length)``; ``unrendered``: ``(first, end)`` frames of the speech the windows
    never reach (empty when ``first == end``)."""

    n_features: int
    length: int
    windows: tuple
    limited: bool = False        # max_windows cut the plan short

    @property
    def rendered(self) -> int:
        return self.windows[-1].end

    @property
    def frames(self) -> int:
        return min(self.rendered, self.length)

    @property
    def unrendered(self) -> tuple:
        return (self.frames, self.length) if self.rendered < self.length else (self.length, self.length)

    @property
    def unrendered_features(self) -> int:
        """Trailing padded feature frames no window reaches (3…46 for the released scheme)."""
        return max(0, self.n_features - self.rendered)

    def describe(self) -> str:
        first, end = self.unrendered
        text = (f"{len(self.windows)} window(s) of {self.windows[0].frames} frames → {self.frames} frames "
                f"({self.frames / FPS:.2f} s at {FPS} fps)")
        if end > first:
            why = ("max_windows" if self.limited else
                   "released windowing; windows 'render_tail' renders them")
            text += f"; speech frames {first}-{end - 1} ({(end - first) / FPS:.2f} s) are not rendered ({why})"
        return text


def released_windows(n_features: int, frames: int = WINDOW_FRAMES) -> int:
    """``sample_video.py:sampling_main``: ``times = max((N − 8) // (L − 5), 1)`` (the 8 is the release's)."""
    return max((int(n_features) - 8) // (int(frames) - OVERLAP_FRAMES), 1)


def window_plan(n_features: int, length: Optional[int] = None, render_tail: bool = False,
                max_windows: int = 0, frames: int = WINDOW_FRAMES) -> WindowPlan:
    """The windows for ``n_features`` padded feature frames (N) and a speech of ``length`` frames
    (default N).

    Released: ``times = max((N − 8)//44, 1)`` windows; window t covers features ``[44t, 44t + 49)``
    and generates frames ``[44t, 44t + 49)``, of which the first 5 (t > 0) replace nothing: they are
    the previous window's last 5, re-generated from their 2 clean latents and dropped. Frames
    generated: ``5 + 44·times``; feature frames ``5 + 44·times … N − 1`` (3 to 46 of them; none for
    N = 49, ≤ 2 s of speech, where the one forced window covers all 49) are never rendered, and the video is cut to ``min(5 + 44·times, length)``. Example: 10 s → seq_len 240,
    N = 241, times 5, 225 frames: 9.375 s of the 10 s are rendered.

    ``render_tail`` (ours): when the released windows stop before ``length``, one more window
    aligned to the end of the features (start ``min(N − 49, 44·times)``; its hand-over frames are the
    previous window's decoded frames at that position, which are always rendered) renders the rest;
    its frames that overlap already rendered ones are dropped. ``max_windows`` > 0 keeps only the
    first windows (a quick look at the start of a long audio). ``frames``: L, the video frames per
    window (49 released; tiny test networks use fewer, the stride is L − 5).
    """
    n, big = int(n_features), int(frames)
    if big <= OVERLAP_FRAMES:
        raise ValueError(f"a window needs more than {OVERLAP_FRAMES} frames, got {big}")
    stride = big - OVERLAP_FRAMES
    if n < 1:
        raise InputError("speech", f"has no audio feature frames (N = {n}); the speech track is empty")
    length = n if length is None else int(length)
    times = released_windows(n, big)
    windows: List[Window] = [Window(0, 0, None, 0, frames=big)]
    for t in range(1, times):
        windows.append(Window(t, t * stride, stride, OVERLAP_FRAMES, frames=big))
    if render_tail and windows[-1].end < length:
        prev = windows[-1]
        start = min(n - big, times * stride)
        windows.append(Window(len(windows), start, start - prev.start, prev.end - start, tail=True, frames=big))
    limited = bool(max_windows) and 0 < max_windows < len(windows)
    if limited:
        windows = windows[:max_windows]
    return WindowPlan(n, length, tuple(windows), limited)


def window_features(features: torch.Tensor, window: Window) -> torch.Tensor:
    """Feature frames ``[start, start + 49)`` of ``features`` ``[N, 5, 12, 768]`` → ``[1, 49, 5, 12, 768]``,
    zero-padded past the end (``sample_video.py``: ``pre_fix[-1:]`` of a ``zeros_like``)."""
    part = features[window.start:window.end]
    if part.shape[0] < window.frames:
        pad = part.new_zeros((window.frames - part.shape[0],) + tuple(features.shape[1:]))
        part = torch.cat([part, pad])
    return part.unsqueeze(0)


# --------------------------------------------------------------------------------------
# Conditions → network call
# --------------------------------------------------------------------------------------

def _dtype_of(net: torch.nn.Module) -> torch.dtype:
    dt = getattr(net, "compute_dtype", None)
    if dt is not None:
        return dt
    for p in net.parameters():
        if p.is_floating_point() and p.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            return p.dtype
    return torch.bfloat16


def _device_of(net: torch.nn.Module) -> torch.device:
    dev = getattr(net, "compute_device", None)
    if dev is not None:
        return torch.device(dev)
    return next(net.parameters()).device


class MTVBranchModel:
    """MTV's :class:`~avsync.samplers.core.guidance.BranchModel` for one window.

    ``text`` ``[1, 226, 4096]`` (T5 output of the prompt); ``audio`` ``{"speech", "effects", "music"
    [, "speech2"]}`` → ``[1, 49, 5, 12, 768]`` wav2vec features of the window. A branch with
    :data:`TEXT` real gets ``text``, else zeros; with :data:`AUDIO` real the features, else zeros of
    the same shape for every stream (the release zeroes all audio together, as its training dropout
    does). ``clean_frames`` leading latent frames are the hand-over (t = 0 embedding).

    ``cache_audio`` (default): the audio projections (``MTVTransformer.project_audio``; they do not
    depend on the timestep) run once per window and branch kind — cond features, uncond zeros — and
    every step passes the tokens (``audio_tokens=``); the release recomputes them in every call
    (50 steps × 2 CFG rows). Bit-equal to the per-step path (the projections run one sample at a
    time either way). False: the features go to every call, as released."""

    def __init__(self, net: torch.nn.Module, text: torch.Tensor, audio: Dict[str, torch.Tensor], clean_frames: int = 0,
                 dtype: Optional[torch.dtype] = None, device=None, cache_audio: bool = True):
        self.net = net
        self.dtype = dtype or _dtype_of(net)
        self.device = torch.device(device) if device is not None else _device_of(net)
        self.text = text.to(self.device, self.dtype)
        self.audio = {k: v.to(self.device, self.dtype) for k, v in audio.items() if v is not None}
        self.clean_frames = int(clean_frames)
        self.cache_audio = bool(cache_audio) and hasattr(net, "project_audio")
        self.projections = 0     # project_audio calls (tests and benchmarks count them)
        self._cache: Dict[frozenset, Dict[str, torch.Tensor]] = {}

    def inputs(self, branch: Branch) -> Dict[str, torch.Tensor]:
        key = branch.real
        if key not in self._cache:
            out = {"text": self.text if TEXT in key else torch.zeros_like(self.text)}
            feats = {name: f if AUDIO in key else torch.zeros_like(f) for name, f in self.audio.items()}
            if self.cache_audio:
                with torch.no_grad():
                    tokens = self.net.project_audio(feats["speech"], feats["effects"], feats["music"],
                                                    feats.get("speech2"), dtype=self.dtype)
                self.projections += 1
                out.update({TOKEN_PREFIX + k: v for k, v in tokens.as_dict().items()})
            else:
                out.update(feats)
            self._cache[key] = out
        return self._cache[key]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        b, f, _, h, w = x.shape
        latents = torch.cat([x.to(self.dtype), x.new_zeros((b, f, ZERO_CHANNELS, h, w), dtype=self.dtype)], dim=2)
        timestep = t.to(self.device).reshape(-1).expand(b)
        if TOKEN_PREFIX + "speech" in inputs:
            from ..networks.mtv_audio import MTVAudioTokens

            tokens = MTVAudioTokens(*(inputs.get(TOKEN_PREFIX + k) for k in ("speech", "effects", "music", "speech2")))
            out = self.net(latents, inputs["text"], timestep, clean_frames=self.clean_frames, audio_tokens=tokens)
        else:
            out = self.net(latents, inputs["text"], timestep, inputs["speech"], inputs["effects"], inputs["music"],
                           speech2=inputs.get("speech2"), clean_frames=self.clean_frames)
        return out.float()


TOKEN_PREFIX = "tokens_"     # MTVBranchModel.inputs keys of the cached projected tokens


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------

@dataclass
class MTVSettings:
    """One run's settings. ``cfg``: the released code's constant 3.5 by default (its config says 6,
    which the code ignores). ``windows``: "released" or "render_tail". ``max_windows``: 0 = all.
    ``batched``: the CFG pair in one model call (False: two calls, less activation memory).
    ``arithmetic``: the solver's timestep arithmetic, "released" (SAT) or "diffusers"
    (``CogVideoXDPMScheduler``). ``cache_audio``: project the audio once per window (bit-equal;
    False recomputes it at every call, as released — needed for nothing but the comparison)."""

    steps: int = RELEASED_STEPS
    cfg: float = RELEASED_CFG
    seed: int = 0
    windows: str = "released"
    max_windows: int = 0
    batched: bool = True
    arithmetic: str = "released"
    cache_audio: bool = True

    def validate(self) -> "MTVSettings":
        if not 1 <= int(self.steps) <= 1000:
            raise InputError("steps", f"must be between 1 and 1000, got {self.steps}")
        if not float(self.cfg) >= 0.0:
            raise InputError("cfg", f"must be ≥ 0, got {self.cfg}")
        if self.windows not in WINDOW_MODES:
            raise InputError("windows", f"must be one of {', '.join(WINDOW_MODES)}, got {self.windows!r}")
        if int(self.max_windows) < 0:
            raise InputError("max_windows", f"must be ≥ 0 (0 = every window), got {self.max_windows}")
        if self.arithmetic not in ARITHMETICS:
            raise InputError("arithmetic", f"must be one of {', '.join(ARITHMETICS)}, got {self.arithmetic!r}")
        return self

    @property
    def render_tail(self) -> bool:
        return self.windows == "render_tail"


def make_solver(settings: MTVSettings, clean: Optional[torch.Tensor] = None):
    """SDE DPM++(2M) on the zero-SNR v-prediction schedule (``samplers/core/dpmpp.py``), holding
    ``clean`` leading latent frames fixed (the window hand-over) when given."""
    from .core.dpmpp import DPMPP2MSDE, KeepCleanFrames, mtv_schedule

    solver = DPMPP2MSDE(mtv_schedule(), steps=int(settings.steps), arithmetic=settings.arithmetic)
    return solver if clean is None else KeepCleanFrames(solver, clean, frame_axis=1)


# --------------------------------------------------------------------------------------
# Windows → video
# --------------------------------------------------------------------------------------

class Resident:
    """A component that stays where it is: ``load()`` returns it, ``offload()`` does nothing.
    :func:`run_windows` takes components with ``load()``/``offload()`` (``compat.ManagedModel``,
    the loader's handles); plain modules are wrapped in this."""

    def __init__(self, obj):
        self.obj = obj

    def load(self, memory_required: int = 0):
        return self.obj

    def offload(self) -> None:
        pass


def _handle(component):
    return component if hasattr(component, "load") and hasattr(component, "offload") else Resident(component)


def _module(component):
    """The object a component holds without loading it (``ManagedModel.module``, ``Resident.obj``)."""
    for name in ("module", "obj"):
        inner = getattr(component, name, None)
        if inner is not None:
            return inner
    return component


def latent_geometry(transformer) -> tuple:
    """``(T, h, w)`` latent frames and size of one window: the network config's (13, 60, 90 released:
    480 × 720 px, hard-coded in ``sample_video.py``); a tiny test network has its own."""
    cfg = getattr(_module(transformer), "config", None)
    if cfg is None or not hasattr(cfg, "latent_frames"):
        return LATENT_FRAMES, HEIGHT // 8, WIDTH // 8
    return int(cfg.latent_frames), int(cfg.latent_height), int(cfg.latent_width)


def window_frames_of(transformer) -> int:
    """L = 4·(T − 1) + 1 video frames per window (the VAE's 4× temporal compression)."""
    return 4 * (latent_geometry(transformer)[0] - 1) + 1


def _to_unit_range(decoded: torch.Tensor) -> torch.Tensor:
    """VAE output in [−1, 1] → [0, 1], clamped, float32 (``sample_video.py``: ``clamp((x + 1)/2, 0, 1)``)."""
    return ((decoded.float() + 1.0) / 2.0).clamp(0.0, 1.0)


@torch.no_grad()
def encode_handover(vae, frames01: torch.Tensor, first: int, noise: NoiseSource) -> torch.Tensor:
    """The released hand-over (``sample_video.py`` L335-339): 5 decoded frames ``[1, 5, 3, H, W]`` from
    index ``first`` of ``frames01`` (clamped to [0, 1]) → [−1, 1] → VAE posterior **sample** ×0.7 →
    ``[1, 2, 16, h, w]`` float32 (the posterior draw comes from ``noise``)."""
    last5 = frames01[:, first:first + OVERLAP_FRAMES] * 2.0 - 1.0
    if last5.shape[1] != OVERLAP_FRAMES:
        raise ValueError(f"hand-over needs {OVERLAP_FRAMES} frames from index {first}, the window has "
                         f"{frames01.shape[1]}")
    return vae.encode(last5, noise).float()


@dataclass
class WindowRun:
    """What :func:`run_windows` reports per window (``on_window``; tests read it): the window,
    its final latents ``[1, 13, 16, h, w]``, its decoded frames ``[1, 49, 3, H, W]`` in [0, 1] and
    the clean latents it started from (None for the first window)."""

    window: Window
    latents: torch.Tensor
    frames: torch.Tensor
    clean: Optional[torch.Tensor]


def evaluations(settings: MTVSettings, plan: WindowPlan) -> int:
    """Model evaluations of a run (the progress bar's total): the solver's per window × windows."""
    return make_solver(settings).evaluations() * len(plan.windows)


@torch.no_grad()
def run_windows(transformer, vae, text: torch.Tensor, features: Dict[str, torch.Tensor], plan: WindowPlan,
                settings: Optional[MTVSettings] = None, guidance=None, noise: Optional[NoiseSource] = None,
                progress=None, trace: Optional[SamplingTrace] = None,
                on_window: Optional[Callable[[WindowRun], None]] = None, memory_required: int = 0) -> torch.Tensor:
    """Sample every window of ``plan`` and hand over between them → IMAGE ``[plan.frames, H, W, 3]`` in [0, 1].

    ``transformer``/``vae``: components with ``load()``/``offload()`` (or plain objects): the
    transformer is loaded for sampling and offloaded before each decode, the VAE loaded for
    decoding and the hand-over encode. ``text`` ``[1, 226, 4096]``; ``features`` per stream
    ``[N, 5, 12, 768]`` (``speech`` decides nothing here: ``plan`` was made from it). ``guidance``:
    the guidance object (default ``CFG(settings.cfg)``). The latent size is the network config's
    (:func:`latent_geometry`).
    """
    settings = (settings or MTVSettings()).validate()
    noise = noise if noise is not None else SeededNoise(settings.seed)
    guide = guidance if guidance is not None else CFG(float(settings.cfg), (TEXT, AUDIO))
    frames, h, w = latent_geometry(transformer)
    if plan.windows[0].frames != 4 * (frames - 1) + 1:
        raise ValueError(f"the plan's {plan.windows[0].frames}-frame windows do not fit the network's {frames} "
                         f"latent frames ({4 * (frames - 1) + 1} video frames)")
    transformer, vae = _handle(transformer), _handle(vae)
    progress = progress if progress is not None else compat.Progress(evaluations(settings, plan), "AVSync MTV")
    on_call = trace.count_call if trace is not None else None
    preview = PREVIEW if compat.in_comfyui() else None
    video: List[torch.Tensor] = []
    previous: Optional[torch.Tensor] = None
    for window in plan.windows:
        compat.check_interrupted()
        clean = None
        if window.handover is not None:
            try:
                clean = encode_handover(vae.load(), previous, window.handover, noise)
            finally:
                vae.offload()
        initial = noise.initial((1, frames, LATENT_CHANNELS, h, w))
        if clean is not None:   # diffusion_video.py L264-265: the clean latents overwrite the first noise frames
            initial[:, :clean.shape[1]] = clean.to(initial.device)
        solver = make_solver(settings, clean)
        try:
            net = transformer.load(memory_required=memory_required)
            window_audio = {k: window_features(v, window) for k, v in features.items() if v is not None}
            family = MTVBranchModel(net, text, window_audio, window.clean_frames, cache_audio=settings.cache_audio)
            predict = guided_predictor(family, guide, solver.steps, batched=settings.batched, on_call=on_call)
            latents = sample(predict, solver, noise, device=family.device, initial=initial, progress=progress,
                             preview=preview, trace=trace)
        finally:
            transformer.offload()
        try:
            decoded = _to_unit_range(vae.load().decode(latents)).to(compat.intermediate_device())
        finally:
            vae.offload()
        if on_window is not None:
            on_window(WindowRun(window, latents.cpu(), decoded, None if clean is None else clean.cpu()))
        video.append(decoded[0, window.keep:])
        previous = decoded
    out = torch.cat(video)[: plan.frames]
    return out.permute(0, 2, 3, 1).contiguous()     # [F, 3, H, W] → IMAGE [F, H, W, 3]


# --------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------

VARIANTS = ("single", "accm", "multi")
AUDIO_RATE = 16000           # wav2vec2's rate (audio_processor.py: librosa.load(sr=16000))


@dataclass
class MTVModel:
    """``AVSYNC_MTV_MODEL``: the MTV variant and its components, each with ``load()`` / ``offload()``
    (``compat.ManagedModel`` or :class:`Resident`): ``transformer`` → ``networks.mtv.MTVTransformer``,
    ``vae`` → ``networks.mtv_encoders.MTVVae``, ``text_encoder`` → the T5 encoder (with ``tokenizer``),
    ``audio_encoder`` → ``networks.mtv_encoders.MTVAudioEncoder``. ``memory``: a
    ``MemoryModel`` for the core's check (``samplers/mtv_memory.py``), or None. ``describe``: what
    was loaded, for the loader node's text."""

    variant: str
    transformer: object
    vae: object
    text_encoder: object
    tokenizer: object
    audio_encoder: object
    memory: object = None
    memory_settings: object = None
    describe: str = ""

    @property
    def speakers(self) -> int:
        return 2 if self.variant == "multi" else 1


@dataclass
class MTVResult:
    """The video (IMAGE ``[F, 480, 720, 3]`` at 24 fps), the plan it followed and per-window runs."""

    frames: torch.Tensor
    plan: WindowPlan
    fps: float = float(FPS)
    windows: list = field(default_factory=list)


def _tracks(variant: str, speech, effects, music, speech2) -> Dict[str, Optional[tuple]]:
    """Check which tracks the variant takes; ``(waveform, sample_rate)`` per stream."""
    if variant not in VARIANTS:
        raise InputError("model", f"unknown MTV variant {variant!r} (expected one of {', '.join(VARIANTS)})")
    if variant == "multi" and speech2 is None:
        raise InputError("speech2", "the multi (two-speaker) MTV model needs a second speaker track")
    if variant != "multi" and speech2 is not None:
        raise InputError("speech2", f"the {variant} MTV model has one speaker; load the 'multi' variant for two")
    if speech is None and effects is None and music is None:
        raise InputError("speech", "no audio: connect at least one of speech, effects, music")
    return {"speech": speech, "effects": effects, "music": music, "speech2": speech2}


@torch.no_grad()
def encode_audio(model: MTVModel, tracks: Dict[str, Optional[tuple]], clip_length: int = WINDOW_FRAMES) -> tuple:
    """wav2vec features of every track, once over the whole file (``sample_video.py`` L179-186), and the
    speech length. A missing track is silence as long as the longest given one (MTVCraft feeds a silent
    speech track to the accm model). Returns ``(features {stream: [N, 5, 12, 768]}, seq_len)``: the
    speech's ``ceil(seconds·24)`` (the video is cut to it). ``clip_length``: the window's frames (N = 1 +
    (L − 1)·k)."""
    from ..networks.mtv_encoders import to_wav2vec_input

    waves = {k: to_wav2vec_input(*v) for k, v in tracks.items() if v is not None}
    samples = max(w.numel() for w in waves.values())
    for k, v in tracks.items():
        if v is None and (k != "speech2"):
            waves[k] = torch.zeros(samples)
    feats = {}
    try:
        enc = _handle(model.audio_encoder).load()
        for name in ("speech", "effects", "music", "speech2"):
            if name in waves:
                try:
                    feats[name] = enc.features(waves[name], FPS, clip_length).float().cpu()
                except ValueError as err:    # e.g. shorter than wav2vec2's receptive field
                    raise InputError(name, str(err)) from None
        seq_len, _padded = enc.frame_count(waves["speech"].numel(), AUDIO_RATE, FPS, clip_length)
    finally:
        _handle(model.audio_encoder).offload()
    return feats, int(seq_len)


@torch.no_grad()
def encode_text(model: MTVModel, prompt: str) -> torch.Tensor:
    """T5-v1.1-XXL of the prompt ``[1, 226, 4096]`` float32 (226 tokens, no mask); the encoder is offloaded after."""
    from ..networks.mtv_encoders import encode_prompt

    try:
        t5 = _handle(model.text_encoder).load()
        return encode_prompt(t5, model.tokenizer, [str(prompt)]).float().cpu()
    finally:
        _handle(model.text_encoder).offload()


@torch.no_grad()
def generate_mtv(model: MTVModel, prompt: str, speech=None, effects=None, music=None, speech2=None,
                 settings: Optional[MTVSettings] = None, guidance=None, noise: Optional[NoiseSource] = None,
                 progress=None, trace: Optional[SamplingTrace] = None, free_bytes: Optional[int] = -1,
                 on_window: Optional[Callable[[WindowRun], None]] = None,
                 on_plan: Optional[Callable[[WindowPlan], None]] = None) -> MTVResult:
    """Text + audio tracks → video at 24 fps (480 × 720), as ``sample_video.py:sampling_main`` runs one prompt line.

    ``speech``/``effects``/``music``/``speech2`` are ``(waveform [C, N], sample_rate)`` (the demixer's
    stems); ``speech2`` only for the ``multi`` variant. The prompt and the tracks are encoded first
    (T5 and wav2vec offloaded afterwards), then :func:`run_windows`. ``guidance``: an
    ``AVSYNC_GUIDANCE`` value (Audio Sync Guidance around the CFG; None or w_a = 0 → exactly CFG).
    ``free_bytes``: −1 asks the device, None skips the memory check. ``on_plan`` sees the window
    plan before sampling starts (the node logs which trailing frames are not rendered).
    """
    from .keyvid import apply_guidance

    settings = (settings or MTVSettings()).validate()
    tracks = _tracks(getattr(model, "variant", "single"), speech, effects, music, speech2)
    noise = noise if noise is not None else SeededNoise(settings.seed)
    guide = apply_guidance(CFG(float(settings.cfg), (TEXT, AUDIO)), guidance, _module(model.transformer),
                           "the MTV transformer")
    required = _check_memory(model, settings, free_bytes)      # before any model runs
    features, seq_len = encode_audio(model, tracks, window_frames_of(model.transformer))
    anchor = "speech" if tracks["speech"] is not None else next(k for k in STREAMS if tracks[k] is not None)
    plan = window_plan(features[anchor].shape[0], seq_len, settings.render_tail, settings.max_windows,
                       window_frames_of(model.transformer))
    if on_plan is not None:
        on_plan(plan)
    text = encode_text(model, prompt)
    runs: list = []

    def collect(run: WindowRun) -> None:
        runs.append(run)
        if on_window is not None:
            on_window(run)

    progress = progress if progress is not None else compat.Progress(evaluations(settings, plan), "AVSync MTV")
    frames = run_windows(model.transformer, model.vae, text, features, plan, settings, guide, noise, progress, trace,
                         on_window=collect, memory_required=required)
    return MTVResult(frames, plan, float(FPS), runs)


def _check_memory(model: MTVModel, settings: MTVSettings, free_bytes) -> int:
    """The core's memory check with the model's ``MemoryModel`` (``samplers/mtv_memory.py``; none → no
    check) for the loaded storage / block swap and this run's CFG batch; returns the activation bytes
    ComfyUI must keep free besides the weights while sampling."""
    from dataclasses import replace

    from .core.memory import check_memory, memory_budget

    mem = getattr(model, "memory", None)
    if mem is None or model.memory_settings is None:
        return 0
    s = replace(model.memory_settings, batch=2 if settings.batched else 1)
    if free_bytes == -1:
        free_bytes = memory_budget(getattr(_handle(model.transformer), "load_device", compat.torch_device()))
    check_memory(mem, s, free_bytes)
    return int(mem.activation_bytes(s))


# --------------------------------------------------------------------------------------
# Assembling the model from its files
# --------------------------------------------------------------------------------------

class BlockSwapped:
    """The transformer under block swap (``samplers/mtv_memory.py:BlockSwap``): ``load()`` puts all but
    the streamed blocks on ``device`` and hooks the streaming in; ``offload()`` puts everything back
    on the CPU. Outside ComfyUI's model management (ComfyUI cannot stream blocks)."""

    def __init__(self, module: torch.nn.Module, blocks_on_gpu: int, device, resident_bytes: int = 0):
        self.module, self.blocks_on_gpu, self.load_device = module, int(blocks_on_gpu), torch.device(device)
        self.resident_bytes = int(resident_bytes)   # the memory model's weights on the device under swap
        self._swap = None

    def load(self, memory_required: int = 0):
        from .mtv_memory import BlockSwap

        if self._swap is None:
            # ComfyUI does not see these weights: have it unload others (T5 after encoding) first
            compat.free_memory(self.resident_bytes + int(memory_required), self.load_device)
            self._swap = BlockSwap(self.module, self.blocks_on_gpu, self.load_device).attach()
        return self.module

    def offload(self) -> None:
        if self._swap is not None:
            self._swap.detach()
            self._swap = None
            compat.soft_empty_cache()


class VaeComponent:
    """The VAE as :func:`run_windows` uses it: the managed ``AutoencoderKLCogVideoX``, handed out as
    ``networks.mtv_encoders.MTVVae`` (scale 0.7)."""

    def __init__(self, managed, tiling: bool = False):
        self.managed, self.tiling = managed, bool(tiling)
        self.module = managed.module

    def load(self, memory_required: int = 0):
        from ..networks.mtv_encoders import MTVVae

        return MTVVae(self.managed.load(memory_required), tiling=self.tiling)

    def offload(self) -> None:
        self.managed.offload()


PRECISIONS = ("auto", "bf16", "fp32")
STORAGES = ("bf16", "fp8")


def compute_dtype(precision: str, device) -> torch.dtype:
    """``auto``: bf16 on a GPU (what the release runs: SAT casts the whole engine to bf16), fp32 on the
    CPU (bf16 matmuls are slow there)."""
    if precision == "auto":
        return torch.bfloat16 if torch.device(device).type != "cpu" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def load_mtv_model(variant: str, transformer, vae, t5, wav2vec, tokenizer=None, storage: str = "bf16",
                   block_swap: int = 0, precision: str = "auto", vae_tiling: bool = False,
                   audio_proj_on_cpu: bool = True) -> MTVModel:
    """Every component from its file (paths): the transformer converted by ``avsync convert mtv``
    (``loaders/mtv.py:load_mtv_transformer``, strict), the VAE (``load_mtv_vae``: converted file or
    diffusers folder), T5 (``loaders/mtv_encoders.py:load_t5_encoder``: a transformers folder or
    ComfyUI's ``t5xxl_*.safetensors``) with its tokenizer (a folder; None: ComfyUI's copy), wav2vec2
    (``load_mtv_audio_encoder``, fp32 as released). ``block_swap``: transformer blocks streamed from
    the CPU during sampling (0: all resident, under ComfyUI's model management). ``audio_proj_on_cpu``
    (on a GPU): the three audio projection models are held outside the managed module, in CPU memory,
    and moved to the GPU one at a time only while a window's tokens are projected
    (``MTVAudio.hold_projections_outside``; :class:`MTVBranchModel` projects once per window)."""
    from ..loaders.mtv import load_mtv_transformer, load_mtv_vae
    from ..networks.audio_layers import list_audio_layers
    from ..loaders.mtv_encoders import load_mtv_audio_encoder, load_t5_encoder, load_t5_tokenizer
    from .mtv_memory import MTVMemoryModel, MTVMemorySettings

    if variant not in VARIANTS:
        raise InputError("variant", f"must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if storage not in STORAGES:
        raise InputError("storage", f"must be one of {', '.join(STORAGES)}, got {storage!r}")
    if precision not in PRECISIONS:
        raise InputError("precision", f"must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if tokenizer is None and compat.comfy_t5_tokenizer_dir() is None:
        raise InputError("t5", "no T5 tokenizer: put one (tokenizer.json or spiece.model) in a tokenizer/ folder "
                               "beside the T5 or in models/avsync/mtv/t5_tokenizer/ (CogVideoX's tokenizer/ "
                               "folder works); inside ComfyUI its own copy is used")
    device = compat.torch_device()
    dtype = compute_dtype(precision, device)
    net = load_mtv_transformer(transformer, "cpu", dtype, storage).eval()
    cfg = net.config
    if (cfg.speakers == 2) != (variant == "multi"):
        raise InputError("transformer", f"{Path(transformer).name} holds the {'two' if cfg.speakers == 2 else 'one'}-"
                                        f"speaker network, but variant is '{variant}'")
    if not 0 <= int(block_swap) <= cfg.num_layers:
        raise InputError("block_swap", f"must be between 0 and {cfg.num_layers} (the transformer's blocks), "
                                       f"got {block_swap}")
    if audio_proj_on_cpu:   # on the CPU the same code runs, with nothing to move
        net.audio.hold_projections_outside()
    proj_off = bool(audio_proj_on_cpu) and torch.device(device).type != "cpu"   # what it saves on the device
    memory_settings = MTVMemorySettings(storage=storage, blocks_on_gpu=None if not block_swap else
                                        cfg.num_layers - int(block_swap), batch=2, latent_frames=cfg.latent_frames,
                                        latent_height=cfg.latent_height, latent_width=cfg.latent_width,
                                        audio_proj_on_cpu=proj_off)
    memory = MTVMemoryModel(cfg)
    if block_swap:
        est = memory.estimate(memory_settings)
        handle = BlockSwapped(net, cfg.num_layers - int(block_swap), device,
                              est.sampling - memory.activation_bytes(memory_settings))
        net.to(compat.offload_device())
    else:
        handle = compat.manage_model(net)
    vae_module = load_mtv_vae(vae, "cpu", dtype).eval()
    text = compat.manage_model(load_t5_encoder(t5, dtype, "cpu"))
    audio = compat.manage_model(load_mtv_audio_encoder(wav2vec, torch.float32, "cpu").eval())
    describe = (f"MTV {variant}: {memory.params / 1e9:.2f} B parameters, {storage} storage, "
                f"{'block swap: ' + str(block_swap) + ' blocks streamed' if block_swap else 'all blocks resident'}, "
                f"{'audio projections on the CPU (on the GPU once per window), ' if proj_off else ''}"
                f"compute {str(dtype).replace('torch.', '')} on {device}; "
                f"{len(list_audio_layers(net))} audio layers (Audio Sync Guidance 'layers': "
                f"0-{len(list_audio_layers(net)) - 1})")
    return MTVModel(variant, handle, VaeComponent(compat.manage_model(vae_module), vae_tiling), text,
                    load_t5_tokenizer(tokenizer), audio, memory, memory_settings, describe)
