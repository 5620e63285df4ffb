"""``avsync inbetween --first A.png --last B.png --out out.mp4``: the frames between two
images with SVD-XT (Generative Inbetweening), through the same node code a ComfyUI
workflow runs (AVSyncDualDirectionalSampler)."""

from __future__ import annotations


VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".m4v"}


def register(sub) -> None:
    from .common import add_common_options
    from .schema_args import add_node_arguments, set_input_flags

    p = sub.add_parser("inbetween", help="generate the video between a first and a last image (SVD-XT inbetweening)")
    p.add_argument("--first", required=True, metavar="IMAGE", help="first keyframe image (PNG/JPG)")
    p.add_argument("--last", required=True, metavar="IMAGE", help="last keyframe image (PNG/JPG)")
    p.add_argument("--out", required=True, metavar="VIDEO",
                   help="video to write (H.264: .mp4, .mov, .mkv or .m4v); frames also as PNGs with --frames-dir")
    p.add_argument("--frames-dir", default=None, metavar="DIR", help="also write every frame as PNG into this folder")
    add_common_options(p)
    add_node_arguments(p, "AVSyncSVDLoader", rename={"model": "svd"}, paths=("model",),
                       notes={"model": "Or a diffusers folder in models/diffusers."}, title="SVD-XT (AVSyncSVDLoader)")
    add_node_arguments(p, "AVSyncBackwardMotionLoader", rename={"backward_weights": "backward"},
                       paths=("backward_weights",), notes={"backward_weights": "Used by --variant full only."},
                       title="backward-motion weights (AVSyncBackwardMotionLoader)")
    add_node_arguments(p, "AVSyncDualDirectionalSampler", title="sampling (AVSyncDualDirectionalSampler)")
    set_input_flags(p, {"first_image": "--first", "last_image": "--last", "svd_model": "--svd"})
    p.set_defaults(func=run)


def _load_models(args, variant: str):
    """(svd_model, backward_weights) for the sampler: names in the model folders go through the
    loader nodes (AVSyncSVDLoader, AVSyncBackwardMotionLoader) as in a workflow; an existing
    path is loaded with the loader functions those nodes call."""
    from .. import compat
    from ..loaders import svd as svd_loader
    from .common import path_outside_model_folders, run_node
    from .schema_args import node_inputs_from_args

    svd_inputs = node_inputs_from_args(args, "AVSyncSVDLoader")
    name, precision = svd_inputs["model"], svd_inputs["precision"]
    path = path_outside_model_folders(name, svd_loader.SVD_XT_FILE.folder, svd_loader.SVD_XT_DIFFUSERS.folder)
    if path is not None:
        model = svd_loader.load_svd(path, svd_loader.auto_precision(compat.torch_device())
                                    if precision == "auto" else precision)
    else:
        (model,) = run_node("AVSyncSVDLoader", model=name, precision=precision)
    backward = None
    if variant == "full":
        name = node_inputs_from_args(args, "AVSyncBackwardMotionLoader")["backward_weights"]
        path = path_outside_model_folders(name, svd_loader.SVD_BACKWARD_FILE.folder)
        if path is not None:
            backward = svd_loader.load_backward_delta(path)
        else:
            (backward,) = run_node("AVSyncBackwardMotionLoader", backward_weights=name)
    return model, backward


def run(args) -> int:
    from .common import (check_input_file, check_output_dir, check_output_file, load_image, run_node, staged_outputs,
                         validate_node_inputs, write_mp4)
    from .schema_args import node_inputs_from_args

    force = bool(getattr(args, "force", False))
    inputs = node_inputs_from_args(args, "AVSyncDualDirectionalSampler")
    check_input_file(args.first, "--first")
    check_input_file(args.last, "--last")
    out = check_output_file(args.out, "--out", force, VIDEO_SUFFIXES, "video")
    frame_names = [f"frame_{i:03d}.png" for i in range(inputs["frames"])]
    frames_dir = check_output_dir(args.frames_dir, "--frames-dir", frame_names, force) if args.frames_dir else None
    first, last = load_image(args.first, "--first"), load_image(args.last, "--last")
    # every widget value is checked before the (multi-GB) SVD model is loaded
    validate_node_inputs("AVSyncDualDirectionalSampler", dict(inputs))
    model, backward = _load_models(args, inputs["variant"])
    (frames,) = run_node("AVSyncDualDirectionalSampler", svd_model=model, backward_weights=backward,
                         first_image=first, last_image=last, **inputs)
    with staged_outputs() as stage:
        write_mp4(stage(out), frames, inputs["fps"])
        if frames_dir is not None:
            from PIL import Image

            for name, f in zip(frame_names, frames):
                Image.fromarray((f.numpy() * 255).round().astype("uint8")).save(stage(frames_dir / name))
    if not getattr(args, "quiet", False):
        print(f"{frames.shape[0]} frames {frames.shape[2]}x{frames.shape[1]} at {inputs['fps']} fps -> {out}")
    return 0
