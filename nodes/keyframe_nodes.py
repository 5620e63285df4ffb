"""Keyframe localization nodes (KeyVID §3.1, App. A/B): audio → keyframe indices + plot."""

from __future__ import annotations

import torch

from .. import compat
from ..core.audio import check_audio
from ..core.errors import InputError
from ..core.keyframes import CLIP_FRAMES, NUM_KEYFRAMES, PEAK_DISTANCE, PEAK_PROMINENCE, VARIANTS
from ..core.localize import (METHODS, SMOOTHING, check_covers_timeline, check_request, localize,
                             smoothing_window)
from ..core.plot import render_plot
from ..core.timeline import Timeline
from .sockets import AUDIO, IMAGE, KEYFRAMES, LOCALIZER_MODEL, TIMELINE

DRIVE = ("auto", "audio", "driving_audio")


class AVSyncKeyframeLocalizer:
    DESCRIPTION = (
        "Finds the moments that matter in the audio (a motion-score curve on the video frame grid) and picks "
        "KeyVID's keyframes around them: per 48-frame clip, frame 0, peaks, valleys between peaks, the rest spread "
        "evenly. 'onset' needs no model; 'learned' runs KeyVID's localizer. Outputs the keyframes and a plot."
    )
    CATEGORY = "AVSync/keyframes"
    FUNCTION = "localize"
    RETURN_TYPES = (KEYFRAMES, IMAGE)
    RETURN_NAMES = ("keyframes", "plot")
    OUTPUT_TOOLTIPS = (
        "Keyframe indices on the timeline's frame grid (one list over the whole timeline and one per clip), "
        "with the curve, peaks, valleys, fps, frame count, method and seed.",
        "Waveform, motion-score curve, peaks (red), valleys (green) and chosen keyframes (blue) against time.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "audio": (AUDIO, {"tooltip": "The clip's audio (from AVSyncAudioLoader); its frames are the timeline's."}),
                "timeline": (TIMELINE, {"tooltip": "Frame grid of the video (fps and length) from AVSyncAudioLoader."}),
                "method": (list(METHODS), {"default": "onset", "tooltip":
                           "onset: spectral-flux onset strength, no model needed. learned: KeyVID's keyframe "
                           "localizer (connect AVSyncLocalizerModelLoader)."}),
                "selection": (list(VARIANTS), {"default": "reference", "tooltip":
                              "reference: the selection KeyVID's released inference code runs (what its models saw). "
                              "paper: Algorithm 1 of the paper (largest-remainder allocation)."}),
                "num_keyframes": ("INT", {"default": NUM_KEYFRAMES, "min": 1, "max": 480, "tooltip":
                                  "Keyframes per clip (KeyVID: 12). A shorter last clip gets proportionally fewer."}),
                "clip_frames": ("INT", {"default": CLIP_FRAMES, "min": 1, "max": 4800, "tooltip":
                                "Frames per clip; keyframes are chosen per clip (KeyVID: 48 = 2 s at 24 fps)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip":
                         "Seed of every random choice (which peaks, which valleys, padding). Same seed, same keyframes."}),
                "smoothing": (list(SMOOTHING), {"default": "auto", "tooltip":
                              "Moving average of width 5 before peak finding. auto: on for 'paper' (as the paper "
                              "says), off for 'reference' (as the released inference code does)."}),
                "peak_distance": ("INT", {"default": PEAK_DISTANCE, "min": 1, "max": 240, "tooltip":
                                  "Minimum distance between two peaks (and between two valleys), in frames."}),
                "prominence": ("FLOAT", {"default": PEAK_PROMINENCE, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip":
                               "Minimum prominence of a peak or valley, in curve units (the onset curve is in [0, 1])."}),
            },
            "optional": {
                "localizer_model": (LOCALIZER_MODEL, {"tooltip": "KeyVID localizer from AVSyncLocalizerModelLoader; "
                                    "needed only for method 'learned'."}),
                "driving_audio": (AUDIO, {"tooltip": "Another track to find the moments in, e.g. the Demixer's effects "
                                  "track; it must cover the same stretch of time as 'audio'."}),
                "drive_with": (list(DRIVE), {"default": "auto", "tooltip":
                               "Which audio drives the keyframes. auto: driving_audio when connected, else audio."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, num_keyframes=None, clip_frames=None):
        # ComfyUI passes only widget values; an input fed by a link arrives as None here
        # and is checked when the node runs (core.keyframes.check_request).
        if clip_frames is not None and not 1 <= int(clip_frames) <= 4800:
            return f"clip_frames: must be between 1 and 4800, got {clip_frames}"
        if num_keyframes is not None and not 1 <= int(num_keyframes) <= int(clip_frames or 4800):
            return f"num_keyframes: must be between 1 and clip_frames ({clip_frames}), got {num_keyframes}"
        return True

    def localize(self, audio, timeline, method="onset", selection="reference", num_keyframes=NUM_KEYFRAMES,
                 clip_frames=CLIP_FRAMES, seed=0, smoothing="auto", peak_distance=PEAK_DISTANCE,
                 prominence=PEAK_PROMINENCE, localizer_model=None, driving_audio=None, drive_with="auto"):
        if not isinstance(timeline, Timeline):
            raise InputError("timeline", f"expected AVSYNC_TIMELINE, got {type(timeline).__name__}")
        check_audio(audio, "audio")
        if drive_with not in DRIVE:
            raise InputError("drive_with", f"must be one of {', '.join(DRIVE)}, got {drive_with!r}")
        use_driving = drive_with == "driving_audio" or (drive_with == "auto" and driving_audio is not None)
        if use_driving and driving_audio is None:
            raise InputError("driving_audio", "drive_with is 'driving_audio' but no driving_audio is connected")
        wav, sr = check_audio(driving_audio, "driving_audio") if use_driving else check_audio(audio, "audio")
        wav = wav.cpu()
        check_covers_timeline(wav.shape[-1], sr, timeline, "driving_audio" if use_driving else "audio")
        if method == "learned" and localizer_model is None:
            raise InputError("localizer_model", "method 'learned' needs a model: connect AVSyncLocalizerModelLoader")
        check_request(timeline, int(num_keyframes), int(clip_frames), method, selection)
        smoothing_window(smoothing, selection)

        score_fn, managed = None, None
        if method == "learned":
            managed = localizer_model
            net = managed.load()
            device = next(net.parameters()).device
            dtype = next(net.parameters()).dtype

            def score_fn(mel: torch.Tensor) -> torch.Tensor:
                return net(mel.to(device=device, dtype=dtype)).float()

        bar = compat.Progress(1, "AVSync keyframe localizer")
        try:
            result = localize(wav, sr, timeline, method=method, score_fn=score_fn, num_keyframes=int(num_keyframes),
                              clip_frames=int(clip_frames), selection=selection, seed=int(seed), smoothing=smoothing,
                              distance=int(peak_distance), prominence=float(prominence),
                              progress=lambda v, total: bar.update_absolute(v, total))
        finally:
            if managed is not None:
                managed.offload()
        title = (f"{method} / {selection}: {len(result.indices)} keyframes over {result.num_frames} frames "
                 f"at {result.fps:g} fps (seed {result.seed})")
        image = render_plot(wav.numpy(), sr, result.curve, result.fps, result.peaks, result.valleys, result.indices,
                            clip_frames=int(clip_frames), title=title)
        bar.update_absolute(1, 1)
        return (result, torch.from_numpy(image).unsqueeze(0))


class AVSyncLocalizerModelLoader:
    DESCRIPTION = ("Loads KeyVID's keyframe localizer (converted to safetensors with `avsync convert localizer`) "
                   "from the avsync_localizer model folder, for AVSyncKeyframeLocalizer's 'learned' method.")
    CATEGORY = "AVSync/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (LOCALIZER_MODEL,)
    RETURN_NAMES = ("localizer_model",)
    OUTPUT_TOOLTIPS = ("The localizer network, managed by ComfyUI's model memory management.",)

    @classmethod
    def INPUT_TYPES(cls):
        from ..loaders.localizer import SPEC
        from ..loaders.model_files import file_choices

        return {"required": {"model_name": (file_choices(SPEC), {"default": SPEC.filename, "tooltip":
                "Converted localizer file in models/avsync/localizer (avsync_localizer folder)."})}}

    def load(self, model_name):
        from ..loaders.localizer import SPEC, load_localizer
        from ..loaders.model_files import resolve

        path = resolve(SPEC, model_name)
        net = load_localizer(path)
        return (compat.manage_model(net, {"file": str(path), "config": net.cfg.to_dict()}),)


NODE_CLASS_MAPPINGS = {
    "AVSyncKeyframeLocalizer": AVSyncKeyframeLocalizer,
    "AVSyncLocalizerModelLoader": AVSyncLocalizerModelLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AVSyncKeyframeLocalizer": "AVSync Keyframe Localizer",
    "AVSyncLocalizerModelLoader": "AVSync Localizer Model Loader",
}
