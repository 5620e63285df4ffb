"""KeyVID keyframe generation and motion interpolation on the sampling core (samplers/keyvid.py),
on tiny random KeyVID models built in memory from the released-layout factory (tests/factories/keyvid.py).

The DDIM arithmetic, four-condition CFG, the interpolator's noise initialisation and keyframe
replacement are checked against the released code in tests/test_sampling_ddim.py (fixture
tests/data/sampling); here: the conditioning the pipelines assemble, index for index against
hand-built tensors, the batched step against separate passes on the KeyVID UNet, determinism,
Cancel, FreeNoise windows, clip chaining and the nodes' validation.
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from avsync import compat
from avsync.core.errors import InputError
from avsync.core.keyframes import Keyframes
from avsync.loaders import keyvid as loader
from avsync.networks.audio_layers import audio_layers_off
from avsync.samplers import keyvid as kv
from avsync.samplers.core.guidance import AudioSyncGuidance, evaluate_branches
from tests.factories import keyvid as fk

# Tiny sizes whose widths meet where the real model's do: text width = context_dim (64), the
# Resampler has 48 frames of 16 queries (keyframe indices up to 47), ImageBind tokens are 768 wide.
SIZES = fk.Sizes(unet=dict(fk.TINY_UNET, context_dim=64),
                 image_proj=dict(fk.TINY_IMAGE_PROJ, video_length=48, output_dim=64),
                 audio=dict(width=768, layers=1))
W = H = 8      # pixels; latents 4 × 4 × 4 (the tiny VAE downsamples 2×)
KF = [0, 3, 7, 11, 15, 19, 23, 27, 31, 35, 40, 47]


def tokenizer(prompts):
    """A deterministic stand-in for the OpenCLIP tokenizer inside the tiny 1000-token vocabulary."""
    return torch.stack([torch.tensor([(sum(map(ord, p)) * (j + 1) + j) % 1000 for j in range(77)]) for p in prompts])


@lru_cache(maxsize=None)
def _components(role: str, seed: int) -> dict:
    comps = loader.split_checkpoint(fk.tiny_state_dict("generator", seed=seed, sizes=SIZES)).components
    if role == "interpolator":   # an interpolator UNet (no frame_idx_embedding); the released interpolator's
        # ImageBind is rebuilt from imagebind_huge.pth, which the generator's carries (stretched) as well
        istate = fk.tiny_state_dict("interpolator", seed=seed, sizes=SIZES)
        comps = dict(comps, unet=loader.split_checkpoint(istate).components["unet"])
    return comps


def build_tiny(role: str, seed: int, dtype=torch.float32) -> loader.KeyVIDModel:
    """A KeyVIDModel from a tiny released state dict, through the loader's own split and builders (no files)."""
    params = fk.tiny_model_params(role, SIZES)
    comps = _components(role, seed)
    mods = {}
    configs = {}
    for comp, tensors in comps.items():
        cfg = loader._component_config(comp, params, tensors)
        configs[comp] = cfg
        if comp == "schedule":
            mods[comp] = {k: v.float() for k, v in tensors.items()}
        elif comp == "vae":
            mods[comp] = loader.build_vae(tensors, params, dtype)
        else:
            mods[comp] = loader._BUILDERS[comp](tensors, cfg, dtype)
    wrap = lambda c: compat.manage_model(mods[c], {"kind": f"keyvid_{c}"})  # noqa: E731
    return loader.KeyVIDModel(role=role, unet=wrap("unet"), vae=wrap("vae"), text_encoder=wrap("text_encoder"),
                              image_encoder=wrap("image_encoder"), image_proj=wrap("image_proj"),
                              imagebind_audio=wrap("imagebind_audio"), schedule=mods["schedule"], config=configs,
                              dtype=dtype, source="tiny")


@pytest.fixture(scope="module")
def gen():
    return build_tiny("generator", 0)


@pytest.fixture(scope="module")
def interp():
    return build_tiny("interpolator", 5)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(3)
    image = torch.rand(20, 30, 3, generator=g)
    wav = torch.randn(1, 16000 * 2, generator=g) * 0.1
    return image, wav


@pytest.fixture(scope="module")
def gen_cond(gen, inputs):
    image, wav = inputs
    first = kv.prepare_first_frame(image, W, H)
    return kv.encode_conditions(gen, first, kv.clip_audio_16k(wav, 16000), "a dog barking", tokenizer)


def gen_settings(**kw):
    return kv.KeyframeSettings(**{"steps": 1, "width": W, "height": H, **kw})


def interp_settings(**kw):
    return kv.InterpolationSettings(**{"steps": 1, "width": W, "height": H, **kw})


# --------------------------------------------------------------------------------------
# Conditioning assembly, index for index
# --------------------------------------------------------------------------------------

def _hand_audio_chunks(trunk_out):
    """The released plumbing written out by hand: frame f holds [CLS, row r column f for r in 0..11];
    flatten the 48·13 tokens; chunk k = flat tokens 12k … 12k+11."""
    cls, grid = trunk_out[0, :1], trunk_out[0, 1:].reshape(12, 48, -1)
    flat = torch.cat([torch.cat([cls, grid[:, f]]) for f in range(48)])      # [624, D]
    return flat.reshape(52, 12, -1)


def test_generator_conditioning_layout(gen, gen_cond):
    cond = gen_cond
    z0 = torch.randn(1, 4, 4, 4)
    fam = kv.generator_family(gen.unet.module, cond, z0, KF, fs=6)
    chunks, null_chunks = _hand_audio_chunks(cond.audio), _hand_audio_chunks(cond.null_audio)
    img = cond.image[0].reshape(48, 16, -1)
    null_img = cond.null_image[0].reshape(48, 16, -1)
    for name, real in (("e_u", ()), ("e_i", ("image",)), ("e_it", ("image", "text")),
                       ("cond", ("image", "text", "audio"))):
        branch = kv.Branch(name, frozenset(real))
        got = fam.inputs(branch)
        ctx = got["context"][0]
        assert ctx.shape[0] == 77 + 16 * len(KF)                       # 77 + 16·T
        text = cond.text[0] if "text" in real else cond.null_text[0]
        assert torch.equal(ctx[:77], text)
        tok = img if "image" in real else null_img
        for j, f in enumerate(KF):
            assert torch.equal(ctx[77 + 16 * j: 77 + 16 * (j + 1)], tok[f])
            ch = chunks if "audio" in real else null_chunks
            assert torch.equal(got["c_audio"][0, j], ch[f])            # chunk index = frame index (released)
        assert torch.equal(got["c_concat"], z0.unsqueeze(2).expand(1, 4, len(KF), 4, 4))
        assert got["frame_idx"].tolist() == [KF] and got["fs"].tolist() == [6]
    # the null conditions are what the release builds, not zeros
    assert not torch.equal(cond.null_text, cond.text) and cond.null_image.abs().sum() > 0
    assert cond.null_audio.abs().sum() > 0 and not torch.equal(cond.null_audio, cond.audio)


def test_interpolator_conditioning_layout(interp, inputs):
    image, wav = inputs
    first = kv.prepare_first_frame(image, W, H)
    cond = kv.encode_conditions(interp, first, kv.clip_audio_16k(wav, 16000), "x", tokenizer)
    kf = torch.randn(1, 4, len(KF), 4, 4)
    fam = kv.interpolator_family(interp.unet.module, cond, kf, KF, fs=24)
    got = fam.inputs(kv.Branch("cond", frozenset({"image", "text", "audio"})))
    assert got["context"].shape[1] == 77 + 16 * 48 and torch.equal(got["context"][0, 77:], cond.image[0])
    c = got["c_concat"]
    for f in range(48):
        want = kf[:, :, KF.index(f)] if f in KF else torch.zeros(1, 4, 4, 4)
        assert torch.equal(c[:, :, f], want)
    # 52 → 48 chunks, bilinear along the chunk axis (align_corners False): frame j reads chunks around (j+0.5)·52/48−0.5
    chunks = _hand_audio_chunks(cond.audio)
    for j in range(48):
        pos = min(max((j + 0.5) * 52 / 48 - 0.5, 0), 51)
        lo = int(pos)
        hi = min(lo + 1, 51)
        want = chunks[lo] * (1 - (pos - lo)) + chunks[hi] * (pos - lo)
        # measured floor over all 48 frames: 1.7e-5 (torch computes the source position from
        # a float32 scale 52/48, here it is float64)
        assert torch.allclose(got["c_audio"][0, j], want, atol=1e-4, rtol=0)
    assert got["fs"].tolist() == [24] and got["frame_idx"].tolist() == [list(range(48))]


def test_first_frame_resize_and_centre_crop():
    img = torch.zeros(100, 300, 3)
    img[:, 140:160] = 1.0                     # a white vertical bar in the middle
    x = kv.prepare_first_frame(img, 512, 320)
    assert x.shape == (1, 3, 320, 512) and x.min() >= -1 and x.max() <= 1
    assert x[0, :, :, 256].mean() > 0.9 and x[0, :, :, 0].mean() == -1   # centred; short side 100 → 320
    # a portrait image is narrower than 512 after Resize(320): CenterCrop pads with black (−1) as torchvision does
    y = kv.prepare_first_frame(torch.ones(300, 100, 3), 512, 320)
    assert y[0, :, :, 0].max() == -1 and y[0, :, :, 256].min() == 1


# --------------------------------------------------------------------------------------
# The batched step on the KeyVID UNet
# --------------------------------------------------------------------------------------

def test_batched_four_passes_equal_separate_passes(gen, gen_cond):
    fam = kv.generator_family(gen.unet.module, gen_cond, torch.randn(1, 4, 4, 4), KF)
    x = torch.randn(1, 4, len(KF), 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(999)
    branches = gen_settings().guidance().branches(0, 2)
    calls = []
    one = evaluate_branches(fam, x, t, branches, batched=True, on_call=calls.append)
    four = evaluate_branches(fam, x, t, branches, batched=False)
    assert calls == [4]
    for b in branches:
        # measured floor: 5.2e-8 (4.1e-8 with ATEN_CPU_CAPABILITY=default), values ≲ 0.13; float32 kernels
        # that depend on the batch size
        assert torch.allclose(one[b.name], four[b.name], atol=1e-6, rtol=0)
    assert not torch.allclose(four["cond"], four["e_it"])             # the audio matters


# --------------------------------------------------------------------------------------
# Determinism, guidance passthrough, Cancel
# --------------------------------------------------------------------------------------

class _ASGConfig:
    """What the asg branch's AVSYNC_GUIDANCE carries: scale, range, layers; wrap() builds AudioSyncGuidance."""

    def __init__(self, w_a, start=0.0, end=1.0, layers=None):
        self.w_a, self.start, self.end, self.layers = w_a, start, end, layers

    def wrap(self, inner):
        layers = self.layers
        return AudioSyncGuidance(inner, self.w_a, lambda net, mask: audio_layers_off(net, layers, samples=mask),
                                 self.start, self.end)


def test_same_seed_bit_identical_other_seed_differs_and_guidance_passthrough(gen, inputs):
    """Same seed + same model → bit-identical (also with an ASG object of scale 0, which must be a
    no-op); another seed → different; ASG with w_a > 0 adds its audio-off branch to the same call."""
    image, wav = inputs

    def run(seed, g=None, trace=None):
        return kv.generate_keyframes(gen, image, wav, 16000, KF, "dog", gen_settings(seed=seed), guidance=g,
                                     tokenizer=tokenizer, trace=trace)

    a = run(1)
    assert a.images.shape == (12, H, W, 3) and a.latents.shape == (1, 4, 12, 4, 4) and a.indices == KF
    b = run(1, _ASGConfig(0.0))
    assert torch.equal(a.images, b.images) and torch.equal(a.latents, b.latents)
    assert (run(2).latents - a.latents).abs().max() > 1e-2
    trace = kv.SamplingTrace()
    with_asg = run(1, _ASGConfig(3.0), trace)
    assert trace.model_calls == [5]
    assert (with_asg.latents - a.latents).abs().max() > 1e-4


def test_cancel_mid_run_leaves_no_audio_layer_switched_off(gen, inputs):
    image, wav = inputs
    net = gen.unet.module
    before = [m.audio_switch.off for m in net.modules() if hasattr(m, "audio_switch")]
    calls = []

    def cancel_after_first(value, total):
        calls.append(value)
        if value == 1:
            compat.request_interrupt()

    progress = compat.Progress(3, "test", callback=cancel_after_first)
    try:
        with pytest.raises(compat.Interrupted):
            kv.generate_keyframes(gen, image, wav, 16000, KF, "x", gen_settings(steps=3), guidance=_ASGConfig(2.0),
                                  progress=progress, tokenizer=tokenizer)
    finally:
        compat.request_interrupt(False)
    assert calls == [1]
    after = [m.audio_switch.off for m in net.modules() if hasattr(m, "audio_switch")]
    assert after and after == before and all(s is None or s is False for s in after)


def test_bf16_model_runs_in_its_dtype(inputs):
    image, wav = inputs
    g16 = build_tiny("generator", 0, torch.bfloat16)
    r = kv.generate_keyframes(g16, image, wav, 16000, KF, "x", gen_settings(), tokenizer=tokenizer)
    assert next(g16.unet.module.parameters()).dtype == torch.bfloat16
    assert r.images.dtype == torch.float32 and torch.isfinite(r.images).all()


# --------------------------------------------------------------------------------------
# FreeNoise windows
# --------------------------------------------------------------------------------------

def test_freenoise_views_and_weights():
    views, weights = kv.window_fusion(48)
    assert views == [(0, 12), (6, 18), (12, 24), (18, 30), (24, 36), (30, 42), (36, 48)]
    assert kv.freenoise_weights(12).tolist() == [1, 2, 3, 4, 5, 6, 6, 5, 4, 3, 2, 1]
    total = torch.zeros(48)
    for (s, e), w in zip(views, weights):
        total[s:e] += w
    assert torch.allclose(total, torch.ones(48), atol=1e-6)
    assert kv.freenoise_views(12) == [(0, 12)] and kv.freenoise_views(50)[-1] == (38, 50)


def test_freenoise_equals_full_when_frames_fit_one_window(gen, gen_cond):
    fam = kv.generator_family(gen.unet.module, gen_cond, torch.randn(1, 4, 4, 4), KF)   # 12 frames
    guide = gen_settings().guidance()
    x = torch.randn(1, 4, 12, 4, 4, generator=torch.Generator().manual_seed(2))
    full = kv.guided_predictor(fam, guide, 2)(x, torch.tensor(500), 0)
    windowed = kv.windowed_predictor(fam, guide, 2)(x, torch.tensor(500), 0)
    assert torch.equal(full, windowed)


# --------------------------------------------------------------------------------------
# Long audio: clips on the exact timeline frames
# --------------------------------------------------------------------------------------

def _keyframes(num_frames, fps=24.0):
    clips = []
    for s in range(0, num_frames, 48):
        n = min(48, num_frames - s)
        clips.append(sorted({0, *range(0, n, max(1, n // 12))})[:12])
    indices = [s + k for s, c in zip(range(0, num_frames, 48), clips) for k in c]
    return Keyframes(indices=indices, curve=[0.0] * num_frames, peaks=[], valleys=[], fps=fps,
                     num_frames=num_frames, method="onset", seed=0, clips=clips)


@pytest.mark.parametrize("sample_rate", [16000, 44100, 48000])
def test_clip_plan_lands_on_exact_timeline_frames_over_a_minute(sample_rate):
    plans = kv.plan_clips(_keyframes(1440), seed=7)
    assert len(plans) == 30
    for i, p in enumerate(plans):
        assert (p.start, p.end, p.seed) == (48 * i, 48 * i + 48, 7 + i)
        assert p.audio_start_s * 24 == p.start                       # exact in binary: k·2 s
        assert round(p.audio_start_s * sample_rate) == 2 * i * sample_rate
    assert plans[-1].end == 1440 and sum(p.end - p.start for p in plans) == 1440
    odd = kv.plan_clips(_keyframes(1441), seed=0)
    assert (odd[-1].start, odd[-1].end) == (1440, 1441)


def test_nodes_chain_clips_on_the_timeline(gen, interp, inputs):
    """Generator node → interpolator node over 52 frames (two clips: 48 + 4): exactly 52 frames,
    clip 1 = the pipeline run from clip 0's last frame with the audio from 2 s and seed + 1."""
    from avsync.nodes.keyvid_nodes import AVSyncKeyframeGenerator, AVSyncMotionInterpolator

    image, _ = inputs
    wav = torch.randn(1, 1, 16000 * 52 // 24, generator=torch.Generator().manual_seed(9)) * 0.1   # 52 frames
    audio = {"waveform": wav, "sample_rate": 16000}
    keyframes = _keyframes(52)
    images, kvk = AVSyncKeyframeGenerator().generate(gen, image[None], audio, keyframes, "x", 2.0, 7.5, 7.5, 1, 1.0,
                                                     5, width=W, height=H, tokenizer=tokenizer)
    assert images.shape == (12, H, W, 3) and kvk.first.indices == keyframes.clips[0]
    (frames,) = AVSyncMotionInterpolator().interpolate(interp, kvk, keyframes, audio, 2.0, 7.5, 9.0, 1, 1.0, 8, "full")
    assert frames.shape == (52, H, W, 3)
    assert kv.plan_clips(keyframes, 5)[1].keyframes == keyframes.clips[1]
    # the seam: clip 1 starts from frame 47 (clip 0's last), audio from 2 s, seeds + 1
    kf1 = kv.generate_keyframes(gen, frames[47], wav[0], 16000, keyframes.clips[1], "x", gen_settings(seed=6),
                                tokenizer=tokenizer, audio_start_s=2.0)
    clip1 = kv.interpolate_motion(interp, kf1.latents, kf1.indices, wav[0], 16000, "x", interp_settings(seed=9),
                                  first_image=frames[47], tokenizer=tokenizer, audio_start_s=2.0)
    assert torch.equal(frames[48:], clip1[:4])


# --------------------------------------------------------------------------------------
# Nodes: validation before any model work
# --------------------------------------------------------------------------------------

def test_node_validation_errors(gen, interp):
    from avsync.nodes.keyvid_nodes import AVSyncKeyframeGenerator, AVSyncMotionInterpolator

    audio = {"waveform": torch.zeros(1, 1, 16000), "sample_rate": 16000}          # 1 s
    v = AVSyncKeyframeGenerator.VALIDATE_INPUTS
    assert v(keyframes=_keyframes(24), audio=audio) is True
    assert "fps" in v(keyframes=_keyframes(48, fps=25.0))
    assert v(keyframes=_keyframes(48, fps=29.97)).startswith("keyframes")
    assert v(keyframes=_keyframes(48), audio=audio).startswith("audio")           # audio shorter than the clips
    assert v(model=interp).startswith("model")                                    # wrong model role
    assert AVSyncMotionInterpolator.VALIDATE_INPUTS(interp_model=gen).startswith("interp_model")
    # widget values: ComfyUI checks them against the schema; _validate checks them for the CLI / Python
    from avsync.nodes.keyvid_nodes import _validate

    assert _validate(window="sliding").startswith("window")
    assert _validate(cfg_txt=-1).startswith("cfg_txt")
    with pytest.raises(InputError, match="keyvid_keyframes"):
        AVSyncMotionInterpolator().interpolate(interp, object(), _keyframes(24), audio, 2, 7.5, 9, 1, 1, 0, "full")
    with pytest.raises(InputError, match="model"):
        AVSyncKeyframeGenerator().generate(interp, torch.rand(1, 16, 16, 3), audio, _keyframes(24), "x", 2, 7.5, 7.5,
                                           1, 1.0, 0)


def test_memory_check_stops_before_model_work_with_suggestions(gen, interp, inputs):
    image, wav = inputs
    est = kv.KeyVIDMemory(gen, 12, 4).estimate(gen_settings())
    with pytest.raises(InputError, match="model.*Settings that would fit: .*batched off.*fp16 or bf16"):
        kv.generate_keyframes(gen, image, wav, 16000, KF, "x", gen_settings(), tokenizer=tokenizer,
                              free_bytes=est.peak - 1)
    big = kv.KeyVIDMemory(interp, 48, 4)
    s = interp_settings()
    assert big.estimate(kv.replace(s, window="freenoise")).sampling < big.estimate(s).sampling
    assert big.estimate(kv.replace(s, batched=False)).sampling < big.estimate(s).sampling
