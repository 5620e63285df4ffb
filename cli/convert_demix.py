"""``avsync convert demix IN.pth OUT.safetensors``: a released MRX checkpoint
(``merlresearch/cocktail-fork-separation``, ``checkpoints/*_mrx_pre_trained_weights.pth``)
→ the safetensors file AVSyncDemixModelLoader reads."""

from __future__ import annotations

from .common import add_common_options, check_input_file, check_output_file, staged_outputs


def register(kinds) -> None:
    p = kinds.add_parser("demix", help="MRX speech/music/effects separator (*_mrx_pre_trained_weights.pth)")
    p.add_argument("src", metavar="IN.pth", help="the released pickled state dict (read with weights_only=True)")
    p.add_argument("dst", metavar="OUT.safetensors", help="where to write the converted file")
    p.add_argument("--family", choices=("mrx",), default="mrx", help="network family (default mrx)")
    p.add_argument("--hop", type=int, default=256, help="STFT hop the model was trained with (release: 256)")
    p.add_argument("--sample-rate", type=int, default=44100, help="rate the model was trained at (release: 44100)")
    p.add_argument("--sources", default="music,speech,sfx",
                   help="output order, comma-separated (release: music,speech,sfx)")
    add_common_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..loaders.demix import convert_checkpoint, load_demix_model

    check_input_file(args.src, "IN.pth")
    dst = check_output_file(args.dst, "OUT.safetensors", getattr(args, "force", False), {".safetensors"})
    with staged_outputs() as stage:
        tmp = convert_checkpoint(args.src, stage(dst), family=args.family, hop=args.hop, sample_rate=args.sample_rate,
                                 source_names=[s.strip() for s in args.sources.split(",") if s.strip()])
        model = load_demix_model(tmp)
    cfg = model.managed.info["config"]
    print(f"wrote {dst}: {args.family}, windows {cfg['window_lengths']}, hop {cfg['n_hop']}, hidden {cfg['n_hidden']}, "
          f"{cfg['n_lstm_layers']} LSTM layers, sources {', '.join(model.source_names)} at {model.sample_rate} Hz")
    return 0
