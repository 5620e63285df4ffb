"""Benchmark: KeyVID generation — the batched four-pass CFG step, and peak memory of the pipeline.

    python bench/bench_keyvid.py                              # CPU, reduced width (see below)
    python bench/bench_keyvid.py --only step --repeats 3      # one part
    python bench/bench_keyvid.py --device cuda --real-config  # released size, random weights (a GPU; not run here)

1. **Four-condition CFG step** (App. G: e_u, e_i, e_it, e_c): the four branches of
   ``samplers/keyvid.py:KeyVIDBranches`` as one batched model call against four sequential calls,
   through ``samplers/core/guidance.py:evaluate_branches`` — 12 keyframes, 40×64 latents (320×512 px),
   the released generator UNet with ``model_channels`` reduced (default 32; released 320, with
   ``--real-config``) and random weights (normal, std 0.02, seed 0). Time per step: minimum of
   ``--repeats``, the two paths interleaved. Goal (real config, GPU): ≤ 0.6× the sequential time.
2. **Peak memory, measured**: ``generate_keyframes`` (12 keyframes, four branches batched) and
   ``interpolate_motion`` (48 frames) at 320×512 in fp16 and bf16, each run in its own process
   (``ru_maxrss`` on CPU, ``max_memory_allocated`` on CUDA), on converted random-weight files
   written by the real converter (``tests/factories/keyvid_files.py``). On CPU the UNet has
   ``model_channels`` ``--mem-channels`` (default 16; released 320) and the encoders are the tiny
   factory ones, so the 2-core / few-GB machine this runs on can hold it; the interpolation is
   measured with its branches one call each (``batched`` off: four batched 48-frame passes at this
   width alone would exceed the machine's share). One sampling step (the peak does not grow with steps).
   Each row also prints ``samplers/keyvid.py:KeyVIDMemory``'s estimate of the same run, so the
   estimate is checked against a measurement.
3. **Peak memory, estimated at the released size**: ``KeyVIDMemory.estimate`` on the released
   generator / interpolator networks built on the meta device (no weights): fp16 and bf16,
   12-frame generation and 48-frame interpolation at 320×512, four branches batched. These are
   **estimates**, not measurements; the goal is that the whole pipeline fits a 12 GB card (the
   stages run one after the other, each model offloaded before the next, so the peak is the
   largest stage's, plus the encoders' weights while conditioning).
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
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._report import row  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GIB = 2 ** 30


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module


def released_unet_params(role: str, channels=None) -> dict:
    from avsync.networks.keyvid_unet import GENERATOR_UNET_PARAMS, INTERPOLATOR_UNET_PARAMS

    p = dict(GENERATOR_UNET_PARAMS if role == "generator" else INTERPOLATOR_UNET_PARAMS, dropout=0.0)
    if channels:
        p["model_channels"] = channels
        p["num_head_channels"] = min(p["num_head_channels"], channels)   # 64-wide heads as released, fewer below 64
    return p


# ------------------------------------------------------------------------------ 1. the step

def bench_step(args) -> dict:
    from avsync.core import keyvid_tokens as tokens
    from avsync.networks.keyvid_unet import KeyVIDUNet
    from avsync.samplers.core.guidance import MultiConditionCFG, evaluate_branches
    from avsync.samplers.keyvid import KeyVIDBranches

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    params = released_unet_params("generator", None if args.real_config else args.channels)
    torch.manual_seed(0)
    unet = _randomize(KeyVIDUNet.from_released_params(params)).to(device, dtype).eval().requires_grad_(False)
    ctx, k, h, w = params["context_dim"], 12, args.height // 8, args.width // 8
    g = torch.Generator().manual_seed(1)
    frame_idx = torch.linspace(0, 47, k).round().long().view(1, -1)
    text, null_text = torch.randn(1, 77, ctx, generator=g), torch.randn(1, 77, ctx, generator=g)
    image, null_image = (tokens.generator_image_tokens(torch.randn(1, 48 * 16, ctx, generator=g), frame_idx)
                         for _ in range(2))
    audio, null_audio = (tokens.generator_audio_tokens(torch.randn(1, 1 + 12 * 48, 768, generator=g), frame_idx)
                         for _ in range(2))
    c_concat = torch.randn(1, 4, 1, h, w, generator=g).repeat(1, 1, k, 1, 1)
    family = KeyVIDBranches(unet, text, null_text, image, null_image, audio, null_audio, c_concat, 6, frame_idx)
    x = torch.randn(1, 4, k, h, w, generator=g).to(device)
    t = torch.tensor(500)
    branches = MultiConditionCFG().branches(0, 1)
    runs = {"batched": lambda: evaluate_branches(family, x, t, branches, batched=True),
            "sequential": lambda: evaluate_branches(family, x, t, branches, batched=False)}
    outs = {name: f() for name, f in runs.items()}   # warm-up
    times = {name: [] for name in runs}
    for r in range(args.repeats):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            _sync(device)
            t0 = time.perf_counter()
            runs[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    diff = max(((outs["batched"][b] - outs["sequential"][b]).norm() / outs["sequential"][b].norm()).item()
               for b in outs["sequential"])
    return {"times": {n: min(v) for n, v in times.items()}, "rel_diff": diff, "channels": params["model_channels"],
            "dtype": str(dtype).removeprefix("torch."), "device": str(device)}


def report_step(args):
    r = bench_step(args)
    tb, ts = r["times"]["batched"], r["times"]["sequential"]
    what = (f"KeyVID four-condition CFG step, 12 keyframes {args.height}x{args.width}, model_channels {r['channels']}, "
            f"{r['dtype']}, {r['device']}")
    print(f"1. {what}: one batched call {tb * 1000:.0f} ms, four calls {ts * 1000:.0f} ms -> {tb / ts:.2f}x "
          f"(goal <= 0.6x at the real config on a GPU); predictions agree to {r['rel_diff']:.1e} relative L2")
    row(what + " (batched)", tb * 1000, "ms", tb / ts, "four sequential calls",
        note=f"relative L2 batched vs sequential {r['rel_diff']:.1e}")


# ------------------------------------------------------------------------------ 2. measured memory

def _mem_sizes(channels: int):
    """Factory sizes with the released UNet layout at ``channels`` and a factor-8 VAE (the latents of
    320×512 are 40×64 as released); encoders tiny."""
    from tests.factories import keyvid as fk
    from tests.factories.keyvid_files import TINY_SIZES

    vae = {"embed_dim": 4, "ddconfig": dict(fk.TINY_VAE["ddconfig"], ch=32, ch_mult=[1, 2, 4, 4])}
    unet = released_unet_params("generator", channels)
    unet.update(context_dim=TINY_SIZES.unet["context_dim"], num_head_channels=16)
    return fk.Sizes(unet=unet, vae=vae, text=TINY_SIZES.text, image_proj=TINY_SIZES.image_proj, audio=TINY_SIZES.audio)


def _write_mem_models(folder: Path, channels: int):
    """Converted random-weight files at the memory-run sizes (written once per folder)."""
    from avsync.loaders import keyvid
    from tests.factories import keyvid as fk

    sizes = _mem_sizes(channels)
    if (folder / "keyvid_interpolator_unet.safetensors").is_file():
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        huge = fk.tiny_imagebind_huge(sizes=sizes)
        ckpts = [fk.save_tiny_ckpt(tmp / "g.ckpt", "generator",
                                   fk.tiny_state_dict("generator", 0, imagebind_huge=huge, sizes=sizes)),
                 fk.save_tiny_ckpt(tmp / "i.ckpt", "interpolator",
                                   fk.tiny_state_dict("interpolator", 5, imagebind_huge=huge, sizes=sizes))]
        configs = {r: keyvid.read_config_file(p) for r, p in fk.write_tiny_configs(tmp / "c", sizes).items()}
        keyvid.convert_checkpoints(ckpts, folder, dtype="fp32", imagebind=fk.save_tiny_imagebind_huge(tmp / "h.pth", huge),
                                   configs=configs, log=lambda s: None)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mem_child(args) -> dict:
    """One (stage, dtype) run in this process: peak memory above the loaded models."""
    from avsync.loaders.keyvid import load_keyvid
    from avsync.samplers import keyvid as kv
    from tests.factories.keyvid_files import write_tiny_clip_vocab
    from avsync.loaders.keyvid import openclip_tokenizer

    folder = Path(args.models)
    tok = openclip_tokenizer(write_tiny_clip_vocab(folder / "tokenizer"))
    role = "generator" if args.stage == "generate" else "interpolator"
    model = load_keyvid(folder / f"keyvid_{role}_unet.safetensors", args.dtype)
    device = torch.device(args.device)
    if device.type == "cuda":
        for m in model.managed().values():
            m.module.to(device)
        torch.cuda.reset_peak_memory_stats()
    hh, ww = args.mem_height, args.mem_width
    image = torch.rand(hh, ww, 3, generator=torch.Generator().manual_seed(0))
    wav = torch.randn(1, 32000, generator=torch.Generator().manual_seed(1)) * 0.1
    idx = [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 47]
    base = _rss_mb()
    if args.stage == "generate":
        s = kv.KeyframeSettings(steps=1, width=ww, height=hh)
        kv.generate_keyframes(model, image, wav, 16000, idx, "a hammer", s, tokenizer=tok, free_bytes=None)
    else:
        s = kv.InterpolationSettings(steps=1, batched=device.type == "cuda", width=ww, height=hh)
        kf = torch.randn(1, 4, len(idx), hh // 8, ww // 8, generator=torch.Generator().manual_seed(2))
        kv.interpolate_motion(model, kf, idx, wav, 16000, "a hammer", s, first_image=image, tokenizer=tok,
                              free_bytes=None)
    frames = len(idx) if args.stage == "generate" else kv.CLIP_FRAMES
    est = kv.KeyVIDMemory(model, frames, 4).estimate(s)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
        above = peak
    else:
        peak = _rss_mb()
        above = peak - base
    return {"peak_mb": peak, "above_mb": above, "estimate_mb": est.peak / 2 ** 20, "batched": s.batched}


def report_memory(args):
    folder = Path(args.models_dir or tempfile.mkdtemp(prefix="avsync-bench-keyvid-"))
    _write_mem_models(folder, args.mem_channels)
    for stage in ("generate", "interpolate"):
        for dtype in ("fp16", "bf16"):
            cmd = [sys.executable, __file__, "--child", "--stage", stage, "--dtype", dtype, "--models", str(folder),
                   "--device", args.device, "--threads", str(args.threads),
                   "--mem-height", str(args.mem_height), "--mem-width", str(args.mem_width)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"2. {stage} {dtype}: failed\n{res.stderr[-2000:]}")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            frames = 12 if stage == "generate" else 48
            what = (f"KeyVID {stage} {frames} frames {args.mem_height}x{args.mem_width} {dtype}, model_channels {args.mem_channels}, "
                    f"{'branches batched' if r['batched'] else 'branches one call each'}, {args.device}")
            print(f"2. {what}: peak {r['peak_mb']:.0f} MB ({r['above_mb']:.0f} MB above the loaded models); "
                  f"KeyVIDMemory estimate {r['estimate_mb']:.0f} MB")
            row(what + " peak memory", r["above_mb"], "MB above loaded models", r["above_mb"] / r["estimate_mb"],
                "KeyVIDMemory estimate", peak_mb=r["peak_mb"])


# ------------------------------------------------------------------------------ 3. estimated, released size

def _meta_model(role: str, dtype):
    from avsync.loaders.keyvid import _build_vae_module, released_config, vae_diffusers_config
    from avsync.networks.keyvid_unet import KeyVIDUNet

    with torch.device("meta"):
        unet = KeyVIDUNet.from_released_params(released_unet_params(role))
        vae = _build_vae_module(vae_diffusers_config(released_config(role)))
    return SimpleNamespace(unet=SimpleNamespace(module=unet), vae=SimpleNamespace(module=vae), dtype=dtype)


def report_estimate(args):
    from avsync.samplers import keyvid as kv

    for dtype in ("fp16", "bf16"):
        peaks = {}
        for stage, role, frames, s in (("generate", "generator", 12, kv.KeyframeSettings()),
                                       ("interpolate", "interpolator", 48, kv.InterpolationSettings())):
            est = kv.KeyVIDMemory(_meta_model(role, DTYPES[dtype]), frames, 4).estimate(s)
            peaks[stage] = est.peak
            what = f"KeyVID {stage} {frames} frames 320x512 {dtype}, released size, branches batched (ESTIMATE)"
            print(f"3. {what}: sampling {est.sampling / GIB:.2f} GiB, decoding {est.decoding / GIB:.2f} GiB, "
                  f"peak {est.peak / GIB:.2f} GiB")
            row(what, est.peak / GIB, "GiB (estimate)", est.peak / (12 * GIB), "a 12 GiB card",
                note="samplers/keyvid.py:KeyVIDMemory estimate, not measured")
        whole = max(peaks.values())
        print(f"3. whole pipeline {dtype} (stages one after the other): estimated peak {whole / GIB:.2f} GiB -> "
              f"{'fits' if whole <= 12 * GIB else 'does NOT fit'} a 12 GiB card (estimate)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--real-config", action="store_true", help="part 1 at the released UNet size (a GPU; ~3 GB fp16)")
    p.add_argument("--channels", type=int, default=32, help="part 1: model_channels (released 320)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="part 1 (default fp16 on cuda, fp32 on cpu)")
    p.add_argument("--width", type=int, help="part 1 (default 512 on cuda; 256 on cpu, where 512 takes minutes a step)")
    p.add_argument("--height", type=int, help="part 1 (default 320 on cuda, 160 on cpu)")
    p.add_argument("--mem-width", type=int, default=512, help="part 2: frame width in px")
    p.add_argument("--mem-height", type=int, default=320, help="part 2: frame height in px")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mem-channels", type=int, default=16, help="part 2: model_channels of the measured runs")
    p.add_argument("--models-dir", help="part 2: folder for the converted files (default: a temporary one)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=("step", "memory", "estimate"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stage", choices=("generate", "interpolate"), help=argparse.SUPPRESS)
    p.add_argument("--models", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    args.width = args.width or (512 if cuda else 256)
    args.height = args.height or (320 if cuda else 160)
    if args.child:
        print(json.dumps(mem_child(args)))
        return 0
    if args.only in (None, "step"):
        report_step(args)
    if args.only in (None, "memory"):
        report_memory(args)
    if args.only in (None, "estimate"):
        report_estimate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
