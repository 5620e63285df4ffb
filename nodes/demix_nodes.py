"""Demixer nodes: split audio into speech, effects and music (MTV's three control tracks)."""

from __future__ import annotations

import logging

import torch

from .. import compat
from ..core.audio import check_audio, make_audio
from ..core.errors import InputError
from .sockets import AUDIO, DEMIX_MODEL

METHODS = ("auto", "dsp", "model", "bandit_v2", "learned")   # samplers/demix.py:METHODS
MODEL_FAMILY_METHODS = ("bandit_v2",)              # methods that also name the connected model's family
MAX_CHUNK_SECONDS = 600.0
LONG_INPUT_SECONDS = 600.0   # from this length on the node states its memory need before it starts

log = logging.getLogger("avsync")


class AVSyncDemixModelLoader:
    DESCRIPTION = ("Loads a speech / effects / music separation model (MRX from the Cocktail Fork paper, or BandIt v2 "
                   "from 'Remastering Divide and Remaster', converted to safetensors with `avsync convert demix`) from "
                   "the avsync_demix model folder, for AVSyncDemixer.")
    CATEGORY = "AVSync/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (DEMIX_MODEL,)
    RETURN_NAMES = ("demix_model",)
    OUTPUT_TOOLTIPS = ("The demix network with its sample rate and source order, managed by ComfyUI's model "
                       "memory management.",)

    @classmethod
    def INPUT_TYPES(cls):
        from ..loaders.demix import DEFAULT_KEY, SPECS
        from ..loaders.model_files import file_choices

        files = file_choices(SPECS.values(), (".safetensors",))
        return {"required": {"model_name": (files, {"default": SPECS[DEFAULT_KEY].filename, "tooltip":
                "Converted demix model in models/avsync/demix (avsync_demix folder). Listed names that are not "
                "there yet fail with instructions on where to get and how to convert them."})}}

    def load(self, model_name):
        from ..loaders.demix import FOLDER, SPECS, load_demix_model
        from ..loaders.model_files import resolve

        spec = next((s for s in SPECS.values() if s.filename == model_name), None)
        path = resolve(spec, model_name) if spec is not None else compat.find_model_file(FOLDER, model_name)
        if path is None:
            raise InputError("model_name", f"'{model_name}' is not in the {FOLDER} model folder")
        return (load_demix_model(path),)


class AVSyncDemixer:
    DESCRIPTION = ("Splits audio into speech, effects and music tracks (as MTV drives lip motion, event timing and "
                   "mood from them). Without a model it uses a signal-processing separator (harmonic/percussive "
                   "split, syllabic-modulation speech detection, stereo centre cue) that is approximate but keeps "
                   "event timing; with a demix model it runs the network. Outputs have the input's rate, length "
                   "and channels; the dsp stems add up to the input exactly.")
    CATEGORY = "AVSync/audio"
    FUNCTION = "demix"
    RETURN_TYPES = (AUDIO, AUDIO, AUDIO)
    RETURN_NAMES = ("speech", "effects", "music")
    OUTPUT_TOOLTIPS = (
        "Dialogue and other speech (drives lip motion).",
        "Sound effects: impacts, foley, ambience (drives event timing; feed it to AVSyncKeyframeLocalizer).",
        "Music (drives visual mood).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "audio": (AUDIO, {"tooltip": "The soundtrack to split (any rate, any number of channels)."}),
                "method": (list(METHODS), {"default": "auto", "tooltip":
                           "auto: the connected demix model, else dsp. dsp: the weights-free separator. "
                           "model: the connected demix model (an error if none is connected). bandit_v2: the "
                           "connected model, which must be a BandIt v2 model (an error otherwise); it runs with "
                           "BandIt's own chunking (8 s chunks on a 1 s hop, Hann-weighted), so chunk_seconds and "
                           "overlap do not apply. A BandIt v2 model runs with its own chunking under auto and "
                           "model too. learned: a small network shipped with AVSync (4.6 MB, no download) that "
                           "refines dsp; trained by us on Debian-packaged recordings; runs on the CPU. Cleaner speech "
                           "and effects than dsp on real mixtures, but tonal or voice-like effects (a chime, a "
                           "bird) can land in speech: for keyframes from events, dsp's effects stem finds more."}),
                "chunk_seconds": ("FLOAT", {"default": 20.0, "min": 1.0, "max": MAX_CHUNK_SECONDS, "step": 0.5,
                                  "tooltip": "Audio is processed in chunks of this length so long files use "
                                             "bounded memory; longer chunks give a model more context."}),
                "overlap": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 0.5, "step": 0.01, "tooltip":
                            "Fraction of a chunk shared with the next one and cross-faded, hiding chunk edges."}),
            },
            "optional": {
                "demix_model": (DEMIX_MODEL, {"tooltip": "A model from AVSyncDemixModelLoader; used by 'auto' "
                                              "and 'model'."}),
            },
        }

    # Not VALIDATE_INPUTS: in ComfyUI the schema's combo / min / max already cover these widgets, and a
    # VALIDATE_INPUTS taking them reported one refusal three times (once per input it takes).
    @classmethod
    def check_widgets(cls, method="auto", chunk_seconds=20.0, overlap=0.1):
        if method not in METHODS:
            return f"method: must be one of {', '.join(METHODS)}, got {method!r}"
        if not 1.0 <= float(chunk_seconds) <= MAX_CHUNK_SECONDS:
            return f"chunk_seconds: must be between 1 and {MAX_CHUNK_SECONDS:g}, got {chunk_seconds}"
        if not 0.0 <= float(overlap) <= 0.5:
            return f"overlap: must be between 0 and 0.5, got {overlap}"
        return True

    def demix(self, audio, method="auto", chunk_seconds=20.0, overlap=0.1, demix_model=None):
        from ..samplers.demix import demix, uses_model, weights_free_method

        wav, sr = check_audio(audio, "audio", allow_batch=True)
        if wav.shape[-1] < 1:
            raise InputError("audio", "is empty (0 samples)")
        if method in ("model",) + MODEL_FAMILY_METHODS and demix_model is None:
            raise InputError("demix_model", f"method '{method}' needs a demix model: connect "
                                            f"AVSyncDemixModelLoader, or choose method 'dsp'")
        if method in MODEL_FAMILY_METHODS and demix_model.family != method:
            raise InputError("demix_model", f"method '{method}' needs a {method} model, got a {demix_model.family} "
                                            f"model ({demix_model.name}); choose method 'model' to run it")
        msg = self.check_widgets(method, chunk_seconds, overlap)
        if msg is not True:
            raise InputError(msg.split(":")[0], msg.split(": ", 1)[1])
        use_model = uses_model(method, demix_model)
        kind, chunk = weights_free_method(method), chunk_seconds
        if use_model:
            own = getattr(demix_model, "chunking", None)     # a family with its own chunker (BandIt v2)
            kind, chunk = ("model", chunk_seconds) if own is None else (demix_model.family, own["chunk_seconds"])
        self.check_memory(wav, sr, chunk, kind)
        stems = torch.empty(3, *wav.shape, dtype=torch.float32)   # filled clip by clip: no second full-length copy
        for b, w in enumerate(wav):
            demix(w, sr, method, demix_model, chunk_seconds, overlap, out=stems[:, b])
        device = compat.intermediate_device()
        return tuple(make_audio(s.to(device), sr) for s in stems)

    @staticmethod
    def check_memory(wav, sr, chunk_seconds, method):
        """State the memory need of a long input, and refuse before any work when it
        exceeds what is available (the full-length stems are returned in memory; the
        CLI's ``avsync demix`` streams them to disk instead)."""
        from ..samplers.demix import available_memory_bytes, memory_need

        clips, channels, samples = wav.shape
        need = memory_need(channels, samples, sr, chunk_seconds, method, clips)
        free = available_memory_bytes()
        seconds = samples / sr
        gb = 2.0 ** 30
        what = (f"demixing {clips} x {seconds:.0f} s of {channels}-channel {sr} Hz audio ({method}) needs about "
                f"{need['total'] / gb:.2f} GB ({need['stems'] / gb:.2f} GB for the three stems, "
                f"{need['chunk'] / gb:.2f} GB for one {chunk_seconds:g} s chunk)")
        if free is not None and need["total"] > free:
            raise InputError("audio", f"{what}, more than the {free / gb:.2f} GB of memory available now; "
                                      f"demix shorter parts (AVSyncAudioLoader start/duration), use smaller "
                                      f"chunk_seconds, or run `avsync demix`, which streams the stems to disk")
        if seconds * clips >= LONG_INPUT_SECONDS:
            avail = "unknown" if free is None else f"{free / gb:.2f} GB"
            log.info("AVSyncDemixer: %s; available: %s", what, avail)


NODE_CLASS_MAPPINGS = {
    "AVSyncDemixer": AVSyncDemixer,
    "AVSyncDemixModelLoader": AVSyncDemixModelLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AVSyncDemixer": "AVSync Demixer (speech / effects / music)",
    "AVSyncDemixModelLoader": "AVSync Demix Model Loader",
}
