"""MTV memory tools: fp8 storage with bf16 compute, block swap, the memory model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from avsync.core.errors import InputError
from avsync.samplers import mtv_memory as M
from avsync.samplers.core.memory import check_memory


def test_fp8_linear_computes_exactly_with_the_dequantised_weight():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(48, 40)
    with torch.no_grad():
        lin.weight.copy_(0.02 * torch.randn(40, 48, generator=g))
        lin.weight[3] = 0  # an all-zero row keeps scale 1
    q, scale = M.quantize_fp8(lin.weight)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (40, 1) and scale[3].item() == 1.0
    fp8 = M.FP8Linear(48, 40, compute_dtype=torch.bfloat16)
    fp8.weight.data, fp8.weight_scale.data, fp8.bias.data = q, scale, lin.bias.detach().bfloat16()
    x = torch.randn(2, 5, 48, generator=g)
    w = (q.float() * scale).bfloat16()
    assert torch.equal(fp8(x), F.linear(x.bfloat16(), w, lin.bias.detach().bfloat16()))   # a real promise: same op
    # e4m3: 3 mantissa bits -> |w - w_q| <= 2^-4 |w| for normals, <= 2^-10 * scale in the subnormal range
    err = (lin.weight.detach() - q.float() * scale).abs()
    bound = torch.maximum(lin.weight.detach().abs() * 2 ** -4, scale * 2 ** -10) * (1 + 1e-6)
    assert (err <= bound).all()
    assert (q.float().abs().amax(dim=1)[torch.arange(40) != 3] == M.FP8_MAX).all()   # each row uses the full range


def test_fp8_conv1d_and_chunked_dequantisation(monkeypatch):
    g = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv1d(6, 8, 2, stride=2)
    q, scale = M.quantize_fp8(conv.weight)
    fp8 = M.FP8Conv1d(conv, compute_dtype=torch.float32)
    fp8.weight.data, fp8.weight_scale.data, fp8.bias.data = q, scale, conv.bias.detach()
    x = torch.randn(3, 6, 9, generator=g)
    assert torch.equal(fp8(x), F.conv1d(x, q.float() * scale, conv.bias, stride=2))
    # output-channel chunks (MTV's 1.21 B-weight conv1 at real size): the same convolution per channel
    monkeypatch.setattr(M, "CONV_CHUNK", 36)             # 3 output channels per chunk
    chunked = fp8(x)
    monkeypatch.undo()
    # measured max |diff| 0 here; different GEMM blocking may round differently (fp32 floor ~1e-6)
    assert torch.allclose(chunked, fp8(x), rtol=0, atol=1e-5)
    whole = M.dequantize_fp8(q, scale, torch.bfloat16)
    monkeypatch.setattr(M, "DEQUANT_CHUNK", 5)          # rows of 12 elements: one row per chunk
    assert torch.equal(M.dequantize_fp8(q, scale, torch.bfloat16), whole)


def test_quantize_never_overflows_to_nan():
    w = torch.tensor([[448.0 * 3, -1e-3, 7.0], [1e30, 1.0, -1e30]])
    q, scale = M.quantize_fp8(w)
    assert torch.isfinite(q.float()).all() and q.float().abs().max() == M.FP8_MAX


# --------------------------------------------------------------------------------------
# with the MTV network
# --------------------------------------------------------------------------------------

def _mtv():
    return pytest.importorskip("avsync.networks.mtv", reason="networks/mtv.py (mtv-net) not merged yet")


SMALL = dict(latent_frames=3, latent_height=8, latent_width=8, audio_window_frames=9, audio_dim=96, dual_heads=4,
             audio_layers_per_frame=2, audio_context=2, text_dim=32, time_embed_dim=64, dual_mlp_dim=64,
             audio_proj_hidden=16, dual_blocks=1, num_layers=3)


@pytest.fixture(scope="module")
def tiny():
    _mtv()
    from tests.factories.mtv import tiny_mtv_inputs, tiny_mtv_transformer

    net = tiny_mtv_transformer(seed=2, **SMALL)
    return net, tiny_mtv_inputs(net.config, batch=2, seed=4)


def test_fp8_storage_replaces_only_the_scoped_weights(tiny):
    import copy

    net, inputs = tiny
    model = copy.deepcopy(net)
    names = M.use_fp8_storage(model, compute_dtype=torch.float32)
    assert "backbone.transformer_blocks.0.attn1.to_q" in names and "audio.audio_proj_music.conv1" in names
    assert "backbone.proj_out" not in names and not any(n.startswith("audio.audio_combine") for n in names)
    fp8_params = sum(getattr(model.get_submodule(n), "weight").numel() for n in names)
    total = sum(p.numel() for p in net.parameters())
    assert fp8_params > 0.5 * total
    with torch.no_grad():
        out, ref = model(**inputs), net(**inputs)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.1   # fp8 rounding of the block weights (measured ~2e-2 at this size)


@pytest.mark.parametrize("blocks_on_gpu", [0, 2])
def test_block_swap_on_cpu_gives_the_resident_output_bit_for_bit(tiny, blocks_on_gpu):
    net, inputs = tiny
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        ref = net(**inputs)
    swap = M.BlockSwap(net, blocks_on_gpu=blocks_on_gpu, device="cpu")
    with swap:
        streamed = swap.streamed
        assert len(streamed) == 3 + 3 - blocks_on_gpu
        # between calls a streamed group holds placeholders only: a forward without the hooks would fail
        assert all(p.numel() == 0 for g in streamed for m in g for p in m.parameters())
        with torch.no_grad():
            out1 = net(**inputs)
            out2 = net(**inputs)
        assert swap.loads == 2 * len(streamed)
        assert all(p.numel() == 0 for g in streamed for m in g for p in m.parameters())
    assert torch.equal(out1, ref) and torch.equal(out2, ref)
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_block_swap_refuses_impossible_counts(tiny):
    with pytest.raises(ValueError, match="blocks_on_gpu"):
        M.BlockSwap(tiny[0], blocks_on_gpu=4, device="cpu")


@pytest.fixture(scope="module")
def released():
    return M.MTVMemoryModel(_mtv().MTVConfig.released("single"))


GB24 = 24 * 10 ** 9   # a "24 GB" card (RTX 3090/4090 report ~23.6-24.0e9 bytes)


def test_memory_model_real_config_numbers(released):
    assert released.params == 11_587_500_096          # reference notes §0: ~11.59 B
    assert released.weight_bytes("bf16") == 2 * released.params
    fp8 = released.weight_bytes("fp8")
    assert 0.5 * released.weight_bytes("bf16") < fp8 < 0.55 * released.weight_bytes("bf16")
    S = M.MTVMemorySettings
    peaks = [released.estimate(S(blocks_on_gpu=n)).peak for n in (0, 10, 20, 30, 42)]
    assert peaks == sorted(peaks) and released.estimate(S()).peak > peaks[-1]
    # the analytic numbers docs/mtv_models.md states (GiB, rounded)
    assert round(released.estimate(S()).peak / 2 ** 30, 1) == 25.3
    assert round(released.estimate(S(storage="fp8")).peak / 2 ** 30, 1) == 14.8
    assert round(released.estimate(S(blocks_on_gpu=30)).peak / 2 ** 30, 1) == 18.9


def test_check_memory_says_which_settings_fit_a_24gb_card(released):
    S = M.MTVMemorySettings
    with pytest.raises(InputError) as err:
        check_memory(released, S(), GB24)
    msg = str(err.value)
    assert "storage=fp8, resident" in msg and "block swap" in msg
    check_memory(released, S(storage="fp8"), GB24)
    check_memory(released, S(blocks_on_gpu=30), GB24)
    with pytest.raises(InputError, match="blocks_on_gpu"):
        check_memory(released, S(blocks_on_gpu=42), GB24)


def test_block_swap_with_fp8_storage(tiny):
    import copy

    net, inputs = tiny
    model = copy.deepcopy(net)
    M.use_fp8_storage(model, compute_dtype=torch.float32)
    with torch.no_grad():
        ref = model(**inputs)
        with M.BlockSwap(model, blocks_on_gpu=1, device="cpu"):
            out = model(**inputs)
    assert torch.equal(out, ref)


def test_memory_model_with_the_audio_projections_on_the_cpu(released):
    S = M.MTVMemorySettings
    proj = released.projection_bytes("bf16")
    # proj1 46080×512, proj2 512², proj3 512×24576, LayerNorm, conv1 24576²×2 (+ biases): 1.244 B each
    assert proj == [2 * 1_244_449_280] * 3
    off, on = released.estimate(S(audio_proj_on_cpu=True)), released.estimate(S())
    # the three projections leave the GPU; one comes back per window, while the step's activations
    # are not alive: the step stays the peak at the released size
    step_off = released.weight_bytes("bf16") - sum(proj) + released.activation_bytes(S()) + M._OVERHEAD
    assert off.sampling == step_off == on.sampling - sum(proj)
    # the analytic numbers docs/mtv_models.md states (GiB, rounded): bf16 all resident fits 24 GB now
    assert round(off.peak / 2 ** 30, 1) == 18.4
    assert round(released.estimate(S(storage="fp8", audio_proj_on_cpu=True)).peak / 2 ** 30, 1) == 11.3
    check_memory(released, S(audio_proj_on_cpu=True), GB24)
    with pytest.raises(InputError) as err:
        check_memory(released, S(), GB24)
    assert "audio_proj_on_cpu" in str(err.value)
    # a tiny batch of activations: the borrowed projection model decides the peak instead
    small = S(audio_proj_on_cpu=True, latent_frames=1, latent_height=2, latent_width=2)
    assert released.estimate(small).sampling == (released.weight_bytes("bf16") - sum(proj) + max(proj)
                                                 + M._OVERHEAD)


def test_block_swap_leaves_held_projections_alone(tiny):
    net, inputs = tiny
    with torch.no_grad():
        ref = net(**inputs)
    net.audio.hold_projections_outside()
    try:
        assert len(M.mtv_swap_groups(net)) == 3   # the blocks only
        with M.BlockSwap(net, blocks_on_gpu=1, device="cpu") as swap:
            assert len(swap.streamed) == 2
            with torch.no_grad():
                out = net(**inputs)
    finally:
        net.audio.restore_projections()
    assert torch.equal(out, ref)
