"""``avsync convert mtv SRC --out OUT.safetensors [--dtype bf16|fp8_e4m3fn] [--variant V]`` and
``avsync convert mtv --vae 3d-vae.pt --out mtv_vae.safetensors``: MTV's released SAT/DeepSpeed
checkpoints (``BAAI/MTVCraft``: ``mtv/{single,multi,accm}``) → the safetensors file the MTV
loader reads (``loaders/mtv.py``; docs/mtv_models.md)."""

from __future__ import annotations

from pathlib import Path

from .common import add_common_options, check_input_file, check_output_file, staged_outputs


def register(kinds) -> None:
    p = kinds.add_parser(
        "mtv",
        help="MTV transformer (SAT mp_rank_00_model_states.pt or its folder with `latest`) or VAE (3d-vae.pt) "
             "-> safetensors",
        description="Convert MTV's released transformer (mtv/single, mtv/multi or mtv/accm of BAAI/MTVCraft: the "
                    "folder with `latest`, or 1/mp_rank_00_model_states.pt) into one safetensors file in diffusers "
                    "(backbone) + MTV (audio) keys; or, with --vae, SAT's 3d-vae.pt into diffusers VAE keys. Pickles "
                    "are read with weights_only=True (only numpy's RNG-state globals are allowed, for that load).",
    )
    p.add_argument("src", nargs="?", metavar="SRC",
                   help="mp_rank_00_model_states.pt or the folder holding `latest` (e.g. mtv/single)")
    p.add_argument("--vae", metavar="3d-vae.pt", help="convert the SAT CogVideoX VAE instead of the transformer")
    p.add_argument("--out", required=True, metavar="OUT.safetensors",
                   help="file to write (for ComfyUI: models/avsync/mtv/mtv_single_bf16.safetensors)")
    p.add_argument("--dtype", choices=("bf16", "fp8_e4m3fn"), default="bf16",
                   help="storage: bf16 (default, ~23 GB) or fp8_e4m3fn (~11.7 GB: the Linear/Conv1d weights of the "
                        "blocks, their audio layers and the audio projections in fp8 with per-channel scales; the "
                        "rest bf16). The VAE is always bf16")
    p.add_argument("--variant", choices=("single", "multi", "accm"),
                   help="which release it is (default: multi from the tensors, single/accm from the folder name)")
    p.add_argument("--no-source-hash", action="store_true",
                   help="skip the sha256 of the source file in the metadata (saves one read of ~23 GB)")
    add_common_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..core.errors import InputError

    quiet = getattr(args, "quiet", False)
    log = (lambda m: None) if quiet else print
    if (args.src is None) == (args.vae is None):
        raise InputError("SRC", "give either the transformer checkpoint SRC or --vae 3d-vae.pt (one per run)")
    dst = check_output_file(args.out, "--out", getattr(args, "force", False), {".safetensors"})
    if args.vae:
        from ..loaders.mtv import convert_sat_vae

        check_input_file(args.vae, "--vae")
        with staged_outputs() as stage:
            digest, size = convert_sat_vae(args.vae, dst, stage=stage)
        log(f"wrote {dst}  {size / 1e9:.2f} GB  sha256 {digest}")
        return 0
    from ..loaders.mtv import convert_sat_checkpoint

    src = Path(args.src)
    if not src.exists():
        raise InputError("SRC", f"{src}: no such file or folder")
    with staged_outputs() as stage:
        result = convert_sat_checkpoint(src, dst, dtype=args.dtype, variant=args.variant,
                                        hash_source=not args.no_source_hash, log=log, stage=stage)
    for reason, n in result.dropped.items():
        log(f"  dropped {n} tensors: {reason}")
    log(f"wrote {dst} (MTV {result.variant}, {result.storage}, {result.tensors} tensors)  {result.size / 1e9:.2f} GB  "
        f"sha256 {result.sha256}")
    return 0
