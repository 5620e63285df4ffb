"""Audio Sync Guidance for the audio-driven video models of ComfyUI core (0.3.64), sampled by KSampler.

The math and bookkeeping only; every ComfyUI object arrives as an argument (``compat.py``
does the ``ModelPatcher`` calls), so this runs and is tested without ComfyUI.

**Where the audio path is, and how it is skipped without touching anything else**
(ComfyUI 0.3.64, ``comfy/ldm/wan/model.py``):

* Wan2.2-S2V — ``WanModel_S2V.forward_orig`` calls ``self.audio_injector(x, i, audio_emb,
  audio_emb_global, seq_len)`` after every block ``i``; ``AudioInjector_WAN.forward`` returns
  ``x`` unchanged unless ``i`` is in ``injected_block_id`` (12 blocks in the released config:
  0, 4, 8, …, 39), and otherwise adds an audio cross-attention residual **in place** to the
  video tokens ``x[:, :seq_len]``. The injector gets no ``transformer_options`` and runs
  outside the ``patches_replace`` block hook, so the skip is an *object patch* of
  ``diffusion_model.audio_injector.forward`` (:func:`s2v_injector_forward`): for the skipped
  blocks and the off-sync rows of the batch it returns the input tokens. Text, reference
  image, motion frames and timestep are untouched (they enter elsewhere); the audio encoder
  still runs (its output is simply not injected).
* HuMo — ``WanAttentionBlockAudio.forward`` calls ``self.audio_cross_attn_wrapper(x, audio,
  …)`` (``AudioCrossAttentionWrapper.forward``: ``x + audio_cross_attn(norm1_audio(x), audio)``)
  between text cross-attention and the FFN. The skip is an object patch of each chosen
  ``diffusion_model.blocks.<i>.audio_cross_attn_wrapper.forward`` (:func:`humo_wrapper_forward`)
  returning ``x`` for the off-sync rows.

Audio-layer indices are forward order (0 = shallowest audio layer), the same syntax as
KeyVID's (``samplers/asg.py:parse_layers``); S2V's index k is its k-th injected block.

**Which rows are off-sync.** Core's ``calc_cond_batch`` (``comfy/samplers.py``) batches
condition lists into one ``apply_model`` call and puts ``cond_or_uncond`` (the list index of
each batch chunk) into ``transformer_options``. The off-sync branch is the positive
conditioning passed once more, as list entry ``off_index``; an ``APPLY_MODEL`` wrapper
(:meth:`AudioSyncHook.apply_model_wrapper`) turns the chunks with that index into a row mask
for the patched audio modules for the duration of the call. Outside such a call the mask is
empty and the patched modules run their original code.

**Batched, where core allows.** Core's post-CFG hook (``cfg_function``: ``sampler_post_cfg_
function``) only sees finished predictions, so ``SkipLayerGuidanceDiT``
(``comfy_extras/nodes_slg.py``) runs its skip branch as a separate ``calc_cond_batch``. Here
the branch is added to core's own cond/uncond call through ``sampler_calc_cond_batch_function``
(``comfy/samplers.py:sampling_function``): conds ``[cond, uncond, cond]`` in one call, the third
with audio skipped; the post-CFG hook then adds ``w_a·(cond − off)``. If the model already
carries another ``sampler_calc_cond_batch_function`` (another node's), that one is kept and the
off-sync branch is a separate call in the post-CFG hook, as SLG does.

**The combination** (in ComfyUI's denoised space, as SLG): ``out = cfg_result + w_a·(D(c) −
D_off-sync(c))``. Since D = x − σ·ε for both predictions, this is eq. 6's ``w_a(ε(c) − ε_off)``
term exactly; the CFG part is core's single-term ``u + cfg·(c − u)`` (= eq. 6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .asg import AudioSyncGuidanceSettings, resolve_layers

OFF_INDEX_KEY = "avsync_asg_off_index"   # transformer_options entry: which cond list index is off-sync


# --------------------------------------------------------------------------------------
# Which audio layers a core model has
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CoreAudioLayers:
    """A core model's audio layers: ``family`` ("wan-s2v" / "humo"), ``blocks`` (the
    transformer block index of each audio layer, forward order) and how to patch them."""

    family: str
    blocks: Tuple[int, ...]

    def patch_names(self, chosen: Sequence[int]) -> List[str]:
        """Object-patch names (relative to the ModelPatcher's model) of the modules to wrap."""
        if self.family == "wan-s2v":
            return ["diffusion_model.audio_injector.forward"]
        return [f"diffusion_model.blocks.{self.blocks[k]}.audio_cross_attn_wrapper.forward" for k in chosen]


def find_core_audio_layers(diffusion_model) -> Optional[CoreAudioLayers]:
    """The audio layers of a ComfyUI core diffusion model, or None if it has none.
    Recognised by the attributes core's classes have (``comfy/ldm/wan/model.py``):
    ``WanModel_S2V.audio_injector`` (an ``AudioInjector_WAN`` with ``injected_block_id``)
    and HuMo's ``blocks[i].audio_cross_attn_wrapper`` (``AudioCrossAttentionWrapper``)."""
    injector = getattr(diffusion_model, "audio_injector", None)
    if injector is not None and isinstance(getattr(injector, "injected_block_id", None), dict):
        ids = injector.injected_block_id               # block id → injector index (insertion order)
        return CoreAudioLayers("wan-s2v", tuple(sorted(ids, key=ids.get)))
    blocks = getattr(diffusion_model, "blocks", None)
    if blocks is not None:
        found = tuple(i for i, b in enumerate(blocks) if getattr(b, "audio_cross_attn_wrapper", None) is not None)
        if found:
            return CoreAudioLayers("humo", found)
    return None


def describe_core_audio_layers(layers: Optional[CoreAudioLayers]) -> str:
    if layers is None:
        return "no audio layers"
    return f"{len(layers.blocks)} audio layers ({layers.family}, in blocks {', '.join(map(str, layers.blocks))})"


# --------------------------------------------------------------------------------------
# Per-call row mask and the patched audio modules
# --------------------------------------------------------------------------------------

class OffSyncRows:
    """The rows of the current model call whose audio is skipped (None outside an off-sync call)."""

    __slots__ = ("mask",)

    def __init__(self):
        self.mask: Optional[torch.Tensor] = None


def off_sync_row_mask(cond_or_uncond: Sequence[int], rows: int, off_index: int) -> Optional[torch.Tensor]:
    """Bool mask over the ``rows`` of a model call made of ``len(cond_or_uncond)`` equal chunks
    (``comfy/samplers.py:_calc_cond_batch``), True for chunks of list entry ``off_index``."""
    chunks = len(cond_or_uncond)
    if chunks == 0 or rows % chunks:
        raise ValueError(f"ASG: {rows} rows do not split into {chunks} condition chunks")
    per_chunk = torch.tensor([c == off_index for c in cond_or_uncond])
    if not bool(per_chunk.any()):
        return None
    return per_chunk.repeat_interleave(rows // chunks)


def _keep_rows(mask: torch.Tensor, skipped: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
    view = mask.to(normal.device).view((-1,) + (1,) * (normal.dim() - 1))
    return torch.where(view, skipped, normal)


def s2v_injector_forward(original: Callable, skip_blocks: Sequence[int], rows: OffSyncRows) -> Callable:
    """Replacement of ``AudioInjector_WAN.forward(x, block_id, audio_emb, audio_emb_global,
    seq_len)``: for ``block_id`` in ``skip_blocks`` the off-sync rows keep their input tokens.
    The original writes its residual into ``x`` in place, so a partial skip gives it a copy."""
    skip = frozenset(skip_blocks)

    def forward(x, block_id, audio_emb, audio_emb_global, seq_len):
        mask = rows.mask
        if mask is None or block_id not in skip:
            return original(x, block_id, audio_emb, audio_emb_global, seq_len)
        if bool(mask.all()):
            return x
        injected = original(x.clone(), block_id, audio_emb, audio_emb_global, seq_len)
        return _keep_rows(mask, x, injected)

    return forward


def humo_wrapper_forward(original: Callable, rows: OffSyncRows) -> Callable:
    """Replacement of ``AudioCrossAttentionWrapper.forward(x, audio, transformer_options)``:
    the off-sync rows skip the audio cross-attention residual."""

    def forward(x, audio, transformer_options={}):
        mask = rows.mask
        if mask is None:
            return original(x, audio, transformer_options=transformer_options)
        if bool(mask.all()):
            return x
        return _keep_rows(mask, x, original(x, audio, transformer_options=transformer_options))

    return forward


# --------------------------------------------------------------------------------------
# The sampler hooks
# --------------------------------------------------------------------------------------

def combine(cfg_result: torch.Tensor, cond_pred: torch.Tensor, off_pred: torch.Tensor, w_a: float) -> torch.Tensor:
    """``cfg_result + w_a·(cond − off_sync)`` (denoised space; see the module docstring)."""
    return cfg_result + w_a * (cond_pred - off_pred)


class AudioSyncHook:
    """The functions the patched model carries. ``calc_cond_batch`` is core's
    ``comfy.samplers.calc_cond_batch``; ``sigma_start`` ≥ ``sigma_end`` are the σ of the start
    / end fractions (``model_sampling.percent_to_sigma``); ``batched``: join core's cond/uncond
    call (False when the model already has a ``sampler_calc_cond_batch_function``)."""

    def __init__(self, settings: AudioSyncGuidanceSettings, calc_cond_batch: Callable, sigma_start: float,
                 sigma_end: float, batched: bool = True):
        self.settings, self.calc_cond_batch = settings, calc_cond_batch
        self.sigma_start, self.sigma_end, self.batched = float(sigma_start), float(sigma_end), batched
        self.rows = OffSyncRows()
        self._pending: Optional[Tuple[torch.Tensor, torch.Tensor]] = None   # (input x, off-sync prediction)
        self.off_sync_calls = 0     # model evaluations that carried the off-sync branch (tests, logs)

    def active(self, sigma: torch.Tensor) -> bool:
        """σ in the [start, end) range of sampling (start ↔ the larger σ)."""
        s = float(sigma.flatten()[0])
        return self.settings.w_a != 0.0 and self.sigma_end < s <= self.sigma_start

    @staticmethod
    def _options(model_options: dict, off_index: int) -> dict:
        opts = dict(model_options)
        opts["transformer_options"] = {**opts.get("transformer_options", {}), OFF_INDEX_KEY: off_index}
        return opts

    def calc_cond_batch_function(self, args: Dict) -> List[torch.Tensor]:
        """``sampler_calc_cond_batch_function``: in range, conds ``[cond, uncond, cond]`` in one
        core call, the last with audio skipped; its prediction is kept for the post-CFG hook."""
        conds, x, sigma, model, opts = args["conds"], args["input"], args["sigma"], args["model"], args["model_options"]
        if not self.active(sigma):
            return self.calc_cond_batch(model, conds, x, sigma, opts)
        out = self.calc_cond_batch(model, list(conds) + [conds[0]], x, sigma, self._options(opts, len(conds)))
        self.off_sync_calls += 1
        self._pending = (x, out[-1])
        return out[:-1]

    def post_cfg_function(self, args: Dict) -> torch.Tensor:
        """``sampler_post_cfg_function``: ``denoised + w_a·(cond_denoised − off_sync)``."""
        cfg_result, x, sigma = args["denoised"], args["input"], args["sigma"]
        pending, self._pending = self._pending, None
        if not self.active(sigma):
            return cfg_result
        if pending is not None and pending[0] is x:
            off = pending[1]
        else:   # not batched (or another node's calc function ran): a separate pass, as SLG
            (off,) = self.calc_cond_batch(args["model"], [args["cond"]], x, sigma, self._options(args["model_options"], 0))
            self.off_sync_calls += 1
        return combine(cfg_result, args["cond_denoised"], off, self.settings.w_a)

    def apply_model_wrapper(self, executor, *args, **kwargs):
        """``APPLY_MODEL`` wrapper: sets the off-sync row mask for the call it wraps."""
        opts = kwargs.get("transformer_options")
        if opts is None:
            opts = next((a for a in args if isinstance(a, dict) and "cond_or_uncond" in a), {})
        off_index = opts.get(OFF_INDEX_KEY)
        if off_index is None:
            return executor(*args, **kwargs)
        x = args[0] if args else kwargs["x"]
        before = self.rows.mask
        self.rows.mask = off_sync_row_mask(opts.get("cond_or_uncond", []), x.shape[0], off_index)
        try:
            return executor(*args, **kwargs)
        finally:
            self.rows.mask = before


def plan_core_patch(settings: AudioSyncGuidanceSettings, diffusion_model,
                    get_original: Callable[[str], Callable], hook: AudioSyncHook) -> Dict[str, Callable]:
    """Object patches (name → replacement forward) that make ``hook.rows`` skip the chosen
    audio layers of ``diffusion_model``. ``get_original(name)`` returns the current
    ``forward`` (``ModelPatcher.get_model_object``, so earlier patches are chained).
    Raises ``ValueError`` for a model without audio layers or a selection it lacks."""
    layers = find_core_audio_layers(diffusion_model)
    count = 0 if layers is None else len(layers.blocks)
    chosen = resolve_layers(settings.layers, count, f"this model ({type(diffusion_model).__name__})")
    if layers.family == "wan-s2v":
        name = layers.patch_names(chosen)[0]
        return {name: s2v_injector_forward(get_original(name), [layers.blocks[k] for k in chosen], hook.rows)}
    return {name: humo_wrapper_forward(get_original(name), hook.rows) for name in layers.patch_names(chosen)}
