"""Dual-directional sampling: EDM pieces, parity with the released pipeline (fixture in
tests/data/inbetween, see its README), re-noising, seeding, memory check."""

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from avsync.core.errors import InputError
from avsync.samplers import edm
from avsync.samplers import inbetween as ib
from tests.test_inbetween_nodes import _one_thread  # noqa: F401  (shared fixture)

DATA = Path(__file__).parent / "data" / "inbetween"


@pytest.fixture(scope="module")
def fixture():
    from safetensors.torch import load_file
    from PIL import Image

    from avsync.loaders.svd import load_backward_delta, load_svd_diffusers

    model = load_svd_diffusers(DATA / "svd", "fp32")
    delta = load_backward_delta(DATA / "backward_delta.safetensors")
    ref = load_file(str(DATA / "reference_latents.safetensors"))
    runs = json.loads((DATA / "runs.json").read_text())

    def img(name):
        return torch.from_numpy(np.array(Image.open(DATA / f"{name}.png"))).float() / 255.0

    return model, delta, ref, runs, img("first"), img("last")


def _settings(runs, **kw):
    base = dict(num_frames=runs["frames"], width=runs["width"], height=runs["height"], steps=4, renoise_repeats=0)
    base.update(kw)
    return ib.InbetweenSettings(**base)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------------------
# EDM / Karras / Euler
# --------------------------------------------------------------------------------------

def test_karras_schedule_hand_values_and_diffusers_agreement():
    s = edm.karras_sigmas(50)
    assert s.shape == (51,) and s.dtype == torch.float32
    assert s[0].item() == pytest.approx(700.0, rel=1e-6)
    assert s[49].item() == pytest.approx(0.002, rel=1e-5)
    assert s[50].item() == 0.0
    assert torch.all(s[:-1] > s[1:])
    # hand value: midpoint of the ramp, ((700^(1/7) + 0.002^(1/7)) / 2)^7
    mid = edm.karras_sigmas(3)[1].item()
    assert mid == pytest.approx(((700 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7, rel=1e-6)
    assert edm.init_noise_sigma(s).item() == pytest.approx(math.sqrt(700 ** 2 + 1), rel=1e-6)
    assert edm.c_noise(torch.tensor(700.0)).item() == pytest.approx(0.25 * math.log(700), rel=1e-6)

    from diffusers import EulerDiscreteScheduler

    sch = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                 prediction_type="v_prediction", interpolation_type="linear", use_karras_sigmas=True,
                                 sigma_min=0.002, sigma_max=700.0, timestep_spacing="leading", timestep_type="continuous",
                                 steps_offset=1)
    sch.set_timesteps(50)
    assert torch.allclose(sch.sigmas, s, rtol=1e-6)
    assert torch.allclose(sch.timesteps, torch.stack([edm.c_noise(x) for x in s[:-1]]), atol=1e-6)
    assert float(sch.init_noise_sigma) == pytest.approx(edm.init_noise_sigma(s).item(), rel=1e-6)
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    sch._step_index = 7
    want = sch.step(v, sch.timesteps[7], x).prev_sample
    assert torch.allclose(edm.euler_step(x, v, s[7], s[8]), want, rtol=1e-6, atol=1e-6)


def test_preconditioning_and_euler_hand_values():
    sig = torch.tensor(1.0)
    assert edm.c_skip(sig).item() == pytest.approx(0.5)
    assert edm.c_out(sig).item() == pytest.approx(-1 / math.sqrt(2))
    assert edm.c_in(sig).item() == pytest.approx(1 / math.sqrt(2))
    x, v = torch.tensor([2.0]), torch.tensor([0.0])
    # x0 = 2/2 = 1; derivative (2-1)/1 = 1; Euler to σ=0 lands on x0
    assert edm.euler_step(x, v, sig, torch.tensor(0.0)).item() == pytest.approx(1.0)
    # half way: 2 + 1·(0.5-1) = 1.5
    assert edm.euler_step(x, v, sig, torch.tensor(0.5)).item() == pytest.approx(1.5)
    assert edm.renoise_std(torch.tensor(5.0), torch.tensor(3.0)).item() == pytest.approx(4.0)
    assert edm.renoise_steps(50, 0.5, 5) == 25 and edm.renoise_steps(50, 0.5, 0) == 0
    assert edm.model_evaluations(50, 0.5, 5) == 175  # the release: 50 + 25·5


def test_cfg_and_fuse_schedules():
    s = ib.InbetweenSettings(num_frames=5)
    assert torch.equal(ib.cfg_scales(s), torch.full((5,), 2.0))
    lin = ib.cfg_scales(ib.InbetweenSettings(num_frames=5, cfg_schedule="linear"))
    assert torch.allclose(lin, torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0]))  # the release's 1 → 3
    assert ib.fuse_weights(s) == 0.5
    w = ib.fuse_weights(ib.InbetweenSettings(num_frames=5, fuse="weighted")).flatten()
    assert torch.allclose(w, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


# --------------------------------------------------------------------------------------
# Parity with the released pipeline (re-noising off)
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("run,kw,execution", [
    ("default", {}, "fused"),
    ("default", {}, "two_call"),
    ("weighted", {"cfg_schedule": "linear", "fuse": "weighted"}, "fused"),
])
def test_parity_with_reference_pipeline(fixture, run, kw, execution):
    model, delta, ref, runs, first, last = fixture
    s = _settings(runs, execution=execution, **kw)
    lat = ib.generate_inbetween(model, first, last, s, backward_weights=delta, seed=runs[run]["seed"],
                                free_bytes=None, return_latents=True)
    want = ref[f"{run}_latents"]
    assert lat.shape == want.shape
    assert _rel(lat, want) <= 1e-4
    # and the fixture is sensitive: the other run's options give a clearly different result
    other = ref["weighted_latents" if run == "default" else "default_latents"]
    assert _rel(lat, other) > 1e-2


# --------------------------------------------------------------------------------------
# Re-noising
# --------------------------------------------------------------------------------------

class _RecordingNoise(ib.SeededNoise):
    def __init__(self, seed):
        super().__init__(seed)
        self.renoise_draws = []

    def renoise(self, shape):
        t = super().renoise(shape)
        self.renoise_draws.append(t.clone())
        return t


class _ReplayNoise(ib.SeededNoise):
    """Conditioning and initial noise from the seed; re-noise draws from a given list."""

    def __init__(self, seed, renoise_draws):
        super().__init__(seed)
        self._queue = list(renoise_draws)

    def renoise(self, shape):
        return self._queue.pop(0).view(shape)


def test_renoise_levels_and_count(fixture):
    model, delta, _, runs, first, last = fixture
    s = _settings(runs, steps=4, renoise_repeats=3, renoise_ratio=0.5, variant="trf")
    trace = ib.SamplingTrace()
    noise = _RecordingNoise(7)
    ib.generate_inbetween(model, first, last, s, seed=7, noise=noise, free_bytes=None, trace=trace,
                          return_latents=True)
    sig = edm.karras_sigmas(4)
    assert trace.evaluations == 4 + 2 * 3 == s.evaluations()
    assert [(i, j) for i, j, _ in trace.renoise_stds] == [(i, j) for i in (0, 1) for j in range(3)]
    for i, _, std in trace.renoise_stds:
        assert std == pytest.approx(math.sqrt(sig[i].item() ** 2 - sig[i + 1].item() ** 2), rel=1e-6)
    assert len(noise.renoise_draws) == 6
    # conditioning noise, initial noise, then the re-noise draws, all from one generator
    assert noise.draws == 2 + 6


def test_renoise_replay_matches_reference(fixture):
    """The reference re-noises from the global RNG and its scheduler draws (and discards) one
    tensor per step; replaying that stream through our noise hook reproduces its result."""
    model, delta, ref, runs, first, last = fixture
    r = runs["renoise"]
    s = _settings(runs, renoise_repeats=r["noise_injection_steps"], renoise_ratio=r["noise_injection_ratio"])
    shape = (runs["frames"], 4, runs["height"] // 2, runs["width"] // 2)
    g = torch.Generator().manual_seed(r["seed"] + 1000)
    draws = []
    k = edm.renoise_steps(s.steps, s.renoise_ratio, s.renoise_repeats)
    for i in range(s.steps):
        torch.randn(shape, generator=g)                   # scheduler.step's unused noise
        if i < k:
            for _ in range(s.renoise_repeats):
                draws.append(torch.randn(shape, generator=g))
                torch.randn(shape, generator=g)           # scheduler.step again
    lat = ib.generate_inbetween(model, first, last, s, backward_weights=delta, seed=r["seed"],
                                noise=_ReplayNoise(r["seed"], draws), free_bytes=None, return_latents=True)
    assert _rel(lat, ref["renoise_latents"]) <= 1e-4
    # replaying different draws gives a different result: the re-noise really enters
    lat2 = ib.generate_inbetween(model, first, last, s, backward_weights=delta, seed=r["seed"],
                                 noise=_ReplayNoise(r["seed"], [d.flip(0) for d in draws]), free_bytes=None,
                                 return_latents=True)
    assert _rel(lat2, ref["renoise_latents"]) > 1e-3


def test_same_seed_same_result_different_seed_different(fixture):
    model, delta, _, runs, first, last = fixture
    s = _settings(runs, steps=2, renoise_repeats=1, renoise_ratio=0.5, variant="no_finetune", cfg=1.0)
    a = ib.generate_inbetween(model, first, last, s, seed=11, free_bytes=None, return_latents=True)
    b = ib.generate_inbetween(model, first, last, s, seed=11, free_bytes=None, return_latents=True)
    c = ib.generate_inbetween(model, first, last, s, seed=12, free_bytes=None, return_latents=True)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


# --------------------------------------------------------------------------------------
# Settings and memory
# --------------------------------------------------------------------------------------

def test_settings_errors_name_the_input():
    for kw, name in [(dict(num_frames=2), "frames"), (dict(width=30), "width"), (dict(steps=0), "steps"),
                     (dict(renoise_ratio=1.5), "renoise_ratio"), (dict(variant="x"), "variant"),
                     (dict(cfg_schedule="linear", cfg=2.0, min_cfg=3.0), "min_cfg"),
                     (dict(decode_chunk_size=0), "decode_chunk_size")]:
        with pytest.raises(InputError) as e:
            ib.InbetweenSettings(**kw).validate()
        assert e.value.input_name == name


@functools.lru_cache(maxsize=None)
def _real_weight_bytes(dtype):
    from avsync.loaders import svd

    return svd.estimate_weight_bytes(dtype)


def _real_estimate(s, dtype=torch.float16):
    b = _real_weight_bytes(dtype)
    size = torch.finfo(dtype).bits // 8
    heads = [(lvl, h) for lvl, h, n in ((0, 5, 2), (1, 10, 2), (2, 20, 2), (3, 20, 1), (2, 20, 3), (1, 10, 3),
                                        (0, 5, 3)) for _ in range(n)]
    return ib.estimate_peak_memory(s, b["unet"] // size, b["vae"] // size, 320, 128, size, 8, heads)


def test_memory_estimate_grows_with_the_settings_and_defaults_fit_24gb():
    d = ib.InbetweenSettings()
    base = _real_estimate(d)
    assert base.peak < 24 * 2 ** 30
    assert _real_estimate(ib.InbetweenSettings(num_frames=14)).sampling < base.sampling
    assert _real_estimate(ib.InbetweenSettings(width=512, height=320)).sampling < base.sampling
    assert _real_estimate(ib.InbetweenSettings(decode_chunk_size=25)).decoding > base.decoding
    assert _real_estimate(d, torch.float32).peak > base.peak
    # the two-call path stores 16 layers of maps (≈1 GB in fp16 at 1024×576×25)
    two = _real_estimate(ib.InbetweenSettings(execution="two_call"))
    assert 0.9e9 < two.maps < 1.2e9
    assert base.maps == 256 << 20


def test_memory_check_stops_with_suggestions():
    d = ib.InbetweenSettings()
    with pytest.raises(InputError) as e:
        ib.check_memory(d, _real_estimate, free_bytes=8 * 2 ** 30, model_dtype=torch.float16)
    msg = str(e.value)
    assert "exceeds" in msg and "Settings that would fit" in msg
    assert "frames" in msg or "width" in msg
    # suggestions really fit
    ib.check_memory(ib.InbetweenSettings(num_frames=25), _real_estimate, free_bytes=10 ** 13,
                    model_dtype=torch.float16)
    with pytest.raises(InputError, match="fp16"):
        ib.check_memory(d, lambda s: _real_estimate(s, torch.float32), free_bytes=8 * 2 ** 30,
                        model_dtype=torch.float32)
    ib.check_memory(d, _real_estimate, free_bytes=None, model_dtype=torch.float16)  # unknown: no check


def test_latent_preview_hand_values_and_progress_hand_off():
    x0 = torch.zeros(4, 2, 3)
    x0[0] = 1.0  # channel 0 only: RGB = (1 + factors[0]) / 2
    kind, img, size = ib.latent_preview(x0)
    assert kind == "JPEG" and size == 512 and img.size == (3, 2)
    want = [round((1 + f) / 2 * 255) for f in (0.3512, 0.2297, 0.3227)]
    assert list(img.getpixel((0, 0))) == want

    class _Bar:
        def __init__(self):
            self.previews = []

        def update(self, n=1, preview=None):
            self.previews.append(preview)

    bar = _Bar()
    s = ib.InbetweenSettings(num_frames=3, steps=2, renoise_repeats=0)
    ib.sample_latents(lambda x, sigma: torch.zeros_like(x), (3, 4, 2, 2), s, ib.SeededNoise(0), "cpu",
                      progress=bar, preview=True)
    assert len(bar.previews) == 2 and all(p[0] == "JPEG" for p in bar.previews)


def test_memory_budget_is_unknown_on_cpu():
    assert ib.memory_budget("cpu") is None


def test_memory_check_names_decode_chunk_size_when_only_decoding_does_not_fit():
    s = ib.InbetweenSettings(decode_chunk_size=25)
    est = _real_estimate(s)
    assert est.sampling < est.decoding
    free = (est.sampling + est.decoding) // 2
    with pytest.raises(InputError, match="^decode_chunk_size: .*decode_chunk_size [0-9]"):
        ib.check_memory(s, _real_estimate, free_bytes=free, model_dtype=torch.float16)
