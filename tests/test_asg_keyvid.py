"""Audio Sync Guidance through KeyVID's keyframe generator (samplers/keyvid.py) on the tiny
random-weight KeyVID models of tests/factories/keyvid.py: no guidance input and w_a = 0 give
bit-identical frames (same seed, same model object); w_a > 0 changes them with the off-sync
branch in the same call (five branches per call, only inside the step range); a guidance input
on a network without audio layers fails before any work."""

from __future__ import annotations

import pytest
import torch

from avsync.core.errors import InputError
from avsync.loaders import keyvid as loaders
from avsync.samplers import keyvid
from avsync.samplers.asg import AudioSyncGuidanceSettings
from avsync.samplers.core.guidance import MultiConditionCFG
from avsync.samplers.core.loop import SamplingTrace
from tests.factories import keyvid as fk


def _tokenizer(texts):
    """Deterministic ids in the tiny vocabulary (the prompt only needs to be the same each run)."""
    out = torch.zeros(len(texts), 77, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = [1] + [3 + (ord(c) % 900) for c in t][:75] + [2]
        out[i, :len(ids)] = torch.tensor(ids)
    return out


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("asg_keyvid")
    # the tiny text tower is 64 wide: the UNet context and the image tokens follow
    sizes = fk.Sizes(unet=dict(fk.TINY_UNET, context_dim=64), image_proj=dict(fk.TINY_IMAGE_PROJ, output_dim=64),
                     audio=dict(fk.AUDIO, width=768))          # the UNet takes 768-wide ImageBind tokens
    huge = fk.tiny_imagebind_huge(sizes=sizes)
    ckpt = fk.save_tiny_ckpt(d / "generator_checkpoint.ckpt", "generator",
                             fk.tiny_state_dict("generator", seed=0, imagebind_huge=huge, sizes=sizes))
    configs = {r: loaders.read_config_file(p) for r, p in fk.write_tiny_configs(d / "configs", sizes).items()}
    out = d / "out"
    loaders.convert_checkpoints([ckpt], out, dtype="fp32", imagebind=fk.save_tiny_imagebind_huge(d / "ib.pth", huge),
                                configs=configs, log=lambda s: None)
    return loaders.load_keyvid(out / "keyvid_generator_unet.safetensors", "fp32", role="generator")


def _run(model, guidance=None, steps=4):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(16, 16, 3, generator=g)
    wave = torch.randn(1, 16000 * 2, generator=g) * 0.1
    trace = SamplingTrace()
    settings = keyvid.KeyframeSettings(steps=steps, width=16, height=16, seed=3)   # tiny VAE: 8×8 latents
    res = keyvid.generate_keyframes(model, image, wave, 16000, [0, 20, 40], "a dog barks", settings,
                                    guidance=guidance, tokenizer=_tokenizer, trace=trace, free_bytes=None)
    return res, trace


def test_no_guidance_and_zero_scale_are_bit_identical_and_asg_changes_the_frames(generator):
    plain, t0 = _run(generator)
    zero, t1 = _run(generator, AudioSyncGuidanceSettings(0.0))
    assert torch.equal(plain.images, zero.images) and torch.equal(plain.latents, zero.latents)
    assert t0.model_calls == t1.model_calls == [4] * 4
    asg, t2 = _run(generator, AudioSyncGuidanceSettings(2.0, 0.0, 1.0, layers=(0, 1)))
    assert t2.model_calls == [5] * 4                              # the off-sync branch joins the call
    # measured 2.8e-4 (latents up to 2.1): the random tiny network's audio term is small. That it
    # is ASG and not the 5-branch batch's arithmetic: doubling w_a doubles it (measured ×2.00)
    d2 = (asg.latents - plain.latents).abs().max()
    asg4, _ = _run(generator, AudioSyncGuidanceSettings(4.0, 0.0, 1.0, layers=(0, 1)))
    d4 = (asg4.latents - plain.latents).abs().max()
    assert d2 > 5e-5 and 1.7 < d4 / d2 < 2.3


def test_the_step_range_limits_the_extra_branch(generator):
    _, trace = _run(generator, AudioSyncGuidanceSettings(2.0, 0.5, 1.0), steps=2)
    assert trace.model_calls == [4, 5]


def test_a_layer_subset_is_checked_against_the_generator_before_sampling(generator):
    from avsync.networks.audio_layers import list_audio_layers

    n = len(list_audio_layers(generator.unet.module))
    with pytest.raises(InputError, match=f"^guidance: audio layer {n} does not exist: the KeyVID generator UNet "
                                         f"has {n} audio layers"):
        _run(generator, AudioSyncGuidanceSettings(layers=(n,)))


def test_a_network_without_audio_layers_is_refused_by_the_pipeline_check():
    with pytest.raises(InputError, match="^guidance: the model has no audio layers"):
        keyvid.apply_guidance(MultiConditionCFG(), AudioSyncGuidanceSettings(), torch.nn.Linear(2, 2))
    # w_a = 0 too: the input is wired to a model it cannot apply to
    with pytest.raises(InputError, match="no audio layers"):
        keyvid.apply_guidance(MultiConditionCFG(), AudioSyncGuidanceSettings(0.0), torch.nn.Linear(2, 2))


def test_the_loader_node_shows_how_many_audio_layers_the_generator_has(generator):
    from avsync.networks.audio_layers import list_audio_layers
    from avsync.nodes.keyvid_loader_nodes import _audio_layers_text

    n = len(list_audio_layers(generator.unet.module))
    assert n > 1
    assert _audio_layers_text(generator) == (f"generator UNet: {n} audio layers (Audio Sync Guidance 'layers': "
                                             f"0-{n - 1}, shallow to deep)")
