"""MTV pipeline (samplers/mtv.py): the released window plan, the branch model's conditions, the
window hand-over, ASG on MTV. Reference: suimuc/MTV_Framework@5704fe6 ``mtv/sample_video.py``."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from avsync.core.errors import InputError
from avsync.samplers.core.guidance import AUDIO, TEXT, Branch
from avsync.samplers.mtv import (
    OVERLAP_FRAMES, WINDOW_FRAMES, MTVBranchModel, MTVSettings, Window, make_solver, window_features, window_plan)


def _padded(seconds: float) -> tuple[int, int]:
    """The release's audio_processor.py:preprocess: seq_len = ceil(s·24), padded up to 1 + 48k."""
    seq = math.ceil(seconds * 16000 / 16000 * 24)
    n = seq if (seq - 1) % 48 == 0 else seq + 48 - (seq - 1) % 48
    return seq, n


# -- window plan -------------------------------------------------------------------------

def test_ten_seconds_give_225_frames():
    seq, n = _padded(10.0)
    assert (seq, n) == (240, 241)
    plan = window_plan(n, seq)
    assert [w.start for w in plan.windows] == [0, 44, 88, 132, 176]       # times = (241 − 8)//44 = 5
    assert plan.rendered == 5 + 44 * 5 == 225 and plan.frames == 225
    assert plan.unrendered == (225, 240) and plan.unrendered_features == 16
    assert [w.keep for w in plan.windows] == [0, 5, 5, 5, 5]
    assert [w.handover for w in plan.windows] == [None, 44, 44, 44, 44]
    assert [w.clean_frames for w in plan.windows] == [0, 2, 2, 2, 2]
    assert "225-239" in plan.describe()


@pytest.mark.parametrize("n", [1 + 48 * k for k in range(1, 40)])
def test_released_plan_formula(n):
    times = max((n - 8) // 44, 1)
    plan = window_plan(n)
    assert len(plan.windows) == times
    assert all(w.start == 44 * w.index and w.end == 44 * w.index + 49 for w in plan.windows)
    assert plan.rendered == 5 + 44 * times
    # 3 to 46 trailing feature frames are never rendered (reference notes §1.5) — except for
    # N = 49 (≤ 2 s of speech), where the one forced window covers all 49
    assert 3 <= n - plan.rendered <= 46 if n > 49 else plan.rendered == n
    # the windows tile the rendered frames without gaps or overlaps
    spans = [w.video_frames for w in plan.windows]
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize("n", [1 + 48 * k for k in range(1, 40)])
def test_render_tail_covers_the_speech(n):
    plan = window_plan(n, render_tail=True)
    released = window_plan(n)
    assert plan.rendered >= n and plan.frames == n
    assert plan.windows[: len(released.windows)] == released.windows
    if len(plan.windows) > len(released.windows):
        tail, prev = plan.windows[-1], plan.windows[-2]
        assert tail.tail and tail.start == min(n - 49, 44 * len(released.windows))
        # the 5 hand-over frames lie inside the previous window, and the kept frames continue it
        assert 0 < tail.handover and tail.handover + OVERLAP_FRAMES <= WINDOW_FRAMES
        assert tail.start == prev.start + tail.handover
        assert tail.video_frames[0] == prev.end and tail.keep >= OVERLAP_FRAMES


def test_render_tail_adds_nothing_when_released_windows_reach_the_end():
    assert len(window_plan(241, 225, render_tail=True).windows) == 5
    assert len(window_plan(49, 40, render_tail=True).windows) == 1


def test_short_and_limited_plans():
    plan = window_plan(1, 1)                # 1/24 s: one zero-padded window, cut to 1 frame
    assert len(plan.windows) == 1 and plan.frames == 1
    plan = window_plan(481, 470, max_windows=2)
    assert len(plan.windows) == 2 and plan.frames == 93 and "(max_windows)" in plan.describe()
    assert not window_plan(481, 470, max_windows=20).limited
    with pytest.raises(InputError, match="speech"):
        window_plan(0)


def test_window_features_slice_and_zero_pad():
    feats = torch.arange(60, dtype=torch.float32).view(60, 1, 1, 1).expand(60, 5, 2, 3)
    w = window_features(feats, Window(1, 44, 44, 5))
    assert w.shape == (1, 49, 5, 2, 3)
    assert torch.equal(w[0, :16, 0, 0, 0], torch.arange(44, 60, dtype=torch.float32))
    assert torch.count_nonzero(w[0, 16:]) == 0       # past the end: zeros, as released (pre_fix of zeros_like)


def test_settings_are_checked():
    with pytest.raises(InputError, match="windows"):
        MTVSettings(windows="tail").validate()
    with pytest.raises(InputError, match="steps"):
        MTVSettings(steps=0).validate()
    with pytest.raises(InputError, match="cfg"):
        MTVSettings(cfg=float("nan")).validate()


# -- branch model ---------------------------------------------------------------------

class _Recorder(torch.nn.Module):
    """Records what the network is called with; answers with the latents' first 16 channels."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, latents, text, timestep, speech, effects, music, speech2=None, clean_frames=0):
        self.calls.append(dict(latents=latents, text=text, timestep=timestep, speech=speech, effects=effects,
                               music=music, speech2=speech2, clean_frames=clean_frames))
        return latents[:, :, :16] * 2


def test_branch_model_conditions_and_zero_channels():
    torch.manual_seed(0)
    net = _Recorder()
    text = torch.randn(1, 226, 8)
    audio = {k: torch.randn(1, 49, 5, 2, 3) for k in ("speech", "effects", "music")}
    family = MTVBranchModel(net, text, audio, clean_frames=2)
    uncond, cond = family.inputs(Branch("uncond")), family.inputs(Branch("cond", frozenset({TEXT, AUDIO})))
    assert torch.equal(cond["text"], text) and all(torch.equal(cond[k], audio[k]) for k in audio)
    assert torch.count_nonzero(uncond["text"]) == 0 and all(torch.count_nonzero(uncond[k]) == 0 for k in audio)
    x = torch.randn(2, 13, 16, 4, 6)
    out = family(x, torch.tensor(999.0), {k: torch.cat([uncond[k], cond[k]]) for k in cond})
    call = net.calls[-1]
    assert call["latents"].shape == (2, 13, 32, 4, 6)
    assert torch.equal(call["latents"][:, :, :16], x) and torch.count_nonzero(call["latents"][:, :, 16:]) == 0
    assert call["timestep"].tolist() == [999.0, 999.0] and call["clean_frames"] == 2
    assert call["speech2"] is None and torch.equal(out, x * 2)


# -- tiny networks: the branch model on MTVTransformer, the hand-over, ASG ------------------

@functools.lru_cache(maxsize=1)
def _tiny():
    """(Built once per session: building takes seconds.) A tiny MTV transformer (3 latent frames of 4 × 6 → 9-frame windows, stride 4) and a tiny
    CogVideoX VAE with the real 4× temporal / 8× spatial compression (32 × 48 px)."""
    mtv = pytest.importorskip("tests.factories.mtv")
    enc = pytest.importorskip("tests.factories.mtv_encoder_files")
    from avsync.networks.mtv_encoders import MTVVae

    from tests.factories.mtv_pipeline_files import SMALL

    net = mtv.tiny_mtv_transformer(seed=0, **SMALL)
    vae = MTVVae(enc.tiny_cogvideox_vae(seed=1).eval())
    return net, vae


def _features(n: int, seed: int, cfg) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, cfg.audio_context, cfg.audio_layers_per_frame, cfg.audio_dim, generator=g)


@pytest.mark.parametrize("cache_audio", [True, False])
def test_uncond_audio_is_zero_before_the_projections(cache_audio):
    net, _ = _tiny()
    cfg = net.config
    seen = {}
    hooks = [getattr(net.audio, name).register_forward_pre_hook(
        lambda m, args, name=name: seen.setdefault(name, []).append(args[0].clone()))
        for name in ("audio_proj", "audio_proj_effect", "audio_proj_music")]
    text = torch.randn(1, cfg.text_tokens, cfg.text_dim)
    audio = {k: _features(9, i, cfg)[None] for i, k in enumerate(("speech", "effects", "music"))}
    family = MTVBranchModel(net, text, audio, cache_audio=cache_audio)
    branches = [Branch("uncond"), Branch("cond", frozenset({TEXT, AUDIO}))]
    prepared = [family.inputs(b) for b in branches]     # cached: projected here, uncond first
    inputs = {k: torch.cat([p[k] for p in prepared]) for k in prepared[1]}
    x = torch.randn(2, 3, 16, 4, 6)
    family(x, torch.tensor(500.0), inputs)
    for h in hooks:
        h.remove()
    for name, stream in (("audio_proj", "speech"), ("audio_proj_effect", "effects"), ("audio_proj_music", "music")):
        seen_in = torch.cat(seen[name])    # one sample per projection call: [uncond, cond]
        assert seen_in.shape[0] == 2
        assert torch.count_nonzero(seen_in[0]) == 0, f"{name}: uncond row must be zeros before the projection"
        assert torch.equal(seen_in[1], audio[stream][0])


class _Counting:
    """A noise source that logs which kind of draw came when (the run's draw order)."""

    def __init__(self, seed):
        from avsync.samplers.core.noise import SeededNoise

        self.inner, self.log = SeededNoise(seed), []

    def _take(self, kind, shape):
        t = getattr(self.inner, kind)(shape)
        self.log.append((kind, tuple(shape), t.clone()))
        return t

    def initial(self, shape):
        return self._take("initial", shape)

    def renoise(self, shape):
        return self._take("renoise", shape)

    def conditioning(self, shape):
        return self._take("conditioning", shape)


def test_window_hand_over_on_tiny_models():
    from avsync.samplers.mtv import run_windows

    net, vae = _tiny()
    cfg = net.config
    n = 1 + 8 * 3                                   # N = 25 → times = (25 − 8)//4 = 4 windows of 9 frames
    assert [w.start for w in window_plan(n, 23, frames=9).windows] == [0, 4, 8, 12]
    plan = window_plan(n, 23, frames=9, max_windows=3)  # the first 3 (2 hand-overs) keep the test short
    assert plan.frames == 17
    feats = {k: _features(n, i, cfg) for i, k in enumerate(("speech", "effects", "music"))}
    text = torch.randn(1, cfg.text_tokens, cfg.text_dim, generator=torch.Generator().manual_seed(7))
    settings = MTVSettings(steps=3, seed=5)
    calls = []
    hook = net.register_forward_pre_hook(lambda m, a, kw: calls.append(kw.get("clean_frames")), with_kwargs=True)
    runs, noise = [], _Counting(5)
    video = run_windows(net, vae, text, feats, plan, settings, noise=noise, on_window=runs.append)
    hook.remove()

    assert video.shape == (17, 32, 48, 3) and 0.0 <= float(video.min()) and float(video.max()) <= 1.0
    # one model call per step (the CFG pair batched), clean_frames 0 in window 0 and 2 after
    assert calls == [0] * 3 + [2] * 6
    # draw order: per window its initial noise (all 3 latent frames) and the solver's draws; before
    # windows 1.. the hand-over's posterior draw
    kinds = [k for k, _, _ in noise.log]
    solver = make_solver(settings)
    per_window = ["initial"] + ["renoise"] * sum(solver.draws(i) for i in range(3))
    assert kinds == per_window + (["conditioning"] + per_window) * 2
    posterior = [t for k, _, t in noise.log if k == "conditioning"]
    for t in range(1, 3):
        prev, run = runs[t - 1], runs[t]
        # the clean latents: the previous window's decoded frames 4..8 (its last 5), clamped to
        # [0, 1], back to [−1, 1], posterior *sample* × 0.7 — recomputed here from the VAE's moments
        mean, std = vae.posterior(prev.frames[:, 4:9] * 2 - 1)
        expect = 0.7 * (mean + std * posterior[t - 1])
        assert run.clean.shape == (1, 2, 16, 4, 6)
        assert torch.allclose(run.clean, expect, rtol=0, atol=1e-6)   # same ops, other grouping: measured 0
        # held clean through sampling: the window's result starts with them exactly
        assert torch.equal(run.latents[:, :2], run.clean)
    # the video: window 0's 9 frames, then frames 5.. of each next window
    expect_video = torch.cat([runs[0].frames[0]] + [r.frames[0, 5:] for r in runs[1:]])
    assert torch.equal(video, expect_video.permute(0, 2, 3, 1))
    # same seed, same model objects → the same video, bit for bit
    again = run_windows(net, vae, text, feats, plan, settings)
    assert torch.equal(again, video)


def test_asg_scale_zero_is_cfg_and_skipping_audio_equals_zero_audio_layers():
    from avsync.samplers.asg import AudioSyncGuidanceSettings
    from avsync.samplers.core.guidance import CFG
    from avsync.samplers.keyvid import apply_guidance
    from avsync.networks.audio_layers import audio_layers_off, list_audio_layers
    from avsync.samplers.mtv import run_windows

    net, vae = _tiny()
    cfg = net.config
    assert len(list_audio_layers(net)) > 0
    n = 1 + 8
    plan = window_plan(n, 9, frames=9)
    feats = {k: _features(n, i, cfg) for i, k in enumerate(("speech", "effects", "music"))}
    text = torch.randn(1, cfg.text_tokens, cfg.text_dim, generator=torch.Generator().manual_seed(7))
    settings = MTVSettings(steps=2, seed=3)
    cfg_guide = CFG(3.5, (TEXT, AUDIO))
    plain = run_windows(net, vae, text, feats, plan, settings, guidance=cfg_guide)
    off = apply_guidance(cfg_guide, AudioSyncGuidanceSettings(w_a=0.0), net, "the MTV transformer")
    assert off is cfg_guide
    assert torch.equal(run_windows(net, vae, text, feats, plan, settings, guidance=off), plain)
    on = apply_guidance(cfg_guide, AudioSyncGuidanceSettings(w_a=2.0), net, "the MTV transformer")
    assert not torch.equal(run_windows(net, vae, text, feats, plan, settings, guidance=on), plain)
    # the off-sync branch inside a batched call: its rows equal a separate run with the audio layers off
    family = MTVBranchModel(net, text, {k: window_features(v, plan.windows[0]) for k, v in feats.items()})
    cond = family.inputs(Branch("cond", frozenset({TEXT, AUDIO})))
    x = torch.randn(1, 3, 16, 4, 6, generator=torch.Generator().manual_seed(1))
    batch = {k: torch.cat([v, v]) for k, v in cond.items()}
    with audio_layers_off(net, None, samples=torch.tensor([False, True])):
        both = family(torch.cat([x, x]), torch.tensor(700.0), batch)
    with audio_layers_off(net):
        alone = family(x, torch.tensor(700.0), cond)
    normal = family(x, torch.tensor(700.0), cond)
    # measured floor for batch 2 vs batch 1 on this CPU: max |Δ| ≈ 1e-7 on values ~1
    assert torch.allclose(both[1:], alone, rtol=0, atol=1e-5)
    assert torch.allclose(both[:1], normal, rtol=0, atol=1e-5)
    assert not torch.allclose(alone, normal, rtol=0, atol=1e-3)


def test_progress_counts_evaluations_across_windows_and_cancel_stops_the_run():
    from avsync import compat
    from avsync.samplers.mtv import evaluations, run_windows

    net, vae = _tiny()
    cfg = net.config
    n = 1 + 8 * 2                                     # N = 17 → 2 windows of 9 frames
    plan = window_plan(n, 17, frames=9)
    feats = {k: _features(n, i, cfg) for i, k in enumerate(("speech", "effects", "music"))}
    text = torch.zeros(1, cfg.text_tokens, cfg.text_dim)
    settings = MTVSettings(steps=2, seed=0)
    assert evaluations(settings, plan) == 4
    seen = []

    def on_progress(value, total):
        seen.append((value, total))
        if value == 3:                                # Cancel during window 1's first step
            compat.request_interrupt()

    try:
        with pytest.raises(compat.Interrupted):
            run_windows(net, vae, text, feats, plan, settings,
                        progress=compat.Progress(evaluations(settings, plan), "t", callback=on_progress))
    finally:
        compat.request_interrupt(False)
    assert seen == [(1, 4), (2, 4), (3, 4)]


def test_two_speakers_reach_the_network_and_are_zero_in_uncond():
    from tests.factories.mtv import tiny_mtv_transformer
    from tests.factories.mtv_pipeline_files import SMALL
    from avsync.samplers.mtv import run_windows

    _tiny()                                           # skips without the factories
    net = tiny_mtv_transformer(seed=1, speakers=2, **SMALL)
    _, vae = _tiny()
    cfg = net.config
    seen = []
    hook = net.audio.audio_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    n = 9
    feats = {k: _features(n, i, cfg) for i, k in enumerate(("speech", "effects", "music", "speech2"))}
    text = torch.randn(1, cfg.text_tokens, cfg.text_dim, generator=torch.Generator().manual_seed(3))
    try:
        video = run_windows(net, vae, text, feats, window_plan(n, 9, frames=9), MTVSettings(steps=1, seed=0))
    finally:
        hook.remove()
    assert video.shape == (9, 32, 48, 3)
    # the shared speech projection runs for speaker 1, then speaker 2, once per branch (the cache):
    # uncond (zeros) first, then cond
    uncond1, uncond2, speaker1, speaker2 = seen
    assert torch.count_nonzero(uncond1) == 0 and torch.count_nonzero(uncond2) == 0
    assert torch.equal(speaker1[0], feats["speech"][:9]) and torch.equal(speaker2[0], feats["speech2"][:9])


def test_audio_cache_projects_once_per_window_and_branch_and_changes_nothing():
    from avsync.samplers.mtv import run_windows

    net, vae = _tiny()
    cfg = net.config
    n = 1 + 8 * 2                                     # 2 windows of 9 frames (one hand-over)
    plan = window_plan(n, 17, frames=9)
    feats = {k: _features(n, i, cfg) for i, k in enumerate(("speech", "effects", "music"))}
    text = torch.randn(1, cfg.text_tokens, cfg.text_dim, generator=torch.Generator().manual_seed(2))
    calls = []
    hook = net.audio.audio_proj_music.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        videos = {}
        for cache in (True, False):
            calls.clear()
            videos[cache] = run_windows(net, vae, text, feats, plan, MTVSettings(steps=3, seed=4, cache_audio=cache))
            # per projection call one sample: cached, uncond + cond per window; else 2 rows × 3 steps per window
            assert calls == [1] * (2 * 2 if cache else 2 * 3 * 2), (cache, calls)
    finally:
        hook.remove()
    # a real promise: the same seed and model give the same video, bit for bit, with or without the cache
    assert torch.equal(videos[True], videos[False])
    assert float(videos[True].std()) > 0


def test_projections_held_on_the_cpu_are_borrowed_per_call_and_stay_out_of_the_module():
    from tests.factories.mtv import tiny_mtv_transformer
    from tests.factories.mtv_pipeline_files import SMALL

    _tiny()
    net = tiny_mtv_transformer(seed=2, **SMALL)
    cfg = net.config
    feats = [_features(9, i, cfg)[None] for i in range(3)]
    before = net.project_audio(*feats)
    n_params = sum(p.numel() for p in net.parameters())
    proj_params = sum(p.numel() for name in net.audio.PROJECTIONS for p in getattr(net.audio, name).parameters())
    net.audio.hold_projections_outside()
    try:
        # out of parameters() / state_dict(): ComfyUI's model management and .to() no longer move them
        assert sum(p.numel() for p in net.parameters()) == n_params - proj_params
        assert not any(k.startswith("audio.audio_proj") for k in net.state_dict())
        net.to(torch.float64)                           # a stand-in for .to(device): they are not moved
        assert net.audio.projection("audio_proj").proj1.weight.dtype == torch.float32
        net.to(torch.float32)
        after = net.project_audio(*feats)
        assert all(torch.equal(a, b) for a, b in zip(before.as_dict().values(), after.as_dict().values()))
    finally:
        net.audio.restore_projections()
    assert sum(p.numel() for p in net.parameters()) == n_params


def test_hand_over_matches_the_released_code():
    """tests/data/mtv/pipeline/README.md: a previous window's decoder output through the release's
    hand-over (clamp, last 5 frames, [−1, 1], SAT encoder, posterior sample, × 0.7) on a tiny random
    SAT ``ContextParallelEncoder3D``, against :func:`encode_handover` on diffusers' encoder with the
    same weights and the same posterior draw."""
    from pathlib import Path

    from diffusers import AutoencoderKLCogVideoX
    from safetensors.torch import load_file

    from avsync.networks.mtv_encoders import MTVVae
    from avsync.samplers.core.noise import InjectedNoise
    from avsync.samplers.mtv import _to_unit_range, encode_handover

    data = load_file(str(Path(__file__).parent / "data" / "mtv" / "pipeline" / "sat_handover.safetensors"))
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32,
                                 latent_channels=16, temporal_compression_ratio=4, sample_height=16,
                                 sample_width=24).eval()
    enc = {k[len("encoder."):]: v.float() for k, v in data.items() if k.startswith("encoder.")}
    vae.encoder.load_state_dict(enc, strict=True)
    frames01 = _to_unit_range(data["io.recon"].float().permute(0, 2, 1, 3, 4))     # [1, 49, 3, 16, 24]
    clean = encode_handover(MTVVae(vae), frames01, 44, InjectedNoise(conditioning=[data["io.eps"]]))
    expect = data["io.first_latent"]
    assert clean.shape == expect.shape == (1, 2, 16, 2, 3)
    err = (clean - expect).abs().max().item()
    # measured floor: max |Δ| 3.3e-6 on values up to 12.8 (float32; SAT's causal conv vs diffusers'); 2.9e-6
    # under ATEN_CPU_CAPABILITY=default; taking the posterior mean instead, or the first 5 frames, is off by ~12
    assert err <= 2e-5 * max(1.0, expect.abs().max().item()), err
