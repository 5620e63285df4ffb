"""``avsync animate --image IMG --audio AUDIO --prompt TEXT --out out.mp4``: the main job, an image and a
sound in, a 24 fps video whose motion hits the sound out (KeyVID).

It runs the nodes a ComfyUI workflow runs (``example_workflows/avsync_keyvid_animate.json``), in the
same order: AVSyncAudioLoader → AVSyncKeyframeLocalizer → AVSyncKeyVIDGeneratorLoader +
AVSyncKeyframeGenerator → AVSyncKeyVIDInterpolatorLoader + AVSyncMotionInterpolator, then writes
the frames as H.264 with the audio muxed in as AAC (``cli/common.py:write_mp4``). Every widget
input of those nodes is a flag (``cli/schema_args.py``); the interpolator's carry ``--interp-``
(both samplers have steps, scales, η). One ``--seed`` seeds both samplers, so the same seed gives
the same video.
"""

from __future__ import annotations

from .cmd_inbetween import VIDEO_SUFFIXES
from .cmd_localize import LOADER_SKIP

GENERATOR, INTERPOLATOR = "AVSyncKeyframeGenerator", "AVSyncMotionInterpolator"
GEN_LOADER, INTERP_LOADER = "AVSyncKeyVIDGeneratorLoader", "AVSyncKeyVIDInterpolatorLoader"
INTERP_PREFIX = "interp-"


def register(sub) -> None:
    from .common import add_common_options
    from .schema_args import add_node_arguments, set_input_flags

    p = sub.add_parser("animate", help="image + audio -> a video whose motion hits the sound (KeyVID)",
                       description="Localize keyframes in the audio, generate them with KeyVID's keyframe "
                                   "generator from the image, fill every frame between with its motion "
                                   "interpolator and write an mp4 with the audio: the nodes of the "
                                   "avsync_keyvid_animate workflow, from the command line.")
    p.add_argument("--image", required=True, metavar="IMAGE", help="first frame (PNG/JPG)")
    p.add_argument("--audio", required=True, metavar="AUDIO", help="audio (or video) file that drives the motion")
    p.add_argument("--out", required=True, metavar="VIDEO",
                   help="video to write (H.264 + AAC: .mp4, .mov, .mkv or .m4v)")
    add_common_options(p)
    add_node_arguments(p, "AVSyncAudioLoader", skip=LOADER_SKIP, title="audio (AVSyncAudioLoader)")
    add_node_arguments(p, "AVSyncKeyframeLocalizer", rename={"seed": "keyframe-seed"},
                       title="keyframes (AVSyncKeyframeLocalizer)")
    add_node_arguments(p, "AVSyncLocalizerModelLoader", rename={"model_name": "localizer-model"},
                       paths=("model_name",), title="localizer model (AVSyncLocalizerModelLoader, method learned)")
    add_node_arguments(p, GEN_LOADER, rename={"unet": "generator", "precision": "precision"}, paths=("unet",),
                       title=f"keyframe generator model ({GEN_LOADER})")
    add_node_arguments(p, INTERP_LOADER, rename={"unet": "interpolator"}, paths=("unet",),
                       skip={"precision": "--precision (both models load in one precision)"},
                       title=f"motion interpolator model ({INTERP_LOADER})")
    add_node_arguments(p, GENERATOR, title=f"keyframe generation ({GENERATOR})")
    add_node_arguments(p, INTERPOLATOR, prefix=INTERP_PREFIX, skip={"seed": "--seed (one seed for both samplers)"},
                       title=f"motion interpolation ({INTERPOLATOR}; flags start with --{INTERP_PREFIX})")
    set_input_flags(p, {"audio_file": "--audio"})
    p.set_defaults(func=run)


def _keyvid_model(args, node_id: str, role: str, precision: str):
    """A name in models/avsync/keyvid goes through the loader node, as in a workflow; an existing path
    is loaded with the function that node calls (companions beside it)."""
    from .. import compat
    from ..loaders.keyvid import FOLDER, auto_precision, load_keyvid
    from .common import path_outside_model_folders, run_node
    from .schema_args import node_inputs_from_args

    name = node_inputs_from_args(args, node_id)["unet"]
    path = path_outside_model_folders(name, FOLDER)
    if path is None:
        (model,) = run_node(node_id, unet=name, precision=precision)
        return model
    if precision == "auto":
        precision = auto_precision(compat.torch_device())
    return load_keyvid(path, precision, role=role, search=lambda n: compat.find_model_file(FOLDER, n))


def run(args) -> int:
    from .cmd_localize import _localizer
    from .common import (check_input_file, check_output_file, load_audio_file, load_image, run_node, staged_outputs,
                         validate_node_inputs, write_mp4)
    from .schema_args import node_inputs_from_args

    force = bool(getattr(args, "force", False))
    check_input_file(args.image, "--image")
    check_input_file(args.audio, "--audio")
    out = check_output_file(args.out, "--out", force, VIDEO_SUFFIXES, "video")
    image = load_image(args.image, "--image")
    audio, timeline = load_audio_file(args.audio, **node_inputs_from_args(args, "AVSyncAudioLoader"),
                                       option="--audio")

    localize = node_inputs_from_args(args, "AVSyncKeyframeLocalizer")
    if localize["method"] == "learned":
        localize["localizer_model"] = _localizer(node_inputs_from_args(args, "AVSyncLocalizerModelLoader")["model_name"])
    keyframes, _plot = run_node("AVSyncKeyframeLocalizer", audio=audio, timeline=timeline, **localize)

    gen_inputs = node_inputs_from_args(args, GENERATOR)
    interp_inputs = node_inputs_from_args(args, INTERPOLATOR)
    interp_inputs["seed"] = gen_inputs["seed"]
    # both samplers' widget values are checked before either model is loaded
    for node_id, inputs in ((GENERATOR, gen_inputs), (INTERPOLATOR, interp_inputs)):
        validate_node_inputs(node_id, dict(inputs))
    precision = node_inputs_from_args(args, GEN_LOADER)["precision"]
    gen_model = _keyvid_model(args, GEN_LOADER, "generator", precision)
    _images, keyvid_keyframes = run_node(GENERATOR, model=gen_model, image=image, audio=audio, keyframes=keyframes,
                                         **gen_inputs)
    interp_model = _keyvid_model(args, INTERP_LOADER, "interpolator", precision)
    (frames,) = run_node(INTERPOLATOR, interp_model=interp_model, keyvid_keyframes=keyvid_keyframes,
                         keyframes=keyframes, audio=audio, **interp_inputs)
    fps = float(keyframes.fps)
    with staged_outputs() as stage:
        write_mp4(stage(out), frames, fps, audio)
    if not getattr(args, "quiet", False):
        print(f"{frames.shape[0]} frames {frames.shape[2]}x{frames.shape[1]} at {fps:g} fps "
              f"({len(keyframes.clips)} clip(s) of {keyframes.clip_frames} frames) + audio -> {out}")
    return 0
