"""KeyVID model files: converter peak memory against checkpoint size, load time and memory per
component and precision, and (through bench/bench_keyvid_unet.py) UNet forward time.

    python bench/bench_keyvid_models.py                # sizes S and M (checkpoints ~0.3 / ~1.6 GB), CPU
    python bench/bench_keyvid_models.py --sizes S      # quicker
    python bench/bench_keyvid_models.py --real         # the released sizes (~15.6 GB checkpoint: needs
                                                       # ~16 GB RAM to *write* it, ~35 GB of disk; not run here)

Checkpoints are random weights in the released Lightning layout, written by the test factory
(``tests/factories/keyvid.py``) in a subprocess. Every measurement runs in its own
subprocess that samples its memory every 2 ms from ``/proc/self/status``:

* ``anon`` — resident anonymous memory (heap, tensors): what converting or loading *needs*;
* ``rss`` — all resident memory, including the checkpoint's memory-mapped pages the kernel
  has paged in. Those are clean page cache: the kernel drops them under memory pressure,
  so ``rss`` can approach the checkpoint size without the conversion needing that memory.

Peak memory is reported above the subprocess's baseline after imports. Converting streams one
tensor at a time, so ``anon`` should stay near the largest tensor (the text token embedding,
49408 × 1024 × 4 B ≈ 200 MB at the released size), not grow with the checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT / "bench"))
from _report import row  # noqa: E402  (bench/ is the script's folder)

RELEASED_TEXT = {"vocab": 49408, "width": 1024, "layers": 24, "ctx": 77, "proj": 1024}
RELEASED_VISION = {"width": 1280, "layers": 32, "patch": 14, "grid": 16, "proj": 1024}
RELEASED_AUDIO = {"width": 768, "layers": 12}


def sizes_named(name: str):
    """S / M: the released structure at reduced widths and depths; real: the released sizes."""
    from avsync.loaders import keyvid
    from tests.factories import keyvid as fk

    if name == "real":
        from avsync.networks.keyvid_unet import GENERATOR_UNET_PARAMS

        return fk.Sizes(unet=dict(GENERATOR_UNET_PARAMS), vae=copy.deepcopy(keyvid.RELEASED_VAE_PARAMS),
                        image_proj=dict(keyvid.RELEASED_IMAGE_PROJ_PARAMS),
                        audio_proj=dict(keyvid.RELEASED_IMAGE_PROJ_PARAMS, num_queries=12, embedding_dim=768),
                        text=dict(RELEASED_TEXT), vision=dict(RELEASED_VISION), audio=dict(RELEASED_AUDIO),
                        padding_bytes=4_000_000_000)  # the rest of ImageBind-huge the release carries
    widths = {"S": (64, 256, 4, 320, 4, 256, 2), "M": (128, 512, 12, 640, 16, 384, 6)}[name]
    unet_ch, text_w, text_l, vis_w, vis_l, aud_w, aud_l = widths
    from avsync.networks.keyvid_unet import GENERATOR_UNET_PARAMS

    vae = copy.deepcopy(keyvid.RELEASED_VAE_PARAMS)
    vae["ddconfig"]["ch"] = 64 if name == "S" else 128
    return fk.Sizes(
        unet=dict(GENERATOR_UNET_PARAMS, model_channels=unet_ch, dropout=0.0), vae=vae,
        image_proj=dict(keyvid.RELEASED_IMAGE_PROJ_PARAMS, dim=4 * unet_ch, output_dim=1024, embedding_dim=vis_w,
                        heads=4, dim_head=64, depth=2),
        audio_proj=dict(keyvid.RELEASED_IMAGE_PROJ_PARAMS, dim=4 * unet_ch, num_queries=12, embedding_dim=aud_w,
                        heads=4, dim_head=64, depth=2),
        text={"vocab": 49408, "width": text_w, "layers": text_l, "ctx": 77, "proj": text_w},
        vision={"width": vis_w, "layers": vis_l, "patch": 14, "grid": 16, "proj": 1024},
        audio={"width": aud_w, "layers": aud_l},
    )


# ------------------------------------------------------------------------------ memory sampling

def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "VmRSS:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) / 1024
    return out


class Sampler:
    """Peak RssAnon / VmRSS (MB) of this process, sampled every 2 ms on a thread."""

    def __init__(self):
        self.base = _status()
        self.peak = dict(self.base)
        self._done = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._done.is_set():
            s = _status()
            for k, v in s.items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(0.002)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._t.join()
        s = _status()
        for k, v in s.items():
            self.peak[k] = max(self.peak[k], v)

    def result(self) -> dict:
        return {"anon_mb": self.peak["RssAnon"] - self.base["RssAnon"], "rss_mb": self.peak["VmRSS"] - self.base["VmRSS"]}


def _child(argv: list[str]) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(argv)], capture_output=True, text=True,
                         env=env, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"child {argv[0]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_child(argv: list[str]) -> None:
    import torch

    torch.set_num_threads(2)
    kind = argv[0]
    if kind == "write":
        _, size, folder = argv
        from tests.factories import keyvid as fk

        sizes = sizes_named(size)
        folder = Path(folder)
        t0 = time.perf_counter()
        huge = fk.tiny_imagebind_huge(sizes=sizes)
        fk.save_tiny_imagebind_huge(folder / "imagebind_huge.pth", huge)
        fk.save_tiny_ckpt(folder / "generator_checkpoint.ckpt", "generator",
                          fk.tiny_state_dict("generator", imagebind_huge=huge, sizes=sizes))
        fk.write_tiny_configs(folder / "configs", sizes)
        print(json.dumps({"seconds": time.perf_counter() - t0}))
        return
    if kind == "convert":
        _, folder, out, dtype = argv
        from diffusers import AutoencoderKL  # noqa: F401  (imports are not part of the peak)
        from transformers import CLIPTextModel  # noqa: F401

        from avsync.loaders import keyvid
        from avsync.networks import imagebind_audio, keyvid_resampler, keyvid_unet  # noqa: F401

        folder = Path(folder)
        configs = {"generator": keyvid.read_config_file(folder / "configs" / "tiny_generator.yaml")}
        with Sampler() as s:
            t0 = time.perf_counter()
            report = keyvid.convert_checkpoints([folder / "generator_checkpoint.ckpt"], out, dtype=dtype,
                                                configs=configs, log=lambda m: None)
            seconds = time.perf_counter() - t0
        print(json.dumps({**s.result(), "seconds": seconds, "written": sum(f.size for f in report.files)}))
        return
    if kind == "load":
        _, out, dtype = argv
        import gc

        from diffusers import AutoencoderKL  # noqa: F401  (imports are not part of the peak)
        from transformers import CLIPTextModel  # noqa: F401

        from avsync.loaders import keyvid
        from avsync.networks import imagebind_audio, keyvid_encoders, keyvid_resampler, keyvid_unet  # noqa: F401

        files = keyvid.companion_paths(Path(out) / "keyvid_generator_unet.safetensors")
        rows = {}
        for comp, path in files.items():
            gc.collect()
            with Sampler() as s:
                t0 = time.perf_counter()
                module = keyvid.load_component(path, comp, dtype)
                seconds = time.perf_counter() - t0
            rows[comp] = {**s.result(), "seconds": seconds, "file_mb": path.stat().st_size / 1e6}
            del module
        print(json.dumps(rows))
        return
    raise SystemExit(f"unknown child {kind}")


# ------------------------------------------------------------------------------ report

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="S,M", help="comma-separated: S, M (and real with --real)")
    p.add_argument("--real", action="store_true", help="also the released size (~15.6 GB checkpoint; big machine)")
    p.add_argument("--dir", help="scratch folder (default: a temporary folder, removed afterwards)")
    p.add_argument("--skip-unet-forward", action="store_true", help="do not run bench/bench_keyvid_unet.py")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _run_child(json.loads(args.child))
        return
    names = [s for s in args.sizes.split(",") if s] + (["real"] if args.real else [])
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="bench_keyvid_"))
    try:
        print("converter: one generator checkpoint -> per-component safetensors (2 threads); peak memory above "
              "the process's baseline")
        print(f"  {'size':>4} {'ckpt GB':>8} {'dtype':>5} {'written GB':>10} {'seconds':>8} {'anon MB':>8} "
              f"{'rss MB':>8} {'anon/ckpt':>9}")
        loads = {}
        for name in names:
            folder = scratch / name
            folder.mkdir(parents=True, exist_ok=True)
            _child(["write", name, str(folder)])
            ckpt_gb = (folder / "generator_checkpoint.ckpt").stat().st_size / 1e9
            for dtype in ("fp32", "fp16"):
                out = folder / f"out_{dtype}"
                r = _child(["convert", str(folder), str(out), dtype])
                print(f"  {name:>4} {ckpt_gb:8.2f} {dtype:>5} {r['written'] / 1e9:10.2f} {r['seconds']:8.1f} "
                      f"{r['anon_mb']:8.0f} {r['rss_mb']:8.0f} {r['anon_mb'] / (ckpt_gb * 1000):9.3f}")
                # the naive path, torch.load of the whole checkpoint, holds at least its size in memory
                row(f"KeyVID convert size {name} ({ckpt_gb:.2f} GB ckpt) -> {dtype}: peak anon memory",
                    r["anon_mb"], "MB", ratio=r["anon_mb"] / (ckpt_gb * 1000), vs="checkpoint size (whole-file load)",
                    peak_mb=r["anon_mb"], note=f"{r['seconds']:.1f} s, rss {r['rss_mb']:.0f} MB")
            loads[name] = {dtype: _child(["load", str(folder / "out_fp16"), dtype]) for dtype in ("fp16", "bf16", "fp32")}
            shutil.rmtree(folder / "out_fp32", ignore_errors=True)
            (folder / "generator_checkpoint.ckpt").unlink()
        print("load (from the fp16 files) per component and precision: seconds / peak anon MB above baseline")
        for name, by_dtype in loads.items():
            comps = list(next(iter(by_dtype.values())))
            print(f"  size {name}")
            print(f"  {'component':>16} {'file MB':>8} " + " ".join(f"{d + ' s':>8} {d + ' MB':>8}" for d in by_dtype))
            for c in comps:
                r16 = by_dtype["fp16"][c]
                print(f"  {c:>16} {r16['file_mb']:8.1f} " + " ".join(
                    f"{by_dtype[d][c]['seconds']:8.2f} {by_dtype[d][c]['anon_mb']:8.0f}" for d in by_dtype))
            # per precision, all components: total load time, and the largest component's peak memory
            # against its file size (a whole-file read holds at least the file)
            for d, comps_d in by_dtype.items():
                big = max(comps_d, key=lambda c: comps_d[c]["file_mb"])
                b = comps_d[big]
                row(f"KeyVID load size {name}, all components as {d} (from fp16 files)",
                    sum(v["seconds"] for v in comps_d.values()), "s", ratio=b["anon_mb"] / b["file_mb"],
                    vs=f"file size ({big}: peak / file)", peak_mb=max(v["anon_mb"] for v in comps_d.values()))
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)
    unet_bench = ROOT / "bench" / "bench_keyvid_unet.py"
    if args.skip_unet_forward:
        return
    if unet_bench.is_file():
        print("UNet forward time per frame at 320x512: bench/bench_keyvid_unet.py")
        sys.stdout.flush()
        subprocess.run([sys.executable, str(unet_bench)], cwd=ROOT, check=False)
    else:
        print("UNet forward time: bench/bench_keyvid_unet.py is not in this checkout (skipped)")


if __name__ == "__main__":
    main()
