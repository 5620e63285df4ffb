"""Loader nodes for KeyVID's keyframe generator and motion interpolator (files made by
``avsync convert keyvid``, in models/avsync/keyvid), consumed by AVSyncKeyframeGenerator and
AVSyncMotionInterpolator.

One Python class (``loaders.keyvid.KeyVIDModel``) travels on two socket types,
``AVSYNC_KEYVID_MODEL`` (generator) and ``AVSYNC_KEYVID_INTERP_MODEL`` (interpolator), so that a
workflow cannot wire one stage's model into the other stage's node."""

from __future__ import annotations

import weakref

from .. import compat
from .sockets import KEYVID_INTERP_MODEL, KEYVID_MODEL

_EXTENSIONS = (".safetensors", ".sft")
PRECISIONS = ("auto", "fp16", "bf16", "fp32")
_PICKLED = (".ckpt", ".pth", ".pt", ".bin")

# Loaded models shared while anything still holds them (ComfyUI's output cache, a second loader
# with the same choice); weak, so that dropping the output frees the weights.
_cache: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


def _file_key(path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def _precision_tooltip() -> str:
    return ("Weight precision. auto: fp16 on a CUDA GPU (what the released KeyVID code runs), bf16 on Apple MPS, "
            "fp32 on the CPU (half precision is very slow there). Or force fp16, bf16 or fp32.")


class _KeyVIDLoader:
    ROLE = "generator"
    CATEGORY = "AVSync/loaders"
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        from ..loaders.keyvid import FOLDER, SPECS
        from ..loaders.model_files import file_choices

        spec = SPECS[cls.ROLE]
        return {"required": {
            "unet": (file_choices(spec, _EXTENSIONS), {"default": spec.filename, "tooltip":
                     f"The KeyVID {cls.ROLE} UNet file in models/avsync/keyvid ('{FOLDER}' folder), made by "
                     f"`avsync convert keyvid` from the released checkpoint. Its companion files (VAE, text and image "
                     f"encoders, image resampler, ImageBind audio, schedule) are read from the same folder. A listed "
                     f"name that is not there fails with the conversion command."}),
            "precision": (list(PRECISIONS), {"default": "auto", "tooltip": _precision_tooltip()}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, unet=None, precision=None):
        from ..loaders.keyvid import CONVERT_COMMAND

        if precision is not None and precision not in PRECISIONS:
            return f"precision: '{precision}' is not one of {', '.join(PRECISIONS)}"
        if unet is not None:
            name = str(unet).lower()
            if name.endswith(_PICKLED):
                return (f"unet: {unet} is a pickled checkpoint; nodes load only the safetensors files that "
                        f"`{CONVERT_COMMAND}` writes")
            if not name.endswith(_EXTENSIONS):
                return f"unet: expected a .safetensors file made by `avsync convert keyvid`, got '{unet}'"
        return True

    def load(self, unet, precision="auto"):
        from ..core.errors import InputError
        from ..loaders.keyvid import FOLDER, SPECS, auto_precision, load_keyvid
        from ..loaders.model_files import resolve

        ok = self.VALIDATE_INPUTS(unet=unet, precision=precision)
        if ok is not True:
            name, _, problem = ok.partition(": ")
            raise InputError(name, problem)
        if precision == "auto":
            precision = auto_precision(compat.torch_device())
        path = resolve(SPECS[self.ROLE], unet)
        key = _file_key(path) + (precision, self.ROLE)
        loaded = _cache.get(key)
        if loaded is None:
            loaded = _cache[key] = load_keyvid(path, precision, role=self.ROLE,
                                               search=lambda name: compat.find_model_file(FOLDER, name))
        return {"ui": {"text": [_audio_layers_text(loaded)]}, "result": (loaded,)}


def _audio_layers_text(model) -> str:
    """Shown on the node (web/js/avsync_sync_report.js): what AVSyncAudioSyncGuidance's 'layers' can pick."""
    from ..networks.audio_layers import list_audio_layers

    n = len(list_audio_layers(model.unet.module))
    return f"{model.role} UNet: {n} audio layers (Audio Sync Guidance 'layers': 0-{n - 1}, shallow to deep)"


class AVSyncKeyVIDGeneratorLoader(_KeyVIDLoader):
    DESCRIPTION = ("Loads KeyVID's keyframe generator (UNet with audio cross-attention and frame-index embedding, "
                   "KL VAE, OpenCLIP ViT-H text and image encoders, image resampler, ImageBind audio trunk) for "
                   "AVSyncKeyframeGenerator, from files made once by `avsync convert keyvid` from the released "
                   "checkpoint (RyanWW/KeyVID).")
    ROLE = "generator"
    RETURN_TYPES = (KEYVID_MODEL,)
    RETURN_NAMES = ("keyvid_model",)
    OUTPUT_TOOLTIPS = ("The KeyVID keyframe generator, every network under ComfyUI's model memory management.",)


class AVSyncKeyVIDInterpolatorLoader(_KeyVIDLoader):
    DESCRIPTION = ("Loads KeyVID's motion interpolator (48-frame UNet, KL VAE, OpenCLIP encoders, image resampler, "
                   "ImageBind audio trunk rebuilt from imagebind_huge.pth as the release does) for "
                   "AVSyncMotionInterpolator, from files made once by `avsync convert keyvid`.")
    ROLE = "interpolator"
    RETURN_TYPES = (KEYVID_INTERP_MODEL,)
    RETURN_NAMES = ("keyvid_interp_model",)
    OUTPUT_TOOLTIPS = ("The KeyVID motion interpolator, every network under ComfyUI's model memory management.",)


NODE_CLASS_MAPPINGS = {
    "AVSyncKeyVIDGeneratorLoader": AVSyncKeyVIDGeneratorLoader,
    "AVSyncKeyVIDInterpolatorLoader": AVSyncKeyVIDInterpolatorLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AVSyncKeyVIDGeneratorLoader": "AVSync KeyVID Generator Loader",
    "AVSyncKeyVIDInterpolatorLoader": "AVSync KeyVID Interpolator Loader",
}
