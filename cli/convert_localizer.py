"""``avsync convert localizer IN.pth OUT.safetensors``: KeyVID's released localizer
(``best_model_version1_with_skip.pth``) → the safetensors file the loader node reads."""

from __future__ import annotations

from .common import add_common_options, check_input_file, check_output_file, staged_outputs


def register(kinds) -> None:
    p = kinds.add_parser("localizer", help="KeyVID keyframe localizer (best_model_version1_with_skip.pth)")
    p.add_argument("src", metavar="IN.pth", help="the released pickled state dict (read with weights_only=True)")
    p.add_argument("dst", metavar="OUT.safetensors", help="where to write the converted file")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads of the audio trunk (default: width / 64, i.e. 12 for the release)")
    add_common_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..loaders.localizer import convert_checkpoint

    check_input_file(args.src, "IN.pth")
    dst = check_output_file(args.dst, "OUT.safetensors", getattr(args, "force", False), {".safetensors"})
    with staged_outputs() as stage:
        summary = convert_checkpoint(args.src, stage(dst), num_heads=args.num_heads)
    cfg = summary["config"]
    print(f"wrote {args.dst}: {summary['kept']} tensors kept, {summary['dropped']} unused dropped "
          f"(width {cfg['embed_dim']}, {cfg['num_blocks']} blocks, {cfg['num_heads']} heads, "
          f"kernel {cfg['kernel_size']} stride {cfg['stride']})")
    return 0
