"""``avsync convert demix IN OUT.safetensors``: a released demix checkpoint → the
safetensors file AVSyncDemixModelLoader reads. Families: MRX
(``merlresearch/cocktail-fork-separation``, ``checkpoints/*_mrx_pre_trained_weights.pth``)
and BandIt v2 (``kwatcharasupat/bandit-v2``, the Lightning ``.ckpt`` files on Zenodo
record 12701995); ``--family auto`` tells them apart by their tensor names."""

from __future__ import annotations

from .common import add_common_options, check_input_file, check_output_file, staged_outputs


def register(kinds) -> None:
    p = kinds.add_parser("demix", help="speech/music/effects separator: MRX (*_mrx_pre_trained_weights.pth) or "
                                       "BandIt v2 (Lightning .ckpt)")
    p.add_argument("src", metavar="IN.pth|IN.ckpt",
                   help="the released pickled checkpoint (read with weights_only=True)")
    p.add_argument("dst", metavar="OUT.safetensors", help="where to write the converted file")
    p.add_argument("--family", choices=("auto", "mrx", "bandit_v2"), default="auto",
                   help="network family (default auto: from the tensor names)")
    p.add_argument("--hop", type=int, default=None,
                   help="STFT hop the model was trained with (released: MRX 256, BandIt v2 512)")
    p.add_argument("--sample-rate", type=int, default=None,
                   help="rate the model was trained at (released: MRX 44100, BandIt v2 48000)")
    p.add_argument("--sources", default=None,
                   help="output order, comma-separated (released: MRX music,speech,sfx; BandIt v2 "
                        "speech,music,sfx, which its checkpoints also name)")
    add_common_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..loaders.demix import convert_checkpoint, load_demix_model

    check_input_file(args.src, "IN.pth|IN.ckpt")
    dst = check_output_file(args.dst, "OUT.safetensors", getattr(args, "force", False), {".safetensors"})
    sources = [s.strip() for s in args.sources.split(",") if s.strip()] if args.sources else None
    if sources is None and args.family == "mrx":
        sources = ["music", "speech", "sfx"]
    with staged_outputs() as stage:
        tmp = convert_checkpoint(args.src, stage(dst), family=args.family, hop=args.hop,
                                 sample_rate=args.sample_rate, source_names=sources)
        model = load_demix_model(tmp)
    cfg = model.managed.info["config"]
    if model.family == "mrx":
        detail = (f"windows {cfg['window_lengths']}, hop {cfg['n_hop']}, hidden {cfg['n_hidden']}, "
                  f"{cfg['n_lstm_layers']} LSTM layers")
    else:
        detail = (f"{cfg['n_bands']} bands, n_fft {cfg['n_fft']}, hop {cfg['hop_length']}, emb {cfg['emb_dim']}, "
                  f"{2 * cfg['n_sqm_modules']} {cfg['rnn_type']} layers of {cfg['rnn_dim']}, "
                  f"chunks {cfg['chunk_seconds']:g} s on a {cfg['hop_seconds']:g} s hop")
    print(f"wrote {dst}: {model.family}, {detail}, sources {', '.join(model.source_names)} at {model.sample_rate} Hz")
    return 0
