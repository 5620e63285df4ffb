"""``avsync convert mtv`` and the strict MTV loader, on tiny SAT/DeepSpeed-layout checkpoints."""

from __future__ import annotations

import pickle

import pytest
import torch

from avsync.core.errors import ModelFormatError
from avsync.loaders import mtv as L
from avsync.loaders.common import _meta_module
from avsync.samplers.mtv_memory import FP8Conv1d, FP8Linear, fp8_eligible
from tests.factories.mtv_files import SAT, sat_state_dict, save_sat_checkpoint


def tiny_mtv_config(**overrides):
    pytest.importorskip("avsync.networks.mtv", reason="networks/mtv.py (mtv-net) not merged yet")
    from tests.factories.mtv import tiny_mtv_config as make

    return make(**overrides)

# small enough for fast tests; every MTV module present (latent 3x8x8 with a 9-frame audio window)
SMALL = dict(latent_frames=3, latent_height=8, latent_width=8, audio_window_frames=9, audio_dim=96, dual_heads=4,
             audio_layers_per_frame=2, audio_context=2, text_dim=32, time_embed_dim=64, dual_mlp_dim=64,
             audio_proj_hidden=16, dual_blocks=1)
# sizes a converter cannot read from tensor shapes (the release has the defaults)
HIDDEN_SIZES = {k: SMALL[k] for k in ("latent_frames", "latent_height", "latent_width", "audio_window_frames",
                                      "dual_heads", "audio_layers_per_frame", "audio_context")}


@pytest.fixture(scope="module")
def cfg():
    return tiny_mtv_config(**SMALL)


@pytest.fixture(scope="module")
def sat(cfg):
    return sat_state_dict(cfg, seed=3)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, sat):
    folder = tmp_path_factory.mktemp("mtv") / "single"
    save_sat_checkpoint(sat, folder)
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory, ckpt):
    out = tmp_path_factory.mktemp("out")
    files = {}
    for dtype in ("bf16", "fp8_e4m3fn"):
        files[dtype] = L.convert_sat_checkpoint(ckpt, out / f"mtv_{dtype}.safetensors", dtype=dtype,
                                                config_overrides=HIDDEN_SIZES)
    return files


def _read(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_deepspeed_pickle_needs_exactly_the_numpy_rng_allowlist(ckpt):
    path = L.resolve_sat_checkpoint(ckpt)
    assert path == ckpt / "1" / L.CHECKPOINT_NAME
    with pytest.raises(pickle.UnpicklingError):          # what a plain weights-only load says
        torch.load(path, weights_only=True, mmap=True)
    needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    assert needed == {"numpy.ndarray", "numpy.dtype", "numpy._core.multiarray._reconstruct"} or \
        needed == {"numpy.ndarray", "numpy.dtype", "numpy.core.multiarray._reconstruct"}
    _, state = L.read_sat_checkpoint(ckpt)
    assert all(isinstance(v, torch.Tensor) for v in state.values()) and len(state) > 100
    # the allowlist was scoped to that one load
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_foreign_global_is_named_before_loading(tmp_path):
    import argparse

    small = {SAT + "time_embed.0.weight": torch.zeros(4, 2)}
    torch.save({"module": small, "args": argparse.Namespace(lr=1.0)}, tmp_path / L.CHECKPOINT_NAME)
    with pytest.raises(ModelFormatError, match="argparse.Namespace"):
        L.read_sat_checkpoint(tmp_path)


def test_backbone_keys_are_diffusers_and_load_strictly(converted, sat, cfg):
    from avsync.networks.mtv import build_backbone

    state = _read(converted["bf16"].path)
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    model = build_backbone(cfg)
    model.load_state_dict(backbone, strict=True)         # diffusers' own module, no unexpected / missing key
    h = cfg.hidden
    qkv = sat[SAT + "transformer.layers.1.attention.query_key_value.weight"].bfloat16()
    for i, name in enumerate("qkv"):
        assert torch.equal(backbone[f"transformer_blocks.1.attn1.to_{name}.weight"], qkv[i * h:(i + 1) * h])
    ada = sat[SAT + "mixins.adaln_layer.adaLN_modulations.0.1.weight"].bfloat16().chunk(12)
    assert torch.equal(backbone["transformer_blocks.0.norm1.linear.weight"], torch.cat(ada[0:3] + ada[6:9]))
    assert torch.equal(backbone["transformer_blocks.0.norm2.linear.weight"], torch.cat(ada[3:6] + ada[9:12]))
    assert torch.equal(backbone["transformer_blocks.0.norm2.norm.bias"],
                       sat[SAT + "transformer.layers.0.post_attention_layernorm.bias"].bfloat16())
    assert torch.equal(backbone["patch_embed.pos_embedding"], sat[SAT + "mixins.pos_embed.pos_embedding"].bfloat16())
    assert torch.equal(backbone["norm_final.weight"], sat[SAT + "transformer.final_layernorm.weight"].bfloat16())
    meta = L.open_mtv_file(converted["bf16"].path)[1]
    assert meta["variant"] == "single" and meta["storage"] == "bf16" and len(meta["source_sha256"]) == 64
    assert converted["bf16"].dropped == {L._DROP_OUTSIDE: 2, L._DROP_UNUSED: 3}


def test_audio_keys_are_untouched_by_the_backbone_renaming(converted, sat):
    state = _read(converted["bf16"].path)
    audio_sat = {k[len(SAT + "transformer."):]: v for k, v in sat.items() if "audio" in k}
    audio_ours = {k[len("audio."):]: v for k, v in state.items() if k.startswith("audio.")}
    assert set(audio_ours) == set(audio_sat)          # same names: no ff.net / to_out.0 / norm1.norm in them
    assert any(k.endswith("audio_attn.key_value.weight") for k in audio_ours)   # fused K|V kept
    assert any(".mlp.dense_h_to_4h." in k for k in audio_ours)
    for k, v in audio_sat.items():
        assert torch.equal(audio_ours[k], v.bfloat16()), k


@pytest.mark.parametrize("edit, names", [
    ("rename", ["transformer_blocks.1.attn1.to_out.0.weight", "attention.dense_x.weight"]),
    ("missing", ["audio.layers.0.audio_attn.query.weight"]),
])
def test_a_renamed_or_missing_key_fails_by_name(tmp_path, sat, edit, names):
    state = dict(sat)
    if edit == "rename":
        key = SAT + "transformer.layers.1.attention.dense.weight"
        state[key.replace("dense.weight", "dense_x.weight")] = state.pop(key)
    else:
        del state[SAT + "transformer.layers.0.audio_attn.query.weight"]
    save_sat_checkpoint(state, tmp_path / "single")
    out = tmp_path / "o.safetensors"
    with pytest.raises(ModelFormatError) as err:
        L.convert_sat_checkpoint(tmp_path / "single", out, config_overrides=HIDDEN_SIZES, hash_source=False)
    for name in names:
        assert name in str(err.value)
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_variant_from_folder_and_tensors(tmp_path, sat):
    save_sat_checkpoint(sat, tmp_path / "weights")
    with pytest.raises(ModelFormatError, match="--variant single or --variant accm"):
        L.convert_sat_checkpoint(tmp_path / "weights", tmp_path / "o.safetensors", config_overrides=HIDDEN_SIZES)
    with pytest.raises(ModelFormatError, match="multi"):
        L.convert_sat_checkpoint(tmp_path / "weights", tmp_path / "o.safetensors", variant="multi",
                                 config_overrides=HIDDEN_SIZES)
    r = L.convert_sat_checkpoint(tmp_path / "weights", tmp_path / "o.safetensors", variant="accm",
                                 config_overrides=HIDDEN_SIZES, hash_source=False)
    assert r.variant == "accm"


def test_fp8_file_stores_only_the_block_weights_in_fp8(converted):
    from safetensors import safe_open

    with safe_open(str(converted["fp8_e4m3fn"].path), "pt") as f:
        keys = list(f.keys())
        fp8 = {k for k in keys if f.get_slice(k).get_dtype() == "F8_E4M3"}
    scales = {k for k in keys if k.endswith(".weight_scale")}
    assert fp8 and {k[: -len("weight")] + "weight_scale" for k in fp8} == scales
    assert all(fp8_eligible(k, 2) or fp8_eligible(k, 3) for k in fp8)
    assert "backbone.transformer_blocks.0.attn1.to_q.weight" in fp8
    assert "audio.audio_proj.conv1.weight" in fp8 and "audio.layers.1.audio_attn.key_value.weight" in fp8
    for kept in ("backbone.patch_embed.proj.weight", "backbone.proj_out.weight", "backbone.time_embedding.linear_1.weight",
                 "audio.audio_combine.dual_blocks.0.attention.query_key_value.weight",
                 "backbone.transformer_blocks.0.attn1.to_q.bias"):
        assert kept in keys and kept not in fp8


def test_loaded_model_equals_the_converted_tensors_and_fp8_storage_computes_the_same(converted, cfg):
    from tests.factories.mtv import tiny_mtv_inputs

    bf16 = L.load_mtv_transformer(converted["bf16"].path, dtype=torch.float32)
    state = _read(converted["bf16"].path)
    for k, v in bf16.state_dict().items():
        assert torch.equal(v, state[k].float()), k
    # fp8 file: stored fp8 kept (FP8 modules) vs dequantised on load (plain modules): same arithmetic
    fp8 = L.load_mtv_transformer(converted["fp8_e4m3fn"].path, dtype=torch.float32, storage="fp8")
    deq = L.load_mtv_transformer(converted["fp8_e4m3fn"].path, dtype=torch.float32, storage="bf16")
    assert isinstance(fp8.backbone.transformer_blocks[0].attn1.to_q, FP8Linear)
    assert isinstance(fp8.audio.audio_proj.conv1, FP8Conv1d)
    assert not isinstance(deq.backbone.transformer_blocks[0].attn1.to_q, FP8Linear)
    inputs = tiny_mtv_inputs(cfg, batch=1, seed=1)
    with torch.no_grad():
        a, b, ref = fp8(**inputs), deq(**inputs), bf16(**inputs)
    assert torch.equal(a, b)
    # fp8 rounding of the block weights vs bf16: close but not equal (measured rel. L2 ~2e-2)
    rel = ((a - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.1


def test_loader_names_missing_and_foreign_keys(tmp_path, converted):
    from avsync.loaders.common import write_safetensors_streamed

    state = _read(converted["bf16"].path)
    meta = L.open_mtv_file(converted["bf16"].path)[1]
    del state["backbone.transformer_blocks.1.ff.net.2.weight"]
    state["audio.layers.0.audio_attn.extra"] = torch.zeros(2)
    bad = tmp_path / "bad.safetensors"
    write_safetensors_streamed(bad, state, {k: v.dtype for k, v in state.items()}, meta)
    with pytest.raises(ModelFormatError) as err:
        L.load_mtv_transformer(bad, dtype=torch.float32)
    assert "backbone.transformer_blocks.1.ff.net.2.weight" in str(err.value)
    assert "audio.layers.0.audio_attn.extra" in str(err.value)


def test_sat_vae_key_rules():
    assert L.sat_vae_key("encoder.down.1.block.2.conv1.conv.weight") == "encoder.down_blocks.1.resnets.2.conv1.conv.weight"
    assert L.sat_vae_key("encoder.down.0.downsample.conv.weight") == "encoder.down_blocks.0.downsamplers.0.conv.weight"
    assert L.sat_vae_key("decoder.up.0.block.1.nin_shortcut.conv.weight") == \
        "decoder.up_blocks.3.resnets.1.conv_shortcut.conv.weight"
    assert L.sat_vae_key("decoder.up.3.upsample.conv.weight") == "decoder.up_blocks.0.upsamplers.0.conv.weight"
    assert L.sat_vae_key("decoder.mid.block_2.norm1.norm_layer.weight") == \
        "decoder.mid_block.resnets.1.norm1.norm_layer.weight"
    assert L.sat_vae_key("loss.logvar") is None


def test_sat_vae_converts_into_diffusers_strictly(tmp_path):
    from diffusers import AutoencoderKLCogVideoX

    cfg = dict(block_out_channels=(32, 32), down_block_types=("CogVideoXDownBlock3D",) * 2,
               up_block_types=("CogVideoXUpBlock3D",) * 2, layers_per_block=1, norm_num_groups=8, latent_channels=4)
    torch.manual_seed(0)
    ref = AutoencoderKLCogVideoX(**cfg).eval()
    n_up = len(ref.decoder.up_blocks)
    # SAT names from diffusers' (the inverse of the ordered renames, written out)
    inverse = {}
    for k in ref.state_dict():
        s = k.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        s = s.replace("resnets.", "block.").replace("downsamplers.0", "downsample").replace("upsamplers.0", "upsample")
        s = s.replace("conv_shortcut", "nin_shortcut").replace("down_blocks.", "down.")
        if s.startswith("decoder.up_blocks."):
            parts = s.split(".")
            parts[1], parts[2] = "up", str(n_up - 1 - int(parts[2]))
            s = ".".join(parts)
        inverse[s] = k
    sat = {s: ref.state_dict()[k] for s, k in inverse.items()}
    sat["loss.logvar"] = torch.zeros(())
    torch.save({"state_dict": sat}, tmp_path / "3d-vae.pt")
    L.convert_sat_vae(tmp_path / "3d-vae.pt", tmp_path / "vae.safetensors", vae_config=cfg)
    vae = L.load_mtv_vae(tmp_path / "vae.safetensors", dtype=torch.float32)
    assert vae.config.scaling_factor == L.VAE_SCALE
    for k, v in ref.state_dict().items():
        assert torch.equal(vae.state_dict()[k], v.bfloat16().float()), k
    # a diffusers folder (model folder holding vae/) loads the same way, strictly
    ref.save_pretrained(tmp_path / "CogVideoX" / "vae", safe_serialization=True)
    folder_vae = L.load_mtv_vae(tmp_path / "CogVideoX", dtype=torch.float32)
    assert folder_vae.config.scaling_factor == L.VAE_SCALE
    assert all(torch.equal(folder_vae.state_dict()[k], v) for k, v in ref.state_dict().items())


def test_cli_converts_and_refuses_bad_input(tmp_path, ckpt, capsys):
    from avsync.cli import main

    out = tmp_path / "m.safetensors"
    assert main(["convert", "mtv", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "SRC" in capsys.readouterr().err
    assert main(["convert", "mtv", "--out", str(out)]) == 2
    # the real-size config is the default: a tiny file's latent grid does not fit it, named before any writing
    assert main(["convert", "mtv", str(ckpt), "--out", str(out), "--no-source-hash"]) == 2
    assert "positional embedding" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("variant", ["single", "multi"])
def test_the_released_sat_key_list_maps_onto_the_network(variant):
    """``tests/data/mtv/network/sat_keys_*.json`` (mtv-net's fixture: the state-dict key -> shape map
    of the released SAT network at the tiny parity config, read from the reference code) maps key
    for key onto MTVTransformer, and its backbone part is exactly this factory's hand-written list."""
    import json
    from pathlib import Path

    from tests.factories.mtv_files import sat_backbone_shapes

    path = Path(__file__).parent / "data" / "mtv" / "network" / f"sat_keys_{variant}.json"
    if not path.is_file():
        pytest.skip("mtv-net's SAT key fixture is not here yet")
    shapes = {k: tuple(v) for k, v in json.loads(path.read_text()).items()}
    cfg = tiny_mtv_config(speakers=2 if variant == "multi" else 1)
    state = {SAT + k: torch.empty(s, device="meta") for k, s in shapes.items()}
    plan = L.plan_keys(state, path.name)
    own = _meta_module(lambda: L._mtv_net().MTVTransformer(cfg)).state_dict()
    L.check_state_fits(own, plan.shapes, path.name)
    assert L.infer_config(plan.shapes, variant) == cfg
    assert {k: s for k, s in shapes.items() if "audio" not in k} == sat_backbone_shapes(cfg)


def test_numpy1_saved_checkpoint_loads_weights_only():
    """A file saved under numpy 1.26 names ``numpy.core.multiarray._reconstruct``; under numpy 2
    it loads only because that name is allowlisted too (tests/data/mtv/convert/README.md)."""
    from pathlib import Path

    path = Path(__file__).parent / "data" / "mtv" / "convert" / "ds_numpy1_mp_rank_00_model_states.pt"
    assert "numpy.core.multiarray._reconstruct" in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    _, state = L.read_sat_checkpoint(path)
    expected = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)).bfloat16()
    assert list(state) == [SAT + "time_embed.0.weight"] and torch.equal(state[SAT + "time_embed.0.weight"], expected)
