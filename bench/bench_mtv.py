"""MTV sampling speed and memory per memory setting (samplers/mtv.py, samplers/mtv_memory.py).

Rows, each measured in its own subprocess (so that peak memory is the setting's own):

1. **one guided step per memory setting**: the CFG pair in one batched call of the MTV transformer
   plus the DPM++(2M) SDE update, in the window's released latent shape (13 latent frames) —
   ``resident`` (every weight on the device, compute dtype), ``fp8`` (fp8 weight storage, dequantised
   per call), ``swap N`` (block swap: N blocks resident, the rest and the audio projections streamed).
   Time per step (best of ``--repeats``) and the peak memory of the step (CUDA:
   ``max_memory_allocated``; CPU: the process's peak resident set above what it held before the
   model was built), with the ratio against ``resident``. ``MTVMemoryModel``'s estimate is printed
   next to each CUDA row.
2. **CFG pair: batched vs two calls**: the same step with the pair as one model call (batch 2)
   against one call per branch (``batch_cfg`` off).
3. **audio projections cached vs per step**: every row above projects the window's audio once
   (``MTVBranchModel``'s cache, the default) — the step runs the dual blocks and the backbone only;
   ``resident no-cache`` re-runs the three projections inside every call, as released.

Default: a small config on the CPU (4 layers, hidden 256, 13 × 8 × 12 latents = 312 video tokens,
the released wav2vec widths, 4 audio tokens per latent frame), 2 threads; ~0.5 GB. ``--device cuda --real``: the released config (42 layers,
hidden 3072, 13 × 60 × 90) with random weights — needs a GPU (bf16: ~23 GB of weights; the
``resident`` row needs a card that holds them, the swap rows fit 24 GB); not run here (no GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _report import best_of, row  # noqa: E402

# the audio projections are shrunk (released: 32 tokens, hidden 512 → one 1.2 B-parameter Conv1d each)
SMALL = dict(num_layers=4, num_heads=4, head_dim=64, latent_frames=13, latent_height=8, latent_width=12,
             audio_tokens=4, audio_proj_hidden=128)


def _rss_mb(field: str = "VmRSS:") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(setting: str, args) -> dict:
    """Build the network for ``setting``, run ``--repeats`` guided steps; time and peak memory."""
    import torch

    from avsync.networks.mtv import MTVConfig, MTVTransformer
    from avsync.samplers.core.dpmpp import DPMPP2MSDE, mtv_schedule
    from avsync.samplers.core.guidance import AUDIO, CFG, TEXT, guided_predictor
    from avsync.samplers.core.noise import SeededNoise
    from avsync.samplers.mtv import MTVBranchModel
    from avsync.samplers.mtv_memory import BlockSwap, MTVMemoryModel, MTVMemorySettings, use_fp8_storage

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = MTVConfig.released("single") if args.real else MTVConfig(**SMALL)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = _rss_mb()
    with torch.device("meta" if args.real else "cpu"):
        net = MTVTransformer(cfg)
    if args.real:   # random weights allocated in the compute dtype (no 46 GB fp32 copy)
        net = net.to(dtype).to_empty(device="cpu")
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0, 0.02)
            for buf in net.buffers():      # no uninitialised memory (NaN/inf) in a timed run
                if buf.is_floating_point():
                    buf.zero_()
    net = net.to(dtype).eval()
    storage, blocks = "bf16", None
    if setting == "fp8":
        use_fp8_storage(net, dtype)
        storage = "fp8"
    swap = None
    if setting.startswith("swap"):
        blocks = int(setting.split()[1])
        swap = BlockSwap(net, blocks, device).attach()
    else:
        net.to(device)
    batched = not setting.endswith("two-calls")
    g = torch.Generator().manual_seed(1)
    shape = (1, cfg.latent_frames, cfg.out_channels, cfg.latent_height, cfg.latent_width)
    text = torch.randn(1, cfg.text_tokens, cfg.text_dim, generator=g)
    audio = {k: torch.randn(1, cfg.audio_window_frames, cfg.audio_context, cfg.audio_layers_per_frame, cfg.audio_dim,
                            generator=g) for k in ("speech", "effects", "music")}
    family = MTVBranchModel(net, text, audio, clean_frames=2, dtype=dtype, device=device,
                            cache_audio=not setting.endswith("no-cache"))
    solver = DPMPP2MSDE(mtv_schedule(), steps=50)
    predict = guided_predictor(family, CFG(3.5, (TEXT, AUDIO)), solver.steps, batched=batched)
    x = torch.randn(shape, generator=g).to(device)
    noise = SeededNoise(2)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step():
        with torch.no_grad():
            pred = predict(x, solver.timestep(10).to(device), 10)
            solver.step(x, pred, 10, noise)
        sync()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = best_of(step, args.repeats)   # after a warm-up step (the cache projects the audio in it)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = _rss_mb("VmHWM:") - base
    est = MTVMemoryModel(cfg).estimate(MTVMemorySettings(storage, blocks, 2 if batched else 1, cfg.latent_frames,
                                                         cfg.latent_height, cfg.latent_width))
    if swap is not None:
        swap.detach()
    return {"setting": setting, "seconds": seconds, "peak_mb": peak, "estimate_mb": est.sampling / 2 ** 20}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--real", action="store_true", help="the released config with random weights (GPU machine)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--settings", nargs="+", default=None,
                    help="memory settings to measure (default: resident, fp8, swap <half>, swap 0, two-calls)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)   # internal: one setting in this process
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one(args.one, args)))
        return 0
    if args.real and args.device != "cuda":
        ap.error("--real needs --device cuda (the released transformer is ~11.6 B parameters)")
    layers = 42 if args.real else SMALL["num_layers"]
    settings = args.settings or ["resident", "fp8", f"swap {layers // 2}", "swap 0", "resident two-calls",
                                 "resident no-cache"]
    results = {}
    for s in settings:
        cmd = [sys.executable, __file__, "--one", s, "--device", args.device, "--threads", str(args.threads),
               "--repeats", str(args.repeats)] + (["--real"] if args.real else [])
        t = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if out.returncode != 0:
            print(f"{s}: failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            continue
        results[s] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[s]
        print(f"{s}: {r['seconds'] * 1e3:.1f} ms per step, peak {r['peak_mb']:.0f} MB "
              f"(MTVMemoryModel estimate {r['estimate_mb']:.0f} MB) [{time.perf_counter() - t:.0f} s]")
    size = "released config" if args.real else "small config (4 layers, hidden 256, 13x8x12 latents, 4 audio tokens)"
    ref = results.get("resident")
    for s, r in results.items():
        if s.endswith(("two-calls", "no-cache")):
            continue
        row(f"MTV step, {s}, {size}, {args.device}", r["seconds"] * 1e3, "ms",
            ratio=None if ref is None else r["seconds"] / ref["seconds"], vs="resident",
            peak_mb=r["peak_mb"], note=f"estimate {r['estimate_mb']:.0f} MB (MTVMemoryModel)")
    two = results.get("resident two-calls")
    if ref is not None and two is not None:
        row(f"MTV CFG pair batched / two calls, {size}, {args.device}", ref["seconds"] * 1e3, "ms",
            ratio=ref["seconds"] / two["seconds"], vs="two calls per step", peak_mb=ref["peak_mb"],
            note=f"two calls: {two['seconds'] * 1e3:.1f} ms, peak {two['peak_mb']:.0f} MB")
    per_step = results.get("resident no-cache")
    if ref is not None and per_step is not None:
        row(f"MTV step, audio projections cached / per step, {size}, {args.device}", ref["seconds"] * 1e3, "ms",
            ratio=ref["seconds"] / per_step["seconds"], vs="projections in every call (released)",
            peak_mb=ref["peak_mb"], note=f"per step: {per_step['seconds'] * 1e3:.1f} ms, peak "
                                         f"{per_step['peak_mb']:.0f} MB")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
