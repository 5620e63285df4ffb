"""MTV transformer: parity with the released SAT code, key mapping, sizes, clean frames, ASG.

Parity fixtures: tests/data/mtv/network/README.md (SAT ``DiffusionTransformer`` of
``suimuc/MTV_Framework`` @ 5704fe6 + SwissArmyTransformer 0.4.12, tiny config, fp32).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from avsync.networks.audio_layers import audio_layers_off, list_audio_layers
from avsync.networks.mtv import MTVConfig, MTVTransformer, sat_to_mtv_key, sat_to_mtv_state_dict, sat_to_mtv_tensors
from avsync.samplers.asg import AudioSyncGuidanceSettings
from avsync.samplers.core.guidance import AUDIO, CFG, TEXT, guided_predictor
from tests.factories.mtv import (SMALL_LATENT, sat_random_state_dict, tiny_mtv_config, tiny_mtv_inputs,
                                 tiny_mtv_transformer)

DATA = Path(__file__).parent / "data" / "mtv" / "network"
SUBSET_FRAMES = [0, 1, 2, 12]
# fast tests: small latent, 9-frame audio windows (→ 3 latent frames), short narrow text,
# narrow audio (the reference hard-codes 768/512 only for the parity fixture)
FAST = dict(SMALL_LATENT, text_tokens=8, text_dim=32, time_embed_dim=64, audio_dim=48, audio_layers_per_frame=2,
            dual_heads=4, dual_mlp_dim=96)


def _from_sat_fixture(tag: str):
    seed = 1000 if tag == "multi" else 0
    shapes = json.loads((DATA / f"sat_keys_{tag}.json").read_text())
    net = MTVTransformer(tiny_mtv_config(speakers=2 if tag == "multi" else 1)).eval()
    net.load_state_dict(sat_to_mtv_state_dict(sat_random_state_dict(shapes, seed)), strict=True)
    return net, tiny_mtv_inputs(net.config, seed=seed + 7, timestep=500.0)


@pytest.mark.parametrize("tag,clean", [("single", 0), ("single", 2), ("multi", 2)])
def test_forward_matches_released_sat_code(tag, clean):
    net, inputs = _from_sat_fixture(tag)
    ref = load_file(DATA / f"sat_outputs_{tag}.safetensors")
    with torch.no_grad():
        out = net(**inputs, clean_frames=clean)
    assert out.shape == (1, 13, 16, 60, 90)
    sub = out[:, SUBSET_FRAMES, :, ::2, ::2]
    expected = ref[f"clean{clean}.subset"]
    rel = ((sub - expected).norm() / expected.norm()).item()
    # measured 4.9e-7 (single, clean 0 and 2) and 5.3e-7 (multi): fp32 summation order
    # (SAT's chunk/rearrange copies, SAT's own tanh-GELU formula vs torch's)
    assert rel <= 1e-5, rel
    # whole output (only its sums are stored): measured relative differences ≤ 1e-6
    total = out.double().sum()
    assert abs(total - ref[f"clean{clean}.sum"]) <= 1e-5 * out.double().abs().sum()
    assert torch.isclose(out.double().pow(2).sum(), ref[f"clean{clean}.sumsq"][0], rtol=1e-5)


def test_every_sat_key_has_a_home_and_audio_keys_keep_sat_names():
    shapes = json.loads((DATA / "sat_keys_multi.json").read_text())
    converted = sat_to_mtv_state_dict({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    with torch.device("meta"):
        net = MTVTransformer(tiny_mtv_config(speakers=2))
    assert set(converted) == set(net.state_dict())
    assert sat_to_mtv_key("model.diffusion_model.transformer.layers.3.audio_attn.dense.weight") == \
        "audio.layers.3.audio_attn.dense.weight"
    assert sat_to_mtv_key("model.diffusion_model.transformer.audio_combine.dual_blocks.0.mlp.dense_h_to_4h.bias") \
        == "audio.audio_combine.dual_blocks.0.mlp.dense_h_to_4h.bias"
    assert sat_to_mtv_key("model.diffusion_model.transformer.layers.3.post_attention_layernorm.weight") == \
        "backbone.transformer_blocks.3.norm2.norm.weight"
    assert sat_to_mtv_key("model.diffusion_model.mixins.pos_embed.freqs_sin") is None
    assert sat_to_mtv_key("first_stage_model.decoder.conv_in.weight") is None
    assert sat_to_mtv_key("conditioner.embedders.0.transformer.shared.weight") is None
    qkv = torch.arange(9.0).reshape(9, 1)
    parts = sat_to_mtv_tensors("model.diffusion_model.transformer.layers.1.attention.query_key_value.weight", qkv)
    assert [k for k, _ in parts] == [f"backbone.transformer_blocks.1.attn1.to_{x}.weight" for x in "qkv"]
    assert torch.equal(parts[2][1], qkv[6:])
    ada = torch.arange(12.0).reshape(12, 1)
    (k1, n1), (k2, n2) = sat_to_mtv_tensors("model.diffusion_model.mixins.adaln_layer.adaLN_modulations.0.1.weight", ada)
    assert k1.endswith("norm1.linear.weight") and n1.flatten().tolist() == [0, 1, 2, 6, 7, 8]
    assert k2.endswith("norm2.linear.weight") and n2.flatten().tolist() == [3, 4, 5, 9, 10, 11]


@pytest.mark.parametrize("variant,params", [("single", 11_587_500_096), ("multi", 12_579_180_096)])
def test_released_sizes(variant, params):
    """Notes §0/§2.4 [derived]: single ≈ 11.59 B, multi ≈ 12.58 B (incl. the learned
    positional embedding, a buffer in diffusers)."""
    with torch.device("meta"):
        net = MTVTransformer(MTVConfig.released(variant))
    assert sum(t.numel() for t in net.state_dict().values()) == params
    assert net.backbone.norm_out.norm.eps == 1e-6 and net.backbone.norm_final.eps == 1e-5
    assert net.backbone.transformer_blocks[0].norm1.norm.eps == 1e-5
    assert net.backbone.config.flip_sin_to_cos is True and net.backbone.config.freq_shift == 0
    assert net.audio.audio_proj.conv1.weight.shape == (32 * 768, 32 * 768, 2)
    with pytest.raises(ValueError, match="variant"):
        MTVConfig.released("duet")


def test_clean_frames_is_the_t0_embedding_per_frame():
    net = tiny_mtv_transformer(3, **FAST)
    x = tiny_mtv_inputs(net.config, seed=4, timestep=0.0)
    with torch.no_grad():
        all_clean = net(**x, clean_frames=net.config.latent_frames)
        plain = net(**x)
        x["timestep"] = torch.tensor([700.0])
        mixed = net(**x, clean_frames=1)
        noisy = net(**x)
    # every frame clean at t = 0 is the plain t = 0 call (other broadcasting; measured diff 0)
    torch.testing.assert_close(all_clean, plain, rtol=0, atol=1e-6)
    assert not torch.allclose(mixed, noisy, atol=1e-4)          # the clean frame changes the call


def test_dual_blocks_use_batch_row_0_of_the_time_embedding_as_released():
    net = tiny_mtv_transformer(2, **FAST)
    x = tiny_mtv_inputs(net.config, batch=2, seed=3)
    bb = net.backbone
    emb = bb.time_embedding(bb.time_proj(torch.tensor([500.0, 100.0])))
    with torch.no_grad():
        mixed, _ = net.audio.encode(x["speech"], x["effects"], x["music"], None, emb)
        row0, _ = net.audio.encode(x["speech"], x["effects"], x["music"], None, emb[:1].expand(2, -1))
        own, _ = net.audio.encode(x["speech"], x["effects"], x["music"], None, emb[1:].expand(2, -1))
    for a, b, c in zip(mixed, row0, own):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)   # measured 0 (same rows, same kernels)
        assert not torch.allclose(a, c, atol=1e-4)


def test_with_silent_audio_modules_the_block_loop_is_diffusers_own_forward():
    """Our block loop on the diffusers submodules = ``CogVideoXTransformer3DModel.forward`` once
    the audio step is the identity (cross-attention outputs and music modulation zeroed)."""
    net = tiny_mtv_transformer(9, **FAST)
    x = tiny_mtv_inputs(net.config, seed=10)
    with torch.no_grad():
        for layer in net.audio.layers:
            for p in (*layer.audio_attn.dense.parameters(), *layer.audio_attn_effect.dense.parameters(),
                      *layer.audio_music_adaLn.parameters()):
                p.zero_()
        ours = net(**x)
        c = net.config
        rope = net._rope(c.latent_frames, c.latent_height // 2, c.latent_width // 2, "cpu")
        theirs = net.backbone(x["latents"], x["text"], x["timestep"], image_rotary_emb=rope, return_dict=False)[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)   # measured 0


def test_input_errors():
    net = tiny_mtv_transformer(0, **FAST)
    x = tiny_mtv_inputs(net.config)
    with pytest.raises(ValueError, match="speech2"):
        net(**x, speech2=x["speech"])
    with pytest.raises(ValueError, match="clean_frames"):
        net(**x, clean_frames=4)


# --- Audio Sync Guidance ---

@pytest.mark.parametrize("speakers", [1, 2])
def test_audio_layers_are_the_cross_attentions_in_forward_order(speakers):
    net = tiny_mtv_transformer(0, speakers=speakers, **FAST)
    names = [i.name for i in list_audio_layers(net)]
    per_layer = ["audio_attn", "audio_attn_second", "audio_attn_effect"] if speakers == 2 else \
        ["audio_attn", "audio_attn_effect"]
    assert names == [f"audio.layers.{i}.{n}" for i in range(2) for n in per_layer]
    assert [i.index for i in list_audio_layers(net)] == list(range(len(names)))


def _zeroed_cross_attention_copy(net: MTVTransformer, names=None) -> MTVTransformer:
    twin = MTVTransformer(net.config).eval()
    twin.load_state_dict(net.state_dict())
    with torch.no_grad():
        for info in list_audio_layers(twin):
            if names is None or info.name in names:
                dense = twin.get_submodule(info.name).dense
                dense.weight.zero_()
                dense.bias.zero_()
    return twin


def test_skipping_audio_layers_per_sample_equals_zeroing_their_output():
    net = tiny_mtv_transformer(5, **FAST)
    x = tiny_mtv_inputs(net.config, batch=2, seed=6)
    zeroed = _zeroed_cross_attention_copy(net)
    with torch.no_grad():
        normal = net(**x)
        with audio_layers_off(net, samples=torch.tensor([True, False])):
            skipped = net(**x)
        with audio_layers_off(net, samples=torch.tensor([False, False])):
            nothing_off = net(**x)
        zero = zeroed(**x)
    assert torch.equal(nothing_off, normal)                 # same model object, same input
    # same batch shape and arithmetic (x + 0 = x); measured difference 0
    torch.testing.assert_close(skipped[0], zero[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(skipped[1], normal[1], rtol=0, atol=1e-6)
    assert (skipped[0] - normal[0]).abs().max() > 1e-3       # the audio layers matter
    # a subset by name: only the effects cross-attention of layer 1
    name = "audio.layers.1.audio_attn_effect"
    zeroed_one = _zeroed_cross_attention_copy(net, {name})
    with torch.no_grad(), audio_layers_off(net, [name]):
        one_off = net(**x)
    torch.testing.assert_close(one_off, zeroed_one(**x), rtol=0, atol=1e-6)


class _TinyMTVBranches:
    """BranchModel-like wiring of the tiny network (uncond = zero text + zero audio, as released)."""

    def __init__(self, net, x):
        self.net, self.x = net, x

    def inputs(self, branch):
        keep = {"text": TEXT in branch.real, "speech": AUDIO in branch.real, "effects": AUDIO in branch.real,
                "music": AUDIO in branch.real}
        return {k: (self.x[k] if on else torch.zeros_like(self.x[k])) for k, on in keep.items()}

    def __call__(self, latents, t, inputs):
        return self.net(latents, timestep=t.reshape(1).expand(latents.shape[0]), **inputs)


def test_asg_through_the_sampling_core():
    net = tiny_mtv_transformer(7, **FAST)
    x = tiny_mtv_inputs(net.config, seed=8)
    model = _TinyMTVBranches(net, x)
    cfg = CFG(3.5, conditions=(TEXT, AUDIO))
    t = torch.tensor(400.0)
    with torch.no_grad():
        plain = guided_predictor(model, cfg, steps=10)(x["latents"], t, 0)
        off = AudioSyncGuidanceSettings(0.0, 0.0, 1.0, None).wrap(cfg)
        assert torch.equal(guided_predictor(model, off, steps=10)(x["latents"], t, 0), plain)
        asg = AudioSyncGuidanceSettings(2.0, 0.0, 1.0, None).wrap(cfg)
        calls = []
        guided = guided_predictor(model, asg, steps=10, on_call=calls.append)(x["latents"], t, 0)
        cond = model(x["latents"], t, model.inputs(cfg.branches(0, 10)[1]))
        off_sync = _zeroed_cross_attention_copy(net)(x["latents"], timestep=t.reshape(1), **model.inputs(cfg.branches(0, 10)[1]))
    assert calls == [3]                                      # uncond, cond, off-sync in one call
    # batched call (3 rows) vs single calls: measured difference ≤ 2e-7
    torch.testing.assert_close(guided, plain + 2.0 * (cond - off_sync), rtol=0, atol=1e-5)
