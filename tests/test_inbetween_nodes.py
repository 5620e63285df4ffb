"""AVSyncDualDirectionalSampler as ComfyUI runs it (run_node), progress and cancel, the
`avsync inbetween` command."""

import pytest
import torch

from avsync import compat
from avsync.cli.common import run_node
from avsync.core.errors import InputError
from avsync.samplers import inbetween as ib

SMALL = dict(frames=3, width=64, height=64, steps=2, cfg=2.0, seed=3, renoise_repeats=1, renoise_ratio=0.5,
             fuse="average", decode_chunk_size=2)


@pytest.fixture(autouse=True)
def _one_thread():
    # 2 shared cores: oversubscribed intra-op threads make tiny models several times slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_delta(unet, seed=1, scale=0.05):
    from tests.factories.svd import backward_param_names

    from avsync.loaders.svd import BackwardMotionDelta

    g = torch.Generator().manual_seed(seed)
    params = dict(unet.named_parameters())
    deltas = {n: torch.randn(params[n].shape, generator=g) * scale for n in backward_param_names(unet)}
    return BackwardMotionDelta(deltas=deltas, source="random", dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny():
    from tests.factories.svd import tiny_svd_model

    model = tiny_svd_model(seed=0)
    return model, random_delta(model.unet.module)


def _images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, 64, 64, 3, generator=g), torch.rand(2, 48, 80, 3, generator=g)


def test_node_generates_frames_and_is_deterministic(tiny):
    model, delta = tiny
    first, last = _images()
    (a,) = run_node("AVSyncDualDirectionalSampler", svd_model=model, backward_weights=delta, first_image=first,
                    last_image=last, variant="full", **SMALL)
    assert a.shape == (3, 64, 64, 3) and a.dtype == torch.float32
    assert 0.0 <= a.min() and a.max() <= 1.0 and a.std() > 1e-3
    (b,) = run_node("AVSyncDualDirectionalSampler", svd_model=model, backward_weights=delta, first_image=first,
                    last_image=last, variant="full", **SMALL)
    assert torch.equal(a, b)
    (c,) = run_node("AVSyncDualDirectionalSampler", svd_model=model, backward_weights=delta, first_image=first,
                    last_image=last, variant="full", execution="two_call", **SMALL)
    # two code paths in float32 (pixels in [0, 1]): measured 1.7e-5 (AVX-512) and 1.1e-5
    # (ATEN_CPU_CAPABILITY=default), one thread; the per-call floor is in test_fused_one_call_...
    assert (a - c).abs().max() < 1e-4
    # the models are back on their offload device afterwards
    assert next(model.unet.module.parameters()).device == model.unet.offload_device


def test_node_progress_counts_every_model_evaluation_and_cancel_stops(tiny):
    model, _ = tiny
    first, last = _images()
    seen = []
    compat.set_default_progress_callback(lambda v, t: seen.append((v, t)))
    try:
        run_node("AVSyncDualDirectionalSampler", svd_model=model, first_image=first, last_image=last,
                 variant="trf", **SMALL)
        assert seen[-1] == (3, 3) and len(seen) == 3  # 2 steps + 1 re-noise repeat
        seen.clear()
        calls = []

        def cancel_on_second(v, t):
            calls.append(v)
            if v == 1:
                compat.request_interrupt()

        compat.set_default_progress_callback(cancel_on_second)
        before = {k: type(p) for k, p in model.unet.module.attn_processors.items()}
        with pytest.raises(compat.Interrupted):
            run_node("AVSyncDualDirectionalSampler", svd_model=model, first_image=first, last_image=last,
                     variant="trf", **SMALL)
        assert calls == [1]  # stopped at the second evaluation, before it ran
        assert {k: type(p) for k, p in model.unet.module.attn_processors.items()} == before
    finally:
        compat.set_default_progress_callback(None)
        compat.request_interrupt(False)


def test_node_errors_name_the_input(tiny):
    model, _ = tiny
    first, last = _images()
    with pytest.raises(InputError) as e:
        run_node("AVSyncDualDirectionalSampler", svd_model=model, first_image=first, last_image=last,
                 variant="full", **SMALL)
    assert e.value.input_name == "backward_weights"
    with pytest.raises(InputError) as e:
        run_node("AVSyncDualDirectionalSampler", svd_model=model, first_image=first[0], last_image=last,
                 variant="trf", **SMALL)
    assert e.value.input_name == "first_image"
    with pytest.raises(InputError) as e:
        run_node("AVSyncDualDirectionalSampler", svd_model=model, first_image=first, last_image=last,
                 variant="trf", **dict(SMALL, width=96))
    assert e.value.input_name == "width"
    with pytest.raises(InputError) as e:
        run_node("AVSyncDualDirectionalSampler", svd_model="svd_xt.safetensors", first_image=first,
                 last_image=last, variant="trf", **SMALL)
    assert e.value.input_name == "svd_model"


def test_chunked_decode_matches_the_svd_pipeline(tiny):
    """Chunked decoding gives what diffusers' StableVideoDiffusionPipeline.decode_latents gives
    with the same chunk size (then mapped to IMAGE: [F, H, W, 3] in 0..1)."""
    import types

    from diffusers import StableVideoDiffusionPipeline

    model, _ = tiny
    vae = model.vae.module
    z = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = ib.decode_latents(vae, z, chunk=2)
    ref = StableVideoDiffusionPipeline.decode_latents(types.SimpleNamespace(vae=vae), z[None], 5, 2)
    ref = (ref[0].permute(1, 2, 3, 0) / 2 + 0.5).clamp(0, 1)
    assert ours.shape == (5, 64, 64, 3)
    assert ((ours > 0) & (ours < 1)).float().mean() > 0.9  # not saturated: the comparison means something
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    # the chunk size changes the temporal decoder's context, so it changes the frames
    assert (ib.decode_latents(vae, z, chunk=5) - ours).abs().max() > 1e-4


def test_cli_writes_an_mp4(tiny, tmp_path):
    import av
    from PIL import Image

    from avsync.cli import main
    from avsync.loaders.svd import save_backward_delta, save_svd_diffusers

    model, delta = tiny
    save_svd_diffusers(model, tmp_path / "models" / "diffusers" / "tiny_svd")
    (tmp_path / "models" / "avsync" / "svd_backward").mkdir(parents=True)
    save_backward_delta(delta.deltas, tmp_path / "models" / "avsync" / "svd_backward" / "d.safetensors")
    first, last = _images()
    Image.fromarray((first[0].numpy() * 255).astype("uint8")).save(tmp_path / "a.png")
    Image.fromarray((last[-1].numpy() * 255).astype("uint8")).save(tmp_path / "b.png")
    out = tmp_path / "out" / "v.mp4"
    try:
        rc = main(["inbetween", "--first", str(tmp_path / "a.png"), "--last", str(tmp_path / "b.png"),
                   "--out", str(out), "--models", str(tmp_path / "models"), "--svd", "tiny_svd",
                   "--backward", "d.safetensors", "--precision", "fp32", "--frames", "3", "--width", "64",
                   "--height", "64", "--steps", "1", "--renoise-repeats", "0", "--decode-chunk-size", "3",
                   "--frames-dir", str(tmp_path / "frames")])
    finally:
        compat.set_models_dir(None)
    assert rc == 0
    with av.open(str(out)) as f:
        frames = [fr for fr in f.decode(video=0)]
        assert len(frames) == 3 and (frames[0].width, frames[0].height) == (64, 64)
    assert len(list((tmp_path / "frames").glob("*.png"))) == 3
    rc = main(["inbetween", "--first", str(tmp_path / "a.png"), "--last", str(tmp_path / "b.png"),
               "--out", str(out), "--models", str(tmp_path / "models"), "--svd", "missing.safetensors"])
    compat.set_models_dir(None)
    assert rc == 2


def test_half_precision_runs_and_keeps_the_vae_dtype():
    from tests.factories.svd import tiny_svd_model

    model = tiny_svd_model(seed=0, dtype=torch.float16)
    delta = random_delta(model.unet.module)
    first, last = _images()
    s = ib.InbetweenSettings(num_frames=3, width=64, height=64, steps=1, renoise_repeats=0)
    fused = ib.generate_inbetween(model, first[0], last[-1], s, backward_weights=delta, seed=1, free_bytes=None,
                                  return_latents=True)
    two = ib.generate_inbetween(model, first[0], last[-1], ib.replace(s, execution="two_call"),
                                backward_weights=delta, seed=1, free_bytes=None, return_latents=True)
    assert fused.dtype == torch.float32 and torch.isfinite(fused).all()
    assert ((fused - two).norm() / two.norm()) < 1e-2  # fp16 rounding only
    assert next(model.vae.module.parameters()).dtype == torch.float16  # upcast for encoding, then back


def test_fused_run_installs_its_processors_once(tiny, monkeypatch):
    """Re-installing processors walks the whole UNet; a fused run does it once (and restores)."""
    model, delta = tiny
    unet = model.unet.module
    first, last = _images()
    calls = []
    original = unet.set_attn_processor
    monkeypatch.setattr(unet, "set_attn_processor", lambda procs: calls.append(1) or original(procs))
    before = {k: type(p) for k, p in unet.attn_processors.items()}
    s = ib.InbetweenSettings(num_frames=3, width=64, height=64, steps=3, renoise_repeats=1, renoise_ratio=1.0)
    trace = ib.SamplingTrace()
    ib.generate_inbetween(model, first[0], last[-1], s, backward_weights=delta, seed=1, free_bytes=None,
                          trace=trace, return_latents=True)
    assert trace.evaluations == 6 and len(calls) == 2  # install + restore, not two per evaluation
    assert {k: type(p) for k, p in unet.attn_processors.items()} == before
