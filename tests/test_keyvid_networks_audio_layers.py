"""Audio layers of the KeyVID UNet: listing, switching off per layer and per sample."""

from __future__ import annotations

import pytest
import torch

from avsync.networks.audio_layers import audio_layers_off, list_audio_layers
from tests.factories.keyvid_networks import build_small, one_thread  # noqa: F401 (one_thread: autouse fixture)



@pytest.fixture(scope="module")
def net_and_inputs():
    return build_small()


def run(net, ins, rows=slice(None)):
    with torch.no_grad():
        return net(ins["x"][rows], ins["timesteps"][rows], ins["context"][rows], ins["c_audio"][rows],
                   fs=ins["fs"][rows], frame_idx=ins["frame_idx"][rows])


def with_zeroed_to_v_ap(net, weights, names=None):
    """The same network with the audio value projections of ``names`` (None = all) zeroed."""
    changed = {k: (torch.zeros_like(v) if k.endswith("attn2.to_v_ap.weight")
                   and (names is None or k[:-len(".to_v_ap.weight")] in names) else v)
               for k, v in weights.items()}
    net.load_state_dict(changed)


def test_audio_layers_are_listed_in_forward_order(net_and_inputs):
    net, _, ins = net_and_inputs
    layers = list_audio_layers(net)
    # attention at both levels: input 1 + 1, middle 1, output 2 + 2
    assert [(i.section, i.block, i.level) for i in layers] == [
        ("input", 1, 0), ("input", 3, 1), ("middle", 0, 1), ("output", 0, 1), ("output", 1, 1),
        ("output", 2, 0), ("output", 3, 0)]
    assert [i.index for i in layers] == list(range(7))
    assert layers[0].name == "input_blocks.1.1.transformer_blocks.0.attn2"
    called = []
    modules = dict(net.named_modules())
    hooks = [modules[i.name].register_forward_hook(lambda m, a, o, n=i.name: called.append(n)) for i in layers]
    try:
        run(net, ins)
    finally:
        for h in hooks:
            h.remove()
    assert called == [i.name for i in layers]


def test_all_layers_off_equals_zeroed_audio_values(net_and_inputs):
    net, weights, ins = net_and_inputs
    plain = run(net, ins)
    with audio_layers_off(net):
        off = run(net, ins)
    with_zeroed_to_v_ap(net, weights)
    try:
        zeroed = run(net, ins)
    finally:
        net.load_state_dict(weights)
    # exact: with to_v_ap = 0 the audio term is exactly 0, and out + 0 == out bit for bit
    assert torch.equal(off, zeroed)
    assert (off - plain).abs().max() > 1e-3
    assert torch.equal(run(net, ins), plain)   # restored


def test_a_subset_switches_exactly_those_layers(net_and_inputs):
    net, weights, ins = net_and_inputs
    layers = list_audio_layers(net)
    deep = [i for i in layers if i.level == 1]          # pick by depth
    with audio_layers_off(net, deep) as switched:
        assert [i.name for i in switched] == [i.name for i in deep]
        off = run(net, ins)
    with_zeroed_to_v_ap(net, weights, {i.name for i in deep})
    try:
        zeroed = run(net, ins)
    finally:
        net.load_state_dict(weights)
    assert torch.equal(off, zeroed)
    # by forward-order index, and the complement gives something else again
    with audio_layers_off(net, [0, 5, 6]):
        shallow = run(net, ins)
    with audio_layers_off(net):
        everything = run(net, ins)
    plain = run(net, ins)
    for a, b in [(off, shallow), (off, everything), (shallow, everything), (off, plain), (shallow, plain)]:
        assert (a - b).abs().max() > 1e-4


def test_per_sample_switch_in_a_batch(net_and_inputs):
    net, _, ins = net_and_inputs
    plain = run(net, ins)
    with audio_layers_off(net, samples=torch.tensor([False, True, False])):
        mixed = run(net, ins)
    # the untouched samples run exactly the plain code in the same batched call
    assert torch.equal(mixed[[0, 2]], plain[[0, 2]])
    with audio_layers_off(net):
        alone = run(net, ins, rows=slice(1, 2))
    # batch of 3 vs batch of 1: different GEMM blocking; measured max |diff| 2.1e-6 (2.4e-6 with
    # ATEN_CPU_CAPABILITY=default; the plain forward shows the same batch-vs-single floor), outputs up to 2.1
    assert torch.allclose(mixed[1:2], alone, rtol=0, atol=2e-5)
    assert (mixed[1] - plain[1]).abs().max() > 1e-3
    # nothing switched off: bit-identical to the plain forward
    with audio_layers_off(net, samples=[False, False, False]):
        assert torch.equal(run(net, ins), plain)


def test_switch_is_restored_after_an_error_and_nests(net_and_inputs):
    net, _, ins = net_and_inputs
    plain = run(net, ins)
    with pytest.raises(RuntimeError, match="boom"):
        with audio_layers_off(net):
            raise RuntimeError("boom")
    assert torch.equal(run(net, ins), plain)
    with audio_layers_off(net, [0]):
        with audio_layers_off(net, [1]):
            pass
        inner_gone = run(net, ins)
    with audio_layers_off(net, [0]):
        only_first = run(net, ins)
    assert torch.equal(inner_gone, only_first)


def test_bad_selections_are_named(net_and_inputs):
    net, _, ins = net_and_inputs
    with pytest.raises(ValueError, match="index 7"):
        with audio_layers_off(net, [7]):
            pass
    with pytest.raises(ValueError, match="no audio layer named 'input_blocks.1.1'"):
        with audio_layers_off(net, ["input_blocks.1.1"]):
            pass
    with pytest.raises(ValueError, match="bool mask"):
        with audio_layers_off(net, samples=torch.tensor([0, 1, 0])):
            pass
    with pytest.raises(ValueError, match="samples mask has 2 entries"):
        with audio_layers_off(net, samples=[True, False]):
            run(net, ins)
