"""SVD conversions.

``avsync convert svd-backward --finetuned DIR_OR_FILE --base SVD14_UNET --out delta.safetensors``
turns the released backward-motion UNet of Generative Inbetweening
(jeanne-wang/svd_keyframe_interpolation, ``checkpoints/svd_reverse_motion_with_attnflip/unet``: a whole
SVD-14 UNet) plus the SVD-14 UNet it was fine-tuned from into ΔW on the 16 temporal
``attn1.to_v`` / ``attn1.to_out.0`` tensors (~50 MB in fp16 instead of a 6 GB UNet). It refuses a
pair that differs anywhere else.

``avsync convert svd-single-file svd_xt.safetensors OUT_DIR`` writes the single-file checkpoint as
a diffusers folder.
"""

from __future__ import annotations

from .common import (OutputError, add_common_options, check_input_file, check_output_dir, check_output_file,
                     staged_outputs)


def register(kinds) -> None:
    p = kinds.add_parser(
        "svd-backward",
        help="backward-motion UNet of Generative Inbetweening + SVD-14 UNet -> ΔW safetensors (~50 MB fp16)",
    )
    p.add_argument("--finetuned", required=True, metavar="DIR_OR_FILE",
                   help="the released fine-tuned UNet: a diffusers unet folder (config.json + "
                        "diffusion_pytorch_model.safetensors/.bin), its parent, or one weights file "
                        "(pickled files are read with weights_only=True)")
    p.add_argument("--base", required=True, metavar="SVD14_UNET",
                   help="the SVD-14 UNet it was fine-tuned from (stabilityai/stable-video-diffusion-img2vid): "
                        "its diffusers folder / unet folder / weights file, or the single file svd.safetensors")
    p.add_argument("--out", required=True, metavar="OUT.safetensors", help="where to write ΔW")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16",
                   help="precision of the stored ΔW (default fp16, as the released inference computes it)")
    add_common_options(p)
    p.set_defaults(func=run_backward)

    q = kinds.add_parser("svd-single-file", help="svd_xt.safetensors (ldm layout) -> a diffusers folder")
    q.add_argument("src", metavar="IN.safetensors", help="SVD / SVD-XT single-file checkpoint")
    q.add_argument("dst", metavar="OUT_DIR", help="diffusers folder to write (unet/, vae/, image_encoder/, ...)")
    q.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="precision of the written weights")
    add_common_options(q)
    q.set_defaults(func=run_single_file)


def run_backward(args) -> int:
    from pathlib import Path

    from ..loaders import svd

    out = check_output_file(args.out, "--out", getattr(args, "force", False), {".safetensors", ".sft"})
    finetuned = svd.read_unet_state_dict(args.finetuned)
    base = svd.read_unet_state_dict(args.base)
    deltas = svd.compute_backward_delta(finetuned, base)
    with staged_outputs() as stage:
        tmp = svd.save_backward_delta(deltas, stage(out), dtype=args.dtype, metadata={
            "finetuned": Path(args.finetuned).name, "base_file": Path(args.base).name,
        })
        loaded = svd.load_backward_delta(tmp)
    layers = {n.rsplit(".attn1.", 1)[0] for n in loaded.names()}
    largest = max(float(d.abs().max()) for d in deltas.values())
    print(f"wrote {out}: ΔW for {len(layers)} temporal attention layers ({len(loaded.deltas)} tensors, "
          f"{loaded.nbytes / 1e6:.1f} MB {args.dtype}; largest |ΔW| {largest:.4g})")
    return 0


def run_single_file(args) -> int:
    from pathlib import Path

    from ..loaders import svd

    check_input_file(args.src, "IN.safetensors")
    dst = Path(args.dst)
    if dst.exists() and not dst.is_dir():
        raise OutputError("OUT_DIR", dst, "is a file; expected a folder")
    if dst.is_dir() and any(dst.iterdir()) and not getattr(args, "force", False):
        raise OutputError("OUT_DIR", dst, "is not empty; pass --force to write into it")
    check_output_dir(dst, "OUT_DIR", (), force=True)
    model = svd.load_svd_single_file(args.src, args.dtype)
    out = svd.save_svd_diffusers(model, args.dst)
    sizes = model.weight_bytes()
    print(f"wrote {out}: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()) + f" ({args.dtype})")
    return 0
