"""``avsync demix AUDIO --out DIR``: speech / effects / music stems of an audio file,
through the same demixer the AVSyncDemixer node runs ([AVSyncDemixModelLoader →]
``samplers.demix``), but streamed: the file is decoded, demixed and written chunk by
chunk (:func:`avsync.samplers.demix.demix_file`), so memory stays flat in its length.
Writes ``DIR/speech.wav``, ``DIR/effects.wav`` and ``DIR/music.wav`` at the input's rate
and length. Node inputs are flags generated from the node schemas (cli/schema_args.py)."""

from __future__ import annotations

STEM_FILES = ("speech.wav", "effects.wav", "music.wav")
LOADER_SKIP = {"audio_file": "the AUDIO argument", "fps": "demix has no video frame grid",
               "sample_rate": "the stems are written at the file's own rate (streamed, no resampling)"}


def register(sub) -> None:
    from .common import add_common_options
    from .schema_args import add_node_arguments, set_input_flags

    p = sub.add_parser("demix", help="split audio into speech, effects and music tracks")
    p.add_argument("audio", metavar="AUDIO", help="audio (or video) file")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for speech.wav, effects.wav, music.wav")
    p.add_argument("--float", action="store_true", help="write 32-bit float WAV instead of 16-bit PCM")
    add_common_options(p)
    # Memory does not grow with the length (the stems are streamed to disk), so the CLI's
    # limit is a day rather than the node's 10 minutes.
    add_node_arguments(p, "AVSyncAudioLoader", skip=LOADER_SKIP, defaults={"max_duration": 86400.0},
                       title="audio (AVSyncAudioLoader)")
    add_node_arguments(p, "AVSyncDemixer", choice_aliases={"method": {"mrx": "model"}},
                       title="demixing (AVSyncDemixer)")
    add_node_arguments(p, "AVSyncDemixModelLoader", rename={"model_name": "model"}, paths=("model_name",),
                       defaults={"model_name": None}, title="model (AVSyncDemixModelLoader)",
                       notes={"model_name": "Given: --method auto uses it. Not given: --method model uses "
                                            "mrx_default.safetensors, --method bandit_v2 bandit_v2_multi.safetensors."})
    set_input_flags(p, {"audio_file": "AUDIO", "demix_model": "--model"})
    p.set_defaults(func=run)


def demix_method(chosen: str, model_name: str | None) -> str:
    """What runs for the demixer's ``method`` choice and a model file (or None): ``"model"``,
    ``"bandit_v2"``, ``"learned"`` or ``"dsp"`` (``auto`` uses the model when one is given, as
    the node does when one is connected)."""
    from ..samplers.demix import uses_model, weights_free_method

    if not uses_model(chosen, model_name or None):
        return weights_free_method(chosen)
    return chosen if chosen == "bandit_v2" else "model"


def demix_model_for(method: str, model_name: str | None, flag: str = "--model"):
    """The demix model :func:`demix_method`'s ``method`` needs (None for ``dsp``), checked against
    it; ``flag`` names the option in errors (``avsync mtv`` has ``--demix-model``)."""
    from ..core.errors import InputError

    if method in ("dsp", "learned"):
        return None
    model = _model(model_name, method)
    if method == "bandit_v2" and model.family != "bandit_v2":
        raise InputError(flag, f"--method bandit_v2 needs a BandIt v2 model, got a {model.family} model "
                               f"({model.name})")
    return model


def _model(name: str | None, method: str = "model"):
    from ..loaders.demix import BANDIT_DEFAULT_KEY, DEFAULT_KEY, FOLDER, SPECS, load_demix_model
    from .common import path_outside_model_folders, run_node

    name = name or SPECS[BANDIT_DEFAULT_KEY if method == "bandit_v2" else DEFAULT_KEY].filename
    path = path_outside_model_folders(name, FOLDER)
    if path is not None:
        return load_demix_model(path)  # a file outside the model folder: the loader node's own function
    (model,) = run_node("AVSyncDemixModelLoader", model_name=name)
    return model


def _return_freed_memory() -> None:
    """Have glibc serve blocks of 128 KiB and more by mmap and unmap them when freed.
    With its default (a threshold that rises after each large free), chunk-sized
    blocks land in the heap and resident memory creeps up with the number of chunks
    through fragmentation although nothing is held (measured: +77..+120 MB from 60 s
    to 600 s of input; with this, +3 MB). Only this command's process is affected."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(-3, 128 * 1024)   # M_MMAP_THRESHOLD
    except OSError:
        pass


def run(args) -> int:
    from ..core.errors import InputError
    from ..nodes.demix_nodes import AVSyncDemixer
    from ..samplers.demix import demix_file
    from .common import check_input_file, check_output_dir
    from .schema_args import node_inputs_from_args, translate_message

    check_input_file(args.audio, "AUDIO")
    out = check_output_dir(args.out, "--out", STEM_FILES, bool(getattr(args, "force", False)))
    inputs = node_inputs_from_args(args, "AVSyncDemixer")
    loader = node_inputs_from_args(args, "AVSyncAudioLoader")
    model_name = node_inputs_from_args(args, "AVSyncDemixModelLoader")["model_name"]
    method = demix_method(inputs["method"], model_name)
    msg = AVSyncDemixer.check_widgets(method, inputs["chunk_seconds"], inputs["overlap"])
    if msg is not True:
        option, _, problem = translate_message(args, str(msg)).partition(": ")
        raise InputError(option, problem)
    model = demix_model_for(method, model_name)
    _return_freed_memory()
    r = demix_file(args.audio, out, method, model, inputs["chunk_seconds"], inputs["overlap"],
                   bits=32 if args.float else 16, max_seconds=loader["max_duration"], stem_files=STEM_FILES,
                   start=loader["start"], duration=loader["duration"], channel_mode=loader["channels"])
    if not getattr(args, "quiet", False):
        print(f"{r['channels']} ch, {r['samples'] / r['sample_rate']:.2f} s at {r['sample_rate']} Hz "
              f"({method}) -> {', '.join(str(p) for p in r['paths'])}")
    return 0
