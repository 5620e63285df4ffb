"""MTV nodes: the loader (transformer variant + VAE + T5 + wav2vec) and the generator
(prompt + speech / effects / music → IMAGE frames at 24 fps). Thin: the pipeline is
samplers/mtv.py (docs/mtv.md)."""

from __future__ import annotations

import logging
import weakref

from ..core.audio import check_audio
from ..core.errors import InputError
from .keyvid_loader_nodes import _file_key
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


# --------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------

T5_FOLDER, T5_DEFAULT = "text_encoders", "t5xxl_fp16.safetensors"
T5_SOURCE = ("ComfyUI's T5-XXL text encoder (comfyanonymous/flux_text_encoders: t5xxl_fp16.safetensors, or the fp8 "
             "files) in models/text_encoders, or a transformers T5 folder such as THUDM/CogVideoX-5b/text_encoder")
WAV2VEC_FOLDER, WAV2VEC_DEFAULT = "audio_encoders", "wav2vec2-base-960h"
WAV2VEC_SOURCE = ("facebook/wav2vec2-base-960h (the folder with config.json, model.safetensors or pytorch_model.bin, "
                  "preprocessor_config.json) in models/audio_encoders")
TOKENIZER_DIR = "t5_tokenizer"   # in models/avsync/mtv, for runs outside ComfyUI (ComfyUI ships its own)

# Loaded models shared while anything still holds them (ComfyUI's output cache, a second loader
# with the same choices); weak, so that dropping the output frees the weights.
_cache: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


def _entries(folder: str, expected=(), extensions=(".safetensors", ".sft")) -> list:
    """Files (and sub-folders holding a config.json: transformers / diffusers layouts) in a model
    folder, the expected names first (always listed so a shared workflow validates and, when the
    file is missing, fails naming where to get it)."""
    from .. import compat

    found = list(compat.list_model_files(folder, extensions))
    for base in compat.model_folder_paths(folder):
        if base.is_dir():
            found += sorted(p.name for p in base.iterdir() if p.is_dir() and (p / "config.json").is_file())
    return list(dict.fromkeys(list(expected) + found))


def _resolve(folder: str, name: str, input_name: str, source: str):
    from .. import compat
    from ..core.errors import MissingModelError

    path = compat.find_model_file(folder, str(name))
    if path is None:
        raise MissingModelError(str(name), folder, compat.model_folder_paths(folder), source,
                                extra=f"(input '{input_name}')")
    return path


def _tokenizer_folder(t5_path):
    """A tokenizer next to the T5 (a transformers folder's tokenizer/ or the folder itself), else
    models/avsync/mtv/t5_tokenizer, else None (ComfyUI's own T5 tokenizer)."""
    from .. import compat

    for cand in (t5_path / "tokenizer", t5_path.parent / "tokenizer", t5_path):
        if cand.is_dir() and any((cand / f).is_file() for f in ("tokenizer.json", "spiece.model")):
            return cand
    return compat.find_model_file("avsync_mtv", TOKENIZER_DIR)


class AVSyncMTVLoader:
    DESCRIPTION = ("Loads MTV (audio-driven CogVideoX-5B): the transformer of one variant (single: one speaker; accm: "
                   "effects and music, no conversation; multi: two speakers) made by `avsync convert mtv` from the "
                   "released checkpoint (BAAI/MTVCraft), the CogVideoX VAE, the T5-XXL text encoder (ComfyUI's "
                   "t5xxl file works) and wav2vec2-base-960h, for AVSyncMTVGenerator. The transformer is ~11.6 B "
                   "parameters: fp8 storage and block swap make it fit smaller cards.")
    CATEGORY = "AVSync/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (MTV_MODEL,)
    RETURN_NAMES = ("mtv_model",)
    OUTPUT_TOOLTIPS = ("The MTV model (transformer, VAE, T5, wav2vec2); T5 and wav2vec2 are unloaded after encoding.",)

    @classmethod
    def INPUT_TYPES(cls):
        from ..loaders.mtv import FOLDER, SPECS, VAE_SPEC
        from ..samplers.mtv import PRECISIONS, STORAGES, VARIANTS

        transformers = _entries(FOLDER, [SPECS[v].filename for v in VARIANTS])
        return {"required": {
            "variant": (list(VARIANTS), {"default": "single", "tooltip":
                        "single: one speaker (prompt 'One person conversation…'); accm: no conversation, effects "
                        "and music (prompt 'No conversation…'); multi: two speakers (two speech tracks)."}),
            "transformer": (transformers, {"default": SPECS["single"].filename, "tooltip":
                            f"The MTV transformer in models/avsync/mtv ('{FOLDER}' folder), made once by "
                            f"`avsync convert mtv` from the released mp_rank_00_model_states.pt (bf16, or fp8 with "
                            f"--dtype fp8_e4m3fn). It must match the variant."}),
            "vae": (_entries(FOLDER, [VAE_SPEC.filename]), {"default": VAE_SPEC.filename, "tooltip":
                    "The CogVideoX 3D VAE in models/avsync/mtv: mtv_vae.safetensors (`avsync convert mtv --vae "
                    "3d-vae.pt`) or a diffusers vae/ folder of CogVideoX-5b."}),
            "t5": (_entries(T5_FOLDER, [T5_DEFAULT]), {"default": T5_DEFAULT, "tooltip":
                   "T5 v1.1 XXL in models/text_encoders: ComfyUI's t5xxl_fp16 / t5xxl_fp8_e4m3fn(_scaled) "
                   ".safetensors, or a transformers text_encoder folder. Unloaded after the prompt is encoded."}),
            "wav2vec": (_entries(WAV2VEC_FOLDER, [WAV2VEC_DEFAULT]), {"default": WAV2VEC_DEFAULT, "tooltip":
                        "wav2vec2-base-960h in models/audio_encoders (the transformers folder, or one .safetensors "
                        "file). Runs in fp32 as released; unloaded after the audio is encoded."}),
            "storage": (list(STORAGES), {"default": "bf16", "tooltip":
                        "Transformer weights in memory: bf16 (~23 GB, as released) or fp8 (~12 GB; each weight "
                        "dequantised to the compute precision when used: slightly rounded weights)."}),
            "block_swap": ("INT", {"default": 0, "min": 0, "max": 42, "tooltip":
                           "Transformer blocks kept in CPU memory and streamed to the GPU while sampling (0: all on "
                           "the GPU). More blocks: less GPU memory, slower steps. The generator's memory check says "
                           "which settings fit before sampling starts."}),
            "precision": (list(PRECISIONS), {"default": "auto", "tooltip":
                          "Compute precision. auto: bf16 on a GPU (what the release runs), fp32 on the CPU."}),
        }, "optional": {
            "audio_proj_on_cpu": ("BOOLEAN", {"default": True, "tooltip":
                                  "Keep the three audio projection models (3.7 B parameters, ~7 GB in bf16, ~3.7 GB "
                                  "in fp8) in CPU memory: they run once per window (the tokens are reused by all 50 "
                                  "steps), each moved to the GPU only for that. Saves their memory on the GPU for a "
                                  "few seconds per window. No effect when running on the CPU."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, transformer=None):
        """Only ``transformer``: ComfyUI checks the combos and block_swap's range itself for every
        input VALIDATE_INPUTS does not name (a ``**kw`` signature switched those checks off and repeated
        a refusal once per input)."""
        if transformer is not None and str(transformer).lower().endswith((".pt", ".pth", ".ckpt", ".bin")):
            return (f"transformer: {transformer} is a pickled checkpoint; nodes load only the safetensors file "
                    f"that `avsync convert mtv` writes")
        return True

    @staticmethod
    def _check_choices(**kw):
        """The combo values, for calls that do not go through ComfyUI's validation (CLI, Python)."""
        from ..samplers.mtv import PRECISIONS, STORAGES, VARIANTS

        for name, allowed in (("variant", VARIANTS), ("storage", STORAGES), ("precision", PRECISIONS)):
            if kw.get(name) is not None and kw[name] not in allowed:
                raise InputError(name, f"must be one of {', '.join(allowed)}, got {kw[name]!r}")

    def load(self, variant, transformer, vae, t5, wav2vec, storage="bf16", block_swap=0, precision="auto",
             audio_proj_on_cpu=True):
        from ..loaders.mtv import FOLDER, SOURCE, VAE_SOURCE
        from ..samplers.mtv import load_mtv_model

        self._check_choices(variant=variant, storage=storage, precision=precision)
        ok = self.VALIDATE_INPUTS(transformer)
        if ok is not True:
            raise InputError("transformer", ok.partition(": ")[2])
        paths = (_resolve(FOLDER, transformer, "transformer", SOURCE), _resolve(FOLDER, vae, "vae", VAE_SOURCE),
                 _resolve(T5_FOLDER, t5, "t5", T5_SOURCE), _resolve(WAV2VEC_FOLDER, wav2vec, "wav2vec", WAV2VEC_SOURCE))
        key = tuple(_file_key(p) for p in paths) + (variant, storage, int(block_swap), precision,
                                                    bool(audio_proj_on_cpu))
        model = _cache.get(key)
        if model is None:
            model = _cache[key] = load_mtv_model(variant, *paths, tokenizer=_tokenizer_folder(paths[2]),
                                                 storage=storage, block_swap=int(block_swap), precision=precision,
                                                 audio_proj_on_cpu=bool(audio_proj_on_cpu))
        return {"ui": {"text": [model.describe]}, "result": (model,)}


# --------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------

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

    # No VALIDATE_INPUTS: ComfyUI's own combo / min / max checks cover every widget (a ``**kw``
    # VALIDATE_INPUTS switches them off: seed −1 and cfg 50 ran); generate() checks them again through
    # MTVSettings.validate() for calls from the CLI or Python.

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
    "AVSyncMTVLoader": AVSyncMTVLoader,
    "AVSyncMTVGenerator": AVSyncMTVGenerator,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AVSyncMTVLoader": "AVSync MTV Loader",
    "AVSyncMTVGenerator": "AVSync MTV Generator (speech / effects / music → video)",
}
