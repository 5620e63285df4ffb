"""``avsync mtv --prompt TEXT --audio MIX [--speech F --effects F --music F] --out out.mp4``: MTV from the
command line — a 480×720 video at 24 fps whose lips follow the speech, events the effects and mood the
music, with the original mix muxed in.

It runs the nodes of ``example_workflows/avsync_mtv.json`` in the same order: AVSyncAudioLoader (the
mix) → AVSyncDemixer (only for the stems not given as files) → AVSyncMTVLoader → AVSyncMTVGenerator,
then writes H.264 + AAC (``cli/common.py:write_mp4``, the mix cut to the video's length, as the
release trims it). Every widget input of those nodes is a flag (``cli/schema_args.py``); the demixer's
carry ``--demix-``. Model entries are names in the model folders or paths.
"""

from __future__ import annotations

from .cmd_inbetween import VIDEO_SUFFIXES

LOADER, GENERATOR, DEMIXER, AUDIO_LOADER = "AVSyncMTVLoader", "AVSyncMTVGenerator", "AVSyncDemixer", "AVSyncAudioLoader"
DEMIX_LOADER = "AVSyncDemixModelLoader"
STEMS = ("speech", "effects", "music")
AUDIO_SKIP = {"audio_file": "--audio", "fps": "MTV generates at 24 fps",
              "sample_rate": "each track is resampled to 16 kHz for wav2vec2; the mix keeps its rate in the mp4"}


def register(sub) -> None:
    from .common import add_common_options
    from .schema_args import add_node_arguments, set_input_flags

    p = sub.add_parser("mtv", help="text + audio -> a video where speech drives the lips, effects the events, "
                                   "music the mood (MTV)",
                       description="Demix the audio (unless the stems are given), generate the video with MTV "
                                   "and write an mp4 with the original mix: the nodes of the avsync_mtv "
                                   "workflow, from the command line.")
    p.add_argument("--audio", required=True, metavar="MIX", help="the soundtrack (audio or video file); muxed into "
                                                               "the output, and demixed for any stem not given")
    for stem in STEMS:
        p.add_argument(f"--{stem}", default=None, metavar="FILE",
                       help=f"the {stem} track as a file (skips demixing it from --audio)")
    p.add_argument("--speech2", default=None, metavar="FILE", help="second speaker's track (variant multi)")
    p.add_argument("--out", required=True, metavar="VIDEO", help="video to write (H.264 + AAC: .mp4, .mov, .mkv, .m4v)")
    add_common_options(p)
    add_node_arguments(p, AUDIO_LOADER, skip=AUDIO_SKIP, title="audio (AVSyncAudioLoader; every track)")
    add_node_arguments(p, DEMIXER, prefix="demix-", title=f"demixing ({DEMIXER}; flags start with --demix-)")
    # the demix model file, as `avsync demix --model` takes it (cmd_demix.py: same defaults and loading)
    add_node_arguments(p, DEMIX_LOADER, prefix="demix-", rename={"model_name": "model"}, paths=("model_name",),
                       defaults={"model_name": None}, title=f"demix model ({DEMIX_LOADER})",
                       notes={"model_name": "Given: --demix-method auto uses it. Not given: --demix-method model "
                                            "uses mrx_default.safetensors, --demix-method bandit_v2 "
                                            "bandit_v2_multi.safetensors."})
    add_node_arguments(p, LOADER, paths=("transformer", "vae", "t5", "wav2vec"), title=f"model ({LOADER})")
    add_node_arguments(p, GENERATOR, title=f"generation ({GENERATOR})")
    set_input_flags(p, {"audio_file": "--audio", "speech": "--speech", "effects": "--effects", "music": "--music",
                        "speech2": "--speech2", "demix_model": "--demix-model"})
    p.set_defaults(func=run)


def _model(inputs: dict):
    """The loader node's files as names in the model folders or paths, loaded with the function the node calls."""
    from ..loaders.mtv import FOLDER, SOURCE, VAE_SOURCE
    from ..nodes.mtv_nodes import (T5_FOLDER, T5_SOURCE, WAV2VEC_FOLDER, WAV2VEC_SOURCE, _resolve,
                                   _tokenizer_folder)
    from ..samplers.mtv import load_mtv_model
    from .common import path_outside_model_folders, validate_node_inputs

    validate_node_inputs(LOADER, dict(inputs))
    paths = []
    for name, folder, source in (("transformer", FOLDER, SOURCE), ("vae", FOLDER, VAE_SOURCE),
                                 ("t5", T5_FOLDER, T5_SOURCE), ("wav2vec", WAV2VEC_FOLDER, WAV2VEC_SOURCE)):
        direct = path_outside_model_folders(str(inputs[name]), folder)
        paths.append(direct if direct is not None else _resolve(folder, inputs[name], name, source))
    return load_mtv_model(inputs["variant"], *paths, tokenizer=_tokenizer_folder(paths[2]), storage=inputs["storage"],
                          block_swap=int(inputs["block_swap"]), precision=inputs["precision"],
                          audio_proj_on_cpu=bool(inputs.get("audio_proj_on_cpu", True)))


def run(args) -> int:
    from .common import (check_input_file, check_output_file, load_audio_file, run_node, staged_outputs,
                         validate_node_inputs, write_mp4)
    from .schema_args import node_inputs_from_args

    force = bool(getattr(args, "force", False))
    check_input_file(args.audio, "--audio")
    given = {k: getattr(args, k) for k in STEMS + ("speech2",) if getattr(args, k) is not None}
    for k, path in given.items():
        check_input_file(path, f"--{k}")
    out = check_output_file(args.out, "--out", force, VIDEO_SUFFIXES, "video")
    loader = node_inputs_from_args(args, AUDIO_LOADER)
    gen = node_inputs_from_args(args, GENERATOR)
    model_inputs = node_inputs_from_args(args, LOADER)
    demix = node_inputs_from_args(args, DEMIXER)
    # every widget value is checked before any audio is decoded or model loaded
    validate_node_inputs(GENERATOR, dict(gen))
    validate_node_inputs(DEMIXER, dict(demix))
    validate_node_inputs(LOADER, dict(model_inputs))
    if model_inputs["variant"] == "multi" and "speech2" not in given:
        from ..core.errors import InputError

        raise InputError("--speech2", "variant multi needs the second speaker's track (--speech is speaker 1)")

    demix_model = None
    if any(k not in given for k in STEMS):   # the demix model file is checked before any audio is decoded
        from .cmd_demix import demix_method, demix_model_for

        model_name = node_inputs_from_args(args, DEMIX_LOADER)["model_name"]
        demix_model = demix_model_for(demix_method(demix["method"], model_name), model_name, "--demix-model")
    mix, _timeline = load_audio_file(args.audio, **loader, option="--audio")
    tracks = {k: load_audio_file(path, **loader, option=f"--{k}")[0] for k, path in given.items()}
    missing = [k for k in STEMS if k not in tracks]
    if missing:
        stems = dict(zip(STEMS, run_node(DEMIXER, audio=mix, demix_model=demix_model, **demix)))
        tracks.update({k: stems[k] for k in missing})
    model = _model(model_inputs)
    frames, fps = run_node(GENERATOR, mtv_model=model, **tracks, **gen)
    with staged_outputs() as stage:
        write_mp4(stage(out), frames, fps, mix)
    if not getattr(args, "quiet", False):
        demixed = f" (demixed: {', '.join(missing)})" if missing else ""
        print(f"{frames.shape[0]} frames {frames.shape[2]}x{frames.shape[1]} at {fps:g} fps + mix{demixed} -> {out}")
    return 0
