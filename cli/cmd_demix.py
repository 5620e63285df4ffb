"""``avsync demix AUDIO --out DIR``: speech / effects / music stems of an audio file,
through the same node code a ComfyUI workflow runs (AVSyncAudioLoader →
[AVSyncDemixModelLoader →] AVSyncDemixer). Writes ``DIR/speech.wav``,
``DIR/effects.wav`` and ``DIR/music.wav`` at the input's rate, length and channels."""

from __future__ import annotations

from pathlib import Path

STEM_FILES = ("speech.wav", "effects.wav", "music.wav")


def register(sub) -> None:
    p = sub.add_parser("demix", help="split audio into speech, effects and music tracks")
    p.add_argument("audio", metavar="AUDIO", help="audio (or video) file")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for speech.wav, effects.wav, music.wav")
    p.add_argument("--method", choices=("auto", "dsp", "mrx"), default="auto",
                   help="dsp: weights-free separator; mrx: the MRX network (default file mrx_default.safetensors); "
                        "auto: mrx when --model is given, else dsp")
    p.add_argument("--model", default=None, metavar="FILE",
                   help="demix model: a name in the avsync_demix model folder, or a path to a converted .safetensors")
    p.add_argument("--chunk-seconds", type=float, default=20.0, help="chunk length in seconds (default 20)")
    p.add_argument("--overlap", type=float, default=0.1, help="cross-faded overlap, fraction of a chunk (default 0.1)")
    p.add_argument("--float", action="store_true", help="write 32-bit float WAV instead of 16-bit PCM")
    p.add_argument("--max-duration", type=float, default=3600.0,
                   help="refuse inputs longer than this many seconds (default 3600)")
    p.set_defaults(func=run)


def _model(args):
    from .. import compat
    from ..loaders.demix import DEFAULT_KEY, FOLDER, SPECS, load_demix_model
    from .common import run_node

    name = args.model or SPECS[DEFAULT_KEY].filename
    if compat.find_model_file(FOLDER, name) is None and Path(name).is_file():
        return load_demix_model(Path(name))  # a file outside the model folder: the loader node's own function
    (model,) = run_node("AVSyncDemixModelLoader", model_name=name)
    return model


def run(args) -> int:
    from .common import load_audio_file, run_node, save_audio_file

    use_model = args.method == "mrx" or (args.method == "auto" and args.model)
    audio, _ = load_audio_file(args.audio, max_duration=args.max_duration)
    inputs = dict(audio=audio, method="model" if use_model else "dsp", chunk_seconds=args.chunk_seconds,
                  overlap=args.overlap)
    if use_model:
        inputs["demix_model"] = _model(args)
    stems = run_node("AVSyncDemixer", **inputs)
    out = Path(args.out)
    for name, stem in zip(STEM_FILES, stems):
        save_audio_file(out / name, stem, bits=32 if args.float else 16)
    wav = audio["waveform"]
    print(f"{wav.shape[-2]} ch, {wav.shape[-1] / audio['sample_rate']:.2f} s at {audio['sample_rate']} Hz "
          f"({inputs['method']}) -> {', '.join(str(out / n) for n in STEM_FILES)}")
    return 0
