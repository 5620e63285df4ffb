"""Loading an SVD single file: AVSync's path (networks built on the meta device, tensors assigned one
by one in the target dtype) against the conventional one (build the networks with random fp32
initialisation, load the converted state dict, cast), measured in the same run, each in a fresh
process so that peak memory is its own.

    python bench/bench_svd_loading.py                   # tiny model (seconds)
    python bench/bench_svd_loading.py --size real       # SVD-XT shapes, random weights: writes a 4.5 GB file;
                                                        # the naive path then needs ~15 GB of RAM

Prints time, peak resident memory and anonymous memory after loading, and the ratios AVSync / naive.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import json, resource, sys, time, torch
from avsync.loaders import svd as L
from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel  # imports are not
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection                # part of the measurement
path, method, dtype = sys.argv[1], sys.argv[2], L.parse_dtype(sys.argv[3])
t = time.perf_counter()
if method == "avsync":
    m = L.load_svd_single_file(path, dtype)
    mods = (m.unet.module, m.vae.module, m.image_encoder.module)
else:
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    meta = {}
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    sd = load_file(path)
    v = L._View(sd, L.UNET_PREFIX)
    ucfg = L.infer_unet_config(v, int(meta.get(L.META_UNET_HEAD_DIM, L.SVD_UNET_HEAD_DIM)))
    unet = UNetSpatioTemporalConditionModel.from_config(ucfg)
    umap = L.svd_unet_key_map(unet.state_dict().keys(), ucfg["layers_per_block"])
    unet.load_state_dict({k: v[o] for k, o in umap.items()})
    vv = L._View(sd, L.VAE_PREFIX)
    vcfg = L.infer_vae_config(vv)
    vae = AutoencoderKLTemporalDecoder.from_config(vcfg)
    vmap = L.svd_vae_key_map(vae.state_dict().keys())
    vsd = {k: vv[o].reshape(vae.state_dict()[k].shape) for k, o in vmap.items()}
    vae.load_state_dict(vsd, strict=False)
    cv = L._View(sd, L.CLIP_PREFIX)
    ccfg = L.infer_clip_config(cv, int(meta.get(L.META_CLIP_HEAD_DIM, L.OPENCLIP_VIT_H_HEAD_DIM)))
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**ccfg))
    clip.load_state_dict(L.openclip_visual_to_transformers(cv), strict=False)
    del sd, v, vv, cv, vsd
    mods = tuple(x.to(dtype).eval() for x in (unet, vae, clip))
elapsed = time.perf_counter() - t
import gc; gc.collect()
anon = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) * 1024
print(json.dumps({"seconds": elapsed, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "anon_after": anon, "params": sum(p.numel() for m in mods for p in m.parameters())}))
"""


def make_file(size: str, folder: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    if size == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.factories import svd as factory

        return factory.save_tiny_svd_single_file(folder / "tiny_svd.safetensors")
    from avsync.loaders import svd as L

    unet, vae, clip = (L._build_unet(L.SVD_XT_UNET_CONFIG), L._build_vae(L.SVD_VAE_CONFIG),
                       L._build_clip(L.SVD_CLIP_VISION_CONFIG))
    g = torch.Generator().manual_seed(0)

    def rnd(shape):
        return (torch.rand(shape, generator=g) * 0.02 - 0.01).to(torch.float16)

    out = {}
    us = unet.state_dict()
    for k, v in L.svd_unet_key_map(us.keys(), 2).items():
        out[L.UNET_PREFIX + v] = rnd(tuple(us[k].shape))
    vs = vae.state_dict()
    for k, v in L.svd_vae_key_map(vs.keys()).items():
        out[L.VAE_PREFIX + v] = rnd(tuple(vs[k].shape) + ((1, 1) if L._is_vae_1x1_attention(v) else ()))
    for k, v in L.transformers_to_openclip_visual(clip.state_dict()).items():
        out[L.CLIP_PREFIX + k] = rnd(tuple(v.shape))
    path = folder / "svd_xt_shapes_random_fp16.safetensors"
    save_file(out, str(path))
    return path


def measure(path: Path, method: str, dtype: str) -> dict:
    r = subprocess.run([sys.executable, "-c", _CHILD, str(path), method, dtype], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("tiny", "real"), default="tiny")
    ap.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="bf16",
                    help="target precision (the real-size file is fp16; bf16 forces a cast)")
    ap.add_argument("--file", help="measure this existing single file instead of writing one")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        path = Path(args.file) if args.file else make_file(args.size, Path(d))
        print(f"file: {path.name} ({path.stat().st_size / 1e9:.2f} GB, written in {time.perf_counter() - t:.0f} s)")
        res = {m: measure(path, m, args.dtype) for m in ("naive", "avsync")}
    for m, r in res.items():
        print(f"{m:7s} load {r['seconds']:7.2f} s   peak RSS {r['peak_rss'] / 1e9:6.2f} GB   "
              f"anonymous after {r['anon_after'] / 1e9:6.2f} GB   params {r['params']:,}")
    a, n = res["avsync"], res["naive"]
    print(f"ratio avsync/naive: time {a['seconds'] / n['seconds']:.2f}x, peak RSS {a['peak_rss'] / n['peak_rss']:.2f}x, "
          f"anonymous after {a['anon_after'] / n['anon_after']:.2f}x")
    from _report import row  # bench/ is the script's folder

    row(f"SVD single-file load ({args.size}, {args.dtype}) time", a["seconds"], "s", ratio=a["seconds"] / n["seconds"],
        vs="naive load", peak_mb=a["peak_rss"] / 2**20)
    row(f"SVD single-file load ({args.size}, {args.dtype}) peak RSS", a["peak_rss"] / 2**20, "MiB",
        ratio=a["peak_rss"] / n["peak_rss"], vs="naive load", peak_mb=a["peak_rss"] / 2**20)


if __name__ == "__main__":
    main()
