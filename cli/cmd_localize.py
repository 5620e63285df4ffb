"""``avsync localize AUDIO --out result.json``: keyframes from an audio file, through
the same node code (AVSyncAudioLoader → AVSyncLocalizerModelLoader →
AVSyncKeyframeLocalizer) a ComfyUI workflow runs."""

from __future__ import annotations


def register(sub) -> None:
    from ..core.keyframes import CLIP_FRAMES, NUM_KEYFRAMES, PEAK_DISTANCE, PEAK_PROMINENCE, VARIANTS
    from ..core.localize import METHODS, SMOOTHING

    p = sub.add_parser("localize", help="find keyframes in an audio file (KeyVID keyframe localizer)")
    p.add_argument("audio", metavar="AUDIO", help="audio (or video) file")
    p.add_argument("--out", required=True, help="JSON file to write (fps, num_frames, curve, peaks, valleys, keyframes)")
    p.add_argument("--fps", type=float, default=24.0, help="video frame rate of the grid (default 24)")
    p.add_argument("--method", choices=METHODS, default="onset", help="onset (no model) or learned (KeyVID localizer)")
    p.add_argument("--selection", choices=VARIANTS, default="reference", help="keyframe selection variant")
    p.add_argument("--num-keyframes", type=int, default=NUM_KEYFRAMES, help="keyframes per clip (default 12)")
    p.add_argument("--clip-frames", type=int, default=CLIP_FRAMES, help="frames per clip (default 48)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random choices (default 0)")
    p.add_argument("--smoothing", choices=SMOOTHING, default="auto", help="window-5 moving average before peak finding")
    p.add_argument("--peak-distance", type=int, default=PEAK_DISTANCE)
    p.add_argument("--prominence", type=float, default=PEAK_PROMINENCE)
    p.add_argument("--model", default=None, help="localizer file in the avsync_localizer folder (method learned)")
    p.add_argument("--start", type=float, default=0.0, help="start of the stretch to read, seconds")
    p.add_argument("--duration", type=float, default=0.0, help="length to read, seconds (0: to the end)")
    p.add_argument("--plot", default=None, help="also save the plot as an image (PNG/JPG)")
    p.set_defaults(func=run)


def run(args) -> int:
    from .common import load_audio_file, run_node, write_json

    audio, timeline = load_audio_file(args.audio, fps=args.fps, start=args.start, duration=args.duration)
    inputs = dict(audio=audio, timeline=timeline, method=args.method, selection=args.selection,
                  num_keyframes=args.num_keyframes, clip_frames=args.clip_frames, seed=args.seed,
                  smoothing=args.smoothing, peak_distance=args.peak_distance, prominence=args.prominence)
    if args.method == "learned":
        from ..loaders.localizer import SPEC

        (inputs["localizer_model"],) = run_node("AVSyncLocalizerModelLoader", model_name=args.model or SPEC.filename)
    keyframes, plot = run_node("AVSyncKeyframeLocalizer", **inputs)
    write_json(args.out, keyframes.to_dict())
    if args.plot:
        from PIL import Image

        Image.fromarray((plot[0].numpy() * 255).round().astype("uint8")).save(args.plot)
    print(f"{len(keyframes.indices)} keyframes over {keyframes.num_frames} frames at {keyframes.fps:g} fps "
          f"-> {args.out}")
    return 0
