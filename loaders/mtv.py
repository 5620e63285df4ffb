"""MTV's released checkpoints: conversion to safetensors, and strict loading.

The release (``BAAI/MTVCraft``, ``mtv/{single,multi,accm}/1/mp_rank_00_model_states.pt`` plus a
``latest`` file naming the ``1`` folder) is SAT/DeepSpeed pickles: the whole SAT engine's
state dict under ``["module"]`` (``sat/training/model_io.py:save_ds_checkpoint`` →
DeepSpeed ``engine._save_checkpoint``) next to DeepSpeed's bookkeeping and the RNG states.

**Reading them with ``weights_only=True``** (the only way AVSync reads pickles): torch's
weights-only unpickler refuses the numpy RNG state SAT saves (``np.random.get_state()``:
a ``uint32`` array). Measured on files saved the way SAT/DeepSpeed save them (module dict,
DeepSpeed's keys with ``torch.Size`` param shapes, ``random``/numpy/torch RNG states), the
globals needed are exactly :func:`sat_safe_globals`: ``numpy.ndarray``, ``numpy.dtype``,
``numpy.dtypes.UInt32DType`` and ``numpy.core.multiarray._reconstruct`` (the name a numpy 1.x
saver writes; ``numpy._core.multiarray._reconstruct`` under numpy 2). They are allowed for that
one ``torch.load`` only (``torch.serialization.safe_globals``), never process-wide. None of them
can run code: ``_reconstruct`` builds an empty array of an allowed dtype, and object arrays
would need ``numpy.dtypes.ObjectDType``, which stays refused. Any other global in a file is
named in the error before anything is loaded (:func:`check_sat_globals`).

**Conversion** (``avsync convert mtv``, :func:`convert_sat_checkpoint`): keep
``model.diffusion_model.*``; split off every key containing ``audio`` first (→
``audio.<SAT key minus model.diffusion_model.transformer.>``, fused ``key_value`` kept); rename
the rest with diffusers' CogVideoX rules (→ ``backbone.<diffusers key>``: ``query_key_value`` →
``to_q/k/v``, ``adaLN_modulations`` → ``norm1.linear`` / ``norm2.linear``, ``freqs_*`` and
``position_embeddings`` dropped). The mapping is ``networks/mtv.py:sat_to_mtv_tensors`` (one rule
set for the converter and the parity test). Every key is checked against the network built on the
meta device before a byte is written; the file is written one tensor at a time from the
memory-mapped pickle (peak: one tensor), in bf16 or with fp8 storage
(``samplers/mtv_memory.py:FP8_SCOPES``).

The VAE comes from SAT's ``3d-vae.pt`` (:func:`convert_sat_vae`, diffusers' VAE rules) or a
diffusers ``vae/`` folder (:func:`load_mtv_vae`). T5-XXL comes from its usual sources (the
encoders' loader).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..core.errors import ModelFormatError
from .checked_file import load_pickled_checked, open_checked
from .common import _assign, _meta_module, check_state_fits, count_indexed, sha256_file, write_safetensors_streamed
from .model_files import ModelFileSpec, register

SAT_PREFIX = "model.diffusion_model."
AUDIO_SAT_PREFIX = SAT_PREFIX + "transformer."
CHECKPOINT_NAME = "mp_rank_00_model_states.pt"
FORMAT_TAG = "avsync_mtv_transformer"
VAE_FORMAT_TAG = "avsync_mtv_vae"
FOLDER = "avsync_mtv"
VARIANTS = ("single", "multi", "accm")
STORAGES = ("bf16", "fp8_e4m3fn")
RELEASE_REPO = "https://huggingface.co/BAAI/MTVCraft"
#: SAT's VAE scale (``configs/cogvideox_5b.yaml: scale_factor``)
VAE_SCALE = 0.7
#: Keys diffusers' converter drops (``convert_cogvideox_to_diffusers.py:TRANSFORMER_SPECIAL_KEYS_REMAP``):
#: RoPE tables (recomputed) and SAT's unused ``transformer.position_embeddings``.
_DROPPED_MARKERS = ("freqs_sin", "freqs_cos", "position_embedding", "embed_tokens")

CONVERT_COMMAND = "avsync convert mtv mtv/single --out models/avsync/mtv/mtv_single_bf16.safetensors"
SOURCE = (f"{RELEASE_REPO} (mtv/single, mtv/multi or mtv/accm: the folder with `latest` and "
          f"1/{CHECKPOINT_NAME}); convert once with: {CONVERT_COMMAND} (add --dtype fp8_e4m3fn for the "
          f"fp8 file)")
VAE_SOURCE = ("3d-vae.pt of the SAT CogVideoX release (THUDM/CogVideoX1.5-5B-SAT, vae/3d-vae.pt; converted with "
              "`avsync convert mtv --vae 3d-vae.pt --out models/avsync/mtv/mtv_vae.safetensors`) or a diffusers "
              "CogVideoX vae/ folder (THUDM/CogVideoX-5b/vae)")

SPECS = {
    v: register(ModelFileSpec(
        key=f"mtv_{v}", filename=f"mtv_{v}_bf16.safetensors", folder=FOLDER,
        source=SOURCE.replace("mtv/single --out", f"mtv/{v} --out").replace("mtv_single_bf16", f"mtv_{v}_bf16"),
        description=f"MTV transformer, {v} variant (CogVideoX-5B backbone in diffusers keys + MTV audio modules), "
                    f"bf16: {'25.2' if v == 'multi' else '23.2'} GB "
                    f"(fp8_e4m3fn file: {'12.7' if v == 'multi' else '11.7'} GB)",
    ))
    for v in VARIANTS
}
VAE_SPEC = register(ModelFileSpec(
    key="mtv_vae", filename="mtv_vae.safetensors", folder=FOLDER, source=VAE_SOURCE,
    description="CogVideoX 3D VAE (diffusers AutoencoderKLCogVideoX keys, scale 0.7), ~0.4 GB in bf16",
))


# --------------------------------------------------------------------------------------
# Reading SAT / DeepSpeed pickles
# --------------------------------------------------------------------------------------

def sat_safe_globals() -> list:
    """What ``torch.load(weights_only=True)`` must additionally build for a SAT/DeepSpeed
    ``mp_rank_00_model_states.pt``: the numpy RNG state (see the module docstring)."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct,
            (_reconstruct, "numpy.core.multiarray._reconstruct"),
            (_reconstruct, "numpy._core.multiarray._reconstruct")]


def _allowed_global_names() -> set[str]:
    names = set()
    for g in sat_safe_globals():
        if isinstance(g, tuple):
            names.add(g[1])
        else:
            names.add(f"{g.__module__}.{g.__qualname__}")
    return names | {"numpy.dtype", "numpy.ndarray"}


def check_sat_globals(path) -> None:
    """Refuse, naming them, globals in the pickle that :func:`sat_safe_globals` does not allow
    (reads the pickle stream only, no tensor data)."""
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a zip checkpoint: the checked reader reports the problem
        return
    extra = sorted(set(needed) - _allowed_global_names())
    if extra:
        raise ModelFormatError(
            f"{path}: the pickle needs globals that AVSync does not allow with weights_only=True: "
            f"{', '.join(extra)}. Expected a SAT/DeepSpeed mp_rank_00_model_states.pt of MTV ({RELEASE_REPO})")


def resolve_sat_checkpoint(src) -> Path:
    """``mp_rank_00_model_states.pt`` itself, or the folder with ``latest`` (SAT's layout:
    ``<folder>/<latest>/mp_rank_00_model_states.pt``), or the iteration folder holding the file."""
    src = Path(src)
    if src.is_file():
        return src
    if not src.is_dir():
        raise ModelFormatError(f"{src}: no such file or folder; expected {CHECKPOINT_NAME} or the MTV folder "
                               f"with `latest` ({SOURCE})")
    if (src / CHECKPOINT_NAME).is_file():
        return src / CHECKPOINT_NAME
    latest = src / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        path = src / tag / CHECKPOINT_NAME
        if not path.is_file():
            raise ModelFormatError(f"{latest} names iteration {tag!r} but {path} does not exist")
        return path
    raise ModelFormatError(f"{src}: holds neither `latest` nor {CHECKPOINT_NAME}; expected the MTV folder "
                           f"(mtv/single, mtv/multi or mtv/accm)")


def read_sat_checkpoint(src) -> tuple[Path, dict[str, torch.Tensor]]:
    """``(file, tensors)`` of a SAT checkpoint: ``torch.load(weights_only=True, mmap=True)`` with
    only :func:`sat_safe_globals` allowed; tensors stay on disk until read."""
    path = resolve_sat_checkpoint(src)
    check_sat_globals(path)
    state = load_pickled_checked(path, what=f"an MTV SAT checkpoint ({CHECKPOINT_NAME})",
                                 required_prefixes=(SAT_PREFIX,), family_hint=f"the released files: {SOURCE}",
                                 safe_globals=sat_safe_globals())
    return path, state


# --------------------------------------------------------------------------------------
# Key mapping
# --------------------------------------------------------------------------------------

def _mtv_net():
    from ..networks import mtv

    return mtv


@dataclass
class KeyPlan:
    """How each key of :class:`~avsync.networks.mtv.MTVTransformer` is made from the SAT file:
    ``ours -> (sat key, index into sat_to_mtv_tensors' output)``; ``dropped``: reason -> SAT keys."""

    sources: dict[str, tuple[str, int]]
    shapes: dict[str, tuple]
    dropped: dict[str, list[str]] = field(default_factory=dict)


_DROP_OUTSIDE = "outside model.diffusion_model. (the SAT engine's T5 / VAE, loaded from their own files)"
_DROP_UNUSED = "RoPE tables and SAT's unused position_embeddings (diffusers drops them too)"


def plan_keys(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> KeyPlan:
    """Map every SAT key by its shape alone (meta tensors: nothing is read). A key that no rule
    maps is an error that names it; so is an audio key outside ``transformer.``."""
    net = _mtv_net()
    sources: dict[str, tuple[str, int]] = {}
    shapes: dict[str, tuple] = {}
    dropped: dict[str, list[str]] = {}
    unknown = []
    for key in state:
        if not key.startswith(SAT_PREFIX):
            dropped.setdefault(_DROP_OUTSIDE, []).append(key)
            continue
        short = key[len(SAT_PREFIX):]
        if "audio" in short and not short.startswith("transformer."):
            unknown.append(key)
            continue
        if "audio" not in short and any(m in short for m in _DROPPED_MARKERS):
            dropped.setdefault(_DROP_UNUSED, []).append(key)
            continue
        t = state[key]
        meta = torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")
        try:
            outs = net.sat_to_mtv_tensors(key, meta)
        except (KeyError, RuntimeError):
            outs = []
        if not outs:
            unknown.append(key)
        for i, (ours, tensor) in enumerate(outs):
            if ours in sources:
                raise ModelFormatError(f"{source}: {key} and {sources[ours][0]} both map to {ours}")
            sources[ours] = (key, i)
            shapes[ours] = tuple(tensor.shape)
    if unknown:
        raise ModelFormatError(
            f"{source}: {len(unknown)} tensors match no MTV rule: {', '.join(sorted(unknown)[:6])}"
            + (f" and {len(unknown) - 6} more" if len(unknown) > 6 else ""))
    return KeyPlan(sources, shapes, dropped)


def infer_config(shapes: Mapping[str, tuple], variant: Optional[str] = None, **overrides):
    """The :class:`~avsync.networks.mtv.MTVConfig` whose network has these (our-key) shapes,
    from the tensors that fix each size; the latent grid and the 64-wide heads are the
    released ones unless ``overrides`` say otherwise (they are not visible in shapes alone, except
    through the positional embedding, which is checked)."""
    net = _mtv_net()
    base = net.MTVConfig.released(variant if variant in VARIANTS else "single")

    def shape(k):
        if k not in shapes:
            raise ModelFormatError(f"MTV checkpoint: missing tensor for {k}")
        return shapes[k]

    hidden = shape("backbone.patch_embed.proj.weight")[0]
    head_dim = overrides.pop("head_dim", base.head_dim)
    fields = dict(
        num_layers=count_indexed(shapes, r"backbone\.transformer_blocks\.(\d+)\."),
        num_heads=hidden // head_dim, head_dim=head_dim,
        in_channels=shape("backbone.patch_embed.proj.weight")[1],
        patch_size=shape("backbone.patch_embed.proj.weight")[2],
        text_dim=shape("backbone.patch_embed.text_proj.weight")[1],
        time_embed_dim=shape("backbone.time_embedding.linear_1.weight")[0],
        audio_dim=shape("audio.audio_proj.norm.weight")[0],
        audio_proj_hidden=shape("audio.audio_proj.proj1.weight")[0],
        dual_blocks=count_indexed(shapes, r"audio\.audio_combine\.dual_blocks\.(\d+)\."),
        speakers=2 if any(k.startswith("audio.layers.0.audio_attn_second.") for k in shapes) else 1,
    )
    p = fields["patch_size"]
    fields["out_channels"] = shape("backbone.proj_out.weight")[0] // (p * p)
    fields["audio_tokens"] = shape("audio.audio_proj.proj3.weight")[0] // fields["audio_dim"]
    fields["dual_mlp_dim"] = shape("audio.audio_combine.dual_blocks.0.mlp.dense_h_to_4h.weight")[0]
    fields.update(overrides)
    try:
        cfg = net.with_overrides(base, **fields)
        cfg.validate()
    except (TypeError, ValueError) as err:
        raise ModelFormatError(f"MTV checkpoint: its sizes make no valid MTV config ({err})") from None
    pos = shapes.get("backbone.patch_embed.pos_embedding")
    tokens = cfg.text_tokens + cfg.latent_frames * (cfg.latent_height // p) * (cfg.latent_width // p)
    if pos is not None and pos[1] != tokens:
        raise ModelFormatError(f"MTV checkpoint: the positional embedding has {pos[1]} positions, the "
                               f"{cfg.latent_frames}x{cfg.latent_height}x{cfg.latent_width} latent grid needs {tokens}")
    return cfg


def infer_variant(path: Path, config) -> str:
    """``multi`` from the tensors (two speakers); ``single`` / ``accm`` (one network, two
    fine-tunes) from the release's folder names."""
    if config.speakers == 2:
        return "multi"
    for part in reversed(path.parts):
        if part in ("single", "accm"):
            return part
    raise ModelFormatError(f"{path}: cannot tell the single-speaker from the accm (no conversation) weights by "
                           f"their tensors; pass --variant single or --variant accm")


# --------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------

class _Converted(Mapping):
    """Our key -> converted tensor, computed on access from the memory-mapped SAT tensors (one
    source tensor cached, so a fused ``query_key_value`` is read once for its three parts)."""

    def __init__(self, state, plan: KeyPlan, storage: str, dtype: torch.dtype):
        from ..samplers.mtv_memory import SCALE_SUFFIX, fp8_eligible

        self._state, self._plan, self._dtype = state, plan, dtype
        self._keys: dict[str, tuple[str, str]] = {}   # out key -> (our key, "value" | "q" | "scale")
        self._shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self._cache: OrderedDict[str, list] = OrderedDict()   # a few SAT tensors' outputs (LRU)
        self._scales: dict[str, torch.Tensor] = {}   # small; the writer stores scales before weights
        for ours, shape in plan.shapes.items():
            if storage == "fp8_e4m3fn" and fp8_eligible(ours, len(shape)):
                self._keys[ours] = (ours, "q")
                self._shapes[ours], self.dtypes[ours] = shape, torch.float8_e4m3fn
                scale_key = ours[: -len("weight")] + SCALE_SUFFIX
                self._keys[scale_key] = (ours, "scale")
                self._shapes[scale_key] = (shape[0],) + (1,) * (len(shape) - 1)
                self.dtypes[scale_key] = torch.float32
            else:
                self._keys[ours] = (ours, "value")
                self._shapes[ours], self.dtypes[ours] = shape, dtype

    def shape(self, key: str) -> tuple:
        return self._shapes[key]

    def _source(self, ours: str) -> torch.Tensor:
        sat_key, index = self._plan.sources[ours]
        if sat_key not in self._cache:
            self._cache[sat_key] = _mtv_net().sat_to_mtv_tensors(sat_key, self._state[sat_key])
            while len(self._cache) > 4:
                self._cache.popitem(last=False)
        self._cache.move_to_end(sat_key)
        return self._cache[sat_key][index][1]

    def __getitem__(self, key: str) -> torch.Tensor:
        from ..samplers.mtv_memory import fp8_scale, quantize_fp8

        ours, kind = self._keys[key]
        t = self._source(ours)
        if kind == "value":
            return t.to(self._dtype) if t.is_floating_point() else t
        if ours not in self._scales:
            self._scales[ours] = fp8_scale(t)
        if kind == "scale":
            return self._scales[ours]
        return quantize_fp8(t, self._scales[ours])[0]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


@dataclass
class ConversionResult:
    path: Path
    source: Path
    variant: str
    storage: str
    sha256: str
    size: int
    tensors: int
    dropped: dict[str, int]
    config: dict


def _storage_name(dtype: str) -> str:
    names = {"bf16": "bf16", "bfloat16": "bf16", "fp8": "fp8_e4m3fn", "fp8_e4m3fn": "fp8_e4m3fn"}
    if dtype not in names:
        raise ModelFormatError(f"unknown MTV storage dtype {dtype!r}; use bf16 or fp8_e4m3fn")
    return names[dtype]


def convert_sat_checkpoint(src, dst, dtype: str = "bf16", variant: Optional[str] = None, *,
                           hash_source: bool = True, log: Callable[[str], None] = lambda m: None,
                           stage: Optional[Callable[[Path], Path]] = None, config_overrides: Optional[dict] = None,
                           ) -> ConversionResult:
    """Convert one released MTV checkpoint (``src``: the file or its folder with ``latest``) into
    one safetensors file ``dst``: keys of :class:`~avsync.networks.mtv.MTVTransformer`, floats in
    bf16, or with ``dtype="fp8_e4m3fn"`` the :data:`~avsync.samplers.mtv_memory.FP8_SCOPES`
    weights in fp8 with per-channel fp32 scales (``<module>.weight_scale``). Every key and shape
    is checked first; metadata: format, variant, storage, config (json), source name and
    sha256 (``hash_source``: one extra read of the file)."""
    storage = _storage_name(dtype)
    if variant is not None and variant not in VARIANTS:
        raise ModelFormatError(f"unknown MTV variant {variant!r}; use one of {', '.join(VARIANTS)}")
    path, state = read_sat_checkpoint(src)
    plan = plan_keys(state, path.name)
    config = infer_config(plan.shapes, variant, **(config_overrides or {}))
    found = infer_variant(path, config) if variant is None else variant
    if (found == "multi") != (config.speakers == 2):
        raise ModelFormatError(f"{path}: --variant {found} but the tensors are those of the "
                               f"{'multi' if config.speakers == 2 else 'single/accm'} network")
    net = _mtv_net()
    own = _meta_module(lambda: net.MTVTransformer(config)).state_dict()
    check_state_fits(own, plan.shapes, f"{path.name} (MTV {found})",
                     shown=lambda k: f"{k} (from {plan.sources[k][0]})" if k in plan.sources else k)
    log(f"checked {len(plan.sources)} tensors of {path} against the MTV {found} network "
        f"({config.num_layers} layers, hidden {config.hidden})")
    meta = {"format": FORMAT_TAG, "variant": found, "storage": storage, "config": json.dumps(asdict(config)),
            "source": str(path.name), "fp8_scopes": "", "key_rules": "networks/mtv.py:sat_to_mtv_tensors"}
    if storage == "fp8_e4m3fn":
        from ..samplers.mtv_memory import FP8_SCOPES

        meta["fp8_scopes"] = ",".join(FP8_SCOPES)
    if hash_source:
        log(f"sha256 of {path.name} ...")
        meta["source_sha256"] = sha256_file(path)
    converted = _Converted(state, plan, storage, torch.bfloat16)
    dst = Path(dst)
    target = stage(dst) if stage is not None else dst
    log(f"writing {dst} ({len(converted)} tensors, {storage})")
    digest, size = write_safetensors_streamed(target, converted, converted.dtypes, meta)
    return ConversionResult(path=dst, source=path, variant=found, storage=storage, sha256=digest, size=size,
                            tensors=len(converted), dropped={r: len(k) for r, k in plan.dropped.items()},
                            config=asdict(config))


# --------------------------------------------------------------------------------------
# Strict loading
# --------------------------------------------------------------------------------------

def open_mtv_file(path):
    """The checked lazy tensors and metadata of a converted MTV transformer file."""
    path = Path(path)
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise ModelFormatError(f"{path}: the MTV loader reads only .safetensors made by `{CONVERT_COMMAND}`; "
                               f"pickled checkpoints are converted first")
    state = open_checked(path, what="an MTV transformer file (mtv_*_bf16.safetensors)",
                         required_prefixes=("backbone.", "audio."), family_hint=f"make it with `{CONVERT_COMMAND}`")
    meta = dict(state.metadata)
    if meta.get("format") != FORMAT_TAG:
        raise ModelFormatError(f"{path}: not an MTV file made by `avsync convert mtv` (metadata format="
                               f"{meta.get('format')!r}); convert with `{CONVERT_COMMAND}`")
    return state, meta


def load_mtv_transformer(path, device="cpu", dtype=torch.bfloat16, storage: str = "bf16"):
    """An :class:`~avsync.networks.mtv.MTVTransformer` from a converted file, strictly: every
    tensor of the network must be in the file with its shape and nothing else (the error names
    missing / unexpected keys). ``dtype``: compute dtype. ``storage="fp8"``: the fp8-scope
    weights stay fp8 (:class:`~avsync.samplers.mtv_memory.FP8Linear`); read from an fp8 file as
    stored, quantised on the fly from a bf16 file. ``storage="bf16"`` from an fp8 file dequantises."""
    from ..samplers.mtv_memory import SCALE_SUFFIX, dequantize_fp8, quantize_fp8, use_fp8_storage

    storage = {"bf16": "bf16", "fp8": "fp8", "fp8_e4m3fn": "fp8"}.get(storage)
    if storage is None:
        raise ModelFormatError("storage must be 'bf16' or 'fp8'")
    path = Path(path)
    state, meta = open_mtv_file(path)
    net = _mtv_net()
    try:
        config = net.MTVConfig(**json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ModelFormatError(f"{path}: its metadata holds no valid MTV config ({err}); convert again") from None
    model = _meta_module(lambda: net.MTVTransformer(config))
    file_fp8 = {k[: -len(SCALE_SUFFIX)] + "weight" for k in state if k.endswith("." + SCALE_SUFFIX)}
    # the file's key set in bf16 terms (scales folded away), checked strictly first
    plain = {k: state.shape(k) for k in state if not k.endswith("." + SCALE_SUFFIX)}
    check_state_fits(model.state_dict(), plain, f"{path.name} (MTV {meta.get('variant', '?')})")
    names = use_fp8_storage(model, dtype, quantize=False) if storage == "fp8" else []
    fp8_weights = {n + ".weight" for n in names}
    tensors = {}
    for key in plain:
        if key in fp8_weights:
            if key in file_fp8:
                tensors[key] = state[key]
                tensors[key[: -len("weight")] + SCALE_SUFFIX] = state[key[: -len("weight")] + SCALE_SUFFIX].float()
            else:
                q, scale = quantize_fp8(state[key])
                tensors[key], tensors[key[: -len("weight")] + SCALE_SUFFIX] = q, scale
        elif key in file_fp8:
            tensors[key] = dequantize_fp8(state[key], state[key[: -len("weight")] + SCALE_SUFFIX], dtype)
        else:
            t = state[key]
            tensors[key] = t.to(dtype) if t.is_floating_point() else t
    model = _assign(model, tensors, f"{path.name} (MTV)")
    return model.to(device)


# --------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------

#: ``convert_cogvideox_to_diffusers.py:VAE_KEYS_RENAME_DICT`` (ordered substring renames)
_VAE_RENAMES = (
    ("block.", "resnets."), ("down.", "down_blocks."), ("downsample", "downsamplers.0"), ("upsample", "upsamplers.0"),
    ("nin_shortcut", "conv_shortcut"), ("encoder.mid.block_1", "encoder.mid_block.resnets.0"),
    ("encoder.mid.block_2", "encoder.mid_block.resnets.1"), ("decoder.mid.block_1", "decoder.mid_block.resnets.0"),
    ("decoder.mid.block_2", "decoder.mid_block.resnets.1"),
)


def sat_vae_key(key: str, num_up: int = 4) -> Optional[str]:
    """diffusers ``AutoencoderKLCogVideoX`` key of a SAT ``3d-vae.pt`` key (None: ``loss.*``,
    dropped): the ordered renames, then ``up.{i}`` → ``up_blocks.{num_up-1-i}``
    (``replace_up_keys_inplace``)."""
    if "loss" in key:
        return None
    for old, new in _VAE_RENAMES:
        key = key.replace(old, new)
    if "up." in key:
        parts = key.split(".")
        parts[1], parts[2] = "up_blocks", str(num_up - 1 - int(parts[2]))
        key = ".".join(parts)
    return key


def _vae_module(config: Optional[dict] = None):
    from diffusers import AutoencoderKLCogVideoX

    cfg = dict(config or {})
    cfg["scaling_factor"] = VAE_SCALE
    return _meta_module(lambda: AutoencoderKLCogVideoX.from_config(cfg))


def convert_sat_vae(src, dst, dtype: str = "bf16", *, stage=None, vae_config: Optional[dict] = None):
    """SAT ``3d-vae.pt`` (``["state_dict"]``, ``loss.*`` dropped) → a safetensors file in diffusers
    keys, checked strictly against ``AutoencoderKLCogVideoX`` (released sizes) first."""
    from .svd import parse_dtype

    src, dst = Path(src), Path(dst)
    state = load_pickled_checked(src, what="the CogVideoX SAT VAE (3d-vae.pt)", required_prefixes=("encoder.", "decoder."),
                                 family_hint=VAE_SOURCE, safe_globals=sat_safe_globals())
    vae = _vae_module(vae_config)
    num_up = len(vae.decoder.up_blocks)
    mapped = {}
    for k in state:
        new = sat_vae_key(k, num_up)
        if new is not None:
            mapped[new] = k
    check_state_fits(vae.state_dict(), {n: tuple(state[o].shape) for n, o in mapped.items()}, f"{src.name} (VAE)",
                     shown=lambda k: f"{k} (from {mapped.get(k, '?')})")
    torch_dtype = parse_dtype(dtype)
    tensors = {n: state[o] for n, o in mapped.items()}
    meta = {"format": VAE_FORMAT_TAG, "scaling_factor": str(VAE_SCALE), "source": src.name,
            "config": json.dumps(dict(vae.config))}
    target = stage(dst) if stage is not None else dst
    return write_safetensors_streamed(target, tensors, {k: torch_dtype for k in tensors}, meta)


def load_mtv_vae(path, device="cpu", dtype=torch.bfloat16):
    """``AutoencoderKLCogVideoX`` (scale 0.7) from a converted ``mtv_vae.safetensors`` or a
    diffusers ``vae/`` folder (or a model folder holding ``vae/``), strictly."""
    from .svd import _read_component

    path = Path(path)
    if path.is_dir():
        folder = path / "vae" if (path / "vae").is_dir() else path
        cfg, state = _read_component(folder, "diffusion_pytorch_model", "vae/")
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    else:
        state = open_checked(path, what="the MTV VAE (mtv_vae.safetensors)", required_prefixes=("encoder.", "decoder."),
                             family_hint=VAE_SOURCE)
        if state.metadata.get("format") != VAE_FORMAT_TAG:
            raise ModelFormatError(f"{path}: not a VAE file made by `avsync convert mtv --vae`")
        cfg = json.loads(state.metadata.get("config", "{}"))
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    vae = _vae_module(cfg)
    tensors = {k: state[k].to(dtype) for k in state}
    return _assign(vae, tensors, f"{path.name} (MTV VAE)").to(device)
