"""Audio Sync Guidance nodes (Syncphony §3.3): settings for AVSync's generators, and a MODEL patch
for the audio-driven models of ComfyUI core (Wan2.2-S2V, HuMo) sampled by KSampler."""

from __future__ import annotations

from .. import compat
from ..core.errors import InputError
from .sockets import GUIDANCE, MODEL

_FORMULA = ("out = e_u + s_img(e_i − e_u) + s_txt(e_it − e_i) + s_aud(e_c − e_it) + w_a(e_c − e_off-sync), "
            "then guidance rescale 0.7")


def _inputs():
    return {
        "w_a": ("FLOAT", {"default": 2.0, "min": 0.0, "max": 10.0, "step": 0.1, "tooltip":
                "Audio Sync Guidance scale w_a: how hard the sample is pushed away from the prediction made "
                "with the audio layers skipped. 2.0 is Syncphony's setting; the paper finds 4 over-exaggerates "
                "motion. 0 turns ASG off (output identical to no ASG)."}),
        "start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                  "First part of sampling with ASG, as a fraction of the steps (0 = from the first step). "
                  "Steps outside [start, end) do not compute the extra prediction at all."}),
        "end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                "End of the ASG range, as a fraction of the steps (1 = to the last step; 0.5 = first half only, "
                "which costs half the extra compute)."}),
        "layers": ("STRING", {"default": "all", "tooltip":
                   "Which audio layers the off-sync prediction skips: 'all', a range '8-15', a list '12,13,14' or "
                   "both '0-3,9'. Indices count the model's audio layers in forward order, shallow to deep, from 0 "
                   "(the loader / validation message says how many the model has)."}),
    }


def _settings(w_a, start, end, layers):
    from ..samplers.asg import AudioSyncGuidanceSettings, parse_layers

    try:
        parse_layers(layers)
    except ValueError as err:
        raise InputError("layers", str(err)) from None
    if not start <= end:
        raise InputError("end", f"must be ≥ start ({start}), got {end}")
    return AudioSyncGuidanceSettings.from_text(w_a, start, end, layers)


def _validate(w_a=None, start=None, end=None, layers=None):
    try:
        if w_a is not None and not w_a >= 0:
            raise InputError("w_a", f"must be ≥ 0, got {w_a}")
        if layers is not None:
            _settings(w_a or 0.0, 0.0, 1.0, layers)
        if start is not None and end is not None and not start <= end:
            raise InputError("end", f"must be ≥ start ({start}), got {end}")
    except InputError as err:
        return str(err)
    return True


class AVSyncAudioSyncGuidance:
    DESCRIPTION = (
        "Syncphony's Audio Sync Guidance for AVSync's KeyVID generators: one more prediction per step with the "
        "model's audio cross-attention skipped ('off-sync'), and the sample pushed away from it. With KeyVID's "
        f"guidance: {_FORMULA}. Syncphony's eq. 6 has one CFG term (text) where KeyVID's has three. The extra "
        "prediction joins the same batched model call; connect to AVSyncKeyframeGenerator / "
        "AVSyncMotionInterpolator 'guidance'.")
    CATEGORY = "AVSync/guidance"
    FUNCTION = "build"
    RETURN_TYPES = (GUIDANCE,)
    RETURN_NAMES = ("guidance",)
    OUTPUT_TOOLTIPS = ("Audio Sync Guidance settings; the generator checks, before sampling, that its model has the "
                       "chosen audio layers.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": _inputs()}

    @classmethod
    def VALIDATE_INPUTS(cls, w_a=None, start=None, end=None, layers=None):
        return _validate(w_a, start, end, layers)

    def build(self, w_a, start, end, layers):
        return (_settings(w_a, start, end, layers),)


class AVSyncAudioSyncGuidanceModel:
    DESCRIPTION = (
        "Audio Sync Guidance (Syncphony) for ComfyUI core's audio-driven video models (Wan2.2-S2V, HuMo), sampled by "
        "KSampler: adds w_a·(cond − off-sync) after CFG, where off-sync is the positive prediction with the model's "
        "audio layers skipped (S2V: its AudioInjector_WAN blocks; HuMo: AudioCrossAttentionWrapper) and nothing else "
        "changed. The off-sync pass joins core's cond/uncond model call. A model without audio layers is refused.")
    CATEGORY = "AVSync/guidance"
    FUNCTION = "patch"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with Audio Sync Guidance; connect it to KSampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        inputs = _inputs()
        for name, what in (("start", "Start"), ("end", "End")):
            kind, opts = inputs[name]
            inputs[name] = (kind, dict(opts, tooltip=(
                f"{what} of the ASG range as ComfyUI's {name}_percent (a fraction of the model's time schedule, "
                "as in SkipLayerGuidanceDiT; with shifted flow schedules this is not the fraction of steps). "
                "Outside the range the extra prediction is not computed.")))
        return {"required": {"model": (MODEL, {"tooltip":
                             "A Wan2.2-S2V or HuMo model (Load Diffusion Model). Models without audio layers are "
                             "refused."}), **inputs}}

    @classmethod
    def VALIDATE_INPUTS(cls, w_a=None, start=None, end=None, layers=None, model=None):
        return _validate(w_a, start, end, layers)

    def patch(self, model, w_a, start, end, layers):
        from ..samplers.asg_comfy import describe_core_audio_layers

        settings = _settings(w_a, start, end, layers)
        found = compat.core_audio_layers(model)
        if found is None:
            raise InputError("model", "this model has no audio layers (Audio Sync Guidance needs Wan2.2-S2V or HuMo)")
        if not settings.enabled:
            return {"ui": {"text": [f"ASG off (w_a = 0 or an empty range); the model has "
                                    f"{describe_core_audio_layers(found)}"]}, "result": (model,)}
        try:
            patched, _ = compat.patch_audio_sync_guidance(model, settings)
        except ValueError as err:
            raise InputError("layers", str(err)) from None
        text = f"{settings.describe()} on a model with {describe_core_audio_layers(found)}"
        compat.log.info("AVSync: %s", text)
        return {"ui": {"text": [text]}, "result": (patched,)}


NODE_CLASS_MAPPINGS = {
    "AVSyncAudioSyncGuidance": AVSyncAudioSyncGuidance,
    "AVSyncAudioSyncGuidanceModel": AVSyncAudioSyncGuidanceModel,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AVSyncAudioSyncGuidance": "AVSync Audio Sync Guidance",
    "AVSyncAudioSyncGuidanceModel": "AVSync Audio Sync Guidance (core model)",
}
