"""Loader nodes for Stable Video Diffusion (SVD-XT) and the backward-motion weights of
Generative Inbetweening, consumed by AVSyncDualDirectionalSampler."""

from __future__ import annotations

import weakref

from .. import compat
from .sockets import SVD_BACKWARD, SVD_MODEL

_SINGLE_FILE_EXTENSIONS = (".safetensors", ".sft")
PRECISIONS = ("auto", "fp16", "bf16", "fp32")

# Loaded models shared while anything still holds them (ComfyUI's output cache, a second
# loader node with the same choice). Weak references: when ComfyUI drops the output
# ("Free model and node cache", another file picked), the weights are freed, not kept here.
_svd_cache: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
_backward_cache: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


def _file_key(path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def svd_choices() -> list[str]:
    """``checkpoints`` single files, then ``diffusers`` folders; the expected file is always listed
    so that a workflow naming it validates and, if it is missing, says where to get it."""
    from ..loaders.model_files import file_choices
    from ..loaders.svd import SVD_XT_FILE

    folders = compat.list_model_files("diffusers", (), include_dirs=True)
    return file_choices(SVD_XT_FILE, _SINGLE_FILE_EXTENSIONS) + folders


def resolve_svd(name: str):
    """The path of an entry of :func:`svd_choices` (a checkpoint file or a diffusers folder)."""
    from ..core.errors import MissingModelError
    from ..loaders.model_files import resolve
    from ..loaders.svd import SVD_XT_DIFFUSERS, SVD_XT_FILE

    if name.lower().endswith(_SINGLE_FILE_EXTENSIONS):
        return resolve(SVD_XT_FILE, name)
    path = compat.find_model_file(SVD_XT_DIFFUSERS.folder, name)
    if path is None or not path.is_dir():
        raise MissingModelError(name, SVD_XT_DIFFUSERS.folder, compat.model_folder_paths(SVD_XT_DIFFUSERS.folder),
                                SVD_XT_DIFFUSERS.source,
                                extra=f"or put {SVD_XT_FILE.filename} in the '{SVD_XT_FILE.folder}' folder")
    return path


class AVSyncSVDLoader:
    DESCRIPTION = ("Loads Stable Video Diffusion XT (UNet, temporal VAE, CLIP image encoder) for "
                   "AVSyncDualDirectionalSampler, from the single file svd_xt.safetensors in models/checkpoints "
                   "(the one ComfyUI's own SVD workflows use) or from a diffusers-format folder in models/diffusers.")
    CATEGORY = "AVSync/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (SVD_MODEL,)
    RETURN_NAMES = ("svd_model",)
    OUTPUT_TOOLTIPS = ("SVD-XT as diffusers modules under ComfyUI's model memory management (one set of weights; "
                       "the backward branch only adds ΔW).",)

    @classmethod
    def INPUT_TYPES(cls):
        from ..loaders.svd import SVD_XT_FILE

        return {"required": {
            "model": (svd_choices(), {"default": SVD_XT_FILE.filename, "tooltip":
                      "svd_xt.safetensors (or another SVD-XT single file) from the checkpoints folder, or a "
                      "diffusers folder (stabilityai/stable-video-diffusion-img2vid-xt) from the diffusers folder. "
                      "A listed name that is not there fails with where to get it."}),
            "precision": (list(PRECISIONS), {"default": "auto", "tooltip":
                          "Weight precision. auto: fp16 on a CUDA GPU (what the released inbetweening code uses; "
                          "half the memory), bf16 on Apple MPS, fp32 on the CPU (half precision is very slow "
                          "there). Or force fp16, bf16, or fp32 (exact comparisons)."}),
        }}

    def load(self, model, precision="auto"):
        from ..core.errors import InputError
        from ..loaders.svd import auto_precision, load_svd

        if precision not in PRECISIONS:
            raise InputError("precision", f"'{precision}' is not one of {', '.join(PRECISIONS)}")
        if precision == "auto":
            precision = auto_precision(compat.torch_device())
        path = resolve_svd(model)
        key = _file_key(path) + (precision,)
        loaded = _svd_cache.get(key)
        if loaded is None:
            loaded = _svd_cache[key] = load_svd(path, precision)
        return (loaded,)


class AVSyncBackwardMotionLoader:
    DESCRIPTION = ("Loads the backward-motion weights of Generative Inbetweening: ΔW for the 16 temporal "
                   "self-attention value/output projections of SVD-XT, made once with `avsync convert svd-backward` "
                   "from the released fine-tuned UNet. The sampler adds them to the one SVD-XT UNet on the fly.")
    CATEGORY = "AVSync/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (SVD_BACKWARD,)
    RETURN_NAMES = ("backward_weights",)
    OUTPUT_TOOLTIPS = ("ΔW keyed by SVD UNet parameter names, for AVSyncDualDirectionalSampler's backward branch.",)

    @classmethod
    def INPUT_TYPES(cls):
        from ..loaders.model_files import file_choices
        from ..loaders.svd import SVD_BACKWARD_FILE

        return {"required": {
            "backward_weights": (file_choices(SVD_BACKWARD_FILE, _SINGLE_FILE_EXTENSIONS),
                                 {"default": SVD_BACKWARD_FILE.filename, "tooltip":
                                 "ΔW file in models/avsync/svd_backward (avsync_svd_backward folder). If it is not "
                                 "there, the error says how to make it from the released checkpoint."}),
        }}

    def load(self, backward_weights):
        from ..loaders.model_files import resolve
        from ..loaders.svd import SVD_BACKWARD_FILE, load_backward_delta

        path = resolve(SVD_BACKWARD_FILE, backward_weights)
        key = _file_key(path)
        loaded = _backward_cache.get(key)
        if loaded is None:
            loaded = _backward_cache[key] = load_backward_delta(path)
        return (loaded,)


NODE_CLASS_MAPPINGS = {
    "AVSyncSVDLoader": AVSyncSVDLoader,
    "AVSyncBackwardMotionLoader": AVSyncBackwardMotionLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AVSyncSVDLoader": "AVSync SVD-XT Loader",
    "AVSyncBackwardMotionLoader": "AVSync Backward-Motion Weights Loader",
}
