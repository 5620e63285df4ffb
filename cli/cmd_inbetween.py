"""``avsync inbetween --first A.png --last B.png --out out.mp4``: the frames between two
images with SVD-XT (Generative Inbetweening), through the same node code a ComfyUI
workflow runs (AVSyncDualDirectionalSampler)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path


def register(sub) -> None:
    from ..samplers.inbetween import CFG_SCHEDULES, EXECUTIONS, FUSE_MODES, VARIANTS, InbetweenSettings

    d = InbetweenSettings()
    p = sub.add_parser("inbetween", help="generate the video between a first and a last image (SVD-XT inbetweening)")
    p.add_argument("--first", required=True, help="first keyframe image (PNG/JPG)")
    p.add_argument("--last", required=True, help="last keyframe image (PNG/JPG)")
    p.add_argument("--out", required=True, help="video to write (.mp4, H.264) ; frames also as PNGs with --frames-dir")
    p.add_argument("--models", dest="inbetween_models", metavar="DIR", default=None,
                   help="models directory (same as the global --models)")
    p.add_argument("--svd", default=None, help="SVD-XT: a file in models/checkpoints, a diffusers folder in "
                                               "models/diffusers, or a path (default svd_xt.safetensors)")
    p.add_argument("--backward", default=None, help="backward-motion ΔW file in models/avsync/svd_backward or a path "
                                                    "(default svd_backward_motion_delta_fp16.safetensors)")
    p.add_argument("--precision", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
                   help="weight precision (auto: fp16 on CUDA, bf16 on MPS, fp32 on CPU)")
    p.add_argument("--frames", type=int, default=d.num_frames)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--height", type=int, default=d.height)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--cfg", type=float, default=d.cfg)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--renoise-repeats", type=int, default=d.renoise_repeats)
    p.add_argument("--renoise-ratio", type=float, default=d.renoise_ratio)
    p.add_argument("--fuse", choices=FUSE_MODES, default=d.fuse)
    p.add_argument("--decode-chunk-size", type=int, default=d.decode_chunk_size)
    p.add_argument("--variant", choices=VARIANTS, default=d.variant)
    p.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, default=d.cfg_schedule)
    p.add_argument("--min-cfg", type=float, default=d.min_cfg)
    p.add_argument("--motion-bucket-id", type=int, default=d.motion_bucket_id)
    p.add_argument("--fps", type=int, default=d.fps, help="conditioning fps and the video's frame rate (default 7)")
    p.add_argument("--noise-aug-strength", type=float, default=d.noise_aug_strength)
    p.add_argument("--execution", choices=EXECUTIONS, default=d.execution)
    p.add_argument("--frames-dir", default=None, help="also write every frame as PNG into this folder")
    p.set_defaults(func=run)


def load_image(path) -> "torch.Tensor":
    """An image file as IMAGE ``[1, H, W, 3]`` (0..1), as core LoadImage gives it."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    from ..core.errors import InputError

    try:
        img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    except (OSError, ValueError) as err:
        raise InputError(str(path), f"cannot read the image ({err})") from None
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


def write_mp4(path, frames, fps) -> None:
    """IMAGE ``[F, H, W, 3]`` → H.264 mp4 (yuv420p, crf 18) with PyAV."""
    import av
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = (frames.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    h, w = rgb.shape[1:3]
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = w - w % 2, h - h % 2
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for f in rgb:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f[: stream.height, : stream.width]), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _load_models(args):
    """(svd_model, backward_weights) for the sampler: names in the model folders go through the
    loader nodes (AVSyncSVDLoader, AVSyncBackwardMotionLoader) as in a workflow; an existing
    path is loaded with the loader functions those nodes call."""
    from ..loaders import svd as svd_loader
    from .common import run_node

    if args.svd and Path(args.svd).exists():
        from .. import compat

        precision = svd_loader.auto_precision(compat.torch_device()) if args.precision == "auto" else args.precision
        model = svd_loader.load_svd(Path(args.svd), precision)
    else:
        (model,) = run_node("AVSyncSVDLoader", precision=args.precision,
                            **({"model": args.svd} if args.svd else {}))
    backward = None
    if args.variant == "full":
        if args.backward and Path(args.backward).exists():
            backward = svd_loader.load_backward_delta(Path(args.backward))
        else:
            (backward,) = run_node("AVSyncBackwardMotionLoader",
                                   **({"backward_weights": args.backward} if args.backward else {}))
    return model, backward


def run(args) -> int:
    from .. import compat
    from .common import run_node

    if args.inbetween_models:
        compat.set_models_dir(args.inbetween_models)
    first, last = load_image(args.first), load_image(args.last)
    model, backward = _load_models(args)
    (frames,) = run_node(
        "AVSyncDualDirectionalSampler", svd_model=model, backward_weights=backward, first_image=first,
        last_image=last, frames=args.frames, width=args.width, height=args.height, steps=args.steps, cfg=args.cfg,
        seed=args.seed, renoise_repeats=args.renoise_repeats, renoise_ratio=args.renoise_ratio, fuse=args.fuse,
        decode_chunk_size=args.decode_chunk_size, variant=args.variant, cfg_schedule=args.cfg_schedule,
        min_cfg=args.min_cfg, motion_bucket_id=args.motion_bucket_id, fps=args.fps,
        noise_aug_strength=args.noise_aug_strength, execution=args.execution)
    write_mp4(args.out, frames, args.fps)
    if args.frames_dir:
        from PIL import Image

        d = Path(args.frames_dir)
        d.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(frames):
            Image.fromarray((f.numpy() * 255).round().astype("uint8")).save(d / f"frame_{i:03d}.png")
    print(f"{frames.shape[0]} frames {frames.shape[2]}x{frames.shape[1]} at {args.fps} fps -> {args.out}")
    return 0
