"""``avsync demix AUDIO --out DIR``: speech / effects / music stems of an audio file,
through the same node code a ComfyUI workflow runs (AVSyncAudioLoader →
[AVSyncDemixModelLoader →] AVSyncDemixer). Writes ``DIR/speech.wav``,
``DIR/effects.wav`` and ``DIR/music.wav`` at the input's rate, length and channels.
Node inputs are flags generated from the node schemas (cli/schema_args.py)."""

from __future__ import annotations

STEM_FILES = ("speech.wav", "effects.wav", "music.wav")
LOADER_SKIP = {"audio_file": "the AUDIO argument", "fps": "demix has no video frame grid"}


def register(sub) -> None:
    from .common import add_common_options
    from .schema_args import add_node_arguments, set_input_flags

    p = sub.add_parser("demix", help="split audio into speech, effects and music tracks")
    p.add_argument("audio", metavar="AUDIO", help="audio (or video) file")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for speech.wav, effects.wav, music.wav")
    p.add_argument("--float", action="store_true", help="write 32-bit float WAV instead of 16-bit PCM")
    add_common_options(p)
    add_node_arguments(p, "AVSyncAudioLoader", skip=LOADER_SKIP, defaults={"max_duration": 3600.0},
                       title="audio (AVSyncAudioLoader)")
    add_node_arguments(p, "AVSyncDemixer", choice_aliases={"method": {"mrx": "model"}},
                       title="demixing (AVSyncDemixer)")
    add_node_arguments(p, "AVSyncDemixModelLoader", rename={"model_name": "model"}, paths=("model_name",),
                       defaults={"model_name": None}, title="model (AVSyncDemixModelLoader)",
                       notes={"model_name": "Given: --method auto uses it. Not given: --method model uses "
                                            "mrx_default.safetensors."})
    set_input_flags(p, {"audio_file": "AUDIO", "demix_model": "--model"})
    p.set_defaults(func=run)


def _model(name: str | None):
    from ..loaders.demix import DEFAULT_KEY, FOLDER, SPECS, load_demix_model
    from .common import path_outside_model_folders, run_node

    name = name or SPECS[DEFAULT_KEY].filename
    path = path_outside_model_folders(name, FOLDER)
    if path is not None:
        return load_demix_model(path)  # a file outside the model folder: the loader node's own function
    (model,) = run_node("AVSyncDemixModelLoader", model_name=name)
    return model


def run(args) -> int:
    from .common import (check_input_file, check_output_dir, load_audio_file, run_node, save_audio_file,
                         staged_outputs)
    from .schema_args import node_inputs_from_args

    check_input_file(args.audio, "AUDIO")
    out = check_output_dir(args.out, "--out", STEM_FILES, bool(getattr(args, "force", False)))
    inputs = node_inputs_from_args(args, "AVSyncDemixer")
    model_name = node_inputs_from_args(args, "AVSyncDemixModelLoader")["model_name"]
    use_model = inputs["method"] == "model" or (inputs["method"] == "auto" and model_name)
    audio, _ = load_audio_file(args.audio, **node_inputs_from_args(args, "AVSyncAudioLoader"))
    inputs.update(audio=audio, method="model" if use_model else "dsp")
    if use_model:
        inputs["demix_model"] = _model(model_name)
    stems = run_node("AVSyncDemixer", **inputs)
    with staged_outputs() as stage:
        for name, stem in zip(STEM_FILES, stems):
            save_audio_file(stage(out / name), stem, bits=32 if args.float else 16)
    if not getattr(args, "quiet", False):
        wav = audio["waveform"]
        print(f"{wav.shape[-2]} ch, {wav.shape[-1] / audio['sample_rate']:.2f} s at {audio['sample_rate']} Hz "
              f"({inputs['method']}) -> {', '.join(str(out / n) for n in STEM_FILES)}")
    return 0
