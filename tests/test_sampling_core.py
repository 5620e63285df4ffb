"""The sampling core's pieces on synthetic denoisers: noise sources, guidance objects and
branch batching with network patches, the loop (progress, cancel, preview, determinism),
chunked decode, the memory check."""

import pytest
import torch

from avsync import compat
from avsync.core.errors import InputError
from avsync.samplers.core import ddim
from avsync.samplers.core.decode import decode_in_chunks
from avsync.samplers.core.guidance import (
    AUDIO, CFG, IMAGE, TEXT, Branch, LinearGuidance, MultiConditionCFG, evaluate_branches, guided_predictor,
    rescale_noise_cfg,
)
from avsync.samplers.core.loop import SamplingTrace, sample
from avsync.samplers.core.memory import MemoryEstimate, check_memory
from avsync.samplers.core.noise import InjectedNoise, SeededNoise
from avsync.samplers.core.preview import LatentPreview
from tests.factories.sampling import TinyKeyVIDBranches, audio_off, make_branch_model


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return make_branch_model()


class _Table:
    """A BranchModel whose branch predictions are fixed numbers: pred = x·0 + value[branch]."""

    net = torch.nn.Identity()

    def __init__(self, values):
        self.values = values
        self.calls = 0

    def inputs(self, branch):
        key = branch.name if branch.name in self.values else "cond"
        return {"v": torch.tensor([[self.values[key]]])}

    def __call__(self, x, t, inputs):   # x [n, 1]: one sample per branch
        self.calls += 1
        return x * 0 + inputs["v"]


# --------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------

def test_seeded_noise_is_one_stream_and_injected_noise_replays_given_draws():
    a, b, c = SeededNoise(3), SeededNoise(3), SeededNoise(4)
    da = [a.initial((2, 3)), a.renoise((2, 3)), a.conditioning((1,))]
    db = [b.initial((2, 3)), b.renoise((2, 3)), b.conditioning((1,))]
    assert all(torch.equal(x, y) for x, y in zip(da, db)) and a.draws == 3
    assert not torch.equal(c.initial((2, 3)), da[0])
    # one generator: the second draw is the continuation of the first
    g = torch.Generator().manual_seed(3)
    assert torch.equal(torch.randn(2, 3, generator=g), da[0]) and torch.equal(torch.randn(2, 3, generator=g), da[1])
    inj = InjectedNoise(torch.ones(6), [torch.full((2, 3), 2.0)])
    assert torch.equal(inj.initial((2, 3)), torch.ones(2, 3))
    assert torch.equal(inj.renoise((2, 3)), torch.full((2, 3), 2.0))
    with pytest.raises(ValueError, match="used up"):
        inj.renoise((2, 3))
    with pytest.raises(ValueError, match="does not fit"):
        InjectedNoise(torch.ones(5)).initial((2, 3))


# --------------------------------------------------------------------------------------
# Guidance
# --------------------------------------------------------------------------------------

def test_cfg_and_four_condition_cfg_hand_values():
    x, t = torch.zeros(1, 1), torch.tensor(0)
    g = CFG(3.0)
    preds = evaluate_branches(_Table({"uncond": 1.0, "cond": 2.0}), x, t, g.branches(0, 1))
    assert g.combine(preds, 0, 1).item() == 1.0 + 3.0 * (2.0 - 1.0)
    m = MultiConditionCFG(s_img=2.0, s_txt=7.5, s_aud=9.0, rescale=0.0)
    assert [b.name for b in m.branches(0, 1)] == ["e_u", "e_i", "e_it", "cond"]
    assert [b.real for b in m.branches(0, 1)] == [frozenset(), {IMAGE}, {IMAGE, TEXT}, {IMAGE, TEXT, AUDIO}]
    table = _Table({"e_u": 1.0, "e_i": 1.5, "e_it": 3.0, "cond": 4.0})
    preds = evaluate_branches(table, x, t, m.branches(0, 1))
    # 1 + 2·0.5 + 7.5·1.5 + 9·1 = 22.25
    assert m.combine(preds, 0, 1).item() == 22.25 and table.calls == 1
    # the release switches all guidance off when the text scale is 1
    off = MultiConditionCFG(s_img=2.0, s_txt=1.0, s_aud=9.0)
    assert [b.name for b in off.branches(0, 1)] == ["cond"]
    assert off.combine({"cond": torch.tensor([4.0])}, 0, 1).item() == 4.0


def test_rescale_noise_cfg_hand_values():
    guided = torch.tensor([[1.0, 3.0], [0.0, 4.0]])   # per-sample unbiased std √2, 2√2
    cond = torch.tensor([[0.0, 1.0], [0.0, 1.0]])      # std √0.5 each
    out = rescale_noise_cfg(guided, cond, 0.7)
    want0 = 0.7 * guided[0] * (0.5 ** 0.5 / 2 ** 0.5) + 0.3 * guided[0]
    want1 = 0.7 * guided[1] * (0.5 ** 0.5 / 8 ** 0.5) + 0.3 * guided[1]
    assert torch.allclose(out, torch.stack([want0, want1]), atol=1e-6)
    # std over all non-batch dims of a video tensor: the result's std matches cond's at rescale 1
    v, c = torch.randn(2, 4, 3, 5, 5) * 3, torch.randn(2, 4, 3, 5, 5)
    r = rescale_noise_cfg(v, c, 1.0)
    assert torch.allclose(r.flatten(1).std(1), c.flatten(1).std(1), rtol=1e-5)


def test_branches_with_a_patch_share_one_call_and_the_patch_hits_only_their_rows(tiny):
    x, t = torch.randn(2, 4, 3, 4, 4), torch.tensor(400)
    full = frozenset({IMAGE, TEXT, AUDIO})
    branches = [Branch("cond", full), Branch("no_audio", full, audio_off), Branch("e_u")]
    calls = []
    got = evaluate_branches(tiny, x, t, branches, on_call=calls.append)
    assert calls == [3]
    assert tiny.net.audio_layer.skip is None                      # restored
    inputs = tiny.inputs(branches[0])
    plain = tiny(x, t, inputs)
    with audio_off(tiny.net, torch.ones(2, dtype=torch.bool)):
        skipped = tiny(x, t, inputs)
    # batch 6 vs batch 2 of the same per-sample network: measured floor 0 (AMD EPYC); 1e-6 for other CPUs
    assert (got["cond"] - plain).abs().max() <= 1e-6
    assert (got["no_audio"] - skipped).abs().max() <= 1e-6
    assert (skipped - plain).abs().max() > 1e-2                    # the patch really changes the output
    # a patch is undone also when the model call fails
    class Failing(TinyKeyVIDBranches):
        def __call__(self, x, t, inputs):
            assert self.net.audio_layer.skip is not None
            raise RuntimeError("model failed")

    with pytest.raises(RuntimeError, match="model failed"):
        evaluate_branches(Failing(tiny.net, tiny.c, tiny.concat), x, t, branches)
    assert tiny.net.audio_layer.skip is None


def test_branches_whose_inputs_differ_in_shape_get_separate_calls():
    class Shapes(_Table):
        def inputs(self, branch):
            return {"v": torch.full((1, 2 if branch.name == "long" else 1), 1.0)}

        def __call__(self, x, t, inputs):
            return x * 0 + inputs["v"].sum(1, keepdim=True)

    calls = []
    out = evaluate_branches(Shapes({}), torch.zeros(1, 1), torch.tensor(0),
                            [Branch("a"), Branch("long"), Branch("b")], on_call=calls.append)
    assert sorted(calls) == [1, 2] and out["long"].item() == 2.0 and out["a"].item() == 1.0


# --------------------------------------------------------------------------------------
# A guidance method added without touching the loop; cancel; determinism
# --------------------------------------------------------------------------------------

class _AudioOffCFG(LinearGuidance):
    """A test-only guidance: CFG between the network with and without its audio term."""

    def __init__(self, scale):
        self.scale = scale
        full = frozenset({IMAGE, TEXT, AUDIO})
        self._b = [Branch("off", full, audio_off), Branch(self.full, full)]

    def branches(self, step, steps):
        return self._b

    def mix(self, preds):
        return preds["off"] + self.scale * (preds[self.full] - preds["off"])


def _run(tiny, guidance, seed, progress=None, trace=None, steps=4):
    solver = ddim.DDIMV(ddim.DiffusionSchedule.keyvid(), steps, eta=1.0)
    predict = guided_predictor(tiny, guidance, solver.steps, on_call=trace.count_call if trace else None)
    return sample(predict, solver, SeededNoise(seed), (2, 4, 3, 4, 4), progress=progress, trace=trace)


def test_same_seed_bit_identical_different_seed_different(tiny):
    g = MultiConditionCFG()
    a, b, c = _run(tiny, g, 5), _run(tiny, g, 5), _run(tiny, g, 6)
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-2
    trace = SamplingTrace()
    d = _run(tiny, _AudioOffCFG(2.0), 5, trace=trace)
    assert trace.evaluations == 4 and trace.model_calls == [2] * 4
    assert (d - a).abs().max() > 1e-2


def test_cancel_mid_run_stops_between_steps_and_leaves_no_patch(tiny):
    seen = []

    def cancel_after_second(v, total):
        seen.append(v)
        assert tiny.net.audio_layer.skip is None   # no patch outlives its model call
        if v == 2:
            compat.request_interrupt()

    try:
        with pytest.raises(compat.Interrupted):
            _run(tiny, _AudioOffCFG(2.0), 1, progress=compat.Progress(4, "test", callback=cancel_after_second))
    finally:
        compat.request_interrupt(False)
    assert seen == [1, 2]
    assert tiny.net.audio_layer.skip is None


def test_progress_gets_a_preview_of_the_middle_frame():
    bars = []

    class _Bar:
        def update(self, n=1, preview=None):
            bars.append(preview)

    solver = ddim.DDIMV(ddim.DiffusionSchedule.keyvid(), 2)
    prev = LatentPreview(frame_axis=2, channel_axis=1, batch_axis=0)
    sample(lambda x, t, i: torch.zeros_like(x), solver, SeededNoise(0), (2, 4, 3, 2, 5), progress=_Bar(),
           preview=prev)
    assert len(bars) == 2 and all(p[0] == "JPEG" and p[1].size == (5, 2) for p in bars)
    x0 = torch.arange(2 * 4 * 3 * 2 * 5, dtype=torch.float32).view(2, 4, 3, 2, 5)
    assert torch.equal(prev.frame(x0), x0[0, :, 1])
    assert torch.equal(LatentPreview(frame_axis=0, channel_axis=1).frame(x0[0].transpose(0, 1)), x0[0, :, 1])


# --------------------------------------------------------------------------------------
# Decode and memory
# --------------------------------------------------------------------------------------

def test_chunked_decode_equals_one_pass_and_checks_cancel():
    w = torch.randn(3, 4)

    def decode(z):   # per-frame "VAE": [n, 4, h, w] -> [n, 3, h, w]
        return torch.einsum("ck,nkhw->nchw", w, z).tanh()

    z = torch.randn(5, 4, 2, 3)
    full = decode_in_chunks(decode, z, 5)
    assert full.shape == (5, 2, 3, 3) and torch.equal(decode_in_chunks(decode, z, 2), full)
    assert torch.equal(full, (decode(z) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1))
    compat.request_interrupt()
    try:
        with pytest.raises(compat.Interrupted):
            decode_in_chunks(decode, z, 2)
    finally:
        compat.request_interrupt(False)


class _Family:
    """A memory model: sampling grows with frames, decoding with the chunk."""

    def estimate(self, s):
        return MemoryEstimate(sampling=s["frames"] * 100, decoding=s["chunk"] * 10)

    def suggestions(self, s, free):
        return [f"frames {f}" for f in range(s["frames"] - 1, 0, -1) if f * 100 <= free][:1]

    def culprit(self, s, est, free):
        return "frames"


def test_memory_check_names_the_input_and_suggests_what_fits():
    check_memory(_Family(), {"frames": 4, "chunk": 2}, free_bytes=400)
    check_memory(_Family(), {"frames": 40, "chunk": 2}, free_bytes=None)      # unknown: no check
    with pytest.raises(InputError, match="^frames: .*Settings that would fit: frames 3"):
        check_memory(_Family(), {"frames": 5, "chunk": 2}, free_bytes=399)


class _PerFrameVAE(torch.nn.Module):
    """The interface of a diffusers 2-D VAE's decoder (``config.scaling_factor``, ``decode(z).sample``)."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"scaling_factor": 0.18215})()
        self.conv = torch.nn.ConvTranspose2d(4, 3, 2, stride=2)

    def decode(self, z):
        return type("Out", (), {"sample": self.conv(z).tanh()})()


def test_decode_latents_with_a_per_frame_vae_scales_and_chunks():
    from avsync.samplers.core.decode import decode_latents

    torch.manual_seed(0)
    vae = _PerFrameVAE().eval()
    z = torch.randn(3, 4, 4, 4)
    got = decode_latents(vae, z, chunk=2)
    with torch.no_grad():
        want = (vae.decode(z / 0.18215).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert got.shape == (3, 8, 8, 3)
    # chunks of 2 + 1 vs one call of 3 (per-frame network): measured floor 0 on AMD EPYC; 1e-6 for other CPUs
    assert (got - want).abs().max() <= 1e-6
