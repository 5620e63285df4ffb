"""``avsync localize AUDIO --out result.json``: keyframes from an audio file, through
the same node code (AVSyncAudioLoader → AVSyncLocalizerModelLoader →
AVSyncKeyframeLocalizer) a ComfyUI workflow runs. Every node input is a flag generated
from the node schemas (cli/schema_args.py)."""

from __future__ import annotations

LOADER_SKIP = {"audio_file": "the AUDIO argument"}


def register(sub) -> None:
    from .common import add_common_options
    from .schema_args import add_node_arguments, set_input_flags

    p = sub.add_parser("localize", help="find keyframes in an audio file (KeyVID keyframe localizer)",
                       description="Find keyframes in an audio file: the AVSyncAudioLoader and "
                                   "AVSyncKeyframeLocalizer nodes, run from the command line.")
    p.add_argument("audio", metavar="AUDIO", help="audio (or video) file")
    p.add_argument("--out", required=True, metavar="FILE.json",
                   help="JSON file to write (fps, num_frames, curve, peaks, valleys, keyframes)")
    p.add_argument("--plot", default=None, metavar="IMAGE",
                   help="also save the plot as an image (.png, .jpg, ... any format Pillow writes)")
    p.add_argument("--driving-audio", default=None, metavar="FILE",
                   help="another track to find the moments in (e.g. demix's effects.wav), read with the same "
                        "start/duration/rate settings; it must cover the same stretch of time as AUDIO")
    add_common_options(p)
    add_node_arguments(p, "AVSyncAudioLoader", skip=LOADER_SKIP, title="audio (AVSyncAudioLoader)")
    add_node_arguments(p, "AVSyncKeyframeLocalizer", title="keyframes (AVSyncKeyframeLocalizer)")
    add_node_arguments(p, "AVSyncLocalizerModelLoader", rename={"model_name": "model"}, paths=("model_name",),
                       title="model (AVSyncLocalizerModelLoader, method learned)")
    set_input_flags(p, {"audio_file": "AUDIO", "driving_audio": "--driving-audio"})
    p.set_defaults(func=run)


def run(args) -> int:
    from .common import (OutputError, check_input_file, check_output_file, image_suffixes, load_audio_file, run_node,
                         staged_outputs, write_json_to)
    from .schema_args import node_inputs_from_args

    force = bool(getattr(args, "force", False))
    check_input_file(args.audio, "AUDIO")
    if args.driving_audio:
        check_input_file(args.driving_audio, "--driving-audio")
    out = check_output_file(args.out, "--out", force)
    plot_path = check_output_file(args.plot, "--plot", force, image_suffixes(), "image") if args.plot else None
    if plot_path is not None and plot_path.resolve() == out.resolve():
        raise OutputError("--plot", plot_path, "is the same file as --out")
    loader = node_inputs_from_args(args, "AVSyncAudioLoader")
    inputs = node_inputs_from_args(args, "AVSyncKeyframeLocalizer")
    audio, timeline = load_audio_file(args.audio, **loader, option="AUDIO")
    inputs.update(audio=audio, timeline=timeline)
    if args.driving_audio:
        inputs["driving_audio"], _ = load_audio_file(args.driving_audio, **loader, option="--driving-audio")
    if inputs["method"] == "learned":
        model = node_inputs_from_args(args, "AVSyncLocalizerModelLoader")["model_name"]
        inputs["localizer_model"] = _localizer(model)
    keyframes, plot = run_node("AVSyncKeyframeLocalizer", **inputs)
    with staged_outputs() as stage:
        write_json_to(stage(out), keyframes.to_dict())
        if plot_path is not None:
            from PIL import Image

            Image.fromarray((plot[0].numpy() * 255).round().astype("uint8")).save(stage(plot_path))
    if not getattr(args, "quiet", False):
        print(f"{len(keyframes.indices)} keyframes over {keyframes.num_frames} frames at {keyframes.fps:g} fps "
              f"-> {out}" + (f", plot {plot_path}" if plot_path else ""))
    return 0


def _localizer(name: str):
    """A name in the avsync_localizer folder goes through the loader node; an existing path is
    loaded with the function that node calls."""
    from .. import compat
    from ..loaders.localizer import FOLDER, load_localizer
    from .common import path_outside_model_folders, run_node

    path = path_outside_model_folders(name, FOLDER)
    if path is not None:
        net = load_localizer(path)
        return compat.manage_model(net, {"file": str(path), "config": net.cfg.to_dict()})
    (model,) = run_node("AVSyncLocalizerModelLoader", model_name=name)
    return model
