"""MTV's SDE DPM++(2M) on the sampling core: parity with the released SAT ``VPSDEDPMPP2MSampler``
(fixture in tests/data/mtv/solver, see its README), the released timestep arithmetic, CFG on v vs on x̂₀,
the window hand-over (``KeepCleanFrames``), the diffusers arithmetic and the loop's progress / cancel."""

import json
from pathlib import Path

import pytest
import torch

from avsync import compat
from avsync.samplers.core import ddim, dpmpp
from avsync.samplers.core.guidance import CFG, evaluate_branches, guided_predictor
from avsync.samplers.core.loop import SamplingTrace, sample
from avsync.samplers.core.noise import InjectedNoise, SeededNoise
from tests.factories.sampling import D_AUD, D_CTX, L_AUD, TinyVideoDenoiser

DATA = Path(__file__).parent / "data" / "mtv" / "solver"
FRAMES, CHANNELS, HEIGHT, WIDTH = 5, 4, 4, 4      # [B, T, C, H, W]: MTV's latent layout, toy sizes
TEXT_TOKENS = 4


# --------------------------------------------------------------------------------------
# A tiny MTV-like branch model (also what the fixture's stand-in network calls)
# --------------------------------------------------------------------------------------

def tiny_mtv_v(den: TinyVideoDenoiser, x, t, text, audio, clean_frames: int = 0):
    """v of a tiny MTV-shaped network: the factory's deterministic denoiser on ``[B, C, T, H, W]`` with
    zero I2V concat channels; the ``clean_frames`` leading frames get the t = 0 time term (the released
    DiT gives them the t = 0 AdaLN embedding)."""
    xc = x.permute(0, 2, 1, 3, 4)
    concat = torch.zeros_like(xc)
    t = t.expand(x.shape[0]) if t.ndim == 0 else t
    out = den(xc, t, concat, text, audio)
    if clean_frames:
        out0 = den(xc, torch.zeros_like(t), concat, text, audio)
        out[:, :, :clean_frames] = out0[:, :, :clean_frames]
    return out.permute(0, 2, 1, 3, 4)


def make_mtv_conditions(seed: int, batch: int = 1) -> dict:
    """Text tokens and speech / effects / music features at toy sizes (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return {"text": torch.randn(batch, TEXT_TOKENS, D_CTX, generator=g),
            **{k: torch.randn(batch, FRAMES, L_AUD, D_AUD, generator=g) for k in ("speech", "effects", "music")}}


class TinyMTVBranches:
    """MTV's branches: ``cond`` = real text and audio, ``uncond`` = zero text and zero audio (before the
    network's audio projections, as released); ``clean_frames`` is passed to the network."""

    def __init__(self, net, conds, clean_frames: int = 0):
        self.net, self.conds, self.clean_frames = net, conds, clean_frames

    def inputs(self, branch):
        real = "cond" in branch.real
        return {k: v if real else torch.zeros_like(v) for k, v in self.conds.items()}

    def __call__(self, x, t, inputs):
        audio = inputs["speech"] + inputs["effects"] + inputs["music"]
        return tiny_mtv_v(self.net, x, t, inputs["text"], audio, self.clean_frames)


RUNS = json.loads((DATA / "runs.json").read_text())


@pytest.fixture(scope="module")
def ref():
    from safetensors.torch import load_file

    return load_file(str(DATA / "dpmpp_sat_reference.safetensors"))


@pytest.fixture(scope="module")
def net(ref):
    torch.set_num_threads(1)       # tiny tensors: more threads only oversubscribe a shared CPU
    n = TinyVideoDenoiser().eval().requires_grad_(False)
    n.load_state_dict({k[len("denoiser/"):]: v for k, v in ref.items() if k.startswith("denoiser/")})
    return n


def _setup(net, ref, name, arithmetic="released"):
    r = RUNS[name]
    conds = {k: ref[f"{name}/cond/{k}"] for k in ("text", "speech", "effects", "music")}
    solver = dpmpp.DPMPP2MSDE(steps=r["steps"], arithmetic=arithmetic)
    if r["clean_frames"]:
        solver = dpmpp.KeepCleanFrames(solver, ref[f"{name}/clean_latents"], frame_axis=1)
    model = TinyMTVBranches(net, conds, clean_frames=dpmpp.clean_frames_of(solver))
    guidance = CFG(dpmpp.MTV_CFG_SCALE, conditions=("cond",))
    draws = [ref[f"{name}/draw{j}"] for j in range(r["draws"])]
    return solver, model, guidance, InjectedNoise(ref[f"{name}/x_T"], draws)


def _run_steps(net, ref, name, count):
    """``count`` loop steps one by one, recording the branch predictions and (x_next, x̂₀) of each."""
    solver, model, guidance, noise = _setup(net, ref, name)
    x = solver.initial(noise.initial(ref[f"{name}/x_T"].shape))
    rec = []
    for i in range(count):
        t = solver.timestep(i)
        preds = evaluate_branches(model, x, t, guidance.branches(i, solver.steps))
        x, x0 = solver.step(x, guidance.combine(preds, i, solver.steps), i, noise)
        rec.append((t, preds, x, x0))
    return solver, rec, noise


# Measured floor of ours (CFG on v, then x̂₀) against the release (x̂₀ per branch, then CFG), max abs over x̂₀
# and x of every step, AMD EPYC, the same under ATEN_CPU_CAPABILITY=default: 1 step of the 50-step schedule
# 0 (bit-identical: at ᾱ = 0, x̂₀ = −v in both orders), 3 steps 9.5e-7 (values up to 4.1), the full 3- and
# 5-step runs 9.5e-7 and 1.9e-6 (values up to 8.2), the hand-over run 1.4e-6. The rounding of the two CFG orders accumulates over a full 50-step run:
# 6.7e-6 there (values up to 10.7, i.e. 7 float32 ulps), which gets its own 2e-5. Step 0's network
# outputs are bit-identical (the same batched [uncond; cond] call on the same x_T as the release).
TOL = 1e-5
TOL_50_STEPS = 2e-5


def _check_step(ref, name, i, t, preds, x, x0):
    assert float(t) == RUNS[name]["network_timesteps"][i], i
    v = torch.cat([preds["uncond"], preds["cond"]])
    want_v = ref[f"{name}/step{i}/v"]
    # step 0 sees the same x_T: the same batched [uncond; cond] network call as the release, bit for bit
    assert torch.equal(v, want_v) if i == 0 else (v - want_v).abs().max().item() <= TOL, i
    assert (x0 - ref[f"{name}/step{i}/x0"]).abs().max().item() <= TOL, i
    assert (x - ref[f"{name}/step{i}/x"]).abs().max().item() <= TOL, i


def test_schedule_and_snap_equal_the_released_discretization_and_denoiser(ref):
    solver = dpmpp.DPMPP2MSDE()                                    # 50 steps, released
    assert torch.equal(solver.table, ref["schedule/denoiser_table"])
    for name, r in RUNS.items():
        s = dpmpp.DPMPP2MSDE(steps=r["steps"])
        assert torch.equal(s.sqrt_alphas, ref[f"{name}/solver_sqrt_alphas"]), name
        assert s.timesteps.tolist() == [int(t) for t in r["network_timesteps"]], name
        for i in range(r["steps"]):
            assert torch.equal(s.snapped_sqrt_alphas[i:i + 1], ref[f"{name}/step{i}/snapped_sqrt_alpha"]), (name, i)
    # the released steps are 999, 979, …, 19 — uniform_trailing for 50 (and MTVCraft's 20) steps, not for 3
    assert RUNS["s50"]["network_timesteps"][:2] == [999.0, 979.0] and RUNS["s50"]["network_timesteps"][-1] == 19.0
    for steps in (50, 20):
        assert dpmpp.released_timesteps(steps).tolist() == ddim.ddim_timesteps(steps).tolist()
    assert dpmpp.released_timesteps(3).tolist() == [333, 666, 999] != ddim.ddim_timesteps(3).tolist()
    # the snap: the solver's √ᾱ (rescaled over the 50 steps) vs the 1000-step table (rescaled over all)
    moved = solver.snapped_index != solver.timesteps
    assert moved.sum().item() == 11 and torch.equal(solver.snapped_index[moved], solver.timesteps[moved] - 1)
    shift = (solver.sqrt_alphas[:-1] - solver.snapped_sqrt_alphas).abs().max().item()
    assert 5.1e-4 < shift < 5.2e-4
    assert solver.sqrt_alphas[0].item() == 0.0 and solver.sqrt_alphas[-1].item() == 1.0


@pytest.mark.parametrize("count", [1, 3])
def test_one_and_three_steps_of_the_50_step_schedule_match_the_released_sampler(net, ref, count):
    solver, rec, noise = _run_steps(net, ref, "s50", count)
    for i, (t, preds, x, x0) in enumerate(rec):
        _check_step(ref, "s50", i, t, preds, x, x0)
    # draws as released: 1 at step 0, 2 at every middle step
    assert len(noise._renoise) == RUNS["s50"]["draws"] - (1 + 2 * (count - 1))


@pytest.mark.parametrize("name", ["s50", "s5", "s3", "handover"])
def test_full_runs_through_the_loop_match_the_released_sampler(net, ref, name):
    solver, model, guidance, noise = _setup(net, ref, name)
    rec = []
    step = solver.step
    solver.step = lambda *a: rec.append(step(*a)) or rec[-1]
    trace = SamplingTrace()
    out = sample(guided_predictor(model, guidance, solver.steps, on_call=trace.count_call), solver, noise,
                 initial=ref[f"{name}/x_T"], trace=trace)
    tol = TOL_50_STEPS if RUNS[name]["steps"] == 50 else TOL
    clean = RUNS[name]["clean_frames"]
    for i, (x, x0) in enumerate(rec):
        assert (x0 - ref[f"{name}/step{i}/x0"]).abs().max().item() <= tol, i
        # the release re-imposes the clean frames at the start of the next step, we at the end of this one
        assert (x[:, clean:] - ref[f"{name}/step{i}/x"][:, clean:]).abs().max().item() <= tol, i
    assert (out - ref[f"{name}/samples"]).abs().max().item() <= tol
    assert not noise._renoise                    # every released draw used, none more (0 at the last step)
    assert trace.model_calls == [2] * RUNS[name]["steps"]       # [uncond; cond] batched, one call per step
    # the last step returns x̂₀ itself
    assert torch.equal(rec[-1][0], rec[-1][1]) if not RUNS[name]["clean_frames"] else True
    # the fixture is sensitive: the sample is far from the start
    assert (ref[f"{name}/samples"] - ref[f"{name}/x_T"]).abs().max() > 0.5


# --------------------------------------------------------------------------------------
# CFG on v = CFG on x̂₀; the first step by hand
# --------------------------------------------------------------------------------------

def test_cfg_on_v_equals_the_released_cfg_on_x0():
    """The release mixes x̂₀ = v·c_out + x·c_skip per branch; the core mixes v. Same x, so the c_skip·x terms
    cancel: equal up to rounding at every step of the 50-step schedule."""
    solver = dpmpp.DPMPP2MSDE()
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for i in range(solver.steps):
        x = 3 * torch.randn(2, 5, 4, 8, 8, generator=g)
        v_u, v_c = torch.randn(2, 5, 4, 8, 8, generator=g), torch.randn(2, 5, 4, 8, 8, generator=g)
        on_v = solver.denoised(x, CFG(3.5).mix({"uncond": v_u, "cond": v_c}), i)
        d_u, d_c = solver.denoised(x, v_u, i), solver.denoised(x, v_c, i)
        on_x0 = d_u + dpmpp.MTV_CFG_SCALE * (d_c - d_u)             # guiders.py:DynamicCFG → NoDynamicThresholding
        worst = max(worst, (on_v - on_x0).abs().max().item())
    # measured floor 2.9e-6 (3.8e-6 under ATEN_CPU_CAPABILITY=default), values up to 19: 2 float32 ulps
    assert worst <= 1e-5
    # by hand, loop step 45 (t = 99, snapped to table index 98): x = 2, v_u = 0.5, v_c = 1
    s = solver.snapped_sqrt_alphas[45].item()
    assert solver.snapped_index[45].item() == 98 and solver.timestep(45).item() == 99
    want = 2 * s - (1 - s * s) ** 0.5 * (0.5 + 3.5 * 0.5)
    x, v_u, v_c = torch.full((1, 1), 2.0), torch.full((1, 1), 0.5), torch.full((1, 1), 1.0)
    assert solver.denoised(x, CFG(3.5).mix({"uncond": v_u, "cond": v_c}), 45).item() == pytest.approx(want, rel=1e-6)


def test_first_and_last_steps_by_hand():
    """Step 0 is at ᾱ = 0: x̂₀ = −v, no memory, x₁ = √ᾱ₁·x̂₀ + √(1 − ᾱ₁)·z (one draw). The last step
    returns x̂₀ and draws nothing."""
    solver = dpmpp.DPMPP2MSDE(steps=5)
    x, v, z = torch.full((1, 2), 2.0), torch.full((1, 2), 0.5), torch.full((1, 2), 1.5)
    noise = InjectedNoise(renoise=[z])
    x1, x0 = solver.step(x, v, 0, noise)
    a1 = solver.sqrt_alphas[1].item()
    assert solver.snapped_sqrt_alphas[0].item() == 0.0 and torch.equal(x0, -v)
    assert x1[0, 0].item() == pytest.approx(a1 * -0.5 + (1 - a1 * a1) ** 0.5 * 1.5, rel=1e-6)
    assert not noise._renoise
    solver.step(x1, v, 1, InjectedNoise(renoise=[z, z]))
    solver.step(x1, v, 2, InjectedNoise(renoise=[z, z]))
    solver.step(x1, v, 3, InjectedNoise(renoise=[z, z]))
    last, x0 = solver.step(x1, v, 4, InjectedNoise())            # no draw left: would raise if it drew
    assert torch.equal(last, x0)
    assert [solver.draws(i) for i in range(5)] == [1, 2, 2, 2, 0]
    assert [dpmpp.DPMPP2MSDE(steps=5, arithmetic="diffusers").draws(i) for i in range(5)] == [1, 2, 2, 2, 1]


def test_bad_settings_fail_with_a_message():
    with pytest.raises(ValueError, match="arithmetic"):
        dpmpp.DPMPP2MSDE(arithmetic="sat")
    with pytest.raises(ValueError, match="before the zero-SNR rescale"):
        dpmpp.DPMPP2MSDE(ddim.DiffusionSchedule.keyvid())
    with pytest.raises(ValueError, match="steps"):
        dpmpp.DPMPP2MSDE(steps=0)


# --------------------------------------------------------------------------------------
# The window hand-over
# --------------------------------------------------------------------------------------

def test_keep_clean_frames_imposes_them_bit_exactly_before_every_step_and_after_the_loop(net):
    g = torch.Generator().manual_seed(4)
    clean = 0.5 * torch.randn(1, 2, CHANNELS, HEIGHT, WIDTH, generator=g)
    solver = dpmpp.KeepCleanFrames(dpmpp.DPMPP2MSDE(steps=5), clean, frame_axis=1)
    assert dpmpp.clean_frames_of(solver) == 2 and dpmpp.clean_frames_of(solver.solver) == 0
    assert solver.latent_frame_mask(FRAMES).tolist() == [False, False, True, True, True]
    assert solver.evaluations() == 5 and solver.timestep(0).item() == 999 and solver.draws(1) == 2
    model = TinyMTVBranches(net, make_mtv_conditions(5), clean_frames=dpmpp.clean_frames_of(solver))
    seen, inner = [], []
    predict = guided_predictor(model, CFG(dpmpp.MTV_CFG_SCALE, ("cond",)), 5)
    step = solver.solver.step
    solver.solver.step = lambda *a: inner.append(step(*a)) or inner[-1]
    out = sample(lambda x, t, i: seen.append(x.clone()) or predict(x, t, i), solver, SeededNoise(6),
                 (1, FRAMES, CHANNELS, HEIGHT, WIDTH))
    assert len(seen) == 5
    for x in seen + [out]:
        assert torch.equal(x[:, :2], clean)                       # never re-noised, bit for bit
    # the wrapped solver itself moves those frames (so the re-imposing is doing something) …
    assert all((x_next[:, :2] - clean).abs().max() > 1e-3 for x_next, _ in inner)
    # … and keeps its own x̂₀ history: the generated frames equal a hand-written released loop
    ref = dpmpp.DPMPP2MSDE(steps=5)
    noise = SeededNoise(6)
    x = noise.initial((1, FRAMES, CHANNELS, HEIGHT, WIDTH))
    for i in range(5):
        x = torch.cat([clean, x[:, 2:]], dim=1)                    # sampling.py: before every step
        x, _ = ref.step(x, predict(x, ref.timestep(i), i), i, noise)
    x = torch.cat([clean, x[:, 2:]], dim=1)                        # and after the loop
    assert torch.equal(out, x)
    with pytest.raises(ValueError, match="clean frames"):
        dpmpp.KeepCleanFrames(dpmpp.DPMPP2MSDE(), torch.zeros(1, 7, 1, 1, 1)).initial(torch.zeros(1, 5, 1, 1, 1))


def test_the_network_is_told_the_clean_frames(net):
    """The BranchModel passes ``clean_frames_of(solver)``: the clean frames get the t = 0 time term."""
    conds = make_mtv_conditions(8)
    x = torch.randn(1, FRAMES, CHANNELS, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(9))
    plain = TinyMTVBranches(net, conds, 0)
    told = TinyMTVBranches(net, conds, dpmpp.clean_frames_of(dpmpp.KeepCleanFrames(dpmpp.DPMPP2MSDE(), x[:, :2])))
    t = torch.tensor(999)
    a = plain(x, t, plain.inputs(CFG(3.5, ("cond",)).branches(0, 1)[1]))
    b = told(x, t, told.inputs(CFG(3.5, ("cond",)).branches(0, 1)[1]))
    assert torch.equal(a[:, 2:], b[:, 2:]) and (a[:, :2] - b[:, :2]).abs().max() > 1e-2


# --------------------------------------------------------------------------------------
# The diffusers arithmetic
# --------------------------------------------------------------------------------------

def _cogvideox_dpm_scheduler():
    from diffusers import CogVideoXDPMScheduler

    # CogVideoX-5B's scheduler_config.json (convert_cogvideox_to_diffusers.py, snr_shift_scale 1.0 for 5B)
    return CogVideoXDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                 beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=True,
                                 steps_offset=0, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                 timestep_spacing="trailing", snr_shift_scale=1.0)


def _run(model, arithmetic, seed, steps=50):
    solver = dpmpp.DPMPP2MSDE(steps=steps, arithmetic=arithmetic)
    predict = guided_predictor(model, CFG(dpmpp.MTV_CFG_SCALE, ("cond",)), steps)
    return sample(predict, solver, SeededNoise(seed), (1, FRAMES, CHANNELS, HEIGHT, WIDTH))


def test_diffusers_arithmetic_equals_cogvideox_dpm_scheduler(net):
    """``arithmetic="diffusers"`` with SeededNoise(seed) = the CogVideoX pipeline's loop over
    ``CogVideoXDPMScheduler.step`` with a CPU generator of that seed (same draws, same order)."""
    model = TinyMTVBranches(net, make_mtv_conditions(7))
    for steps in (50, 3):
        ours = _run(model, "diffusers", 0, steps)
        sch = _cogvideox_dpm_scheduler()
        sch.set_timesteps(steps)
        g = torch.Generator().manual_seed(0)
        latents, old = torch.randn(1, FRAMES, CHANNELS, HEIGHT, WIDTH, generator=g), None
        predict = guided_predictor(model, CFG(dpmpp.MTV_CFG_SCALE, ("cond",)), steps)
        for i, t in enumerate(sch.timesteps):
            v = predict(latents, t, i)
            latents, old = sch.step(v, old, t, sch.timesteps[i - 1] if i > 0 else None, latents, generator=g,
                                    return_dict=False)
        # measured: bit-identical (the same float64 0-d coefficients and float32 tensor operations)
        assert torch.equal(ours, latents), steps
        assert dpmpp.DPMPP2MSDE(steps=steps, arithmetic="diffusers").timesteps.tolist() == sch.timesteps.tolist()


def test_released_and_diffusers_arithmetic_differ_by_the_documented_amount(net):
    released, diffusers = dpmpp.DPMPP2MSDE(), dpmpp.DPMPP2MSDE(arithmetic="diffusers")
    assert released.timesteps.tolist() == diffusers.timesteps.tolist()            # 999, 979, …, 19
    # solver √ᾱ: rescaled over the 50 steps vs over the full table (docs/sampling.md: up to 6.2e-4)
    full = diffusers.alphas_cumprod64.sqrt()[diffusers.timesteps]
    gap = (released.sqrt_alphas[:-1].double() - full).abs().max().item()
    assert 6.2e-4 < gap < 6.3e-4
    # the sample, 50 steps, tiny denoiser, seeds 0-3: measured 0.028, 0.046, 0.033, 0.030 max abs
    # (values up to 14); float rounding alone is < 2e-5, so this is the arithmetic
    model = TinyMTVBranches(net, make_mtv_conditions(7))
    d = (_run(model, "released", 0) - _run(model, "diffusers", 0)).abs().max().item()
    assert 0.02 < d < 0.035


# --------------------------------------------------------------------------------------
# The loop drives it like the other solvers
# --------------------------------------------------------------------------------------

def test_loop_reports_progress_with_preview_and_cancels_between_steps(net):
    model = TinyMTVBranches(net, make_mtv_conditions(7))
    solver = dpmpp.DPMPP2MSDE(steps=6)
    predict = guided_predictor(model, CFG(dpmpp.MTV_CFG_SCALE, ("cond",)), solver.steps)
    ticks, previews = [], []
    progress = compat.Progress(solver.evaluations(), "test", callback=lambda v, total: ticks.append((v, total)))
    out = sample(predict, solver, SeededNoise(0), (1, FRAMES, CHANNELS, HEIGHT, WIDTH), progress=progress,
                 preview=lambda x0: previews.append(x0.clone()))
    assert ticks == [(i, 6) for i in range(1, 7)]
    assert torch.equal(previews[-1], out)                          # the last step returns x̂₀
    # same seed, same model → same output (a real promise: bit-exact)
    assert torch.equal(out, sample(predict, dpmpp.DPMPP2MSDE(steps=6), SeededNoise(0),
                                   (1, FRAMES, CHANNELS, HEIGHT, WIDTH)))
    calls = []

    def cancel_after_second(v, total):
        if v == 2:
            compat.request_interrupt()

    try:
        with pytest.raises(compat.Interrupted):
            sample(lambda x, t, i: calls.append(i) or predict(x, t, i), dpmpp.DPMPP2MSDE(steps=6), SeededNoise(0),
                   (1, FRAMES, CHANNELS, HEIGHT, WIDTH), progress=compat.Progress(6, "test", callback=cancel_after_second))
    finally:
        compat.request_interrupt(False)
    assert calls == [0, 1]
