"""Running MTV's 11.6 B-parameter transformer on a card smaller than its weights.

Three tools, usable together (docs/mtv_models.md, "Memory"):

* **fp8 weight storage, bf16 compute** — :class:`FP8Linear` / :class:`FP8Conv1d` keep a weight
  as ``float8_e4m3fn`` with one fp32 scale per output channel (``weight ≈ q · scale``,
  ``scale = amax(row) / 448``) and dequantise it to the compute dtype at every call
  (``F.linear`` / ``F.conv1d`` on ``q.float() · scale`` cast to bf16): half the bytes of bf16 for
  the weights that dominate the model, the arithmetic of a bf16 model with slightly rounded
  weights. :func:`fp8_eligible` says which weights (:data:`FP8_SCOPES`); :func:`quantize_fp8`
  is the one quantiser (the converter and the loader call it).
* **block swap** — :class:`BlockSwap` keeps ``blocks_on_gpu`` transformer blocks (each with its
  MTV audio layer) and everything outside the blocks on the GPU, and streams the other blocks
  (and the three audio projection models) from pinned CPU memory: a block is copied in on a
  side CUDA stream while the previous one computes, and its GPU copy is dropped after use. The
  same code runs on the CPU (no side stream, copies are no-ops) and is tested there for
  bit-equal outputs.
* :class:`MTVMemoryModel` — the core's :class:`~avsync.samplers.core.memory.MemoryModel` for
  MTV: the peak of the sampling and decoding stages for given settings, so that
  ``check_memory`` refuses, before sampling, settings that do not fit and names those that do.

The released code has none of these (it loads the whole engine in bf16 on one GPU:
``sat/model/base_model.py:get_model``); WanVideoWrapper's ``WanVideoBlockSwap`` and diffusers'
``hooks/group_offloading.py`` are the patterns followed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .core.memory import MemoryEstimate, gib

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
SCALE_SUFFIX = "weight_scale"

#: Where fp8 storage applies (state-dict key prefixes of :class:`~avsync.networks.mtv.MTVTransformer`):
#: the Linear / Conv1d weights of the 42 blocks, of their audio layers and of the three audio
#: projection models — 98.9 % of the parameters at the released size. Biases, LayerNorms,
#: embeddings (patch, text, time, positional), the output layer and the small speech/effects
#: interaction blocks (``audio.audio_combine``, 47 M) stay in the compute dtype.
FP8_SCOPES = ("backbone.transformer_blocks.", "audio.layers.", "audio.audio_proj.", "audio.audio_proj_effect.",
              "audio.audio_proj_music.")


def fp8_eligible(key: str, ndim: int) -> bool:
    """Whether the weight ``key`` (of ``ndim`` dimensions) is stored in fp8: a Linear (2-D) or
    Conv1d (3-D) ``.weight`` inside :data:`FP8_SCOPES`."""
    return key.endswith(".weight") and ndim in (2, 3) and key.startswith(FP8_SCOPES)


def fp8_scale(weight: torch.Tensor) -> torch.Tensor:
    """Per output channel ``amax / 448`` (1 for an all-zero row), fp32, shape ``[out, 1, …]``."""
    amax = weight.detach().abs().reshape(weight.shape[0], -1).amax(dim=1).float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return scale.reshape(-1, *([1] * (weight.dim() - 1)))


def quantize_fp8(weight: torch.Tensor, scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with ``q`` float8_e4m3fn and ``scale`` fp32 (:func:`fp8_scale` unless
    given): ``q = clamp(w / scale, ±448)`` rounded to nearest. The clamp matters: a cast past
    ±448 gives NaN, not saturation."""
    scale = fp8_scale(weight) if scale is None else scale
    q = (weight.detach().float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


#: elements dequantised at a time: bounds the fp32 transient (torch has no fp8 × fp32 kernel
#: writing bf16 directly) to 64 MB; the bf16 result is the only full-size allocation
DEQUANT_CHUNK = 1 << 24
#: weights per output-channel chunk of an :class:`FP8Conv1d` (bounds its bf16 transient to 128 MB)
CONV_CHUNK = 1 << 26


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q · scale`` (fp32, elementwise) cast to ``dtype``: the weight an fp8 module computes
    with; computed in row chunks of at most :data:`DEQUANT_CHUNK` elements (same values)."""
    per_row = max(1, q[0].numel()) if q.dim() else 1
    rows = max(1, DEQUANT_CHUNK // per_row)
    if q.shape[0] <= rows:
        return (q.float() * scale).to(dtype)
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    for i in range(0, q.shape[0], rows):
        out[i:i + rows] = q[i:i + rows].float() * scale[i:i + rows]
    return out


class _FP8Weight(nn.Module):
    """An fp8 ``weight`` + fp32 ``weight_scale`` (+ ``bias`` in the compute dtype)."""

    def _init_fp8(self, shape, bias: bool, compute_dtype: torch.dtype, device=None):
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(torch.empty(shape, dtype=FP8_DTYPE, device=device), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones((shape[0],) + (1,) * (len(shape) - 1), device=device),
                                         requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(shape[0], dtype=compute_dtype, device=device), requires_grad=False)
                     if bias else None)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.weight_scale, self.compute_dtype)

    def _bias(self):
        return None if self.bias is None else self.bias.to(self.compute_dtype)


class FP8Linear(_FP8Weight):
    """``nn.Linear`` with its weight stored in fp8; computes in ``compute_dtype`` (bf16)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_fp8((out_features, in_features), bias, compute_dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x.to(self.compute_dtype), self.dequantized_weight(), self._bias())
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 storage, " \
               f"compute {self.compute_dtype}"


class FP8Conv1d(_FP8Weight):
    """``nn.Conv1d`` (stride, padding, dilation, groups kept) with its weight stored in fp8."""

    def __init__(self, conv: nn.Conv1d, compute_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        if conv.padding_mode != "zeros":
            raise ValueError("FP8Conv1d supports zero padding only")
        self._init_fp8(tuple(conv.weight.shape), conv.bias is not None, compute_dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        per_channel = self.weight[0].numel()
        rows = max(1, CONV_CHUNK // per_channel)
        if self.groups != 1 or self.weight.shape[0] <= rows:
            return F.conv1d(x, self.dequantized_weight(), self._bias(), self.stride, self.padding, self.dilation,
                            self.groups)
        # MTV's audio projection conv1 (24576² × 2 = 1.21 B weights): dequantising it whole would hold
        # a 2.4 GB bf16 copy; output-channel chunks bound that to CONV_CHUNK elements
        bias = self._bias()
        outs = []
        for i in range(0, self.weight.shape[0], rows):
            w = dequantize_fp8(self.weight[i:i + rows], self.weight_scale[i:i + rows], self.compute_dtype)
            outs.append(F.conv1d(x, w, None if bias is None else bias[i:i + rows], self.stride, self.padding,
                                 self.dilation))
        return torch.cat(outs, dim=1)


def fp8_module_names(model: nn.Module) -> list[str]:
    """Names of the Linear / Conv1d modules whose weights :func:`fp8_eligible` selects."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d)) and fp8_eligible(f"{name}.weight", m.weight.dim()):
            out.append(name)
    return out


def use_fp8_storage(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16,
                    names: Optional[Iterable[str]] = None, quantize: bool = True) -> list[str]:
    """Replace the eligible Linear / Conv1d modules of ``model`` by fp8 ones, in place.

    ``quantize``: quantise the current weights (:func:`quantize_fp8`); False leaves the new
    modules empty (a meta-built model the loader fills from an fp8 file). Returns the names."""
    names = list(fp8_module_names(model) if names is None else names)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        device = old.weight.device
        if isinstance(old, nn.Linear):
            new = FP8Linear(old.in_features, old.out_features, old.bias is not None, compute_dtype, device=device)
        else:
            new = FP8Conv1d(old, compute_dtype, device=device)
        if quantize and device.type != "meta":
            q, scale = quantize_fp8(old.weight)
            new.weight.data, new.weight_scale.data = q, scale
            if old.bias is not None:
                new.bias.data = old.bias.detach().to(compute_dtype)
        setattr(parent, attr, new)
    return names


# --------------------------------------------------------------------------------------
# Block swap
# --------------------------------------------------------------------------------------

def mtv_swap_groups(model: nn.Module, audio_projections: bool = True) -> list[list[nn.Module]]:
    """The swappable groups of an :class:`~avsync.networks.mtv.MTVTransformer`, in the order a
    forward call uses them: the three audio projection models (1.24 B parameters each at the
    released size, run once per call before the blocks), then block ``i`` with its audio layer."""
    groups: list[list[nn.Module]] = []
    # projections held outside the module tree (MTVAudio.hold_projections_outside) are not the
    # swap's: the sampler projects once per window and moves each to the GPU only then
    if audio_projections and not getattr(model.audio, "projections_held_outside", False):
        groups += [[model.audio.audio_proj], [model.audio.audio_proj_effect], [model.audio.audio_proj_music]]
    groups += [[block, audio] for block, audio in zip(model.backbone.transformer_blocks, model.audio.layers)]
    return groups


class BlockSwap:
    """Keep ``blocks_on_gpu`` blocks resident on ``device``; stream the other groups from CPU.

    ``groups`` (default :func:`mtv_swap_groups`) are lists of modules used together; the first
    ``blocks_on_gpu`` *block* groups stay resident, as does everything outside the groups. A
    streamed group's tensors live in (pinned, on CUDA) CPU memory; on the device they are
    placeholders of size 0 until a forward pre-hook on any of the group's modules loads them (a
    whole group at once; the copy of the next streamed group starts at the same time on a side
    stream when ``device`` is CUDA) and the group's device copy is dropped when the next group
    starts or the forward ends. Weights are never written back: inference only.

    Use as a context manager or call :meth:`attach` / :meth:`detach` (which restores every tensor
    to where it was, on the CPU)."""

    def __init__(self, model: nn.Module, blocks_on_gpu: int, device="cuda", groups=None, prefetch: bool = True,
                 pin_memory: bool = True):
        self.model = model
        self.device = torch.device(device)
        all_groups = mtv_swap_groups(model) if groups is None else [list(g) for g in groups]
        n_proj = 3 if groups is None and not getattr(model.audio, "projections_held_outside", False) else 0
        blocks = all_groups[n_proj:]
        if not 0 <= int(blocks_on_gpu) <= len(blocks):
            raise ValueError(f"blocks_on_gpu must be between 0 and {len(blocks)}, got {blocks_on_gpu}")
        self.blocks_on_gpu = int(blocks_on_gpu)
        self.resident_groups = blocks[: self.blocks_on_gpu]
        self.streamed = all_groups[:n_proj] + blocks[self.blocks_on_gpu:]
        self.cuda = self.device.type == "cuda"
        self.prefetch = prefetch and self.cuda
        self.pin_memory = pin_memory and self.cuda
        self._home: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # group -> (param, cpu copy)
        self._loaded: dict[int, Optional[torch.cuda.Event]] = {}
        self._stream = None
        self._hooks: list = []
        self.loads = 0  # groups copied in (for tests and benchmarks)

    # -- setup ------------------------------------------------------------------------
    def _tensors(self, group) -> list[torch.Tensor]:
        seen, out = set(), []
        for m in group:
            for t in list(m.parameters()) + list(m.buffers()):
                if id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
        return out

    def attach(self) -> "BlockSwap":
        streamed_ids = {id(t) for g in self.streamed for t in self._tensors(g)}
        # everything else goes to the device once (and back where it was on detach)
        self._resident = []
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if id(t) not in streamed_ids:
                self._resident.append((t, t.device))
                t.data = t.data.to(self.device)
        for gi, group in enumerate(self.streamed):
            home = []
            for t in self._tensors(group):
                cpu = t.data.to("cpu")
                if self.pin_memory:
                    cpu = cpu.pin_memory()
                home.append((t, cpu))
                t.data = torch.empty(0, dtype=cpu.dtype, device=self.device)
            self._home[gi] = home
            for m in group:
                for sub in m.modules():
                    self._hooks.append(sub.register_forward_pre_hook(lambda mod, args, gi=gi: self._use(gi)))
        self._hooks.append(self.model.register_forward_pre_hook(lambda mod, args: self._start()))
        self._hooks.append(self.model.register_forward_hook(lambda mod, args, out: self._finish()))
        if self.cuda:
            self._stream = torch.cuda.Stream(self.device)
        return self

    def detach(self) -> None:
        """Remove the hooks; streamed tensors go back to their CPU copies, resident ones to the
        device they were on before :meth:`attach`."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for home in self._home.values():
            for t, cpu in home:
                t.data = cpu
        for t, device in getattr(self, "_resident", []):
            t.data = t.data.to(device)
        self._resident = []
        self._home.clear()
        self._loaded.clear()

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.detach()

    # -- moving -----------------------------------------------------------------------
    def _copy_in(self, gi: int) -> None:
        if gi in self._loaded or gi >= len(self.streamed):
            return
        self.loads += 1
        if self.prefetch:
            with torch.cuda.stream(self._stream):
                for t, cpu in self._home[gi]:
                    t.data = cpu.to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            self._loaded[gi] = event
        else:
            for t, cpu in self._home[gi]:
                t.data = cpu.to(self.device)
            self._loaded[gi] = None

    def _drop(self, gi: int) -> None:
        for t, cpu in self._home[gi]:
            if self.cuda:
                t.data.record_stream(torch.cuda.current_stream(self.device))
            t.data = torch.empty(0, dtype=cpu.dtype, device=self.device)
        self._loaded.pop(gi, None)

    def _use(self, gi: int) -> None:
        if gi not in self._loaded:
            self._copy_in(gi)
        event = self._loaded.get(gi)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            self._loaded[gi] = None
        for other in [g for g in self._loaded if g < gi]:
            self._drop(other)
        if self.prefetch:
            self._copy_in(gi + 1)

    def _start(self) -> None:
        if self.prefetch and self.streamed:
            self._copy_in(0)

    def _finish(self) -> None:
        for gi in list(self._loaded):
            self._drop(gi)


# --------------------------------------------------------------------------------------
# Memory model (for samplers/core/memory.py:check_memory)
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MTVMemorySettings:
    """What decides MTV's peak on the device. ``blocks_on_gpu`` None: the whole transformer
    resident (no block swap); ``batch`` 2 = the CFG pair in one call."""

    storage: str = "bf16"                 # "bf16" | "fp8"
    blocks_on_gpu: Optional[int] = None
    batch: int = 2
    latent_frames: int = 13
    latent_height: int = 60
    latent_width: int = 90
    audio_proj_on_cpu: bool = False       # the 3 audio projections held on the CPU, on the GPU one at a time per window

    def describe(self) -> str:
        swap = "resident" if self.blocks_on_gpu is None else f"block swap with {self.blocks_on_gpu} blocks on the GPU"
        return f"storage={self.storage}, {swap}" + (", audio_proj_on_cpu" if self.audio_proj_on_cpu else "")


#: bytes the VAE decode needs besides its weights, per output pixel-frame of one chunk
#: (diffusers AutoencoderKLCogVideoX decoding 2 latent frames = up to 8 video frames at a time,
#: 128-channel bf16 activations, ~6 alive at the peak) — an analytic estimate, not measured on a GPU
_DECODE_BYTES_PER_PIXEL_FRAME = 6 * 128 * 2
_VAE_PARAMS = 215_580_000   # CogVideoX 3D VAE (diffusers AutoencoderKLCogVideoX defaults)
#: CUDA context, allocator slack, the small tensors of the step (solver state, embeddings)
_OVERHEAD = 900 * 2 ** 20


class MTVMemoryModel:
    """:class:`~avsync.samplers.core.memory.MemoryModel` for MTV (released sizes by default).

    Weight bytes are counted on the network built on the meta device (exact for the config);
    activations are analytic: the residual stream ``X = batch · tokens · hidden · 2`` bytes, and
    the peak inside a block is the MLP (input, norm, 4× hidden GELU input and output, residual,
    attention output): ``(2·mlp_ratio + 6) · X``. fp8 adds the bf16 copy of the largest fp8
    weight dequantised at once (a Linear's whole weight; Conv1d chunks of :data:`CONV_CHUNK`). Block swap holds the resident part plus two streamed
    groups (the one computing and the one being copied in). T5 and wav2vec2 are unloaded
    before sampling and are not counted; decoding runs after the transformer is offloaded."""

    def __init__(self, config=None):
        from ..loaders.common import _meta_module
        from ..networks.mtv import MTVConfig, MTVTransformer

        self.config = config or MTVConfig.released("single")
        model = _meta_module(lambda: MTVTransformer(self.config))
        self._names = dict(model.named_parameters())
        self._names.update(dict(model.named_buffers()))
        self.groups = [[n for m in g for n in self._group_names(model, m)] for g in mtv_swap_groups(model)]
        self.params = sum(t.numel() for t in self._names.values())

    @staticmethod
    def _group_names(model, module) -> list[str]:
        ids = {id(t) for t in list(module.parameters()) + list(module.buffers())}
        return [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if id(t) in ids]

    def _bytes(self, names: Iterable[str], storage: str) -> int:
        total = 0
        for n in names:
            t = self._names[n]
            if storage == "fp8" and fp8_eligible(n, t.dim()):
                total += t.numel() + 4 * t.shape[0]
            else:
                total += 2 * t.numel()
        return total

    def weight_bytes(self, storage: str = "bf16") -> int:
        return self._bytes(self._names, storage)

    def activation_bytes(self, s: MTVMemorySettings) -> int:
        c = self.config
        p = c.patch_size
        tokens = c.text_tokens + s.latent_frames * (s.latent_height // p) * (s.latent_width // p)
        x = s.batch * tokens * c.hidden * 2
        return (2 * c.mlp_ratio + 6) * x

    def projection_bytes(self, storage: str = "bf16") -> list[int]:
        """Bytes of each of the three audio projection models."""
        return [self._bytes(g, storage) for g in self.groups[:3]]

    def estimate(self, s: MTVMemorySettings) -> MemoryEstimate:
        n_proj = 3
        projections, blocks = self.groups[:n_proj], self.groups[n_proj:]
        off_gpu = {n for g in projections for n in g} if s.audio_proj_on_cpu else set()
        if s.blocks_on_gpu is None:
            weights = self._bytes([n for n in self._names if n not in off_gpu], s.storage)
        else:
            streamed = ([] if s.audio_proj_on_cpu else projections) + blocks[s.blocks_on_gpu:]
            streamed_names = {n for g in streamed for n in g} | off_gpu
            resident = self._bytes([n for n in self._names if n not in streamed_names], s.storage)
            biggest = sorted((self._bytes(g, s.storage) for g in streamed), reverse=True)[:2]
            weights = resident + sum(biggest)
        transient = 0
        if s.storage == "fp8":   # the bf16 copy of the largest weight dequantised at once
            transient = 2 * max(min(t.numel(), CONV_CHUNK) if t.dim() == 3 else t.numel()
                                for n, t in self._names.items() if fp8_eligible(n, t.dim()))
        sampling = weights + self.activation_bytes(s) + transient + _OVERHEAD
        if s.audio_proj_on_cpu:
            # once per window, before the steps: one projection model borrowed onto the GPU next to
            # the resident weights (the step's activations are not alive then; the projection's are
            # a few MB: 49 frames × 24576 wide)
            sampling = max(sampling, weights + max(self.projection_bytes(s.storage)) + transient + _OVERHEAD)
        frames = 4 * 2  # one decode chunk: 2 latent frames -> up to 8 video frames
        pixels = (s.latent_height * 8) * (s.latent_width * 8) * frames
        decoding = 2 * _VAE_PARAMS + _DECODE_BYTES_PER_PIXEL_FRAME * pixels + _OVERHEAD
        return MemoryEstimate(sampling=sampling, decoding=decoding)

    def candidates(self, s: MTVMemorySettings) -> list[MTVMemorySettings]:
        # cheapest change first: the projections off the GPU cost a copy per window, fp8 rounds the
        # weights, block swap copies weights at every step
        out = [replace(s, storage="bf16", blocks_on_gpu=None), replace(s, storage="bf16", blocks_on_gpu=None,
                                                                        audio_proj_on_cpu=True),
               replace(s, storage="fp8", blocks_on_gpu=None)]
        for storage in ("bf16", "fp8"):
            for n in (30, 20, 10, 4, 0):
                out.append(replace(s, storage=storage, blocks_on_gpu=min(n, self.config.num_layers)))
        out.append(replace(s, storage="fp8", blocks_on_gpu=None, audio_proj_on_cpu=True))
        return out

    def suggestions(self, s: MTVMemorySettings, free_bytes: int) -> list:
        fits = [c for c in self.candidates(s) if c != s and self.estimate(c).peak <= free_bytes]
        return [f"{c.describe()} (~{gib(self.estimate(c).peak)})" for c in fits[:3]]

    def culprit(self, s: MTVMemorySettings, estimate: MemoryEstimate, free_bytes: int) -> str:
        return "blocks_on_gpu" if s.blocks_on_gpu is not None else "memory"
