"""KeyVID UNet forward time per frame at 320×512 (latents 40×64), fp32 and bf16.

    python bench/bench_keyvid_unet.py                     # reduced width (model_channels 64), CPU
    python bench/bench_keyvid_unet.py --real --device cuda  # the released config (1.47 G params, 5.9 GB fp32)
    python bench/bench_keyvid_unet.py --reference /path/to/KeyVID   # also time the released module

The default run uses the released generator config with ``model_channels`` reduced to 64
(everything else — levels, attention resolutions, 64-wide heads, the 1024-wide context,
T = 12, B = 1, 40×64 latents — as released), because the real model's weights alone take
5.9 GB in fp32. ``--real`` builds the released size (needs ~12 GB free for fp32 + bf16
copies; meant for a GPU machine).

The reference comparison imports ``lvdm.modules.networks.openaimodel3d_v4`` from the given
checkout (its own dependencies — einops, timm, … — must be installed). xformers and
flash_attn are blocked first so the reference runs its explicit einsum path (the only
one with the audio branch). Both get the same weights; the script prints the relative L2
between their outputs next to the timings.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from avsync.networks import keyvid_unet as K  # noqa: E402


def inputs(batch, frames, h, w, device):
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(batch, 8, frames, h, w, generator=g).to(device),
            "timesteps": torch.full((batch,), 999, dtype=torch.long).to(device),
            "context": torch.randn(batch, 77 + 16 * frames, 1024, generator=g).to(device),
            "c_audio": torch.randn(batch, frames, 12, 768, generator=g).to(device),
            "fs": torch.full((batch,), 6, dtype=torch.long).to(device),
            "frame_idx": torch.linspace(0, 47, frames).round().long()[None].repeat(batch, 1).to(device)}


def timed(fn, repeats, device):
    times = []
    out = None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times), out


def load_reference(path):
    sys.modules["xformers"] = None
    sys.modules["flash_attn"] = None
    sys.path.insert(0, str(path))
    import lvdm.modules.networks.openaimodel3d_v4 as ref
    return ref.UNetModel


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", action="store_true", help="released size (1.47 G params; GPU machine)")
    ap.add_argument("--channels", type=int, default=64, help="model_channels of the reduced run (multiple of 32)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--reference", type=Path, help="a KeyVID checkout to time the released module too")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    params = dict(K.GENERATOR_UNET_PARAMS, temporal_length=args.frames)
    if not args.real:
        params["model_channels"] = args.channels
    torch.manual_seed(0)
    net = K.KeyVIDUNet.from_released_params(params).eval()
    for p in net.parameters():          # nothing at its zero init (random weights, real shapes)
        torch.nn.init.normal_(p, std=0.02)
    n_params = sum(p.numel() for p in net.parameters())
    ins = inputs(1, args.frames, 40, 64, device)
    size = "released size" if args.real else f"model_channels {params['model_channels']} (released: 320)"
    print(f"KeyVID generator UNet, {size}: {n_params / 1e6:.1f} M params; B 1, T {args.frames}, latents 40x64 "
          f"(320x512 px); {device}, {args.threads} threads")

    ref_cls = None
    if args.reference:
        try:
            ref_cls = load_reference(args.reference)
        except Exception as err:   # the reference needs its own dependencies
            print(f"reference not importable from {args.reference}: {type(err).__name__}: {err}")

    def call(m, x):
        return lambda: m(x["x"], x["timesteps"], x["context"], x["c_audio"], fs=x["fs"], frame_idx=x["frame_idx"])

    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        m = net.to(device=device, dtype=dtype)
        x = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in ins.items()}
        call(m, x)()   # warm-up
        t, out = timed(call(m, x), args.repeats, device)
        results[dtype] = out.float()
        print(f"  ours {str(dtype).split('.')[-1]:>8}: {t:7.3f} s per call, {t / args.frames * 1000:8.1f} ms per frame")
        if ref_cls is not None:
            ref = ref_cls(**params).eval().to(device=device, dtype=dtype)
            ref.load_state_dict(m.state_dict())
            if dtype == torch.bfloat16:
                ref.dtype = torch.bfloat16   # the release computes in self.dtype (use_fp16 switches only fp16)
            try:
                call(ref, x)()
            except RuntimeError as err:   # e.g. its GroupNorm upcasts x but not bf16 weights (CPU)
                print(f"  ref  {str(dtype).split('.')[-1]:>8}: fails: {str(err).splitlines()[0]}")
                del ref
                continue
            tr, rout = timed(call(ref, x), args.repeats, device)
            rel = float((out.float() - rout.float()).norm() / rout.float().norm())
            print(f"  ref  {str(dtype).split('.')[-1]:>8}: {tr:7.3f} s per call, {tr / args.frames * 1000:8.1f} ms per "
                  f"frame; ours/ref time {t / tr:.2f}; relative L2 ours vs ref {rel:.1e}")
            del ref
    rel = float((results[torch.bfloat16] - results[torch.float32]).norm() / results[torch.float32].norm())
    print(f"  bf16 vs fp32 output: relative L2 {rel:.1e}")


if __name__ == "__main__":
    main()
