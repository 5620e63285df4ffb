"""Temporal-attention conventions of dual-directional sampling, and the fused one-call path
against the straightforward two-call path on a tiny random SVD UNet (16 temporal layers)."""

import copy
import dataclasses

import pytest
import torch

from avsync.networks.temporal_attention import (
    CaptureProcessor,
    FusedDualDirectionProcessor,
    InjectRotatedProcessor,
    MapStore,
    PlainTemporalProcessor,
    block_place,
    flip_frames,
    processors_installed,
    rotate_maps_180,
    temporal_self_attention_layers,
)
from avsync.samplers import inbetween as ib
from tests.test_inbetween_nodes import _one_thread, tiny  # noqa: F401  (shared fixtures)


# --------------------------------------------------------------------------------------
# Conventions on hand-made maps
# --------------------------------------------------------------------------------------

def test_rotation_is_180_degrees_on_a_hand_made_map():
    a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    r = rotate_maps_180(a[None, None])[0, 0]
    assert torch.equal(r, torch.tensor([[9.0, 8.0, 7.0], [6.0, 5.0, 4.0], [3.0, 2.0, 1.0]]))
    # paper §4.1: A'[N-1-j, N-1-k] = A[j, k] (0-based), for every j, k
    n = 4
    a = torch.arange(n * n, dtype=torch.float32).view(n, n)
    r = rotate_maps_180(a)
    for j in range(n):
        for k in range(n):
            assert r[n - 1 - j, n - 1 - k] == a[j, k]
    # rotating twice is the identity; rotation is not a transpose
    assert torch.equal(rotate_maps_180(r), a)
    assert not torch.equal(r, a.T)


def test_rotation_keeps_rows_stochastic():
    p = torch.softmax(torch.randn(6, 5, 5), dim=-1)
    assert torch.allclose(rotate_maps_180(p).sum(-1), torch.ones(6, 5))


def test_flip_frames_reverses_the_frame_axis_only():
    x = torch.arange(3 * 2 * 2, dtype=torch.float32).view(3, 2, 2)  # [F, h, w]
    y = flip_frames(x, 0)
    assert torch.equal(y[0], x[2]) and torch.equal(y[1], x[1]) and torch.equal(y[2], x[0])


def _attention(dim=8, heads=2):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(3)
    attn = Attention(query_dim=dim, heads=heads, dim_head=dim // heads, out_bias=True).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return attn


def test_rotated_maps_on_the_reversed_input_give_the_reversed_output():
    """With the same V/out weights, the backward branch driven by rotated forward maps on
    flip(x) reproduces flip(forward output): the rotation encodes the reversed motion."""
    attn = _attention()
    x = torch.randn(3, 5, 8)  # [positions, frames, channels]
    store = MapStore()
    attn.set_processor(CaptureProcessor("l", store))
    out_fwd = attn(x)
    attn.set_processor(InjectRotatedProcessor("l", store))
    out_bwd = attn(flip_frames(x, 1))
    assert torch.allclose(out_bwd, flip_frames(out_fwd, 1), atol=1e-6)
    # the maps came from the forward input, not from the backward one
    attn.set_processor(PlainTemporalProcessor("l"))
    own = attn(flip_frames(x[:, torch.randperm(5)], 1))
    assert not torch.allclose(own, out_bwd, atol=1e-3)


def test_capture_and_plain_equal_diffusers_default_attention():
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn = _attention()
    x = torch.randn(4, 6, 8)
    attn.set_processor(AttnProcessor2_0())
    ref = attn(x)
    store = MapStore()
    attn.set_processor(CaptureProcessor("l", store))
    assert torch.allclose(attn(x), ref, atol=1e-6)
    assert store["l"].shape == (4 * 2, 6, 6)  # rows·heads, F, F
    attn.set_processor(PlainTemporalProcessor("l"))
    assert torch.allclose(attn(x), ref, atol=1e-6)


class _Delta:
    def __init__(self, deltas):
        self.deltas = deltas

    def names(self):
        return sorted(self.deltas)

    def backward_weights(self, name, base):
        if name not in self.deltas and name.endswith(".bias"):
            return base
        return base + self.deltas[name]


@pytest.mark.parametrize("max_map_bytes", [1 << 30, 1])
def test_fused_layer_equals_capture_then_inject(max_map_bytes):
    attn = _attention()
    delta = _Delta({"l.to_v.weight": torch.randn(8, 8) * 0.2, "l.to_out.0.weight": torch.randn(8, 8) * 0.2})
    xf, xb = torch.randn(6, 5, 8), torch.randn(6, 5, 8)
    store = MapStore()
    attn.set_processor(CaptureProcessor("l", store))
    ref_f = attn(xf)
    attn.set_processor(InjectRotatedProcessor("l", store, delta))
    ref_b = attn(xb)
    attn.set_processor(FusedDualDirectionProcessor("l", delta, max_map_bytes=max_map_bytes))
    out = attn(torch.cat([xf, xb]))
    assert torch.allclose(out[:6], ref_f, atol=1e-6)
    assert torch.allclose(out[6:], ref_b, atol=1e-6)
    # ΔW changes the backward half only
    attn.set_processor(FusedDualDirectionProcessor("l", None, max_map_bytes=max_map_bytes))
    plain = attn(torch.cat([xf, xb]))
    assert torch.allclose(plain[:6], ref_f, atol=1e-6)
    assert (plain[6:] - ref_b).abs().max() > 1e-3


# --------------------------------------------------------------------------------------
# The UNet: 16 layers, installation, fused == two-call
# --------------------------------------------------------------------------------------

def test_svd_structure_has_16_temporal_self_attention_layers(tiny):
    model, delta = tiny
    layers = temporal_self_attention_layers(model.unet.module)
    places = [block_place(n) for n in layers]
    assert len(layers) == 16
    assert (places.count("down"), places.count("mid"), places.count("up")) == (6, 1, 9)
    assert sum(ib.rotated_layer("no_finetune", n) for n in layers) == 9
    assert all(ib.rotated_layer("full", n) for n in layers)
    assert not any(ib.rotated_layer("trf", n) for n in layers)
    assert sorted(delta.names()) == sorted(f"{n}.{p}.weight" for n in layers for p in ("to_v", "to_out.0"))


def test_processors_are_restored_after_a_call(tiny):
    model, _ = tiny
    unet = model.unet.module
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    with pytest.raises(RuntimeError, match="boom"):
        with processors_installed(unet, lambda layer: PlainTemporalProcessor(layer)):
            assert all(isinstance(unet.attn_processors[n + ".processor"], PlainTemporalProcessor)
                       for n in temporal_self_attention_layers(unet))
            raise RuntimeError("boom")
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


def _branch_inputs(model, frames, cfg=2.0, fuse="average", schedule="constant"):
    g = torch.Generator().manual_seed(5)
    s = ib.InbetweenSettings(num_frames=frames, width=64, height=64, cfg=cfg, fuse=fuse, cfg_schedule=schedule)
    d = model.unet.module.config.cross_attention_dim
    first = ib.KeyframeConditioning(torch.randn(1, 1, d, generator=g), torch.randn(1, 4, 8, 8, generator=g))
    last = ib.KeyframeConditioning(torch.randn(1, 1, d, generator=g), torch.randn(1, 4, 8, 8, generator=g))
    return ib.build_branch_inputs(first, last, s, torch.device("cpu"), torch.float32)


def _double_inputs(inputs):
    """The branch inputs in float64 (the CFG scales and fuse weights stay as they are)."""
    return dataclasses.replace(inputs, **{f: getattr(inputs, f).double() for f in
                                          ("embeds_fwd", "embeds_bwd", "latents_fwd", "latents_bwd", "time_ids")})


@pytest.mark.parametrize("variant", ["full", "no_finetune", "trf"])
def test_fused_one_call_equals_two_call_on_tiny_unet(tiny, variant):
    model, delta = tiny
    unet = model.unet.module
    inputs = _branch_inputs(model, frames=4)
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(9)) * 3
    sigma = torch.tensor(3.5)
    w = delta if variant == "full" else None
    two = ib.TwoCallEvaluator(unet, inputs, variant, w)(x, sigma)
    fused = ib.FusedEvaluator(unet, inputs, variant, w)(x, sigma)
    assert fused.shape == x.shape
    # The same two paths with the UNet in float64 (the outputs are rounded to float32 at the end,
    # in _guided): the algorithms are identical, so they agree to the final rounding. Measured 0.0
    # for every variant (AMD EPYC and ATEN_CPU_CAPABILITY=default, 1 and 2 threads).
    unet64 = copy.deepcopy(unet).double()
    inputs64 = _double_inputs(inputs)
    two64 = ib.TwoCallEvaluator(unet64, inputs64, variant, w)(x.double(), sigma.double())
    fused64 = ib.FusedEvaluator(unet64, inputs64, variant, w)(x.double(), sigma.double())
    assert (fused64 - two64).abs().max().item() <= 1e-6  # 4 float32 ulps at |v| ~ 3
    # In float32 each path differs from that reference by its own rounding and kernel choice: the
    # measured floor max|path32 - ref64| is 4.5e-6 .. 1.1e-5 (|v| up to 2.95), and max|fused32 - two32|
    # 3.1e-6 .. 1.25e-5 over the same four kernel/thread settings. 1e-4 leaves ~8x margin and is still
    # 500x below the smallest real difference seen here (variant no_finetune vs trf: 5.1e-2).
    for path in (two, fused):
        assert (path - two64).abs().max().item() < 5e-5
    assert (fused - two).abs().max().item() < 1e-4


def test_variants_and_delta_change_the_prediction(tiny):
    model, delta = tiny
    unet = model.unet.module
    inputs = _branch_inputs(model, frames=4)
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(9)) * 3
    sigma = torch.tensor(3.5)
    outs = {v: ib.FusedEvaluator(unet, inputs, v, delta if v == "full" else None)(x, sigma)
            for v in ("full", "no_finetune", "trf")}
    for a in outs:
        for b in outs:
            if a < b:
                assert (outs[a] - outs[b]).abs().max() > 1e-4, (a, b)


def test_trf_branch_is_plain_svd_on_the_reversed_video(tiny):
    """TRF baseline = mean of SVD(z, first) and flip(SVD(flip(z), last)), CFG per branch."""
    model, _ = tiny
    unet = model.unet.module
    inputs = _branch_inputs(model, frames=4)
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor(1.7)
    ev = ib.FusedEvaluator(unet, inputs, "trf")
    got = ev(x, sigma)
    fwd, bwd = ev.branch_inputs(x, sigma)
    t = 0.25 * sigma.log()
    with torch.no_grad():
        vf = unet(fwd, t, encoder_hidden_states=inputs.embeds_fwd, added_time_ids=inputs.time_ids).sample
        vb = unet(bwd, t, encoder_hidden_states=inputs.embeds_bwd, added_time_ids=inputs.time_ids).sample
    gf = vf[0] + 2.0 * (vf[1] - vf[0])
    gb = vb[0] + 2.0 * (vb[1] - vb[0])
    assert torch.allclose(got, 0.5 * gf + 0.5 * gb.flip(0), atol=1e-5)


def test_missing_backward_weights_for_full_variant_is_a_clear_error(tiny):
    model, _ = tiny
    from avsync.core.errors import InputError

    with pytest.raises(InputError, match="backward_weights"):
        ib.FusedEvaluator(model.unet.module, _branch_inputs(model, 4), "full", None)


def test_merged_weights_equal_on_the_fly_and_a_bias_delta_is_applied():
    """ΔW merged once per run gives what adding it in the layer gives; a stored bias ΔW
    (the reference adds every to_out.0 tensor it finds) changes the backward output."""
    from diffusers.models.attention_processor import Attention

    from avsync.networks.temporal_attention import MergedBackwardWeights

    torch.manual_seed(0)
    host = torch.nn.Module()
    host.l = Attention(query_dim=8, heads=2, dim_head=4)
    attn = host.l
    x = torch.randn(4, 5, 8)
    deltas = {"l.to_v.weight": torch.randn(8, 8) * 0.1, "l.to_out.0.weight": torch.randn(8, 8) * 0.1}
    plain = _Delta(deltas)
    merged = MergedBackwardWeights(host, plain)
    assert merged.names() == ["l.to_out.0.weight", "l.to_v.weight"]
    attn.set_processor(FusedDualDirectionProcessor("l", plain))
    on_the_fly = attn(x)
    attn.set_processor(FusedDualDirectionProcessor("l", merged))
    torch.testing.assert_close(attn(x), on_the_fly, rtol=0, atol=0)
    with_bias = _Delta({**deltas, "l.to_out.0.bias": torch.full((8,), 0.5)})
    attn.set_processor(FusedDualDirectionProcessor("l", MergedBackwardWeights(host, with_bias)))
    out = attn(x)
    torch.testing.assert_close(out[:2], on_the_fly[:2])            # forward half: base weights
    torch.testing.assert_close(out[2:], on_the_fly[2:] + 0.5)      # backward half: bias + ΔW_b
