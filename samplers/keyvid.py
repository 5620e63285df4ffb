"""KeyVID on the sampling core: keyframe generation, motion interpolation, and long audio clip by clip.

Faithful to the released code (``XingruiWang/KeyVID@0341618``, docs/keyvid_generation.md):

* :func:`generate_keyframes` — ``scripts/evaluation/asva/run_inference_keyframe`` →
  ``pipeline_audio_cond_animation_keyframe_add_idx.py:image_guided_synthesis`` (paper App. G):
  first frame ``Resize(320)`` + ``CenterCrop(320, 512)`` in [−1, 1]; image tokens = OpenCLIP
  image encoder → Resampler → the keyframes' groups (``select_keyframes``); text tokens
  (penultimate OpenCLIP text layer; unconditional text ""); unconditional image tokens =
  embedder(zeros image) → Resampler; audio = ImageBind trunk on the clip's fbank → the released
  token plumbing (``core/keyvid_tokens.py:generator_audio_tokens``); null audio = the trunk on a
  zero fbank; ``c_concat`` = the first frame's latent × 0.18215 repeated; fs = 6; ``frame_idx`` =
  the keyframes' 24-fps indices; 90-step ``uniform_trailing`` DDIM, η = 1, the four CFG passes as
  one batched call per step, rescale 0.7; per-frame VAE decode (``perframe_ae``) in chunks.
* :func:`interpolate_motion` — ``run_inference_interp`` →
  ``pipeline_audio_cond_animation_freenoise_inpainting_new.py:image_guided_synthesis`` (App. C):
  ``c_concat`` zeros with the keyframe latents at their 24-fps slots, all 48×16 image tokens,
  audio chunks resampled 52 → 48, fs = 24, the anchor-interpolated initial noise and the
  step-0 keyframe replacement, s_aud 9.0, full 48-frame temporal attention. Keyframes pass as
  latents (the release round-trips them through an H.264 mp4).
* :func:`animate_clips` — any length: 2-s clips on the keyframes' 48-frame grid, each clip after
  the first conditioned on the previous clip's last frame (the seam, docs).

Every random draw comes from one :class:`~avsync.samplers.core.noise.SeededNoise` per clip, in
this order: the first frame's VAE posterior sample (generator only), the initial latents, the
per-step DDIM draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import compat
from ..core import keyvid_tokens as tokens
from ..core.audio import resample
from ..core.errors import InputError
from ..core.fbank import SAMPLE_RATE as FBANK_RATE
from ..core.fbank import imagebind_input
from ..core.modules import module_bytes, param_count
from .core.ddim import DDIMV, DiffusionSchedule, KeyframeReplacement
from .core.decode import decode_latents
from .core.guidance import AUDIO, IMAGE, TEXT, Branch, LinearGuidance, MultiConditionCFG, guided_predictor
from .core.loop import SamplingTrace, sample
from .core.memory import MemoryEstimate, check_memory, memory_budget
from .core.noise import NoiseSource, SeededNoise, anchor_interpolated_noise
from .core.preview import LatentPreview

FPS = 24                    # KeyVID's frame grid
CLIP_FRAMES = 48            # one clip: 2 s at 24 fps
CLIP_SECONDS = CLIP_FRAMES / FPS
NUM_KEYFRAMES = 12
FBANK_FRAMES = 204          # ImageBind diffusion trunk: 2 s of 10-ms fbank frames, not cropped
WINDOWS = ("full", "freenoise")
FREENOISE_WINDOW = 12
FREENOISE_STRIDE = 6
PREVIEW = LatentPreview(frame_axis=2, channel_axis=1, batch_axis=0)   # latents [B, 4, T, h, w]


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------

@dataclass
class KeyframeSettings:
    """Keyframe generation (``scripts/generation.sh:run_asva`` stage 1)."""

    steps: int = 90
    eta: float = 1.0
    cfg_img: float = 2.0
    cfg_txt: float = 7.5
    cfg_aud: float = 7.5
    guidance_rescale: float = 0.7
    fs: int = 6
    seed: int = 0
    width: int = 512
    height: int = 320
    decode_chunk_size: int = 4
    batched: bool = True          # the CFG branches in one model call per step (False: one call each)

    def validate(self) -> "KeyframeSettings":
        if self.steps < 1 or self.steps > 1000:
            raise InputError("steps", f"must be between 1 and 1000, got {self.steps}")
        if self.eta < 0:
            raise InputError("eta", f"must be ≥ 0, got {self.eta}")
        for name in ("cfg_img", "cfg_txt", "cfg_aud"):
            if getattr(self, name) < 0:
                raise InputError(name, f"must be ≥ 0, got {getattr(self, name)}")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise InputError("guidance_rescale", f"must be between 0 and 1, got {self.guidance_rescale}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v < 8 or v % 8:
                raise InputError(name, f"must be a positive multiple of 8 px, got {v}")
        if self.decode_chunk_size < 1:
            raise InputError("decode_chunk_size", f"must be at least 1, got {self.decode_chunk_size}")
        return self

    def guidance(self) -> MultiConditionCFG:
        return MultiConditionCFG(self.cfg_img, self.cfg_txt, self.cfg_aud, self.guidance_rescale)


@dataclass
class InterpolationSettings(KeyframeSettings):
    """Motion interpolation (stage 2): s_aud 9.0, fs 24; ``window`` "full" (released) or "freenoise"."""

    cfg_aud: float = 9.0
    fs: int = 24
    window: str = "full"
    inpainting_end_step: int = 0   # the release's --inpainting_end_step: keyframe replacement up to this step

    def validate(self) -> "InterpolationSettings":
        super().validate()
        if self.window not in WINDOWS:
            raise InputError("window", f"must be one of {WINDOWS}, got {self.window!r}")
        if self.inpainting_end_step < 0:
            raise InputError("inpainting_end_step", f"must be ≥ 0, got {self.inpainting_end_step}")
        return self


@dataclass
class KeyframeResult:
    """One clip's keyframes: ``images`` IMAGE ``[K, H, W, 3]``, ``latents`` ``[1, 4, K, h, w]``
    (scaled by the VAE's scale factor, as the UNet sees them), ``indices`` their 24-fps frames."""

    images: torch.Tensor
    latents: torch.Tensor
    indices: List[int]


# --------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------

def prepare_first_frame(image: torch.Tensor, width: int = 512, height: int = 320) -> torch.Tensor:
    """IMAGE ``[H, W, 3]`` (0..1) → ``[1, 3, height, width]`` in [−1, 1], as the reference's
    ``transforms.Compose([Resize(320), CenterCrop((320, 512)), Normalize(0.5, 0.5)])``: the shorter
    side is resized to ``height`` (bilinear, antialiased), then the centre ``height × width`` is
    cut out; where the resized image is narrower than ``width`` (portrait or square input),
    CenterCrop pads with zeros (black, −1 after normalising) as torchvision does."""
    x = image.to(torch.float32).permute(2, 0, 1)[None]
    h, w = x.shape[-2:]
    short = min(h, w)
    nh, nw = (height, max(1, round(w * height / short))) if h == short else (max(1, round(h * height / short)), height)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    pad_h, pad_w = max(0, height - nh), max(0, width - nw)
    if pad_h or pad_w:
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        nh, nw = x.shape[-2:]
    top, left = int(round((nh - height) / 2.0)), int(round((nw - width) / 2.0))
    x = x[..., top:top + height, left:left + width]
    return x * 2.0 - 1.0


def clip_audio_16k(waveform: torch.Tensor, sample_rate: int, start_s: float = 0.0,
                   seconds: float = CLIP_SECONDS) -> torch.Tensor:
    """``[C, N]`` (or ``[N]``) audio → mono 16-kHz ``[1, 32000]`` for the clip starting at
    ``start_s`` (zero-padded past the end)."""
    wav = waveform.to(torch.float32)
    if wav.dim() == 3:
        wav = wav[0]
    if wav.dim() == 2:
        wav = wav.mean(0)
    first = int(round(start_s * sample_rate))
    count = int(round(seconds * sample_rate))
    seg = wav[first:first + count]
    if seg.numel() < count:
        seg = F.pad(seg, (0, count - seg.numel()))
    if sample_rate != FBANK_RATE:
        seg = resample(seg, sample_rate, FBANK_RATE)
    n = int(round(seconds * FBANK_RATE))
    seg = seg[:n] if seg.numel() >= n else F.pad(seg, (0, n - seg.numel()))
    return seg[None]


def _default_tokenizer():
    from ..loaders.keyvid import openclip_tokenizer

    return openclip_tokenizer()


def _dev(module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


@dataclass
class Conditioning:
    """Everything one clip's four CFG branches need (batch 1; ``image``/``null_image`` are the
    full ``[1, 48·16, C]`` Resampler outputs; ``audio``/``null_audio`` the trunk outputs
    ``[1, 1 + 12·48, 768]``)."""

    text: torch.Tensor
    null_text: torch.Tensor
    image: torch.Tensor
    null_image: torch.Tensor
    audio: torch.Tensor
    null_audio: torch.Tensor


@torch.no_grad()
def encode_conditions(model, first: torch.Tensor, audio16k: torch.Tensor, prompt: str,
                      tokenizer: Optional[Callable] = None) -> Conditioning:
    """Text, image and audio conditions of one clip and their null versions (the release's
    ``unconditional_conditioning*``): text ""; image tokens of a zeros image (not a zero vector);
    the trunk on ``zeros_like(fbank)``. ``first`` ``[1, 3, H, W]`` in [−1, 1]."""
    tokenizer = tokenizer or _default_tokenizer()
    try:
        te = model.text_encoder.load()
        dev, dt = _dev(te)
        ids = tokenizer([prompt, ""]).to(dev)
        text = te(ids).float()
    finally:
        model.text_encoder.offload()
    try:
        enc = model.image_encoder.load()
        proj = model.image_proj.load()
        dev, dt = _dev(enc)
        pix = torch.cat([first, torch.zeros_like(first)]).to(dev, dt)
        emb = proj(enc(pix).to(_dev(proj)[1])).float()
    finally:
        model.image_encoder.offload()
        model.image_proj.offload()
    try:
        trunk = model.imagebind_audio.load()
        dev, dt = _dev(trunk)
        mel = imagebind_input(audio16k, target_frames=FBANK_FRAMES)
        aud = trunk(torch.cat([mel, torch.zeros_like(mel)]).to(dev, dt)).float()
    finally:
        model.imagebind_audio.offload()
    return Conditioning(text[:1], text[1:], emb[:1], emb[1:], aud[:1], aud[1:])


class KeyVIDBranches:
    """The KeyVID family's :class:`~avsync.samplers.core.guidance.BranchModel`: per branch the
    context ``[1, 77 + 16·T, C]`` (real or null text, real or null image tokens), ``c_audio``
    ``[1, T, 12, 768]`` (real or null), and the shared ``c_concat``, ``fs``, ``frame_idx``.

    ``window(start, end)`` gives the same family restricted to frames [start, end) (FreeNoise)."""

    def __init__(self, unet, text, null_text, image_tokens, null_image_tokens, audio_tokens, null_audio_tokens,
                 c_concat, fs: int, frame_idx: torch.Tensor):
        self.net = unet
        dev, self.dtype = _dev(unet)
        self.device = dev
        put = lambda t: t.to(dev, self.dtype)  # noqa: E731
        self.text, self.null_text = put(text), put(null_text)
        self.image, self.null_image = put(image_tokens), put(null_image_tokens)
        self.audio, self.null_audio = put(audio_tokens), put(null_audio_tokens)
        self.c_concat = put(c_concat)
        self.fs = torch.tensor([int(fs)], device=dev, dtype=torch.long)
        self.frame_idx = frame_idx.to(dev).long().view(1, -1)
        self._cache = {}

    @property
    def frames(self) -> int:
        return self.c_concat.shape[2]

    def inputs(self, branch: Branch):
        key = branch.real
        if key not in self._cache:
            text = self.text if TEXT in key else self.null_text
            image = self.image if IMAGE in key else self.null_image
            audio = self.audio if AUDIO in key else self.null_audio
            self._cache[key] = {"context": tokens.build_context(text, image), "c_audio": audio,
                                "c_concat": self.c_concat, "fs": self.fs, "frame_idx": self.frame_idx}
        return self._cache[key]

    def __call__(self, x, t, inputs):
        xin = torch.cat([x.to(self.dtype), inputs["c_concat"]], dim=1)
        ts = t.to(self.device).long().reshape(-1).expand(x.shape[0])
        out = self.net(xin, ts, context=inputs["context"], c_audio=inputs["c_audio"], fs=inputs["fs"],
                       frame_idx=inputs["frame_idx"])
        return out.float()

    def window(self, start: int, end: int) -> "KeyVIDBranches":
        q = tokens.IMAGE_TOKENS_PER_FRAME
        w = KeyVIDBranches.__new__(KeyVIDBranches)
        w.net, w.dtype, w.device = self.net, self.dtype, self.device
        w.text, w.null_text = self.text, self.null_text
        w.image, w.null_image = self.image[:, q * start:q * end], self.null_image[:, q * start:q * end]
        w.audio, w.null_audio = self.audio[:, start:end], self.null_audio[:, start:end]
        w.c_concat = self.c_concat[:, :, start:end]
        w.fs = self.fs
        w.frame_idx = self.frame_idx[:, start:end]
        w._cache = {}
        return w


def generator_family(unet, cond: Conditioning, first_latent: torch.Tensor, indices: Sequence[int],
                     fs: int = 6) -> KeyVIDBranches:
    """The generator's branches (``…_keyframe_add_idx.py:image_guided_synthesis``): context
    ``[text; image tokens of the keyframes]`` (``select_keyframes``), audio chunk = frame index
    (``generator_audio_tokens``), ``c_concat`` = ``first_latent`` ``[1, 4, h, w]`` (scaled)
    repeated over the K keyframes, ``frame_idx`` = the keyframes' 24-fps indices."""
    frame_idx = torch.tensor([list(indices)], dtype=torch.long)
    c_concat = first_latent.unsqueeze(2).repeat(1, 1, len(indices), 1, 1)
    return KeyVIDBranches(
        unet, cond.text, cond.null_text,
        tokens.generator_image_tokens(cond.image, frame_idx), tokens.generator_image_tokens(cond.null_image, frame_idx),
        tokens.generator_audio_tokens(cond.audio, frame_idx), tokens.generator_audio_tokens(cond.null_audio, frame_idx),
        c_concat, fs, frame_idx)


def interpolator_family(unet, cond: Conditioning, keyframe_latents: torch.Tensor, indices: Sequence[int],
                        fs: int = 24, frames: int = CLIP_FRAMES) -> KeyVIDBranches:
    """The interpolator's branches (``…_freenoise_inpainting_new.py:image_guided_synthesis``): all
    48×16 image tokens, audio chunks resampled 52 → 48, ``c_concat`` zeros ``[1, 4, 48, h, w]`` with
    ``keyframe_latents`` ``[1, 4, K, h, w]`` at ``indices``, ``frame_idx`` 0…47 (unused by its UNet)."""
    b, c, _, h, w = keyframe_latents.shape
    c_concat = torch.zeros(1, c, frames, h, w)
    c_concat[:, :, list(indices)] = keyframe_latents.float()
    return KeyVIDBranches(
        unet, cond.text, cond.null_text,
        tokens.interpolator_image_tokens(cond.image, frames), tokens.interpolator_image_tokens(cond.null_image, frames),
        tokens.interpolator_audio_tokens(cond.audio, frames), tokens.interpolator_audio_tokens(cond.null_audio, frames),
        c_concat, fs, torch.arange(frames).view(1, -1))


# --------------------------------------------------------------------------------------
# Guidance: MultiConditionCFG, optionally wrapped by an AVSYNC_GUIDANCE object
# --------------------------------------------------------------------------------------

def apply_guidance(inner: LinearGuidance, guidance=None):
    """The guidance object a run uses. ``guidance`` is an ``AVSYNC_GUIDANCE`` value (Audio Sync
    Guidance settings) or None: anything with ``wrap(inner) -> Guidance`` (e.g. building
    :class:`~avsync.samplers.core.guidance.AudioSyncGuidance` around ``inner`` with its
    ``w_a``/``start``/``end`` and an ``audio_layers_off`` patch). None, or ``w_a == 0``: ``inner``
    itself, so the output is bit-identical to a run without guidance."""
    if guidance is None or float(getattr(guidance, "w_a", 1.0)) == 0.0:
        return inner
    wrap = getattr(guidance, "wrap", None)
    if wrap is None:
        raise InputError("guidance", f"expected an AVSYNC_GUIDANCE object with a wrap(guidance) method, "
                                     f"got {type(guidance).__name__}")
    return wrap(inner)


# --------------------------------------------------------------------------------------
# FreeNoise windows (option for the interpolator)
# --------------------------------------------------------------------------------------

def freenoise_views(frames: int, window: int = FREENOISE_WINDOW, stride: int = FREENOISE_STRIDE) -> list:
    """``freenoise .. get_views``: [(0, 12), (6, 18), …, (36, 48)] for 48 frames; one view of all
    frames when ``frames ≤ window``; a last view ending at ``frames`` when the stride does not land there."""
    if frames <= window:
        return [(0, frames)]
    views = [(s, s + window) for s in range(0, frames - window + 1, stride)]
    if views[-1][1] != frames:
        views.append((frames - window, frames))
    return views


def freenoise_weights(length: int) -> torch.Tensor:
    """``attention_freenoise.py:generate_weight_sequence``: 1, 2, …, n/2, n/2, …, 1 (triangular)."""
    half = (length + 1) // 2
    up = list(range(1, half + 1))
    down = list(range(length // 2, 0, -1))
    return torch.tensor(up + down, dtype=torch.float32)


def window_fusion(frames: int, window: int = FREENOISE_WINDOW, stride: int = FREENOISE_STRIDE):
    """(views, per-view weights ``[len]`` normalised so that the weights of every frame sum to 1)."""
    views = freenoise_views(frames, window, stride)
    total = torch.zeros(frames)
    raw = []
    for s, e in views:
        w = freenoise_weights(e - s)
        total[s:e] += w
        raw.append(w)
    return views, [w / total[s:e] for (s, e), w in zip(views, raw)]


def windowed_predictor(family: KeyVIDBranches, guidance, steps: int, batched: bool = True, on_call=None,
                       window: int = FREENOISE_WINDOW, stride: int = FREENOISE_STRIDE):
    """FreeNoise-style windows done so that they work (the release's windowed attention is dead
    code and returns the last window only, notes A4): the guided prediction of each 12-frame
    window (stride 6) with its own frames' conditions, fused per frame with triangular weights
    normalised to sum 1. With ``frames ≤ window`` this is the full prediction."""
    views, weights = window_fusion(family.frames, window, stride)
    preds = [guided_predictor(family.window(s, e), guidance, steps, batched, on_call) for s, e in views]

    def predict(x, t, step):
        out = torch.zeros_like(x, dtype=torch.float32)
        for (s, e), w, p in zip(views, weights, preds):
            out[:, :, s:e] += p(x[:, :, s:e], t, step) * w.to(x.device).view(1, 1, -1, 1, 1)
        return out

    return predict


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------

UNET_ACTIVATION_MAPS = 18.0     # live UNet activations per sample-frame, in level-0 feature maps (as SVD's)
DECODER_ACTIVATION_MAPS = 6.0


class KeyVIDMemory:
    """KeyVID's :class:`~avsync.samplers.core.memory.MemoryModel`. ``settings`` carries ``frames``
    (12 keyframes / 48 interpolated) through :func:`memory_settings`."""

    def __init__(self, model, frames: int, branches: int):
        self.model, self.frames, self.branches = model, frames, branches
        unet = model.unet.module
        self.unet_params = param_count(unet)
        self.unet_channels = int(getattr(unet, "model_channels", 320))
        vae = model.vae.module
        self.vae_params = param_count(vae)
        self.vae_channels = int(vae.config.block_out_channels[0])
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.bytes = torch.finfo(model.dtype).bits // 8

    def estimate(self, s) -> MemoryEstimate:
        h, w = s.height // self.factor, s.width // self.factor
        window = getattr(s, "window", "full")
        frames = min(self.frames, FREENOISE_WINDOW) if window == "freenoise" else self.frames
        batch = self.branches if s.batched else 1
        act = UNET_ACTIVATION_MAPS * batch * frames * h * w * self.unet_channels * self.bytes
        sampling = self.unet_params * self.bytes + int(act)
        decoding = self.vae_params * self.bytes + int(
            DECODER_ACTIVATION_MAPS * min(s.decode_chunk_size, self.frames) * s.height * s.width * self.vae_channels
            * self.bytes)
        return MemoryEstimate(sampling=sampling, decoding=decoding)

    def suggestions(self, s, free_bytes: int) -> list:
        out, est = [], self.estimate(s)
        if est.decoding > free_bytes:
            for c in (2, 1):
                if c < s.decode_chunk_size and self.estimate(replace(s, decode_chunk_size=c)).decoding <= free_bytes:
                    out.append(f"decode_chunk_size {c}")
                    break
        if est.sampling > free_bytes:
            if s.batched and self.estimate(replace(s, batched=False)).sampling <= free_bytes:
                out.append("batched off (one model call per CFG branch)")
            if getattr(s, "window", None) == "full" and \
                    self.estimate(replace(s, window="freenoise")).sampling <= free_bytes:
                out.append("window freenoise")
        if self.bytes == 4:
            out.append("load the KeyVID model in fp16 or bf16 (halves weights and activations)")
        return out

    def culprit(self, s, est: MemoryEstimate, free_bytes: int) -> str:
        return "decode_chunk_size" if est.sampling <= free_bytes < est.decoding else "model"


def _check_memory(model, settings, frames: int, free_bytes) -> MemoryEstimate:
    mem = KeyVIDMemory(model, frames, 4 if settings.cfg_txt != 1.0 else 1)
    if free_bytes == -1:
        free_bytes = memory_budget(model.unet.load_device)
    check_memory(mem, settings, free_bytes)
    return mem.estimate(settings)


# --------------------------------------------------------------------------------------
# Shared run pieces
# --------------------------------------------------------------------------------------

def _check_role(model, role: str, name: str) -> None:
    if getattr(model, "role", None) != role:
        raise InputError(name, f"expected a KeyVID {role} model, got {getattr(model, 'role', type(model).__name__)!r}")


def _latent_hw(model, settings) -> tuple[int, int, int]:
    vae = model.vae.module
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return int(vae.config.latent_channels), settings.height // factor, settings.width // factor


def _sample(model, family: KeyVIDBranches, guidance, settings, noise: NoiseSource, initial: torch.Tensor,
            solver: DDIMV, progress, trace: Optional[SamplingTrace], predict=None) -> torch.Tensor:
    if predict is None:
        predict = guided_predictor(family, guidance, solver.steps, batched=settings.batched,
                                   on_call=trace.count_call if trace is not None else None)
    return sample(predict, solver, noise, device=family.device, initial=initial, progress=progress,
                  preview=PREVIEW if compat.in_comfyui() else None, trace=trace)


@torch.no_grad()
def decode_clip(model, latents: torch.Tensor, chunk: int) -> torch.Tensor:
    """``[1, 4, T, h, w]`` scaled latents → IMAGE ``[T, H, W, 3]`` per frame (``perframe_ae``), in chunks."""
    try:
        vae = model.vae.load()
        frames = latents[0].transpose(0, 1).contiguous()       # [T, 4, h, w]
        return decode_latents(vae, frames, chunk)
    finally:
        model.vae.offload()


def _extra(model, est: MemoryEstimate) -> int:
    """What ComfyUI must keep free besides the UNet's weights while it samples."""
    return max(0, est.sampling - module_bytes(model.unet.module, buffers=False))


def _progress(progress, total: int, desc: str):
    return progress if progress is not None else compat.Progress(total, desc)


# --------------------------------------------------------------------------------------
# Keyframe generation
# --------------------------------------------------------------------------------------

def check_keyframe_indices(indices: Sequence[int], name: str = "keyframes") -> List[int]:
    idx = [int(i) for i in indices]
    if not idx:
        raise InputError(name, "no keyframes in this clip")
    if any(i < 0 or i >= CLIP_FRAMES for i in idx):
        raise InputError(name, f"keyframe indices must lie in 0…{CLIP_FRAMES - 1} of the 24-fps clip, got {idx}")
    if sorted(set(idx)) != idx:
        raise InputError(name, f"keyframe indices must be sorted and unique, got {idx}")
    return idx


@torch.no_grad()
def generate_keyframes(model, first_image: torch.Tensor, waveform: torch.Tensor, sample_rate: int,
                       keyframe_indices: Sequence[int], prompt: str, settings: Optional[KeyframeSettings] = None,
                       guidance=None, noise: Optional[NoiseSource] = None, progress=None,
                       tokenizer: Optional[Callable] = None, audio_start_s: float = 0.0,
                       trace: Optional[SamplingTrace] = None, free_bytes: Optional[int] = -1) -> KeyframeResult:
    """One 2-s clip's keyframes (48 frames at 24 fps; the release uses 12 keyframes).

    ``first_image`` IMAGE ``[H, W, 3]``; ``waveform`` ``[C, N]`` at ``sample_rate`` (the clip is the
    2 s from ``audio_start_s``); ``keyframe_indices`` clip-relative 24-fps frames. ``guidance``:
    an ``AVSYNC_GUIDANCE`` object (:func:`apply_guidance`). ``noise`` defaults to
    ``SeededNoise(settings.seed)``. ``free_bytes``: −1 asks the device, None skips the check.
    """
    settings = (settings or KeyframeSettings()).validate()
    _check_role(model, "generator", "model")
    idx = check_keyframe_indices(keyframe_indices)
    noise = noise if noise is not None else SeededNoise(settings.seed)
    est = _check_memory(model, settings, len(idx), free_bytes)
    inner = settings.guidance()
    guide = apply_guidance(inner, guidance)
    solver = DDIMV(DiffusionSchedule.keyvid(), settings.steps, settings.eta)
    progress = _progress(progress, solver.evaluations(), "AVSync keyframes")

    first = prepare_first_frame(first_image, settings.width, settings.height)
    cond = encode_conditions(model, first, clip_audio_16k(waveform, sample_rate, audio_start_s), prompt, tokenizer)
    c, h, w = _latent_hw(model, settings)
    try:
        vae = model.vae.load()
        dev, dt = _dev(vae)
        post = vae.encode(first.to(dev, dt)).latent_dist
        # the release's get_first_stage_encoding: a posterior sample (the first draw of the run)
        z0 = (post.mean.float() + post.std.float() * noise.conditioning(post.mean.shape).to(dev)) * model.scale_factor
    finally:
        model.vae.offload()
    initial = noise.initial((1, c, len(idx), h, w))
    try:
        unet = model.unet.load(memory_required=_extra(model, est))
        family = generator_family(unet, cond, z0, idx, settings.fs)
        latents = _sample(model, family, guide, settings, noise, initial, solver, progress, trace)
    finally:
        model.unet.offload()
    images = decode_clip(model, latents, settings.decode_chunk_size)
    return KeyframeResult(images=images, latents=latents.cpu(), indices=idx)


# --------------------------------------------------------------------------------------
# Motion interpolation
# --------------------------------------------------------------------------------------

@torch.no_grad()
def interpolate_motion(model, keyframe_latents: torch.Tensor, keyframe_indices: Sequence[int], waveform: torch.Tensor,
                       sample_rate: int, prompt: str, settings: Optional[InterpolationSettings] = None,
                       first_image: Optional[torch.Tensor] = None, guidance=None, noise: Optional[NoiseSource] = None,
                       progress=None, tokenizer: Optional[Callable] = None, audio_start_s: float = 0.0,
                       trace: Optional[SamplingTrace] = None, free_bytes: Optional[int] = -1,
                       return_latents: bool = False):
    """All 48 frames of one clip → IMAGE ``[48, H, W, 3]`` (or the latents ``[1, 4, 48, h, w]``).

    ``keyframe_latents`` ``[1, 4, K, h, w]`` (scaled, as :class:`KeyframeResult` holds them) at
    ``keyframe_indices``; ``first_image`` IMAGE for the image tokens (the clip's reference frame;
    None: the first keyframe, decoded).
    """
    settings = (settings or InterpolationSettings()).validate()
    _check_role(model, "interpolator", "interp_model")
    idx = check_keyframe_indices(keyframe_indices)
    kf = keyframe_latents.to(torch.float32)
    if kf.dim() != 5 or kf.shape[2] != len(idx):
        raise InputError("keyframes", f"expected keyframe latents [1, 4, {len(idx)}, h, w], got {tuple(kf.shape)}")
    c, h, w = _latent_hw(model, settings)
    if tuple(kf.shape[-2:]) != (h, w) or kf.shape[1] != c:
        raise InputError("keyframes", f"keyframe latents {tuple(kf.shape)} do not match {settings.width}×"
                                      f"{settings.height} px ({c} × {h} × {w} latents)")
    noise = noise if noise is not None else SeededNoise(settings.seed)
    est = _check_memory(model, settings, CLIP_FRAMES, free_bytes)
    guide = apply_guidance(settings.guidance(), guidance)
    solver = DDIMV(DiffusionSchedule.keyvid(), settings.steps, settings.eta,
                   keyframes=KeyframeReplacement(kf, idx, until_step=settings.inpainting_end_step))
    progress = _progress(progress, solver.evaluations(), "AVSync interpolation")

    if first_image is None:
        first = decode_clip(model, kf[:, :, :1], 1)[0]
        first = prepare_first_frame(first, settings.width, settings.height)
    else:
        first = prepare_first_frame(first_image, settings.width, settings.height)
    cond = encode_conditions(model, first, clip_audio_16k(waveform, sample_rate, audio_start_s), prompt, tokenizer)
    initial = anchor_interpolated_noise(noise.initial((1, c, CLIP_FRAMES, h, w)), idx)
    try:
        unet = model.unet.load(memory_required=_extra(model, est))
        family = interpolator_family(unet, cond, kf, idx, settings.fs)
        predict = None
        if settings.window == "freenoise":
            predict = windowed_predictor(family, guide, solver.steps, settings.batched,
                                         trace.count_call if trace is not None else None)
        latents = _sample(model, family, guide, settings, noise, initial, solver, progress, trace, predict)
    finally:
        model.unet.offload()
    if return_latents:
        return latents.cpu()
    return decode_clip(model, latents, settings.decode_chunk_size)


# --------------------------------------------------------------------------------------
# Any length: clip after clip
# --------------------------------------------------------------------------------------

def check_timeline_keyframes(keyframes, waveform: Optional[torch.Tensor] = None, sample_rate: Optional[int] = None,
                             name: str = "keyframes") -> None:
    """Keyframes must be on KeyVID's grid (24 fps, 48-frame clips, per-clip lists) and, when audio
    is given, the audio must cover every clip's frames."""
    fps = float(getattr(keyframes, "fps", 0))
    if abs(fps - FPS) > 1e-6:
        raise InputError(name, f"KeyVID generates at {FPS} fps; these keyframes are on a {fps:g} fps grid "
                               f"(set the localizer's fps to {FPS})")
    if int(keyframes.clip_frames) != CLIP_FRAMES:
        raise InputError(name, f"KeyVID clips are {CLIP_FRAMES} frames; these keyframes use clips of {keyframes.clip_frames}")
    if not keyframes.clips:
        raise InputError(name, "holds no per-clip keyframe lists")
    expected = -(-int(keyframes.num_frames) // CLIP_FRAMES)
    if len(keyframes.clips) != expected:
        raise InputError(name, f"{len(keyframes.clips)} clip lists for {keyframes.num_frames} frames (expected {expected})")
    for i, clip in enumerate(keyframes.clips):
        check_keyframe_indices(clip, f"{name} (clip {i})")
    if waveform is not None:
        have = waveform.shape[-1] / float(sample_rate)
        need = keyframes.num_frames / FPS
        if have + 0.5 / FPS < need:
            raise InputError("audio", f"is {have:.2f} s long but the keyframes cover {keyframes.num_frames} frames "
                                      f"({need:.2f} s at {FPS} fps); use the audio the keyframes were localized on")


def clip_spans(num_frames: int) -> list:
    """``(start, end)`` timeline frames of each clip: ``[48i, min(48i + 48, num_frames))``; the
    audio of clip i starts at exactly ``48i / 24`` s. Integer arithmetic: no drift at any length."""
    return [(s, min(s + CLIP_FRAMES, num_frames)) for s in range(0, num_frames, CLIP_FRAMES)]


@dataclass
class ClipPlan:
    """One clip of a long run: its span on the timeline, audio start, keyframes, seed."""

    index: int
    start: int
    end: int
    audio_start_s: float
    keyframes: List[int]
    seed: int


def plan_clips(keyframes, seed: int) -> List[ClipPlan]:
    """Clip i: frames ``[48i, …)``, audio from ``48i/24`` s, keyframes ``keyframes.clips[i]``, seed ``seed + i``."""
    return [ClipPlan(i, s, e, s / FPS, list(keyframes.clips[i]), int(seed) + i)
            for i, (s, e) in enumerate(clip_spans(int(keyframes.num_frames)))]


@dataclass
class ClipRun:
    """What :func:`animate_clips` hands back per clip (the nodes show the keyframes)."""

    plan: ClipPlan
    keyframes: KeyframeResult
    frames: torch.Tensor


SAME = object()   # animate_clips: the interpolator uses the generator's guidance


@dataclass
class KeyVIDKeyframes:
    """``AVSYNC_KEYVID_KEYFRAMES``: what the keyframe generator node hands the motion interpolator.

    ``first`` is clip 0's :class:`KeyframeResult` (latents, indices, images). Clips after the first
    depend on the previous clip's last *interpolated* frame, so they are generated when the
    interpolator reaches them (:func:`animate_clips` with ``first_keyframes``); for that the object
    carries the generator, its settings and guidance, the first image, the audio and the prompt.
    """

    first: KeyframeResult
    keyframes: object                # core.keyframes.Keyframes (the localizer's timeline)
    image: torch.Tensor              # IMAGE [H, W, 3]: clip 0's first frame, as given
    waveform: torch.Tensor           # [C, N]
    sample_rate: int
    prompt: str
    model: object = None             # the generator (KeyVIDModel, role "generator")
    settings: KeyframeSettings = field(default_factory=KeyframeSettings)
    guidance: object = None
    tokenizer: Optional[Callable] = None

    @property
    def clips(self) -> int:
        return len(self.keyframes.clips)


@torch.no_grad()
def animate_clips(gen_model, interp_model, image: torch.Tensor, waveform: torch.Tensor, sample_rate: int, keyframes,
                  prompt: str, gen_settings: Optional[KeyframeSettings] = None,
                  interp_settings: Optional[InterpolationSettings] = None, guidance=None, progress=None,
                  tokenizer: Optional[Callable] = None, first_keyframes: Optional[KeyframeResult] = None,
                  on_clip: Optional[Callable[[ClipRun], None]] = None, free_bytes: Optional[int] = -1,
                  interp_guidance=SAME) -> torch.Tensor:
    """IMAGE + audio + ``AVSYNC_KEYFRAMES`` → IMAGE ``[keyframes.num_frames, H, W, 3]`` at 24 fps.

    Clip i covers timeline frames ``[48i, 48i + 48)`` and audio from ``48i/24`` s; its first image
    is ``image`` for clip 0 and the previous clip's **last generated frame** after that (the seam:
    keyframe 0 of clip i is generated from frame 48i − 1). A short last clip is generated as a full
    48-frame clip (audio zero-padded) and cut to its length. Clip i's seed is ``gen_settings.seed + i``
    (generator) and ``interp_settings.seed + i`` (interpolator). ``first_keyframes``: clip 0's keyframes
    already generated (the nodes pass the generator node's result). ``guidance`` applies to both
    stages unless ``interp_guidance`` is given for the interpolator.
    """
    if interp_guidance is SAME:
        interp_guidance = guidance
    gen_settings = (gen_settings or KeyframeSettings()).validate()
    interp_settings = (interp_settings or InterpolationSettings()).validate()
    _check_role(gen_model, "generator", "model")
    _check_role(interp_model, "interpolator", "interp_model")
    check_timeline_keyframes(keyframes, waveform, sample_rate)
    plans = plan_clips(keyframes, gen_settings.seed)
    per_clip = gen_settings.steps + interp_settings.steps
    progress = _progress(progress, per_clip * len(plans), "AVSync animate")
    frames, current = [], image
    for plan in plans:
        compat.check_interrupted()
        if plan.index == 0 and first_keyframes is not None:
            kf = first_keyframes
            progress.update(gen_settings.steps)
        else:
            kf = generate_keyframes(gen_model, current, waveform, sample_rate, plan.keyframes, prompt,
                                    replace(gen_settings, seed=gen_settings.seed + plan.index), guidance,
                                    progress=progress, tokenizer=tokenizer, audio_start_s=plan.audio_start_s,
                                    free_bytes=free_bytes)
        clip = interpolate_motion(interp_model, kf.latents, kf.indices, waveform, sample_rate, prompt,
                                  replace(interp_settings, seed=interp_settings.seed + plan.index), first_image=current,
                                  guidance=interp_guidance, progress=progress, tokenizer=tokenizer,
                                  audio_start_s=plan.audio_start_s, free_bytes=free_bytes)
        clip = clip[: plan.end - plan.start]
        if on_clip is not None:
            on_clip(ClipRun(plan, kf, clip))
        frames.append(clip)
        current = clip[-1]
    return torch.cat(frames)
