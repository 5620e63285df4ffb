"""Audio Sync Guidance settings (the AVSYNC_GUIDANCE socket) and the guidance node: layer
syntax, the check before sampling, the wrapper around a pipeline's guidance (no settings or
w_a = 0 → the inner guidance itself, so bit-identical runs), the skip patch on a tiny KeyVID
UNet switching exactly the chosen audio layers. The combination, the step range and the
batched five-pass call are tested on the core object in tests/test_sampling_asg.py."""

from __future__ import annotations

import pytest
import torch

from avsync.core.errors import InputError
from avsync.networks.audio_layers import audio_layers_off, list_audio_layers
from avsync.nodes.asg_nodes import AVSyncAudioSyncGuidance
from avsync.samplers.asg import (AudioSyncGuidanceSettings, check_guidance, parse_layers, resolve_layers,
                                 with_audio_sync_guidance)
from avsync.samplers.core.guidance import AudioSyncGuidance, MultiConditionCFG
from tests.factories.keyvid_networks import build_small, one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def unet():
    return build_small(batch=2)


def run(net, ins):
    with torch.no_grad():
        return net(ins["x"], ins["timesteps"], ins["context"], ins["c_audio"], fs=ins["fs"], frame_idx=ins["frame_idx"])


@pytest.mark.parametrize("text, expected", [
    ("all", None), ("", None), (" ALL ", None), ("3", (3,)), ("8-11", (8, 9, 10, 11)),
    ("12,13,14", (12, 13, 14)), ("0-2, 9, 1", (0, 1, 2, 9)), ("5 - 5", (5,)),
])
def test_layer_syntax(text, expected):
    assert parse_layers(text) == expected


@pytest.mark.parametrize("text, message", [
    ("deep", "'deep' is not an index or a range"), ("4-2", "runs backwards"), ("1,,2", "'' is not an index"),
    ("-3", "is not an index"),
])
def test_layer_syntax_errors_say_what_is_expected(text, message):
    with pytest.raises(ValueError, match=message):
        parse_layers(text)


def test_layers_are_checked_against_the_model():
    assert resolve_layers(None, 3) == (0, 1, 2)
    assert resolve_layers((2,), 3) == (2,)
    with pytest.raises(ValueError, match=r"audio layer 7 does not exist: the model has 3 audio layers \(0-2\)"):
        resolve_layers((1, 7), 3)
    with pytest.raises(ValueError, match="has no audio layers"):
        resolve_layers(None, 0)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="start ≤ end"):
        AudioSyncGuidanceSettings(2.0, 0.6, 0.5)
    with pytest.raises(ValueError, match="w_a must be ≥ 0"):
        AudioSyncGuidanceSettings(-1.0)
    s = AudioSyncGuidanceSettings.from_text(2.0, 0.0, 0.5, "0-2,5")
    assert s.layers == (0, 1, 2, 5) and s.enabled
    assert s.describe() == "ASG w_a=2, steps 0-0.5 of sampling, skipping audio layers 0-2,5"
    assert not AudioSyncGuidanceSettings(0.0).enabled and not AudioSyncGuidanceSettings(2.0, 0.5, 0.5).enabled


def test_a_guidance_input_on_a_model_without_audio_layers_is_an_error_before_sampling(unet):
    net, _, _ = unet
    check_guidance(None, torch.nn.Linear(2, 2))                      # no guidance input: nothing to check
    check_guidance(AudioSyncGuidanceSettings(), net)
    with pytest.raises(InputError, match="^guidance: the model has no audio layers"):
        check_guidance(AudioSyncGuidanceSettings(), torch.nn.Linear(2, 2))
    with pytest.raises(InputError, match="^guidance: audio layer 9 does not exist: the model has 7 audio layers"):
        check_guidance(AudioSyncGuidanceSettings(layers=(9,)), net)


def test_no_settings_or_zero_scale_is_the_inner_guidance_itself(unet):
    net, _, _ = unet
    inner = MultiConditionCFG()
    assert with_audio_sync_guidance(inner, None, net) is inner
    assert with_audio_sync_guidance(inner, AudioSyncGuidanceSettings(0.0), net) is inner
    asg = with_audio_sync_guidance(inner, AudioSyncGuidanceSettings(2.0, 0.25, 0.75), net)
    assert isinstance(asg, AudioSyncGuidance) and (asg.w_a, asg.start, asg.end) == (2.0, 0.25, 0.75)
    assert [len(asg.branches(i, 4)) for i in range(4)] == [4, 5, 5, 4]


def test_the_skip_patch_switches_exactly_the_chosen_layers(unet):
    net, _, ins = unet
    layers = list_audio_layers(net)
    asg = with_audio_sync_guidance(MultiConditionCFG(), AudioSyncGuidanceSettings(layers=(1, 4)), net)
    mask = torch.tensor([True, False])
    modules = dict(net.named_modules())
    with asg.skip_audio(net, mask):
        switched = [i.index for i in layers if modules[i.name].audio_switch.off is not None]
        patched = run(net, ins)
    assert switched == [1, 4]
    assert all(modules[i.name].audio_switch.off is None for i in layers)       # restored
    with audio_layers_off(net, [1, 4], samples=mask):
        reference = run(net, ins)
    assert torch.equal(patched, reference)                                      # same code path, same call
    with audio_layers_off(net, None, samples=mask):
        all_off = run(net, ins)
    plain = run(net, ins)
    assert torch.equal(patched[1], plain[1])                                    # the unmasked sample is untouched
    # measured: the audio terms change sample 0 by ~1e-1 here; two layers differ from all seven
    assert (patched[0] - plain[0]).abs().max() > 1e-3 and (patched[0] - all_off[0]).abs().max() > 1e-3


def test_all_layers_patch_equals_the_network_with_every_audio_layer_off(unet):
    net, _, ins = unet
    asg = with_audio_sync_guidance(MultiConditionCFG(), AudioSyncGuidanceSettings(), net)
    with asg.skip_audio(net, torch.tensor([True, True])):
        patched = run(net, ins)
    with audio_layers_off(net):
        reference = run(net, ins)
    assert torch.equal(patched, reference)


def test_guidance_node_builds_settings_and_validates():
    node = AVSyncAudioSyncGuidance()
    (s,) = node.build(2.0, 0.0, 0.5, "8-11")
    assert s == AudioSyncGuidanceSettings(2.0, 0.0, 0.5, (8, 9, 10, 11))
    assert AVSyncAudioSyncGuidance.VALIDATE_INPUTS(w_a=2.0, start=0.0, end=1.0, layers="all") is True
    assert AVSyncAudioSyncGuidance.VALIDATE_INPUTS(layers="deep").startswith("layers: 'deep' is not an index")
    assert AVSyncAudioSyncGuidance.VALIDATE_INPUTS(start=0.8, end=0.2) == "end: must be ≥ start (0.8), got 0.2"
    with pytest.raises(InputError, match="^end: "):
        node.build(2.0, 0.8, 0.2, "all")
    tips = AVSyncAudioSyncGuidance.INPUT_TYPES()["required"]
    assert "over-exaggerates" in tips["w_a"][1]["tooltip"] and tips["w_a"][1]["default"] == 2.0
    assert "w_a(e_c − e_off-sync)" in AVSyncAudioSyncGuidance.DESCRIPTION
