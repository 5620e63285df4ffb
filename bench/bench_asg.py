"""Benchmark: Audio Sync Guidance's step-time overhead over the same sampler without it.

    python bench/bench_asg.py                    # reduced KeyVID generator UNet on CPU (2 threads)
    python bench/bench_asg.py --device cuda --real --frames 12 --height 40 --width 64   # released size, GPU

The network is KeyVID's generator UNet (``networks/keyvid_unet.py``) with the released config
except ``model_channels`` (64 instead of 320 by default, ``--channels``) and ``temporal_length``;
random weights (normal, std 0.02, seed 0); released context widths (1024 context, 768-wide audio
tokens, 12 per frame). Branches come from ``samplers/keyvid.py:KeyVIDBranches`` and run through
``samplers/core/guidance.py:guided_predictor``, as the pipeline runs them. In one process,
interleaved, minimum of ``--repeats``:

* KeyVID's four-condition CFG, one batched call per step (the baseline);
* ASG on top, its off-sync branch in the same call (five branches per call) — the goal is
  ≤ +25 % (Syncphony reports +43 %: 2 min 01 s → 2 min 53 s per 5-s video, separate pass);
* ASG with the branch as a sixth separate call (``batched=False`` for the whole step, the
  paper's way of counting) — for reference;
* ASG limited to the first half of the steps (``end = 0.5``), over a whole ``--steps`` loop.

Prints ``bench/_report.py:row`` lines (ratio = ASG / without ASG).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench/_report.py


def build(args):
    from avsync.networks import keyvid_unet as K
    from avsync.samplers.keyvid import KeyVIDBranches

    params = dict(K.GENERATOR_UNET_PARAMS, temporal_length=args.frames)
    if not args.real:
        params["model_channels"] = args.channels
    torch.manual_seed(0)
    with torch.device(args.device):
        net = K.KeyVIDUNet.from_released_params(params).eval().requires_grad_(False)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.02)
    g = torch.Generator().manual_seed(1)
    t = args.frames
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    family = KeyVIDBranches(net, r(1, 77, 1024), r(1, 77, 1024), r(1, 16 * t, 1024), r(1, 16 * t, 1024),
                            r(1, t, 12, 768), torch.zeros(1, t, 12, 768), r(1, 4, t, args.height, args.width), 6,
                            torch.arange(t).view(1, -1) * 4)
    return net, family


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--real", action="store_true", help="released width (model_channels 320; GPU machine)")
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--frames", type=int, default=4, help="keyframes per clip (released: 12)")
    ap.add_argument("--height", type=int, default=16, help="latent height (released 40 = 320 px)")
    ap.add_argument("--width", type=int, default=16, help="latent width (released 64 = 512 px)")
    ap.add_argument("--steps", type=int, default=4, help="loop length for the step-range row")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from avsync.samplers.asg import AudioSyncGuidanceSettings
    from _report import best_of, row

    from avsync.samplers.core.guidance import MultiConditionCFG, guided_predictor

    net, family = build(args)
    inner = MultiConditionCFG()
    asg = AudioSyncGuidanceSettings(2.0).wrap(inner)
    half = AudioSyncGuidanceSettings(2.0, 0.0, 0.5).wrap(inner)
    x = torch.randn(1, 4, args.frames, args.height, args.width, generator=torch.Generator().manual_seed(2))
    t = torch.tensor(500)

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    def step(guidance, batched=True):
        predict = guided_predictor(family, guidance, 10, batched=batched)

        def run():
            with torch.no_grad():
                predict(x, t, 0)
            sync()
        return run

    def loop(guidance):
        predict = guided_predictor(family, guidance, args.steps)

        def run():
            with torch.no_grad():
                for i in range(args.steps):
                    predict(x, t, i)
            sync()
        return run

    runs = {"cfg": step(inner), "asg": step(asg), "asg_separate": step(asg, batched=False),
            "cfg_loop": loop(inner), "half_loop": loop(half)}
    best = {k: float("inf") for k in runs}
    for _ in range(args.repeats):              # interleaved: the machine's load hits every path alike
        for k, fn in runs.items():
            best[k] = min(best[k], best_of(fn, 1))
    size = (f"KeyVID generator UNet, model_channels {320 if args.real else args.channels}, {args.frames} frames, "
            f"{args.height}×{args.width} latents, {args.device}")
    print(size)
    print(f"four-condition CFG step (one call): {best['cfg'] * 1e3:.1f} ms")
    print(f"+ ASG, five branches in one call:   {best['asg'] * 1e3:.1f} ms  ({best['asg'] / best['cfg'] - 1:+.0%})")
    print(f"+ ASG, five separate calls:         {best['asg_separate'] * 1e3:.1f} ms  "
          f"({best['asg_separate'] / best['cfg'] - 1:+.0%})")
    print(f"{args.steps}-step loop, ASG in the first half: {best['half_loop'] / best['cfg_loop'] - 1:+.0%}")
    row("asg_step_batched", best["asg"] * 1e3, "ms", best["asg"] / best["cfg"], "four-condition CFG step", note=size)
    row("asg_step_separate_calls", best["asg_separate"] * 1e3, "ms", best["asg_separate"] / best["cfg"],
        "four-condition CFG step (one call)", note="five branches as five calls")
    row("asg_first_half_loop", best["half_loop"] * 1e3, "ms", best["half_loop"] / best["cfg_loop"],
        f"{args.steps}-step loop without ASG", note="off-sync branch only in steps < 0.5·N, batched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
