"""Demix model files: the released MRX checkpoints, their conversion to safetensors,
and loading them into :class:`~avsync.networks.mrx.MRX`.

A converted file is a safetensors ``state_dict`` in the released key layout, with
metadata ``avsync_family`` (``"mrx"``) and ``avsync_config`` (the JSON of
:class:`~avsync.networks.mrx.MRXConfig`, which holds what the tensors cannot tell:
the hop, the sample rate and the source order). Pickled checkpoints are read only by
:func:`convert_checkpoint`, with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .. import compat
from ..core.errors import ModelFormatError
from .checked_file import load_pickled_checked, open_checked
from .model_files import ModelFileSpec, register

FOLDER = "avsync_demix"
FAMILIES = ("mrx", "bandit_v2")

_REPO = "https://github.com/merlresearch/cocktail-fork-separation"
_RELEASED = {
    # key: (released file, sha256 of the released .pth (git LFS pointer), size, what it is)
    "mrx_default": ("default_mrx_pre_trained_weights.pth",
                    "9cecc071c9e58afda34d1a98609a1540f61320e718bafecc4c9c1c5e3ed20a0c", 122317463,
                    "MRX trained on Divide and Remaster with an SNR loss (output level matches the mixture)."),
    "mrx_adapted_loudness": ("adapted_loudness_mrx_pre_trained_weights.pth",
                             "4bc4eabf554cf980d3328a2c45452c47beca1ca76324d75583e7587377dce409", 122317657,
                             "MRX adapted to real film stems by loudness-normalising DnR stems (SDX23 CDX)."),
    "mrx_adapted_eq": ("adapted_eq_mrx_pre_trained_weights.pth",
                       "e49928fce323b6da017373b7c833dde13c957abd4dbfd002c556ed0a64f29b55", 122317657,
                       "MRX adapted to real film stems by equalising DnR stems (SDX23 CDX)."),
    "mrx_paper": ("paper_mrx_pre_trained_weights.pth",
                  "e206fe97739a1fd5ba66d2a4a1e3f68c16f0e3eb8cb7b25ec93d53e7b429f58f", 122316769,
                  "MRX as in the ICASSP paper (SI-SDR loss: output level does NOT match the mixture)."),
}

SPECS: dict[str, ModelFileSpec] = {}


def _register(key: str, source: str, description: str, size: str) -> None:
    SPECS[key] = register(ModelFileSpec(key=key, filename=f"{key}.safetensors", folder=FOLDER, source=source,
                                        description=description, size=size))


for _key, (_file, _sha, _size, _desc) in _RELEASED.items():
    _register(_key, f"{_REPO}/raw/main/checkpoints/{_file} (git LFS, MIT; .pth sha256 {_sha}), then "
                    f"`avsync convert demix {_file} {_key}.safetensors`",
              _desc + " Speech / music / effects at 44.1 kHz.", f"{_size / 1e6:.0f} MB")
DEFAULT_KEY = "mrx_default"

_BANDIT_RECORD = "https://zenodo.org/records/12701995"
_BANDIT_RELEASED = {
    # key: (released file, sha256 of the .ckpt as quoted by third-party projects — not checked here, no download
    # is possible on the build machine —, what it is)
    "bandit_v2_multi": ("checkpoint-multi.ckpt",
                        "abcfccf65446752a057f4a302c941479a54b7560ebf8d7bca039d2ea98e64cfc",
                        "BandIt v2 trained on multilingual DnR v3 (the paper's main model)."),
    "bandit_v2_eng": ("checkpoint-eng.ckpt", "3d14c48399ddb42be6fca6c316adc1b7d67d0e648e4e937359811aa6fa8b8cd2",
                      "BandIt v2 trained on the English part of DnR v3."),
}
for _key, (_file, _sha, _desc) in _BANDIT_RELEASED.items():
    _register(_key, f"{_BANDIT_RECORD}/files/{_file} (Zenodo, weights CC BY-SA 4.0, code Apache-2.0; .ckpt ~447 MB, "
                    f"sha256 {_sha} as quoted by others), then `avsync convert demix {_file} {_key}.safetensors`",
              _desc + " Speech / music / effects at 48 kHz, each channel separated on its own.", "149 MB")
BANDIT_DEFAULT_KEY = "bandit_v2_multi"
# chunks per network call (the reference: inference_batch_size 10 on a GPU). One 8 s chunk of one channel at
# the released size already needs ~0.7 GB of working memory (bench/bench_demix.py), so one at a time on a CPU
BANDIT_CHUNK_BATCH = 1


@dataclass
class DemixModel:
    """What ``AVSYNC_DEMIX_MODEL`` carries: the managed network and how to call it."""

    family: str
    managed: "compat.ManagedModel"
    sample_rate: int
    source_names: tuple          # the network's output order
    min_length: int              # shortest input (samples at sample_rate) the network accepts
    name: str = ""
    # the family's own chunker, e.g. BandIt v2's {"kind": "bandit", "chunk_seconds": 8, "hop_seconds": 1};
    # None: AVSync's cross-faded chunks (samplers/chunking.py)
    chunking: Optional[dict] = None
    loudness_normalize: bool = True   # MRX's separate.py brings input to -27 LUFS; BandIt's inference.py does not

    def stem_index(self, stem: str) -> int:
        """Index of AVSync's stem (speech / effects / music) in the network's output."""
        aliases = {"speech": ("speech", "dialog", "dialogue", "vocals"), "effects": ("sfx", "effects", "effect"),
                   "music": ("music",)}[stem]
        for i, n in enumerate(self.source_names):
            if n.lower() in aliases:
                return i
        raise ModelFormatError(f"{self.name}: model has no {stem} source (its sources: {', '.join(self.source_names)})")


def _strip_prefixes(sd: dict) -> dict:
    """Released ``.pth`` files are plain state dicts; a Lightning ``.ckpt`` from the
    reference training script nests them in ``state_dict`` with a ``model.`` prefix."""
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if all(k.startswith("model.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items()}
    return sd


def convert_checkpoint(src: str | Path, dst: str | Path, family: str = "auto", hop: Optional[int] = None,
                       sample_rate: Optional[int] = None, source_names: Optional[list] = None) -> Path:
    """Read a released pickled checkpoint (``weights_only=True``), check it builds the
    network, and write safetensors with the config in the metadata. ``family``
    ``auto`` tells MRX from BandIt v2 by the tensor names; ``sample_rate`` defaults to
    the family's released rate (MRX 44100, BandIt v2 48000) and ``hop`` (the STFT hop,
    which no checkpoint stores) to its released hop (MRX 256, BandIt v2 512)."""
    from safetensors.torch import save_file

    from ..networks.mrx import MRX, config_from_state_dict
    from . import demix_bandit

    if family not in FAMILIES + ("auto",):
        raise ModelFormatError(f"unknown demix family {family!r}; known: {', '.join(FAMILIES)}")
    src, dst = Path(src), Path(dst)
    raw = load_pickled_checked(src, what="a released demix checkpoint (MRX *_mrx_pre_trained_weights.pth or "
                                         "a BandIt v2 Lightning .ckpt)", mmap=False)
    if family == "auto":
        family = demix_bandit.FAMILY if demix_bandit.looks_like_bandit(raw) else "mrx"
    if family == demix_bandit.FAMILY:
        if not demix_bandit.looks_like_bandit(raw):
            raise ModelFormatError(f"{src}: not a BandIt v2 checkpoint (no band_split.norm_fc_modules.* tensors)")
        return demix_bandit.convert(raw, src, dst, sample_rate or 48000, source_names, hop_length=hop or 512)
    if demix_bandit.looks_like_bandit(raw):
        raise ModelFormatError(f"{src}: is a BandIt v2 checkpoint, not MRX: convert it with --family bandit_v2")
    sample_rate, hop = sample_rate or 44100, hop or 256
    sd = _strip_prefixes(raw)
    try:
        cfg = config_from_state_dict(sd, n_hop=hop, sample_rate=sample_rate)
    except (KeyError, IndexError) as err:
        raise ModelFormatError(f"{src}: not an MRX state dict (missing {err})") from None
    if source_names:
        cfg.source_names = list(source_names)
    net = MRX(cfg)
    _load_strict(net, sd, src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(dst),
              metadata={"avsync_family": family, "avsync_config": json.dumps(cfg.to_dict())})
    return dst


def _load_strict(net: torch.nn.Module, sd: dict, path) -> None:
    missing, unexpected = net.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ModelFormatError(f"{path}: does not match the {type(net).__name__} layout "
                               f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})")


def load_demix_model(path: str | Path) -> DemixModel:
    """Build the network of a converted demix file (safetensors only)."""
    from ..networks.mrx import MRX, MRXConfig, config_from_state_dict

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ModelFormatError(f"{path}: demix models are loaded from .safetensors only; convert a released "
                               f"checkpoint once with `avsync convert demix {path.name} {path.stem}.safetensors`")
    from . import demix_bandit
    from .checked_file import read_safetensors_header

    hint = "convert a released checkpoint with `avsync convert demix IN.pth|IN.ckpt OUT.safetensors`"
    header = read_safetensors_header(path, what="a converted MRX or BandIt v2 demix model", family_hint=hint)
    family = header.get("__metadata__", {}).get("avsync_family")
    if family is None:
        family = demix_bandit.FAMILY if demix_bandit.looks_like_bandit(header) else "mrx"
    if family not in FAMILIES:
        raise ModelFormatError(f"{path}: demix family {family!r} is not supported (known: {', '.join(FAMILIES)})")
    if family == demix_bandit.FAMILY:
        checked = open_checked(path, what="a converted BandIt v2 demix model (e.g. bandit_v2_multi.safetensors)",
                               required_prefixes=demix_bandit.REQUIRED_PREFIXES, family_hint=hint)
        net, bcfg = demix_bandit.build({k: checked[k] for k in checked}, checked.metadata, path)
        net.eval().requires_grad_(False)
        managed = compat.manage_model(net, {"file": str(path), "family": family, "config": bcfg.to_dict()})
        return DemixModel(family=family, managed=managed, sample_rate=bcfg.sample_rate,
                          source_names=tuple(bcfg.stems), min_length=net.min_length, name=path.name,
                          chunking={"kind": "bandit", "chunk_seconds": bcfg.chunk_seconds,
                                    "hop_seconds": bcfg.hop_seconds, "batch": BANDIT_CHUNK_BATCH},
                          loudness_normalize=False)
    checked = open_checked(path, what="a converted MRX demix model (e.g. mrx_default.safetensors)",
                           required_prefixes=("_encoders.", "_decoders."), family_hint=hint)
    meta = checked.metadata
    sd = {k: checked[k] for k in checked}
    if "avsync_config" in meta:
        cfg = MRXConfig(**json.loads(meta["avsync_config"]))
    else:  # converted by another tool: shapes give the architecture, the hop is the released default
        cfg = config_from_state_dict(sd)
    net = MRX(cfg)
    _load_strict(net, sd, path)
    net.eval().requires_grad_(False)
    managed = compat.manage_model(net, {"file": str(path), "family": family, "config": cfg.to_dict()})
    return DemixModel(family=family, managed=managed, sample_rate=cfg.sample_rate,
                      source_names=tuple(cfg.source_names), min_length=net.min_length, name=path.name)


# ----------------------------------------------------------------------------------------
# The network of the Demixer's `learned` method (ours, shipped in the repository)
# ----------------------------------------------------------------------------------------

SMALL_DEMIXER_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "small_demixer.safetensors"
_SMALL_DEMIXERS: dict = {}


def load_small_demixer(path: str | Path = SMALL_DEMIXER_WEIGHTS):
    """The :class:`~avsync.networks.small_demixer.SmallDemixer` of ``path`` (default: the
    file shipped in ``weights/``), built once per path and process (it is 4.6 MB, so it
    stays on the CPU outside ComfyUI's model management)."""
    from ..networks.small_demixer import SmallDemixer, SmallDemixerConfig

    path = Path(path)
    key = str(path.resolve())
    if key not in _SMALL_DEMIXERS:
        checked = open_checked(path, what="the network of the Demixer's learned method "
                                          "(weights/small_demixer.safetensors, shipped with AVSync)",
                               required_prefixes=("inp.", "rnn.", "out."),
                               family_hint="restore it from the repository, or retrain it with "
                                           "tools/train_small_demixer.py")
        meta = checked.metadata or {}
        if meta.get("avsync_family", "small_demixer") != "small_demixer":
            raise ModelFormatError(f"{path}: is a {meta['avsync_family']} file, not the learned demixer")
        try:
            config = SmallDemixerConfig(**json.loads(meta.get("avsync_config", "{}")))
        except (TypeError, ValueError) as err:
            raise ModelFormatError(f"{path}: unreadable avsync_config metadata ({err})") from None
        net = SmallDemixer(config)
        try:
            _load_strict(net, {k: checked[k].float() for k in checked}, path)
        except RuntimeError as err:   # a tensor of another shape
            raise ModelFormatError(f"{path}: does not match the SmallDemixer layout of its config "
                                   f"({str(err).strip().splitlines()[-1][:200]})") from None
        _SMALL_DEMIXERS[key] = net.eval().requires_grad_(False)
    return _SMALL_DEMIXERS[key]
