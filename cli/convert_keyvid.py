"""``avsync convert keyvid GEN_OR_INTERP.ckpt [...] --out DIR [--dtype fp16] [--imagebind imagebind_huge.pth]``:
KeyVID's released Lightning checkpoints (``RyanWW/KeyVID``) → the per-component safetensors the
KeyVID loader nodes read (see ``loaders/keyvid.py``). Components both checkpoints share are
checked tensor by tensor and stored once."""

from __future__ import annotations

from .common import add_common_options, check_input_file, check_output_dir, staged_outputs


def register(kinds) -> None:
    p = kinds.add_parser(
        "keyvid",
        help="KeyVID generator / interpolator .ckpt (RyanWW/KeyVID) -> per-component safetensors",
        description="Convert KeyVID's released checkpoints: generator_checkpoint.ckpt and/or "
                    "'epoch=3669-step=58720.ckpt' (the role of each is read from its tensors). The interpolator also "
                    "needs --imagebind imagebind_huge.pth (facebookresearch/ImageBind; weights CC-BY-NC 4.0), as the "
                    "released pipeline rebuilds its ImageBind from that file.",
    )
    p.add_argument("checkpoints", nargs="+", metavar="CKPT",
                   help="released Lightning .ckpt files (read with weights_only=True, memory-mapped)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder to write into (for ComfyUI: models/avsync/keyvid); shared files already there are "
                        "compared and kept when identical")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16",
                   help="precision of the stored weights (default fp16, the released inference precision); "
                        "the diffusion schedule always stays fp32")
    p.add_argument("--imagebind", metavar="imagebind_huge.pth",
                   help="ImageBind-huge weights (https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth), "
                        "needed for the interpolator")
    p.add_argument("--generator-config", metavar="YAML",
                   help="configs/inference/keyframe_generation.yaml, for a checkpoint not of the released shape "
                        "(default: the released configuration)")
    p.add_argument("--interpolator-config", metavar="YAML",
                   help="configs/inference/keyframe_interpolation.yaml, likewise")
    add_common_options(p)
    p.set_defaults(func=run)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def run(args) -> int:
    from ..loaders import keyvid

    for path in args.checkpoints:
        check_input_file(path, "CKPT")
    for option in ("imagebind", "generator_config", "interpolator_config"):
        if getattr(args, option):
            check_input_file(getattr(args, option), "--" + option.replace("_", "-"))
    out = check_output_dir(args.out, "--out", (), force=True)  # which files would be overwritten: below
    quiet = getattr(args, "quiet", False)
    configs = {}
    if args.generator_config:
        configs["generator"] = keyvid.read_config_file(args.generator_config)
    if args.interpolator_config:
        configs["interpolator"] = keyvid.read_config_file(args.interpolator_config)
    with staged_outputs() as stage:
        report = keyvid.convert_checkpoints(args.checkpoints, out, dtype=args.dtype, imagebind=args.imagebind,
                                            configs=configs, log=(lambda m: None) if quiet else print,
                                            overwrite=getattr(args, "force", False), stage=stage)
    if quiet:
        return 0
    for role, src in report.roles.items():
        print(f"{role}: {src}")
        for reason, n in report.dropped.get(role, {}).items():
            print(f"  dropped {n} tensors: {reason}")
    for comp, verdict in report.shared.items():
        print(f"shared {comp}: {verdict}")
    for line in report.lines:
        print(line)
    for f in report.files:
        tag = " (already there, identical)" if f.reused else ""
        print(f"{f.path}  {_size(f.size)}  sha256 {f.sha256}{tag}")
    return 0
