"""The one module of AVSync that touches ComfyUI.

Everything ComfyUI-specific goes through here, imported lazily, so that every
other module imports and runs without ComfyUI (tests, the command line):

* progress bars (ComfyUI's ``ProgressBar`` is also where a user's Cancel is noticed),
* interruption checks,
* devices, offloading and cache clearing (``comfy.model_management``),
* wrapping our models in ``ModelPatcher`` so that "unload models" frees them,
* model folders (``folder_paths``) and the input folder.

Outside ComfyUI each of these falls back to a plain equivalent: a logging progress
reporter, a no-op interrupt check, CUDA-if-available, and a models directory given
by ``--models`` or ``AVSYNC_MODELS_DIR``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

log = logging.getLogger("avsync")

MODEL_EXTENSIONS = (".safetensors", ".sft")


# --------------------------------------------------------------------------------------
# Is ComfyUI there?
# --------------------------------------------------------------------------------------

def _comfy_module(name: str):
    """Return ``comfy.<name>`` / ``folder_paths`` if ComfyUI is running, else None.

    We only look at modules ComfyUI has *already* imported: importing ``comfy``
    ourselves outside ComfyUI would parse argv and try to initialise CUDA.
    """
    if name == "folder_paths":
        return sys.modules.get("folder_paths")
    if "comfy.model_management" not in sys.modules and os.environ.get("AVSYNC_FORCE_COMFY") != "1":
        return None
    try:
        import importlib

        return importlib.import_module(name)
    except Exception as err:  # pragma: no cover - only inside a broken ComfyUI
        log.warning("AVSync: could not import %s (%s); using the plain fallback", name, err)
        return None


def in_comfyui() -> bool:
    return "comfy.model_management" in sys.modules and "folder_paths" in sys.modules


# --------------------------------------------------------------------------------------
# Progress and cancellation
# --------------------------------------------------------------------------------------

class Progress:
    """A progress reporter. Inside ComfyUI it drives ``comfy.utils.ProgressBar``
    (whose hook raises when the user pressed Cancel); outside it logs at most
    twice a second and calls an optional callback (the CLI's bar, tests).
    """

    def __init__(self, total: int, desc: str = "", callback: Optional[Callable[[int, int], None]] = None):
        self.total = max(int(total), 1)
        self.value = 0
        self.desc = desc
        self._callback = callback or _default_callback
        self._bar = None
        utils = _comfy_module("comfy.utils")
        if utils is not None:
            self._bar = utils.ProgressBar(self.total)
        self._last_log = 0.0

    def update(self, n: int = 1, preview: Any = None) -> None:
        self.update_absolute(self.value + n, preview=preview)

    def update_absolute(self, value: int, total: Optional[int] = None, preview: Any = None) -> None:
        if total is not None:
            self.total = max(int(total), 1)
        self.value = min(int(value), self.total)
        if self._bar is not None:
            self._bar.update_absolute(self.value, self.total, preview)
        # Also directly: newer ComfyUI throttles the ProgressBar hook (>= 100 ms between calls),
        # and that hook is where Cancel used to be noticed; a step that ends inside the
        # throttle window would otherwise run one more step after Cancel.
        check_interrupted()
        if self._callback is not None:
            if self._callback is _default_callback and _default_callback_wants_desc:
                self._callback(self.value, self.total, self.desc)
            else:
                self._callback(self.value, self.total)
        now = time.monotonic()
        if self._bar is None and (now - self._last_log > 0.5 or self.value == self.total):
            self._last_log = now
            log.debug("%s %d/%d", self.desc, self.value, self.total)


_default_callback: Optional[Callable[..., None]] = None
_default_callback_wants_desc = False


def set_default_progress_callback(fn: Optional[Callable[..., None]], *, with_desc: bool = False) -> None:
    """The CLI installs its progress reporter here; ComfyUI does not need it. ``fn(value, total)``,
    or ``fn(value, total, desc)`` with ``with_desc``."""
    global _default_callback, _default_callback_wants_desc
    _default_callback = fn
    _default_callback_wants_desc = bool(with_desc)


class Interrupted(RuntimeError):
    """Raised outside ComfyUI when :func:`request_interrupt` was called."""


_interrupt_requested = False


def request_interrupt(flag: bool = True) -> None:
    """Outside ComfyUI: make the next :func:`check_interrupted` raise (tests, Ctrl-C)."""
    global _interrupt_requested
    _interrupt_requested = flag


def check_interrupted() -> None:
    """Raise if the user cancelled. Call it in long loops that have no progress bar."""
    global _interrupt_requested
    mm = _comfy_module("comfy.model_management")
    if mm is not None:
        check = getattr(mm, "throw_exception_if_processing_interrupted", None)
        if check is not None:
            check()
        elif getattr(mm, "processing_interrupted", lambda: False)():
            raise getattr(mm, "InterruptProcessingException", Interrupted)()
        return
    if _interrupt_requested:
        _interrupt_requested = False
        raise Interrupted("AVSync: interrupted")


# --------------------------------------------------------------------------------------
# Devices and memory
# --------------------------------------------------------------------------------------

def torch_device():
    import torch

    mm = _comfy_module("comfy.model_management")
    if mm is not None:
        return mm.get_torch_device()
    forced = os.environ.get("AVSYNC_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def offload_device():
    import torch

    mm = _comfy_module("comfy.model_management")
    if mm is not None:
        return mm.unet_offload_device()
    return torch.device("cpu")


def intermediate_device():
    import torch

    mm = _comfy_module("comfy.model_management")
    if mm is not None:
        return mm.intermediate_device()
    return torch.device("cpu")


def free_memory_bytes(device=None) -> Optional[int]:
    """Free memory on ``device`` in bytes (None when unknown, e.g. plain CPU)."""
    import torch

    device = device or torch_device()
    mm = _comfy_module("comfy.model_management")
    if mm is not None:
        return int(mm.get_free_memory(device))
    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return None


def soft_empty_cache() -> None:
    import torch

    mm = _comfy_module("comfy.model_management")
    if mm is not None:
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def free_memory(required_bytes: int, device=None) -> None:
    """Make ``required_bytes`` free on ``device`` for work that ComfyUI's loader does not see (block swap
    streams weights itself): inside ComfyUI its ``free_memory`` unloads other models (e.g. a text encoder
    still resident after encoding); outside, the cache is emptied."""
    mm = _comfy_module("comfy.model_management")
    if mm is not None:
        mm.free_memory(int(required_bytes), device or torch_device())
    soft_empty_cache()


# --------------------------------------------------------------------------------------
# Models under ComfyUI's memory management
# --------------------------------------------------------------------------------------

@dataclass
class ManagedModel:
    """An ``nn.Module`` held the way ComfyUI holds its own models.

    Inside ComfyUI ``patcher`` is a ``comfy.model_patcher.ModelPatcher``, so the
    "Unload models" button and ComfyUI's memory planning see and free it. Outside,
    the module simply moves between ``load_device`` and ``offload_device``.
    """

    module: Any
    load_device: Any
    offload_device: Any
    patcher: Any = None
    info: Optional[dict] = None

    def load(self, memory_required: int = 0):
        """Put the model on its load device (ComfyUI may unload others first); return the module."""
        mm = _comfy_module("comfy.model_management")
        if self.patcher is not None and mm is not None:
            # force_full_load: ComfyUI's partial (low-VRAM) loading only streams weights of
            # its own comfy.ops layers; plain torch/diffusers layers that did not fit would
            # be left on the CPU. ComfyUI still unloads other models to make room for ours.
            mm.load_models_gpu([self.patcher], memory_required=memory_required, force_full_load=True)
            return self.patcher.model.inner
        self.module.to(self.load_device)
        return self.module

    def offload(self) -> None:
        if self.patcher is None:
            self.module.to(self.offload_device)
            soft_empty_cache()


def _patcher_host(module):
    """An ``nn.Module`` that holds ``module`` as its only child.

    ModelPatcher writes bookkeeping attributes onto the model it wraps (``device``,
    ``model_loaded_weight_memory``, ...); diffusers and transformers models have a
    read-only ``device`` property, so they are wrapped in a plain host instead.
    """
    import torch

    class PatcherHost(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    return PatcherHost(module)


def manage_model(module, info: Optional[dict] = None) -> ManagedModel:
    """Wrap a freshly built model so that ComfyUI can load, offload and free it."""
    load, off = torch_device(), offload_device()
    patcher = None
    mp = _comfy_module("comfy.model_patcher")
    if mp is not None:
        patcher = mp.ModelPatcher(_patcher_host(module), load_device=load, offload_device=off)
    module.to(off)
    return ManagedModel(module=module, load_device=load, offload_device=off, patcher=patcher, info=info)


# --------------------------------------------------------------------------------------
# Model folders
# --------------------------------------------------------------------------------------

# AVSync's own folders: name -> path below ComfyUI's models directory.
AVSYNC_MODEL_FOLDERS = {
    "avsync_localizer": "avsync/localizer",
    "avsync_demix": "avsync/demix",
    "avsync_keyvid": "avsync/keyvid",
    "avsync_svd_backward": "avsync/svd_backward",
    "avsync_mtv": "avsync/mtv",
}

_models_dir_override: Optional[Path] = None


def set_models_dir(path: Optional[str | os.PathLike]) -> None:
    """Outside ComfyUI: the models directory (``--models``); overrides ``AVSYNC_MODELS_DIR``."""
    global _models_dir_override
    _models_dir_override = Path(path).expanduser().resolve() if path else None


def models_dir() -> Path:
    """The models directory outside ComfyUI (``--models``, ``AVSYNC_MODELS_DIR``, or ./models)."""
    if _models_dir_override is not None:
        return _models_dir_override
    env = os.environ.get("AVSYNC_MODELS_DIR")
    return Path(env).expanduser().resolve() if env else Path.cwd() / "models"


def register_model_folders() -> None:
    """Register AVSync's folders with ComfyUI, merging with paths that
    ``extra_model_paths.yaml`` may already have given (it is applied before packs load)."""
    fp = _comfy_module("folder_paths")
    if fp is None:
        return
    for name, sub in AVSYNC_MODEL_FOLDERS.items():
        default = os.path.join(fp.models_dir, *sub.split("/"))
        paths, exts = fp.folder_names_and_paths.get(name, ([], set()))
        paths = list(paths)
        if default not in paths:
            paths.append(default)
        fp.folder_names_and_paths[name] = (paths, set(exts) | set(MODEL_EXTENSIONS))


def model_folder_paths(folder: str) -> list[Path]:
    """Directories searched for ``folder`` (an AVSync folder or a core one like ``checkpoints``)."""
    fp = _comfy_module("folder_paths")
    if fp is not None:
        try:
            return [Path(p) for p in fp.get_folder_paths(folder)]
        except KeyError:
            return []
    sub = AVSYNC_MODEL_FOLDERS.get(folder, folder)
    return [models_dir().joinpath(*sub.split("/"))]


def list_model_files(folder: str, extensions: Iterable[str] = MODEL_EXTENSIONS, include_dirs: bool = False) -> list[str]:
    """File names (relative to the folder, forward slashes) found in ``folder``.

    ``include_dirs`` also lists sub-directories (diffusers-format model folders).
    """
    fp = _comfy_module("folder_paths")
    exts = tuple(e.lower() for e in extensions)
    if fp is not None and not include_dirs:
        try:
            return sorted(f for f in fp.get_filename_list(folder) if f.lower().endswith(exts))
        except KeyError:
            return []
    found: set[str] = set()
    for base in model_folder_paths(folder):
        if not base.is_dir():
            continue
        for p in base.rglob("*"):
            if p.is_file() and p.name.lower().endswith(exts):
                found.add(p.relative_to(base).as_posix())
            elif include_dirs and p.is_dir() and (p / "model_index.json").is_file():
                found.add(p.relative_to(base).as_posix())
    return sorted(found)


def find_model_file(folder: str, name: str) -> Optional[Path]:
    """The full path of ``name`` in ``folder``, or None."""
    for base in model_folder_paths(folder):
        p = base.joinpath(*name.split("/"))
        if p.exists():
            return p
    return None


def clip_bpe_tokenizer_dir() -> Optional[Path]:
    """ComfyUI's copy of the CLIP BPE vocabulary (``comfy/sd1_tokenizer``: ``vocab.json``,
    ``merges.txt``) when ComfyUI has imported ``comfy``; None otherwise."""
    comfy = sys.modules.get("comfy")
    if comfy is None or not getattr(comfy, "__file__", None):
        return None
    d = Path(comfy.__file__).parent / "sd1_tokenizer"
    return d if (d / "vocab.json").is_file() and (d / "merges.txt").is_file() else None


def comfy_t5_tokenizer_dir() -> Optional[Path]:
    """ComfyUI's copy of the T5 v1.1 tokenizer (``comfy/text_encoders/t5_tokenizer``: ``tokenizer.json``)
    when ComfyUI has imported ``comfy``; None otherwise."""
    comfy = sys.modules.get("comfy")
    if comfy is None or not getattr(comfy, "__file__", None):
        return None
    d = Path(comfy.__file__).parent / "text_encoders" / "t5_tokenizer"
    return d if (d / "tokenizer.json").is_file() else None


# --------------------------------------------------------------------------------------
# Input folder
# --------------------------------------------------------------------------------------

def input_directory() -> Optional[Path]:
    """ComfyUI's input folder, or None outside ComfyUI (then any path is allowed)."""
    fp = _comfy_module("folder_paths")
    if fp is None:
        return None
    return Path(fp.get_input_directory())


def annotated_input_path(name: str) -> Path:
    """Resolve a name from a ComfyUI upload widget ("file.wav", "sub/file.wav [input]")."""
    fp = _comfy_module("folder_paths")
    if fp is not None:
        return Path(fp.get_annotated_filepath(name))
    return Path(name)


def list_input_files(extensions: Iterable[str]) -> list[str]:
    d = input_directory()
    if d is None or not d.is_dir():
        return []
    exts = tuple(e.lower() for e in extensions)
    return sorted(
        p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and p.name.lower().endswith(exts)
    )


# --------------------------------------------------------------------------------------
# Audio Sync Guidance on core ComfyUI models (AVSyncAudioSyncGuidanceModel)
# --------------------------------------------------------------------------------------

def core_audio_layers(model):
    """The audio layers of a core ``MODEL`` (a ``ModelPatcher``), or None
    (``samplers/asg_comfy.py:find_core_audio_layers``)."""
    from .samplers.asg_comfy import find_core_audio_layers

    return find_core_audio_layers(model.get_model_object("diffusion_model"))


def patch_audio_sync_guidance(model, settings, calc_cond_batch=None, apply_model_wrapper_type=None):
    """A clone of core ``MODEL`` ``model`` sampling with Audio Sync Guidance (math in
    ``samplers/asg_comfy.py``). ``ModelPatcher`` API used: ``get_model_object``, ``clone``,
    ``add_object_patch``, ``add_wrapper_with_key`` (``WrappersMP.APPLY_MODEL``),
    ``set_model_sampler_calc_cond_batch_function``, ``set_model_sampler_post_cfg_function``;
    core's ``comfy.samplers.calc_cond_batch``. The two last arguments replace core's pieces
    in tests. Raises ``ValueError`` for a model without audio layers."""
    from .samplers.asg_comfy import AudioSyncHook, plan_core_patch

    sampling = model.get_model_object("model_sampling")
    batched = "sampler_calc_cond_batch_function" not in model.model_options
    hook = AudioSyncHook(settings, calc_cond_batch, sampling.percent_to_sigma(settings.start),
                         sampling.percent_to_sigma(settings.end), batched=batched)
    patches = plan_core_patch(settings, model.get_model_object("diffusion_model"), model.get_model_object, hook)
    if calc_cond_batch is None or apply_model_wrapper_type is None:
        samplers, extension = _comfy_module("comfy.samplers"), _comfy_module("comfy.patcher_extension")
        if samplers is None or extension is None:
            raise RuntimeError("Audio Sync Guidance on a core MODEL needs a running ComfyUI")
        hook.calc_cond_batch = calc_cond_batch or samplers.calc_cond_batch
        apply_model_wrapper_type = apply_model_wrapper_type or extension.WrappersMP.APPLY_MODEL
    patched = model.clone()
    for name, forward in patches.items():
        patched.add_object_patch(name, forward)
    patched.add_wrapper_with_key(apply_model_wrapper_type, "avsync_audio_sync_guidance", hook.apply_model_wrapper)
    if batched:
        patched.set_model_sampler_calc_cond_batch_function(hook.calc_cond_batch_function)
    patched.set_model_sampler_post_cfg_function(hook.post_cfg_function)
    return patched, hook
