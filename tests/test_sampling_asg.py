"""Audio Sync Guidance (Syncphony §3.3) as a guidance object over KeyVID's four-condition CFG,
on synthetic denoisers: the formula with hand-checked numbers, the step range (the extra
branch is not evaluated outside it), w_a = 0 is exactly no ASG, the off-sync branch is the
network with its audio term skipped, five passes in one call equal five separate passes."""

import pytest
import torch

from avsync.samplers.core import ddim
from avsync.samplers.core.guidance import (
    AudioSyncGuidance, MultiConditionCFG, evaluate_branches, guided_predictor, rescale_noise_cfg, step_in_range,
)
from avsync.samplers.core.loop import SamplingTrace, sample
from avsync.samplers.core.noise import SeededNoise
from tests.factories.sampling import audio_off, make_branch_model


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return make_branch_model()


VALUES = {"e_u": [1.0, 0.0], "e_i": [1.5, 0.5], "e_it": [3.0, 1.0], "cond": [4.0, 2.0], "off_sync": [3.5, 2.5]}


def test_formula_with_hand_checked_numbers():
    preds = {k: torch.tensor([v]) for k, v in VALUES.items()}
    inner = MultiConditionCFG(s_img=2.0, s_txt=7.5, s_aud=9.0, rescale=0.0)
    asg = AudioSyncGuidance(inner, w_a=2.0, skip_audio=audio_off)
    # e_u + 2(e_i − e_u) + 7.5(e_it − e_i) + 9(e_c − e_it) + 2(e_c − e_off)
    # first value:  1 + 1 + 11.25 + 9 + 1    = 23.25
    # second value: 0 + 1 + 3.75  + 9 − 1    = 12.75
    out = asg.combine(preds, 0, 10)
    assert out.tolist() == [[23.25, 12.75]]
    # then guidance rescale against e_c, as without ASG
    rescaled = AudioSyncGuidance(MultiConditionCFG(2.0, 7.5, 9.0, rescale=0.7), 2.0, audio_off).combine(preds, 0, 10)
    assert torch.equal(rescaled, rescale_noise_cfg(out, preds["cond"], 0.7))
    # hand value of the rescale (unbiased std of two values = |a − b|/√2): std(e_c) = 2/√2,
    # std(out) = 10.5/√2 → factor 2/10.5; 0.7·23.25·2/10.5 + 0.3·23.25 = 3.1 + 6.975
    assert rescaled[0, 0].item() == pytest.approx(10.075, rel=1e-6)


def test_step_range_and_branch_list():
    inner = MultiConditionCFG()
    asg = AudioSyncGuidance(inner, w_a=2.0, skip_audio=audio_off, start=0.2, end=0.5)
    active = [i for i in range(10) if len(asg.branches(i, 10)) == 5]
    assert active == [2, 3, 4] == [i for i in range(10) if step_in_range(i, 10, 0.2, 0.5)]
    off = asg.branches(2, 10)[-1]
    assert off.name == "off_sync" and off.real == inner.branches(2, 10)[-1].real and off.patch is audio_off
    with pytest.raises(ValueError):
        AudioSyncGuidance(inner, 2.0, audio_off, start=0.6, end=0.5)


def _run(tiny, guidance, steps=6, batched=True):
    trace = SamplingTrace()
    solver = ddim.DDIMV(ddim.DiffusionSchedule.keyvid(), steps, eta=1.0)
    predict = guided_predictor(tiny, guidance, steps, batched=batched, on_call=trace.count_call)
    return sample(predict, solver, SeededNoise(9), (2, 4, 3, 4, 4), trace=trace), trace


def test_the_off_sync_branch_is_evaluated_only_inside_the_range(tiny):
    inner = MultiConditionCFG()
    out, trace = _run(tiny, AudioSyncGuidance(inner, 2.0, audio_off, start=0.0, end=0.5))
    assert trace.model_calls == [5, 5, 5, 4, 4, 4]          # one call per step; 5 branches in the first half
    _, trace = _run(tiny, AudioSyncGuidance(inner, 2.0, audio_off, start=0.5, end=1.0), batched=False)
    assert len(trace.model_calls) == 4 * 6 + 3               # separate passes: the extra one only in 3 steps
    plain, _ = _run(tiny, inner)
    assert (out - plain).abs().max() > 1e-2                  # ASG changes the sample
    assert tiny.net.audio_layer.skip is None


def test_w_a_zero_is_bit_identical_to_no_asg(tiny):
    inner = MultiConditionCFG()
    plain, t0 = _run(tiny, inner)
    zero, t1 = _run(tiny, AudioSyncGuidance(inner, 0.0, audio_off))
    assert torch.equal(plain, zero) and t0.model_calls == t1.model_calls == [4] * 6


def test_off_sync_branch_is_the_network_without_audio_and_five_in_one_call_equal_five_calls(tiny):
    asg = AudioSyncGuidance(MultiConditionCFG(), 2.0, audio_off)
    x, t = torch.randn(2, 4, 3, 4, 4), torch.tensor(700)
    calls = []
    one = evaluate_branches(tiny, x, t, asg.branches(0, 10), batched=True, on_call=calls.append)
    five = evaluate_branches(tiny, x, t, asg.branches(0, 10), batched=False, on_call=calls.append)
    assert calls == [5, 1, 1, 1, 1, 1]
    # measured floor (batch 10 vs 2 of the same per-sample network): 0 on AMD EPYC, also with
    # ATEN_CPU_CAPABILITY=default; 1e-6 for CPUs whose conv3d kernels depend on the batch size
    for k in five:
        assert (one[k] - five[k]).abs().max() <= 1e-6, k
    full = tiny.inputs(asg.branches(0, 10)[3])
    with audio_off(tiny.net, torch.ones(2, dtype=torch.bool)):
        no_audio = tiny(x, t, full)
    assert (one["off_sync"] - no_audio).abs().max() <= 1e-6
    assert (one["off_sync"] - one["cond"]).abs().max() > 1e-2
