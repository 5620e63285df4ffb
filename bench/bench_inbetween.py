"""Benchmark: one dual-directional model evaluation, fused one-call path vs two-call paths.

    python bench/bench_inbetween.py                       # small config on CPU
    python bench/bench_inbetween.py --device cuda --real-config   # SVD-XT size, 25×1024×576, fp16

Paths, measured in the same run on the same random weights and inputs:

* fused     — one UNet call on [fwd-uncond, fwd-cond, bwd-uncond, bwd-cond]; each temporal
              self-attention layer hands its maps to the backward half (AVSync's default);
* two_call  — forward call storing the 16 layers' maps, then the backward call (one set of
              weights, ΔW applied on the fly);
* two_unet  — the released code's layout: a second UNet with ΔW merged, plus stored maps.

Time is per evaluation: all paths in one process, interleaved, minimum of --repeats after a
warm-up (the machine's load changes hit every path alike). Peak memory: on CUDA
``max_memory_allocated`` during the evaluation (weights included); on CPU each path runs in
its own process and the peak resident set during the evaluations is reported (weights
included; "held before" is what the process held before the first evaluation: weights, and
on CPU the Python/torch runtime). Ratios are fused / two_call and fused / two_unet. Goals on the real config:
time ≤ 0.7× and peak memory ≤ 0.5× of the two-call path.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import torch

PATHS = ("fused", "two_call", "two_unet")


def small_unet_config():
    from avsync.loaders.svd import SVD_XT_UNET_CONFIG

    return dict(SVD_XT_UNET_CONFIG, block_out_channels=[64, 128, 128, 128], num_attention_heads=[1, 2, 2, 2],
                cross_attention_dim=64, addition_time_embed_dim=16, projection_class_embeddings_input_dim=48)


def build(args):
    from diffusers import UNetSpatioTemporalConditionModel

    from avsync.loaders.svd import SVD_XT_UNET_CONFIG, BackwardMotionDelta
    from avsync.networks.temporal_attention import temporal_self_attention_layers
    from avsync.samplers import inbetween as ib

    cfg = SVD_XT_UNET_CONFIG if args.real_config else small_unet_config()
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    device = torch.device(args.device)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNetSpatioTemporalConditionModel.from_config(cfg).to(dtype).eval().requires_grad_(False)
    params = dict(unet.named_parameters())
    deltas = {f"{layer}.{p}.weight": torch.randn_like(params[f"{layer}.{p}.weight"]) * 0.01
              for layer in temporal_self_attention_layers(unet) for p in ("to_v", "to_out.0")}
    delta = BackwardMotionDelta(deltas=deltas, source="random", dtype=dtype)
    s = ib.InbetweenSettings(num_frames=args.frames, width=args.width, height=args.height)
    h, w = args.height // 8, args.width // 8
    d = cfg["cross_attention_dim"]
    g = torch.Generator().manual_seed(1)
    first = ib.KeyframeConditioning(torch.randn(1, 1, d, generator=g), torch.randn(1, 4, h, w, generator=g))
    last = ib.KeyframeConditioning(torch.randn(1, 1, d, generator=g), torch.randn(1, 4, h, w, generator=g))
    inputs = ib.build_branch_inputs(first, last, s, device, dtype)
    x = torch.randn(args.frames, 4, h, w, generator=g).to(device) * 10
    return unet, delta, inputs, x


def make_evaluator(path, unet, delta, inputs):
    from avsync.samplers import inbetween as ib

    if path == "fused":
        return ib.FusedEvaluator(unet, inputs, "full", delta)
    if path == "two_call":
        return ib.TwoCallEvaluator(unet, inputs, "full", delta)
    merged = copy.deepcopy(unet)
    with torch.no_grad():
        for name, p in merged.named_parameters():
            if name in delta.deltas:
                p.copy_(delta.backward_weights(name, p))
    return ib.TwoCallEvaluator(unet, inputs, "full", delta, backward_unet=merged)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_peak_reset():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass


def _vm(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def measure_memory(path, args) -> dict:
    """Peak memory of one evaluation of ``path`` (after a warm-up), with what was held before it."""
    torch.set_num_threads(args.threads)
    unet, delta, inputs, x = build(args)
    ev = make_evaluator(path, unet, delta, inputs)
    sigma = torch.tensor(20.0)
    base = torch.cuda.memory_allocated() if args.device == "cuda" else _vm("VmRSS:")  # weights (+ runtime on CPU)
    ev(x, sigma)  # warm-up
    _sync(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        _rss_peak_reset()
    ev(x, sigma)
    _sync(args.device)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else _vm("VmHWM:")
    del ev, unet
    return {"path": path, "peak_bytes": peak, "base_bytes": base}


def measure_times(args) -> dict:
    """Seconds per evaluation of every path, interleaved (A B C A B C …) in one process so that
    changing machine load hits all paths alike; the minimum over the repeats."""
    torch.set_num_threads(args.threads)
    unet, delta, inputs, x = build(args)
    evs = {path: make_evaluator(path, unet, delta, inputs) for path in PATHS}
    sigma = torch.tensor(20.0)
    times = {path: [] for path in PATHS}
    for ev in evs.values():
        ev(x, sigma)  # warm-up
    for _ in range(args.repeats):
        for path, ev in evs.items():
            _sync(args.device)
            t = time.perf_counter()
            ev(x, sigma)
            _sync(args.device)
            times[path].append(time.perf_counter() - t)
    return {path: min(v) for path, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--real-config", action="store_true", help="SVD-XT UNet size, 25 frames, 1024×576 (needs a GPU)")
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.real_config:
        args.frames, args.width, args.height = args.frames or 25, args.width or 1024, args.height or 576
    else:
        args.frames, args.width, args.height = args.frames or 8, args.width or 256, args.height or 192
    if args.child:
        print(json.dumps(measure_memory(args.child, args)))
        return 0
    results = {}
    for path in PATHS:
        if args.device == "cuda":
            results[path] = measure_memory(path, args)
            torch.cuda.empty_cache()
        else:  # a fresh process per path, so that one path's freed memory does not hide another's peak
            cmd = [sys.executable, __file__, "--child", path, "--device", "cpu", "--frames", str(args.frames),
                   "--width", str(args.width), "--height", str(args.height), "--threads", str(args.threads)]
            cmd += ["--real-config"] if args.real_config else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[path] = json.loads(out)
    for path, t in measure_times(args).items():
        results[path]["time_s"] = t
    cfg = "SVD-XT size" if args.real_config else "small UNet (64-128 ch)"
    print(f"config: {cfg}, {args.frames} frames, {args.width}x{args.height}, CFG on (4 samples), device {args.device}")
    print(f"{'path':10s} {'time/eval':>10s} {'peak mem':>10s} {'held before':>12s} {'peak above it':>14s}")
    for path, r in results.items():
        print(f"{path:10s} {r['time_s']:9.3f}s {r['peak_bytes'] / 2**20:8.0f}MiB {r['base_bytes'] / 2**20:10.0f}MiB "
              f"{(r['peak_bytes'] - r['base_bytes']) / 2**20:12.0f}MiB")
    f, t, u = results["fused"], results["two_call"], results["two_unet"]
    print(f"fused / two_call: time {f['time_s'] / t['time_s']:.2f}x, peak memory {f['peak_bytes'] / t['peak_bytes']:.2f}x")
    print(f"fused / two_unet: time {f['time_s'] / u['time_s']:.2f}x, peak memory {f['peak_bytes'] / u['peak_bytes']:.2f}x")
    print("reference pipeline (jeanne-wang/svd_keyframe_interpolation): not installed here; two_unet mirrors its layout")
    from _report import row  # bench/ is the script's folder

    size = f"{cfg}, {args.frames}x{args.width}x{args.height}, {args.device}"
    for other in ("two_call", "two_unet"):
        o = results[other]
        row(f"inbetween fused eval ({size}) time", f["time_s"], "s", ratio=f["time_s"] / o["time_s"], vs=other,
            peak_mb=f["peak_bytes"] / 2**20)
        row(f"inbetween fused eval ({size}) peak memory", f["peak_bytes"] / 2**20, "MiB",
            ratio=f["peak_bytes"] / o["peak_bytes"], vs=other, peak_mb=f["peak_bytes"] / 2**20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
