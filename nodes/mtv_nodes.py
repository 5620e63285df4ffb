"""MTV nodes: the loader (transformer variant + VAE + T5 + wav2vec) and the generator
(prompt + speech / effects / music → IMAGE frames at 24 fps). Thin: the pipeline is
samplers/mtv.py (docs/mtv.md)."""

from __future__ import annotations

import logging

from ..core.audio import check_audio
from ..core.errors import InputError
from .sockets import AUDIO, GUIDANCE, IMAGE, MTV_MODEL

log = logging.getLogger("avsync")

MAX_SEED = 0xFFFFFFFFFFFFFFFF
_GUIDANCE_TIP = ("Optional Audio Sync Guidance (AVSyncAudioSyncGuidance): adds a branch with MTV's speech/effects "
                 "cross-attentions skipped and pushes away from it. Unconnected, or scale 0: exactly the released "
                 "CFG sampling.")


def _settings(steps, cfg, seed, windows, max_windows, batch_cfg):
    from ..samplers.mtv import MTVSettings

    return MTVSettings(steps=int(steps), cfg=float(cfg), seed=int(seed), windows=str(windows),
                       max_windows=int(max_windows), batched=bool(batch_cfg)).validate()


def _track(audio, name):
    if audio is None:
        return None
    wav, sr = check_audio(audio, name)
    if wav.shape[-1] < 1:
        raise InputError(name, "is empty (0 samples)")
    return wav, sr


class AVSyncMTVGenerator:
    DESCRIPTION = (
        "MTV (CogVideoX-5B with speech / effects cross-attention and music style injection): a 480×720 video at "
        "24 fps whose lips follow the speech, events the effects and mood the music. Connect the three tracks "
        "straight from AVSyncDemixer (or two speaker tracks for the multi model). Long audio runs as the release "
        "does: 49-frame windows advancing by 44, each starting from the previous window's last 5 frames; the "
        "video is cut to the speech length. Connect the frames to CreateVideo with the original mix."
    )
    CATEGORY = "AVSync/mtv"
    FUNCTION = "generate"
    RETURN_TYPES = (IMAGE, "FLOAT")
    RETURN_NAMES = ("frames", "fps")
    OUTPUT_TOOLTIPS = ("The video, IMAGE [frames, 480, 720, 3], frame i at i/24 s.",
                       "The frame rate (24.0): connect it to CreateVideo's fps.")

    @classmethod
    def INPUT_TYPES(cls):
        from ..samplers.mtv import RELEASED_CFG, RELEASED_STEPS, WINDOW_MODES

        return {
            "required": {
                "mtv_model": (MTV_MODEL, {"tooltip": "The MTV model from AVSyncMTVLoader (single, accm or multi)."}),
                "prompt": ("STRING", {"default": "", "multiline": True, "tooltip":
                           "What the video shows, in the release's template: 'One person conversation. Persons: "
                           "Person1: <looks>. Person1 is speaking. Scene Description: <scene>' (two people: "
                           "'Two person conversation. …'; accm: 'No conversation. Scene Description: …')."}),
                "effects": (AUDIO, {"tooltip": "Sound-effects track (AVSyncDemixer's effects): drives event timing."}),
                "music": (AUDIO, {"tooltip": "Music track (AVSyncDemixer's music): drives mood and style."}),
                "steps": ("INT", {"default": RELEASED_STEPS, "min": 1, "max": 1000, "tooltip":
                          "SDE DPM++(2M) steps per window (released 50; MTVCraft runs 20). Each step is one model "
                          "call (two with 'batch_cfg' off)."}),
                "cfg": ("FLOAT", {"default": RELEASED_CFG, "min": 0.0, "max": 20.0, "step": 0.1, "tooltip":
                        "Classifier-free guidance scale (released code: 3.5, hard-coded; the released config's 6 is "
                        "ignored). The unconditional branch has zero text and zero audio."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "tooltip":
                         "Seed of every random draw of the run (one CPU generator for all windows): same seed, "
                         "same video on any device."}),
                "windows": (list(WINDOW_MODES), {"default": "released", "tooltip":
                            "released: the release's windows; up to 46 frames (~1.9 s) at the end of the speech "
                            "are never rendered and the video is shorter than the audio. render_tail: one more "
                            "window aligned to the end renders them (not in the release)."}),
                "max_windows": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip":
                                "Render only the first N windows (49 + 44·(N−1) frames), e.g. 1 for a quick look. "
                                "0: every window the audio needs."}),
                "batch_cfg": ("BOOLEAN", {"default": True, "tooltip":
                              "Run the conditional and unconditional passes in one batched model call (faster). "
                              "Off: two calls per step, less activation memory."}),
            },
            "optional": {
                "speech": (AUDIO, {"tooltip": "Speech track (AVSyncDemixer's speech; speaker 1 for the multi model): "
                                              "drives the lips. Unconnected: silence (what MTVCraft feeds the accm "
                                              "model)."}),
                "speech2": (AUDIO, {"tooltip": "Second speaker's track, for the multi (two-speaker) model only."}),
                "guidance": (GUIDANCE, {"tooltip": _GUIDANCE_TIP}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, **kw):
        """Widget values only (linked inputs arrive as None and are checked again when the node runs)."""
        from ..samplers.mtv import WINDOW_MODES

        try:
            if kw.get("windows") is not None and kw["windows"] not in WINDOW_MODES:
                raise InputError("windows", f"must be one of {', '.join(WINDOW_MODES)}, got {kw['windows']!r}")
            if kw.get("cfg") is not None and not float(kw["cfg"]) >= 0:
                raise InputError("cfg", f"must be ≥ 0, got {kw['cfg']}")
            if kw.get("steps") is not None and not 1 <= int(kw["steps"]) <= 1000:
                raise InputError("steps", f"must be between 1 and 1000, got {kw['steps']}")
            if kw.get("max_windows") is not None and int(kw["max_windows"]) < 0:
                raise InputError("max_windows", f"must be ≥ 0, got {kw['max_windows']}")
        except InputError as err:
            return str(err)
        return True

    def generate(self, mtv_model, prompt, effects, music, steps, cfg, seed, windows, max_windows, batch_cfg,
                 speech=None, speech2=None, guidance=None):
        from ..samplers.mtv import MTVModel, generate_mtv

        if not isinstance(mtv_model, MTVModel):
            raise InputError("mtv_model", f"expected an MTV model from AVSyncMTVLoader, got {type(mtv_model).__name__}")
        settings = _settings(steps, cfg, seed, windows, max_windows, batch_cfg)
        tracks = {name: _track(a, name) for name, a in
                  (("speech", speech), ("effects", effects), ("music", music), ("speech2", speech2))}
        result = generate_mtv(mtv_model, str(prompt), settings=settings, guidance=guidance,
                              on_plan=lambda plan: log.info("AVSyncMTVGenerator: %s", plan.describe()), **tracks)
        return {"ui": {"text": [result.plan.describe()]}, "result": (result.frames, result.fps)}


NODE_CLASS_MAPPINGS = {
    "AVSyncMTVGenerator": AVSyncMTVGenerator,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AVSyncMTVGenerator": "AVSync MTV Generator (speech / effects / music → video)",
}
