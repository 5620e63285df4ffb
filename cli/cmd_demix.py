"""``avsync demix AUDIO --out DIR``: speech / effects / music stems of an audio file,
through the same demixer the AVSyncDemixer node runs ([AVSyncDemixModelLoader →]
``samplers.demix``), but streamed: the file is decoded, demixed and written chunk by
chunk, so memory stays flat in its length. Writes ``DIR/speech.wav``,
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
    p.add_argument("--max-duration", type=float, default=86400.0,
                   help="refuse inputs longer than this many seconds (default 86400: memory does not grow with "
                        "the length, the stems are streamed to disk)")
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
    """Streams: the file is decoded, demixed and written chunk by chunk
    (:func:`avsync.samplers.demix.demix_file`), so memory does not grow with its length."""
    from ..core.errors import InputError
    from ..nodes.demix_nodes import AVSyncDemixer
    from ..samplers.demix import demix_file

    use_model = args.method == "mrx" or (args.method == "auto" and args.model)
    method = "model" if use_model else "dsp"
    msg = AVSyncDemixer.VALIDATE_INPUTS(method, args.chunk_seconds, args.overlap)
    if msg is not True:
        name, _, problem = msg.partition(": ")
        raise InputError(name.replace("_", "-"), problem)
    model = _model(args) if use_model else None
    _return_freed_memory()
    out = Path(args.out)
    r = demix_file(args.audio, out, method, model, args.chunk_seconds, args.overlap, bits=32 if args.float else 16,
                   max_seconds=args.max_duration, stem_files=STEM_FILES)
    print(f"{r['channels']} ch, {r['samples'] / r['sample_rate']:.2f} s at {r['sample_rate']} Hz "
          f"({method}) -> {', '.join(str(p) for p in r['paths'])}")
    return 0
