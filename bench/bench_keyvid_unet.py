"""KeyVID UNet forward time per frame at 320×512 (latents 40×64), fp32 and bf16, against
the released module.

    python bench/bench_keyvid_unet.py                              # reduced width (model_channels 64), CPU
    python bench/bench_keyvid_unet.py --reference /path/to/KeyVID  # also time the released module
    python bench/bench_keyvid_unet.py --real --device cuda         # released size (1.47 G params, 5.9 GB fp32)

The default run uses the released generator config with ``model_channels`` reduced to 64
(everything else — four levels, attention at 1/2/4× downsampling, 64-wide heads, the
1024-wide context, T = 12, B = 1, 40×64 latents — as released), because the real model's
weights alone take 5.9 GB in fp32. ``--real`` builds the released size (for a GPU machine).

Each (implementation, dtype) runs in its own process, so every peak-memory figure is that
run's alone (``ru_maxrss`` on CPU, ``max_memory_allocated`` on CUDA) and one run's freed
memory cannot inflate the next. All runs load the same random weights (normal, std 0.02,
seed 0; nothing left at its zero init) from a temporary file.

The reference is ``lvdm.modules.networks.openaimodel3d_v4.UNetModel`` imported from the
given checkout (its own dependencies — einops, timm, … — must be importable). xformers
and flash_attn are blocked first, so it runs its explicit einsum path (the only one with
the audio branch), as KeyVID's ROCm release did. The script prints the relative L2 of our
output against the reference's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import row  # noqa: E402  (bench/ is the script's folder)

from avsync.networks import keyvid_unet as K  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def inputs(batch, frames, h, w, device):
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(batch, 8, frames, h, w, generator=g).to(device),
            "timesteps": torch.full((batch,), 999, dtype=torch.long).to(device),
            "context": torch.randn(batch, 77 + 16 * frames, 1024, generator=g).to(device),
            "c_audio": torch.randn(batch, frames, 12, 768, generator=g).to(device),
            "fs": torch.full((batch,), 6, dtype=torch.long).to(device),
            "frame_idx": torch.linspace(0, 47, frames).round().long()[None].repeat(batch, 1).to(device)}


def load_reference(path):
    sys.modules["xformers"] = None      # un-importable: the reference keeps its einsum attention
    sys.modules["flash_attn"] = None
    sys.path.insert(0, str(path))
    import lvdm.modules.networks.openaimodel3d_v4 as ref
    return ref.UNetModel


def params_for(args) -> dict:
    params = dict(K.GENERATOR_UNET_PARAMS, temporal_length=args.frames)
    if not args.real:
        params["model_channels"] = args.channels
    return params


def child(args) -> None:
    """One timed run; prints one JSON line and saves the output next to the weights."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    params = params_for(args)
    if args.impl == "ours":
        net = K.KeyVIDUNet.from_released_params(params)
    else:
        net = load_reference(args.reference)(**params)
        if dtype != torch.float32:
            net.dtype = dtype          # the release casts its input to self.dtype (fp32 unless use_fp16)
    net.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    net = net.eval().to(device=device, dtype=dtype)
    x = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs(1, args.frames, 40, 64, device).items()}

    def call():
        with torch.no_grad():
            return net(x["x"], x["timesteps"], context=x["context"], c_audio=x["c_audio"], fs=x["fs"],
                       frame_idx=x["frame_idx"])

    result = {"impl": args.impl, "dtype": args.dtype}
    try:
        out = call()   # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        result["seconds"] = min(times)
        torch.save(out.float().cpu(), Path(args.weights).with_name(f"out_{args.impl}_{args.dtype}.pt"))
    except RuntimeError as err:   # e.g. the reference's GroupNorm upcasts x but not bf16 weights on CPU
        result["error"] = str(err).splitlines()[0]
    if device.type == "cuda":
        result["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    else:
        result["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(json.dumps(result))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", action="store_true", help="released size (1.47 G params; GPU machine)")
    ap.add_argument("--channels", type=int, default=64, help="model_channels of the reduced run (multiple of 64)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds; each run keeps its best")
    ap.add_argument("--reference", type=Path, help="a KeyVID checkout to time the released module too")
    ap.add_argument("--child", nargs=3, metavar=("IMPL", "DTYPE", "WEIGHTS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.impl, args.dtype, args.weights = args.child
        return child(args)

    params = params_for(args)
    torch.manual_seed(0)
    net = K.KeyVIDUNet.from_released_params(params)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.02)
    n_params = sum(p.numel() for p in net.parameters())
    size = "released size" if args.real else f"model_channels {params['model_channels']} (released: 320)"
    print(f"KeyVID generator UNet, {size}: {n_params / 1e6:.1f} M params; B 1, T {args.frames}, latents 40x64 "
          f"(320x512 px); {args.device}, {args.threads} threads, best of {args.repeats} interleaved rounds")
    runs = [("ours", "fp32"), ("ours", "bf16")]
    if args.reference:
        runs += [("ref", "fp32"), ("ref", "bf16")]
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pt"
        torch.save(net.state_dict(), weights)
        del net
        results = {}
        passthrough = ["--channels", str(args.channels), "--device", args.device, "--threads", str(args.threads),
                       "--frames", str(args.frames), "--repeats", "1"]
        if args.real:
            passthrough.append("--real")
        if args.reference:
            passthrough += ["--reference", str(args.reference)]
        # rounds interleave the runs (ours, ref, ours, ref, ...) so that a change in machine load
        # between runs does not decide the ratio; each run keeps its best round
        for _ in range(args.repeats):
            for impl, dt in runs:
                if "error" in results.get((impl, dt), {}):
                    continue
                proc = subprocess.run([sys.executable, sys.argv[0], *passthrough, "--child", impl, dt, str(weights)],
                                      capture_output=True, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                if proc.returncode or not lines:
                    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    results[(impl, dt)] = {"error": f"failed ({tail})"}
                    continue
                r = json.loads(lines[-1])
                best = results.get((impl, dt))
                if best is None or "error" in r or r["seconds"] < best["seconds"]:
                    r["peak_gb"] = max(r["peak_gb"], best["peak_gb"]) if best else r["peak_gb"]
                    results[(impl, dt)] = r
                    if "error" not in r:
                        Path(weights.with_name(f"out_{impl}_{dt}.pt")).replace(weights.with_name(f"best_{impl}_{dt}.pt"))
        for impl, dt in runs:
            r = results.get((impl, dt), {"error": "not run"})
            if "error" in r:
                print(f"  {impl:>4} {dt}: fails: {r['error']}")
                continue
            out = torch.load(weights.with_name(f"best_{impl}_{dt}.pt"), weights_only=True)
            line = (f"  {impl:>4} {dt}: {r['seconds']:8.3f} s per call, {r['seconds'] / args.frames * 1000:8.1f} ms "
                    f"per frame, peak {r['peak_gb']:.2f} GB")
            if dt == "bf16" and weights.with_name(f"best_{impl}_fp32.pt").exists():
                full = torch.load(weights.with_name(f"best_{impl}_fp32.pt"), weights_only=True)
                line += f"; vs its fp32 rel L2 {float((out - full).norm() / full.norm()):.1e}"
            print(line)
        # one row per run, ratio against the path it replaces measured in the same run: ours against the
        # released module in the same dtype (with --reference), our bf16 otherwise against our fp32
        for (impl, dt), r in results.items():
            if "seconds" not in r:
                continue
            base_key = ("ref", dt) if impl == "ours" and "seconds" in results.get(("ref", dt), {}) else (
                ("ours", "fp32") if (impl, dt) == ("ours", "bf16") else None)
            base = results.get(base_key) if base_key else None
            ok = base is not None and "seconds" in base
            name = {"ref": "released module", "ours": "ours"}[base_key[0]] + " " + base_key[1] if ok else ""
            row(f"KeyVID UNet forward, {impl} {dt} ({size}, T {args.frames}, 40x64 latents, {args.device})",
                r["seconds"] / args.frames * 1000, "ms/frame", ratio=r["seconds"] / base["seconds"] if ok else None,
                vs=name, peak_mb=r["peak_gb"] * 1000)
        if args.reference and ("ref", "fp32") in results and "seconds" in results[("ref", "fp32")]:
            ours = torch.load(weights.with_name("best_ours_fp32.pt"), weights_only=True)
            ref = torch.load(weights.with_name("best_ref_fp32.pt"), weights_only=True)
            t_ours, t_ref = results[("ours", "fp32")]["seconds"], results[("ref", "fp32")]["seconds"]
            m_ours, m_ref = results[("ours", "fp32")]["peak_gb"], results[("ref", "fp32")]["peak_gb"]
            print(f"  fp32 ours / reference: time {t_ours / t_ref:.2f}x, peak memory {m_ours / m_ref:.2f}x; "
                  f"output relative L2 {float((ours - ref).norm() / ref.norm()):.1e}")
            row("UNet forward fp32, ours vs released", t_ours / args.frames * 1000, "ms per frame",
                ratio=t_ours / t_ref, vs="KeyVID openaimodel3d_v4 (einsum path)", peak_mb=m_ours * 1000)


if __name__ == "__main__":
    main()
