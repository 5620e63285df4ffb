"""Audio Sync Guidance on a real ComfyUI (0.3.64) Wan2.2-S2V model, at tiny size.

Two steps, run with ComfyUI's own Python (not the pack's venv), e.g.::

    /work/comfyenv/bin/python tools/asg_s2v_check.py build --comfy /work/comfy \
        --out /tmp/asg-comfy/models/diffusion_models/avsync_tiny_s2v.safetensors
    PYTHONPATH=<dir where `import avsync` is this pack> /work/comfyenv/bin/python tools/asg_s2v_check.py run \
        --comfy /work/comfy --checkpoint /tmp/asg-comfy/models/diffusion_models/avsync_tiny_s2v.safetensors

``build`` writes a random-weight checkpoint with the key layout of ``comfy/ldm/wan/model.py:
WanModel_S2V`` at tiny size (dim 128 = one 128-wide head, 9 blocks so that 3 of the released
injection blocks 0, 4, 8 exist, ffn 256); core's ``comfy/model_detection.py`` recognises it as
``s2v`` by ``casual_audio_encoder.encoder.final_linear.weight``. The text width stays 4096 and the
audio width 1024 (S2V's fixed ``text_dim`` / ``audio_dim``), so ``text_embedding`` and the audio
encoder keep their real input sizes.

``run`` loads it through core (``comfy.sd.load_diffusion_model``: detection, ``ModelPatcher``),
builds the conditioning the way core's ``WanSoundImageToVideo`` does
(``comfy_extras/nodes_wan.py:wan_sound_to_video``, no reference image or motion, so no VAE) from
random stand-ins of the UMT5 text embedding (1×16×4096) and of the 25 wav2vec2 layers (50 Hz,
1024 wide) — the real UMT5-XXL and wav2vec2 cannot be made tiny, their sizes are fixed by core's
configs — and samples with core's KSampler (``nodes.py:common_ksampler``, euler / simple) three
times: unpatched, through ``AVSyncAudioSyncGuidanceModel`` with w_a = 0, and with w_a = 2. It
prints the max differences and counts the model calls, and exits 1 if w_a = 0 is not identical to
the unpatched run or w_a = 2 leaves the latent unchanged.
"""

from __future__ import annotations

import argparse
import sys

TINY = dict(dim=128, ffn_dim=256, num_layers=9, num_heads=1, in_dim=16, out_dim=16)


def _import_comfy(comfy_dir: str):
    sys.argv = [sys.argv[0], "--cpu"]          # comfy.cli_args parses argv on import
    sys.path.insert(0, comfy_dir)
    import comfy.options

    comfy.options.enable_args_parsing()         # as ComfyUI's main.py does
    import comfy.model_management  # noqa: F401  (makes compat see a running ComfyUI)


def build(args) -> None:
    import torch
    from safetensors.torch import save_file

    _import_comfy(args.comfy)
    import comfy.ops
    from comfy.ldm.wan.model import WanModel_S2V

    net = WanModel_S2V(**TINY, operations=comfy.ops.disable_weight_init, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(args.seed)
    state = {}
    for name, p in net.state_dict().items():
        if p.dim() <= 1 and ("norm" in name or name.endswith("modulation")):
            t = 1.0 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name else 0.1 * torch.randn(p.shape, generator=g)
        elif p.dim() <= 1:
            t = 0.05 * torch.randn(p.shape, generator=g)
        else:
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            t = torch.randn(p.shape, generator=g) / fan_in ** 0.5
        state["model.diffusion_model." + name] = t.contiguous()
    save_file(state, args.out)
    print(f"wrote {args.out}: {sum(v.numel() for v in state.values()) / 1e6:.1f} M parameters, "
          f"{len(state)} tensors")


def run(args) -> int:
    import torch

    _import_comfy(args.comfy)
    import comfy.model_detection
    import comfy.sd
    import comfy.utils
    import node_helpers
    import nodes
    from comfy_extras.nodes_wan import wan_sound_to_video

    from avsync.nodes.asg_nodes import AVSyncAudioSyncGuidanceModel

    sd = comfy.utils.load_torch_file(args.checkpoint)
    config = comfy.model_detection.detect_unet_config(sd, "model.diffusion_model.")
    print("core detection:", {k: config.get(k) for k in ("image_model", "model_type", "dim", "num_layers")})
    if config.get("model_type") != "s2v":
        print("FAIL: core does not detect the checkpoint as S2V")
        return 1
    model = comfy.sd.load_diffusion_model(args.checkpoint)
    print("loaded:", type(model.model).__name__, type(model.model.diffusion_model).__name__)

    g = torch.Generator().manual_seed(1)
    frames = 4 * ((args.length - 1) // 4 + 1)
    text = torch.randn(1, 16, 4096, generator=g)
    positive = [[text, {}]]
    negative = [[torch.zeros_like(text), {}]]
    audio_layers = [torch.randn(1, 50 * frames // 16 + 8, 1024, generator=g) for _ in range(25)]
    positive, negative, latent, _ = wan_sound_to_video(positive, negative, None, args.size, args.size, args.length, 1,
                                                       audio_encoder_output={"encoded_audio_all_layers": audio_layers})
    print("conditioning: audio_embed", tuple(positive[0][1]["audio_embed"].shape), "latent", tuple(latent["samples"].shape))

    calls = []

    def counting(m):
        orig = m.model.diffusion_model.forward

        def wrapper(executor, *a, **k):
            calls.append(a[0].shape[0])
            return executor(*a, **k)
        m = m.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "count", wrapper)
        return m, orig

    import comfy.patcher_extension

    def sample(m, label):
        m, _ = counting(m)
        calls.clear()
        (out,) = nodes.common_ksampler(m, args.seed, args.steps, args.cfg, "euler", "simple", positive, negative, latent)
        print(f"{label}: model calls (rows each) {calls}")
        return out["samples"].clone()

    node = AVSyncAudioSyncGuidanceModel()
    plain = sample(model, "unpatched")
    (zero,) = node.patch(model, 0.0, 0.0, 1.0, "all")
    zero_out = sample(zero, "ASG w_a=0")
    (asg,) = node.patch(model, args.w_a, 0.0, 1.0, "all")
    asg_out = sample(asg, f"ASG w_a={args.w_a:g}")
    (half,) = node.patch(model, args.w_a, 0.0, 0.5, "all")
    half_out = sample(half, f"ASG w_a={args.w_a:g}, first half of the steps")
    d_zero = (zero_out - plain).abs().max().item()
    d_asg = (asg_out - plain).abs().max().item()
    d_half = (half_out - plain).abs().max().item()
    print(f"max |w_a=0 - unpatched| = {d_zero:.3g}; max |w_a={args.w_a:g} - unpatched| = {d_asg:.3g} "
          f"(latent std {plain.std().item():.3g}); first half only: {d_half:.3g}")
    ok = torch.equal(zero_out, plain) and d_asg > 1e-4 and d_half > 1e-4
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the tiny random-weight S2V checkpoint")
    b.add_argument("--comfy", required=True, help="ComfyUI checkout")
    b.add_argument("--out", required=True)
    b.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run", help="sample it with core's KSampler, with and without ASG")
    r.add_argument("--comfy", required=True)
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--size", type=int, default=32)
    r.add_argument("--length", type=int, default=9)
    r.add_argument("--steps", type=int, default=4)
    r.add_argument("--cfg", type=float, default=4.0)
    r.add_argument("--w-a", type=float, default=2.0)
    r.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.cmd == "build":
        build(args)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
