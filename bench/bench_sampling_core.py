"""Benchmark: the sampling core — batched branches vs separate passes, and inbetweening on the core vs before.

    python bench/bench_sampling_core.py                 # small configs on CPU (1 thread)
    python bench/bench_sampling_core.py --device cuda   # same configs on a GPU
    python bench/bench_sampling_core.py --only inbetween --repeats 3   # one part

1. **Four-condition CFG step** (KeyVID's guidance, App. G): the four branches (e_u, e_i, e_it,
   e_c) as one batched model call vs four sequential calls, through
   ``samplers/core/guidance.py:evaluate_branches``; also Audio Sync Guidance's five branches in
   one call (its overhead over four). The network is a small random SVD-style video UNet
   (diffusers ``UNetSpatioTemporalConditionModel``, 64–128 channels; the KeyVID UNet lands on
   another branch), each branch differing only in its cross-attention tokens, as in KeyVID.
   Time per step: minimum of --repeats, paths interleaved in one process.
2. **Inbetweening on the core vs before**: ``samplers/inbetween.py:sample_latents`` (now
   ``core/loop.py:sample`` + ``core/edm.py:EulerEDM``) against the loop it replaced (kept below,
   verbatim, as the baseline), same fused dual-direction evaluator, seed and settings: time ratio
   and the largest difference of the latents (0 = bit-identical); and the loops' own cost per
   evaluation with a free evaluator (what the core adds, without the UNet's noise).
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import row  # noqa: E402  (bench/ is the script's folder)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def small_unet(device, dtype):
    from diffusers import UNetSpatioTemporalConditionModel

    from avsync.loaders.svd import SVD_XT_UNET_CONFIG

    cfg = dict(SVD_XT_UNET_CONFIG, block_out_channels=[64, 128, 128, 128], num_attention_heads=[1, 2, 2, 2],
               cross_attention_dim=64, addition_time_embed_dim=16, projection_class_embeddings_input_dim=48)
    torch.manual_seed(0)
    with torch.device(device):
        return UNetSpatioTemporalConditionModel.from_config(cfg).to(dtype).eval().requires_grad_(False)


class VideoUNetBranches:
    """A :class:`BranchModel` over a video UNet: text / image / audio tokens (real or null)
    concatenated as cross-attention context; ``x`` ``[B, F, 8, h, w]`` (noisy + concat latents)."""

    def __init__(self, unet, batch, device, dtype, tokens=(8, 16, 12)):
        self.net = unet
        g = torch.Generator().manual_seed(1)
        d = unet.config.cross_attention_dim
        self.c = {}
        for name, n in zip(("text", "image", "audio"), tokens):
            for kind in ("", "null_"):
                self.c[kind + name] = torch.randn(batch, n, d, generator=g).to(device, dtype)
        self.ids = torch.tensor([[6.0, 127.0, 0.02]] * batch, device=device, dtype=dtype)

    def inputs(self, branch):
        ctx = [self.c[k] if k in branch.real else self.c["null_" + k] for k in ("text", "image", "audio")]
        return {"ctx": torch.cat(ctx, 1), "ids": self.ids}

    def __call__(self, x, t, inputs):
        return self.net(x, t, encoder_hidden_states=inputs["ctx"], added_time_ids=inputs["ids"], return_dict=False)[0]


def bench_branches(args) -> dict:
    from avsync.samplers.core.guidance import AudioSyncGuidance, MultiConditionCFG, evaluate_branches

    device = torch.device(args.device)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    unet = small_unet(device, dtype)
    model = VideoUNetBranches(unet, 1, device, dtype)
    h, w = args.height // 8, args.width // 8
    x = torch.randn(1, args.frames, 8, h, w, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    t = torch.tensor(0.5, device=device)

    @contextmanager
    def no_patch(net, mask):   # ASG's skip-audio patch stand-in: this UNet has no audio layers
        yield net

    four = MultiConditionCFG()
    five = AudioSyncGuidance(four, 2.0, no_patch)
    paths = {
        "four, one call": lambda: evaluate_branches(model, x, t, four.branches(0, 1), batched=True),
        "four, four calls": lambda: evaluate_branches(model, x, t, four.branches(0, 1), batched=False),
        "five (ASG), one call": lambda: evaluate_branches(model, x, t, five.branches(0, 1), batched=True),
    }
    out = {k: f() for k, f in paths.items()}  # warm-up
    diff = max((out["four, one call"][k] - out["four, four calls"][k]).abs().max().item()
               for k in out["four, four calls"])
    times, _ = _interleaved(paths, args.repeats, args.device)
    return {"times": times, "max_diff": diff}


# The loop samplers/inbetween.py:sample_latents ran before the sampling core (commit 2a9eaeb),
# kept verbatim as the baseline of part 2.
@torch.no_grad()
def legacy_sample_latents(evaluate, shape, settings, noise, device, initial=None):
    from avsync.samplers.core import edm

    sigmas = edm.karras_sigmas(settings.steps)
    if initial is None:
        initial = noise.initial(shape)
    x = initial.to(device, torch.float32) * edm.init_noise_sigma(sigmas).to(device)
    renoise_until = edm.renoise_steps(settings.steps, settings.renoise_ratio, settings.renoise_repeats)

    def step(x, i):
        s, s_next = sigmas[i].to(device), sigmas[i + 1].to(device)
        v = evaluate(x, s)
        return edm.euler_step(x, v, s, s_next)

    for i in range(settings.steps):
        x = step(x, i)
        if i < renoise_until:
            std = edm.renoise_std(sigmas[i], sigmas[i + 1])
            for j in range(settings.renoise_repeats):
                x = x + noise.renoise(x.shape).to(device) * std.to(device)
                x = step(x, i)
    return x


def bench_inbetween(args) -> dict:
    from avsync.samplers import inbetween as ib

    device = torch.device(args.device)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    unet = small_unet(device, dtype)
    s = ib.InbetweenSettings(num_frames=args.ib_frames, width=args.ib_width, height=args.ib_height,
                             steps=args.ib_steps, renoise_repeats=1, renoise_ratio=0.5, variant="no_finetune")
    h, w = s.height // 8, s.width // 8
    d = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(3)
    first = ib.KeyframeConditioning(torch.randn(1, 1, d, generator=g), torch.randn(1, 4, h, w, generator=g))
    last = ib.KeyframeConditioning(torch.randn(1, 1, d, generator=g), torch.randn(1, 4, h, w, generator=g))
    ev = ib.FusedEvaluator(unet, ib.build_branch_inputs(first, last, s, device, dtype), s.variant)
    shape = (s.num_frames, 4, h, w)
    runs = {
        "core": lambda: ib.sample_latents(ev, shape, s, ib.SeededNoise(5), device),
        "before": lambda: legacy_sample_latents(ev, shape, s, ib.SeededNoise(5), device),
    }
    with ev.installed():
        times, outs = _interleaved(runs, args.repeats, args.device)
    # the loops' own cost: a free evaluator, the release's 50 steps with 5 re-noise repeats (175 evaluations)
    s50 = ib.InbetweenSettings(num_frames=args.ib_frames, steps=50)
    free = lambda x, sigma: torch.zeros_like(x)  # noqa: E731
    loops = {
        "core": lambda: ib.sample_latents(free, shape, s50, ib.SeededNoise(5), device),
        "before": lambda: legacy_sample_latents(free, shape, s50, ib.SeededNoise(5), device),
    }
    loop_times, loop_outs = _interleaved(loops, 5 * args.repeats, args.device)
    return {"times": times, "max_diff": (outs["core"] - outs["before"]).abs().max().item(),
            "evaluations": s.evaluations(), "loop_times": {k: v / s50.evaluations() for k, v in loop_times.items()},
            "loop_diff": (loop_outs["core"] - loop_outs["before"]).abs().max().item()}


def _interleaved(runs, repeats, device):
    """Minimum time of each run over ``repeats``, the runs alternating (and their order reversed every
    other round) so that changing machine load hits them alike; and each run's last output."""
    times, outs = {k: [] for k in runs}, {}
    for r in range(repeats):
        for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            _sync(device)
            t0 = time.perf_counter()
            outs[k] = runs[k]()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}, outs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--frames", type=int, default=4, help="part 1: frames (KeyVID keyframes: 12)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--ib-frames", type=int, default=3)
    p.add_argument("--ib-width", type=int, default=64)
    p.add_argument("--ib-height", type=int, default=64)
    p.add_argument("--ib-steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="1 by default: on a shared, loaded CPU more threads oversubscribe and time becomes noise")
    p.add_argument("--only", choices=("branches", "inbetween"), help="run one part")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.only != "inbetween":
        report_branches(args)
    if args.only != "branches":
        report_inbetween(args)
    return 0


def report_branches(args):
    r = bench_branches(args)
    tm = r["times"]
    print(f"1. four-condition CFG step, small video UNet (64-128 ch), {args.frames} frames, "
          f"{args.width}x{args.height}, device {args.device}, {args.threads} threads, min of {args.repeats}")
    for k, v in tm.items():
        print(f"   {k:22s} {v * 1000:9.1f} ms")
    print(f"   one call / four calls: {tm['four, one call'] / tm['four, four calls']:.2f}x   "
          f"(max |difference| of the branch predictions {r['max_diff']:.1e})")
    print(f"   ASG five in one call / four in one call: {tm['five (ASG), one call'] / tm['four, one call']:.2f}x")
    size = f"{args.frames}x{args.width}x{args.height}, {args.device}"
    row(f"4-condition CFG step, one batched call ({size})", tm["four, one call"] * 1000, "ms",
        ratio=tm["four, one call"] / tm["four, four calls"], vs="four sequential calls",
        note=f"max |diff| {r['max_diff']:.1e}")
    row(f"ASG 5-branch step, one batched call ({size})", tm["five (ASG), one call"] * 1000, "ms",
        ratio=tm["five (ASG), one call"] / tm["four, one call"], vs="4-condition CFG in one call")


def report_inbetween(args):
    r = bench_inbetween(args)
    tm = r["times"]
    print(f"2. inbetweening loop, fused evaluator, {args.ib_frames} frames {args.ib_width}x{args.ib_height}, "
          f"{r['evaluations']} evaluations, min of {args.repeats}")
    print(f"   on the core {tm['core']:.3f} s, before {tm['before']:.3f} s: core / before {tm['core'] / tm['before']:.2f}x, "
          f"max |difference| of the latents {r['max_diff']:.1e}")
    lt = r["loop_times"]
    print(f"   the loop itself (free evaluator, 50 steps + 5 re-noise repeats over 25 steps): core "
          f"{lt['core'] * 1e6:.0f} us, before {lt['before'] * 1e6:.0f} us per evaluation "
          f"(max |difference| {r['loop_diff']:.1e})")
    size = f"{args.ib_frames}x{args.ib_width}x{args.ib_height}, {r['evaluations']} evaluations, {args.device}"
    row(f"inbetween sampling on the core ({size})", tm["core"], "s", ratio=tm["core"] / tm["before"],
        vs="pre-core loop", note=f"max |diff| {r['max_diff']:.1e}")
    row("sampling loop overhead per evaluation (free evaluator)", lt["core"] * 1e6, "us",
        ratio=lt["core"] / lt["before"], vs="pre-core loop", note=f"max |diff| {r['loop_diff']:.1e}")


if __name__ == "__main__":
    sys.exit(main())
