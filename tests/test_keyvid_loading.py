"""KeyVID checkpoints: `avsync convert keyvid` on tiny Lightning-style checkpoints in the
released key layout (tests/factories/keyvid.py), strict loading, shared components, precision,
errors. Parity of the encoders with the reference code is in test_keyvid_loading_parity.py."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from avsync.core.errors import MissingModelError, ModelFormatError
from avsync.loaders import keyvid
from tests.factories import keyvid as fk
from tests.test_compat import fake_comfy  # noqa: F401  (ComfyUI stand-ins, used as a fixture)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Tiny generator + interpolator checkpoints, imagebind_huge.pth and the tiny yamls."""
    d = tmp_path_factory.mktemp("keyvid_release")
    huge = fk.tiny_imagebind_huge()
    gen_state = fk.tiny_state_dict("generator", seed=0, imagebind_huge=huge)
    interp_state = fk.tiny_state_dict("interpolator", seed=5, imagebind_huge=huge)
    return {
        "dir": d,
        "gen_state": gen_state,
        "interp_state": interp_state,
        "huge_state": huge,
        "gen": fk.save_tiny_ckpt(d / "generator_checkpoint.ckpt", "generator", gen_state),
        "interp": fk.save_tiny_ckpt(d / "epoch=3669-step=58720.ckpt", "interpolator", interp_state),
        "huge": fk.save_tiny_imagebind_huge(d / "imagebind_huge.pth", huge),
        "configs": {r: keyvid.read_config_file(p) for r, p in fk.write_tiny_configs(d / "configs").items()},
        "config_files": fk.write_tiny_configs(d / "configs"),
    }


def _convert(release, out, ckpts=("gen", "interp"), dtype="fp32", imagebind=True, **kw):
    return keyvid.convert_checkpoints([release[c] for c in ckpts], out, dtype=dtype,
                                      imagebind=release["huge"] if imagebind else None,
                                      configs=release["configs"], log=lambda s: None, **kw)


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("keyvid_out")
    return out, _convert(release, out)


def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


SHARED = ("vae", "text_encoder", "image_encoder", "imagebind_audio", "schedule")


def test_both_checkpoints_convert_into_per_component_files_with_shared_ones_once(release, converted):
    out, report = converted
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"keyvid_{c}.safetensors" for c in SHARED]
                           + [f"keyvid_{r}_{c}.safetensors" for r in keyvid.ROLES for c in ("unet", "image_proj")])
    assert all(v == "identical in both checkpoints (stored once)" for v in report.shared.values())
    assert set(report.shared) == set(SHARED)
    # every released tensor of each component is in its file, bit for bit (fp32), under its released name
    prefixes = {"unet": "model.diffusion_model.", "image_proj": "image_proj_model.", "vae": "first_stage_model.",
                "text_encoder": "cond_stage_model.model.", "image_encoder": "embedder.model.",
                "schedule": ""}
    for role, state in (("generator", release["gen_state"]), ("interpolator", release["interp_state"])):
        for comp, prefix in prefixes.items():
            fname = keyvid.component_filename(comp, role if comp in ("unet", "image_proj") else None)
            tensors, meta = _read(out / fname)
            expected = {k[len(prefix):]: v for k, v in state.items()
                        if k.startswith(prefix) and (comp != "image_encoder" or k.startswith(prefix + "visual."))}
            if comp == "schedule":
                expected = {k: v for k, v in state.items() if k in keyvid.SCHEDULE_BUFFERS}
            assert set(tensors) == set(expected), (role, comp)
            assert all(torch.equal(tensors[k], expected[k]) for k in expected), (role, comp)
            assert meta["format"] == "avsync_keyvid" and meta["component"] == comp
    # the audio proj model, the image embedder's text leftovers and ImageBind's other parts are dropped
    assert report.dropped["generator"]["audio_proj_model.* (AudioResampler: never called at inference)"] == sum(
        k.startswith("audio_proj_model.") for k in release["gen_state"])


def test_the_interpolator_imagebind_is_rebuilt_from_imagebind_huge_with_the_stretched_pos_embed(release, converted):
    out, _ = converted
    tensors, _ = _read(out / "keyvid_imagebind_audio.safetensors")
    key = "modality_preprocessors.audio.pos_embedding_helper.pos_embed"
    pretrained = release["huge_state"][key]
    assert pretrained.shape[1] == 1 + 12 * 19 and tensors[key].shape[1] == 1 + 12 * 48
    # ddpm3d.py:interpolate_pos_embed: CLS row kept, 12 x 19 grid resized bilinearly to 12 x 48
    assert torch.equal(tensors[key][:, 0], pretrained[:, 0])
    grid = pretrained[:, 1:].reshape(1, 12, 19, -1).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(12, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(tensors[key][:, 1:], want.permute(0, 2, 3, 1).reshape(1, 576, -1), rtol=0, atol=0)
    # and the interpolator's own ImageBind keys were not used
    ib_keys = [k for k in release["interp_state"] if k.startswith("imagebind_model.")]
    assert ib_keys


def test_loaded_models_hold_the_checkpoint_weights_strictly(release, converted):
    out, _ = converted
    model = keyvid.load_keyvid(out / "keyvid_generator_unet.safetensors", "fp32", role="generator")
    assert model.role == "generator" and model.scale_factor == pytest.approx(0.18215)
    unet_sd = model.unet.module.state_dict()
    src = {k[len("model.diffusion_model."):]: v for k, v in release["gen_state"].items()
           if k.startswith("model.diffusion_model.")}
    assert set(unet_sd) == set(src) and all(torch.equal(unet_sd[k], src[k]) for k in src)
    assert "frame_idx_embedding.0.weight" in unet_sd
    proj = model.image_proj.module.state_dict()
    assert all(torch.equal(proj[k], release["gen_state"]["image_proj_model." + k]) for k in proj)
    # the VAE's ldm -> diffusers mapping: one conv per kind, and the 1x1 attention reshape
    vae = model.vae.module.state_dict()
    g = release["gen_state"]
    assert torch.equal(vae["decoder.up_blocks.0.resnets.0.conv1.weight"], g["first_stage_model.decoder.up.1.block.0.conv1.weight"])
    assert torch.equal(vae["encoder.mid_block.attentions.0.to_q.weight"],
                       g["first_stage_model.encoder.mid.attn_1.q.weight"][:, :, 0, 0])
    assert torch.equal(vae["post_quant_conv.weight"], g["first_stage_model.post_quant_conv.weight"])
    # the text tower runs one block fewer (penultimate layer), then ln_final
    text = model.text_encoder.module.model
    assert text.config.num_hidden_layers == fk.TEXT["layers"] - 1
    interp = keyvid.load_keyvid(out / "keyvid_interpolator_unet.safetensors", "fp32")
    assert interp.role == "interpolator" and "frame_idx_embedding.0.weight" not in interp.unet.module.state_dict()
    assert interp.files["vae"] == model.files["vae"]  # one shared file


def test_loaded_generator_runs_end_to_end_on_its_encoders(converted):
    out, _ = converted
    m = keyvid.load_keyvid(out / "keyvid_generator_unet.safetensors", "fp32")
    tokens = torch.zeros(1, 77, dtype=torch.long)
    tokens[0, :3] = torch.tensor([998, 5, 999])
    text = m.text_encoder.module(tokens)
    image_tokens = m.image_encoder.module(torch.rand(1, 3, 40, 64) * 2 - 1)
    assert text.shape == (1, 77, fk.TEXT["width"]) and image_tokens.shape == (1, 257, fk.VISION["width"])
    assert torch.isfinite(text).all() and torch.isfinite(image_tokens).all()
    mel = torch.randn(1, 1, 128, 204)
    audio = m.imagebind_audio.module(mel)
    assert audio.shape == (1, 1 + 12 * 48, fk.AUDIO["width"])


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_outputs(release, tmp_path, dtype, torch_dtype):
    report = _convert(release, tmp_path, ckpts=("gen",), dtype=dtype)
    unet, meta = _read(tmp_path / "keyvid_generator_unet.safetensors")
    assert meta["dtype"] == dtype
    k = "out.2.weight"
    assert unet[k].dtype == torch_dtype and torch.equal(unet[k], release["gen_state"]["model.diffusion_model." + k].to(torch_dtype))
    schedule, _ = _read(tmp_path / "keyvid_schedule.safetensors")
    assert all(v.dtype == torch.float32 for v in schedule.values())  # arithmetic, never halved
    # sha256 and size reported are those of the files
    for f in report.files:
        assert f.sha256 == hashlib.sha256(f.path.read_bytes()).hexdigest() and f.size == f.path.stat().st_size
    model = keyvid.load_keyvid(tmp_path / "keyvid_generator_unet.safetensors", dtype)
    assert next(model.unet.module.parameters()).dtype == torch_dtype
    assert next(model.vae.module.parameters()).dtype == torch_dtype


def test_a_renamed_unet_key_fails_with_both_names_before_anything_is_written(release, tmp_path):
    state = dict(release["gen_state"])
    old = "model.diffusion_model.input_blocks.1.0.temopral_conv.conv1.0.weight"
    assert old in state
    state[old.replace("temopral_conv", "temporal_conv")] = state.pop(old)
    ckpt = fk.save_tiny_ckpt(tmp_path / "renamed.ckpt", "generator", state)
    with pytest.raises(ModelFormatError) as err:
        keyvid.convert_checkpoints([ckpt], tmp_path / "out", configs=release["configs"])
    msg = str(err.value)
    assert old in msg and old.replace("temopral_conv", "temporal_conv") in msg and "renamed.ckpt" in msg
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("key", ["first_stage_model.decoder.up.0.block.1.norm2.bias",
                                 "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_bias",
                                 "embedder.model.visual.ln_post.weight",
                                 "imagebind_model.modality_trunks.audio.blocks.0.attn.bias_k",
                                 "image_proj_model.latents", "alphas_cumprod"])
def test_a_missing_key_fails_with_its_name(release, tmp_path, key):
    state = dict(release["gen_state"])
    del state[key]
    ckpt = fk.save_tiny_ckpt(tmp_path / "missing.ckpt", "generator", state)
    with pytest.raises(ModelFormatError, match=key.replace(".", r"\.")):
        keyvid.convert_checkpoints([ckpt], tmp_path / "out", configs=release["configs"])


def test_an_unknown_key_fails_with_its_name(release, tmp_path):
    state = dict(release["gen_state"], **{"model_ema.decay": torch.tensor(0.999)})
    ckpt = fk.save_tiny_ckpt(tmp_path / "extra.ckpt", "generator", state)
    with pytest.raises(ModelFormatError, match=r"model_ema\.decay"):
        keyvid.convert_checkpoints([ckpt], tmp_path / "out", configs=release["configs"])


def test_a_differing_shared_tensor_is_named_and_stored_per_role(release, tmp_path):
    state = dict(release["interp_state"])
    key = "first_stage_model.encoder.conv_in.bias"
    state[key] = state[key] + 1e-3
    interp = fk.save_tiny_ckpt(tmp_path / "interp.ckpt", "interpolator", state)
    report = keyvid.convert_checkpoints([release["gen"], interp], tmp_path / "out", dtype="fp32",
                                        imagebind=release["huge"], configs=release["configs"])
    assert report.shared["vae"] == "differs (stored per role)"
    assert any(key in line and "keyvid_interpolator_vae.safetensors" in line for line in report.lines)
    assert (tmp_path / "out" / "keyvid_vae.safetensors").is_file()
    assert (tmp_path / "out" / "keyvid_interpolator_vae.safetensors").is_file()
    m = keyvid.load_keyvid(tmp_path / "out" / "keyvid_interpolator_unet.safetensors", "fp32")
    assert m.files["vae"].endswith("keyvid_interpolator_vae.safetensors")
    assert torch.equal(m.vae.module.state_dict()["encoder.conv_in.bias"], state[key])


def test_converting_one_checkpoint_at_a_time_reuses_identical_shared_files(release, tmp_path):
    _convert(release, tmp_path, ckpts=("gen",))
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    report = _convert(release, tmp_path, ckpts=("interp",))
    reused = {f.path.name for f in report.files if f.reused}
    assert reused == {f"keyvid_{c}.safetensors" for c in SHARED}
    assert all(tmp_path.joinpath(n).stat().st_mtime_ns == before[n] for n in reused)  # not rewritten
    assert "already in the folder" in report.shared["vae"]
    keyvid.load_keyvid(tmp_path / "keyvid_interpolator_unet.safetensors", "fp32")


def test_the_interpolator_needs_imagebind_huge_and_says_where_to_get_it(release, tmp_path):
    with pytest.raises(ModelFormatError) as err:
        _convert(release, tmp_path / "out", ckpts=("interp",), imagebind=False)
    msg = str(err.value)
    assert "--imagebind imagebind_huge.pth" in msg and "CC-BY-NC 4.0" in msg and "imagebind_huge.pth" in msg
    assert not (tmp_path / "out").exists()


def test_two_checkpoints_of_one_role_are_refused(release, tmp_path):
    with pytest.raises(ModelFormatError, match="both generator"):
        _convert(release, tmp_path, ckpts=("gen", "gen"))


def test_a_truncated_checkpoint_gets_a_clean_error(release, tmp_path):
    data = release["gen"].read_bytes()
    cut = tmp_path / "generator_checkpoint.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="generator_checkpoint.ckpt: cannot be read"):
        keyvid.convert_checkpoints([cut], tmp_path / "out")


def test_a_truncated_or_foreign_converted_file_gets_a_clean_error(converted, tmp_path):
    out, _ = converted
    for p in out.iterdir():
        shutil.copy(p, tmp_path / p.name)
    vae = tmp_path / "keyvid_vae.safetensors"
    vae.write_bytes(vae.read_bytes()[:-1000])
    with pytest.raises(ModelFormatError, match="keyvid_vae.safetensors"):
        keyvid.load_keyvid(tmp_path / "keyvid_generator_unet.safetensors", "fp32")
    # a component file picked as the UNet
    with pytest.raises(ModelFormatError, match="keyvid_text_encoder.safetensors: holds the KeyVID 'text_encoder'"):
        keyvid.load_keyvid(tmp_path / "keyvid_text_encoder.safetensors", "fp32")
    # the generator asked for, the interpolator given
    with pytest.raises(ModelFormatError, match="a KeyVID interpolator UNet, but a generator"):
        keyvid.load_keyvid(tmp_path / "keyvid_interpolator_unet.safetensors", "fp32", role="generator")


def test_a_missing_companion_names_the_file_the_folder_and_the_command(converted, tmp_path):
    out, _ = converted
    shutil.copy(out / "keyvid_generator_unet.safetensors", tmp_path)
    with pytest.raises(MissingModelError) as err:
        keyvid.load_keyvid(tmp_path / "keyvid_generator_unet.safetensors", "fp32")
    msg = str(err.value)
    assert "keyvid_generator_image_proj.safetensors" in msg and "avsync_keyvid" in msg
    assert "avsync convert keyvid" in msg and str(tmp_path) in msg


def test_cli_prints_sha256_and_size_of_every_output(release, tmp_path, capsys):
    from avsync.cli import main

    rc = main(["convert", "keyvid", str(release["gen"]), "--out", str(tmp_path), "--dtype", "fp16",
               "--generator-config", str(release["config_files"]["generator"])])
    assert rc == 0
    printed = capsys.readouterr().out
    for p in tmp_path.glob("*.safetensors"):
        assert f"sha256 {hashlib.sha256(p.read_bytes()).hexdigest()}" in printed
    assert "dropped" in printed and "shared vae: generator only" in printed


def test_cli_errors_exit_2_without_traceback(release, tmp_path, capsys):
    from avsync.cli import main

    assert main(["convert", "keyvid", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nope.ckpt: no such file" in err and "Traceback" not in err
    assert main(["convert", "keyvid", str(release["interp"]), "--out", str(tmp_path / "o"),
                 "--interpolator-config", str(release["config_files"]["interpolator"])]) == 2
    assert "--imagebind imagebind_huge.pth" in capsys.readouterr().err


def test_unet_metadata_names_companions_with_their_sha256(converted):
    out, _ = converted
    _, meta = _read(out / "keyvid_generator_unet.safetensors")
    companions = json.loads(meta["companions"])
    shas = json.loads(meta["companion_sha256"])
    assert companions["vae"] == "keyvid_vae.safetensors"
    assert shas["vae"] == hashlib.sha256((out / "keyvid_vae.safetensors").read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- loader nodes

def test_loader_node_missing_file_names_file_folder_and_command(models_dir):
    from avsync.cli.common import run_node

    with pytest.raises(MissingModelError) as err:
        run_node("AVSyncKeyVIDGeneratorLoader", unet="keyvid_generator_unet.safetensors", precision="fp32")
    msg = str(err.value)
    assert "keyvid_generator_unet.safetensors" in msg and "avsync_keyvid" in msg
    assert str(models_dir / "avsync" / "keyvid") in msg and "avsync convert keyvid" in msg and "RyanWW/KeyVID" in msg


def test_loader_nodes_validate_inputs():
    from avsync.nodes.keyvid_loader_nodes import AVSyncKeyVIDGeneratorLoader as G

    assert G.VALIDATE_INPUTS(unet="keyvid_generator_unet.safetensors", precision="fp16") is True
    msg = G.VALIDATE_INPUTS(unet="generator_checkpoint.ckpt", precision="fp16")
    assert msg.startswith("unet:") and "avsync convert keyvid" in msg
    assert G.VALIDATE_INPUTS(unet=None, precision="fp8").startswith("precision:")


def test_loader_nodes_load_each_role_from_the_models_folder(converted, models_dir):
    from avsync.cli.common import run_node
    from avsync.nodes.keyvid_loader_nodes import AVSyncKeyVIDGeneratorLoader, AVSyncKeyVIDInterpolatorLoader

    out, _ = converted
    folder = models_dir / "avsync" / "keyvid"
    shutil.copytree(out, folder)
    choices = AVSyncKeyVIDGeneratorLoader.INPUT_TYPES()["required"]["unet"][0]
    assert choices[0] == "keyvid_generator_unet.safetensors" and "keyvid_interpolator_unet.safetensors" in choices
    (gen,) = run_node("AVSyncKeyVIDGeneratorLoader", unet="keyvid_generator_unet.safetensors", precision="fp32")
    (again,) = run_node("AVSyncKeyVIDGeneratorLoader", unet="keyvid_generator_unet.safetensors", precision="fp32")
    assert gen.role == "generator" and again is gen  # cached while held
    (interp,) = run_node("AVSyncKeyVIDInterpolatorLoader", unet="keyvid_interpolator_unet.safetensors",
                         precision="auto")
    assert interp.role == "interpolator" and interp.dtype == torch.float32  # auto on the CPU
    assert AVSyncKeyVIDInterpolatorLoader.RETURN_TYPES == ("AVSYNC_KEYVID_INTERP_MODEL",)
    assert AVSyncKeyVIDGeneratorLoader.RETURN_TYPES == ("AVSYNC_KEYVID_MODEL",)
    with pytest.raises(ModelFormatError, match="interpolator UNet, but a generator"):
        run_node("AVSyncKeyVIDGeneratorLoader", unet="keyvid_interpolator_unet.safetensors", precision="fp32")
    # a missing companion: named with the folder and the command
    (folder / "keyvid_text_encoder.safetensors").unlink()
    with pytest.raises(MissingModelError) as err:
        run_node("AVSyncKeyVIDGeneratorLoader", unet="keyvid_generator_unet.safetensors", precision="bf16")
    assert "keyvid_text_encoder.safetensors" in str(err.value) and "avsync convert keyvid" in str(err.value)


def test_inside_comfyui_every_network_is_a_patcher_and_companions_come_from_any_keyvid_folder(
        converted, fake_comfy, tmp_path):
    from avsync.cli.common import run_node

    calls, fp = fake_comfy
    out, _ = converted
    first, second = tmp_path / "first", tmp_path / "second"   # e.g. extra_model_paths.yaml + models/avsync/keyvid
    first.mkdir()
    shutil.copytree(out, second)
    shutil.move(str(second / "keyvid_generator_unet.safetensors"), first)
    fp.folder_names_and_paths["avsync_keyvid"] = ([str(first), str(second)], {".safetensors"})
    fp.get_filename_list = lambda name: sorted(
        p.name for d in fp.folder_names_and_paths[name][0] for p in Path(d).iterdir())
    (model,) = run_node("AVSyncKeyVIDGeneratorLoader", unet="keyvid_generator_unet.safetensors", precision="fp32")
    assert model.files["unet"].startswith(str(first)) and model.files["vae"].startswith(str(second))
    managed = model.managed()
    assert all(m.patcher is not None for m in managed.values()) and calls.count("patcher") == len(managed)
    assert managed["vae"].load() is model.vae.module
    assert ("load_models_gpu", 1, True) in calls


def test_cli_refuses_to_overwrite_without_force_and_writes_nothing_on_error(release, tmp_path, capsys, monkeypatch):
    from avsync.cli import main

    gen_cfg = str(release["config_files"]["generator"])
    args = ["convert", "keyvid", str(release["gen"]), "--out", str(tmp_path), "--generator-config", gen_cfg, "-q"]
    assert main(args) == 0 and capsys.readouterr().out == ""
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "keyvid_generator_unet.safetensors" in err and "--force" in err
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    assert main(args + ["--force"]) == 0
    # an error in the middle of writing leaves neither temporary nor final files behind
    from avsync.cli.common import staged_outputs

    fresh = tmp_path / "fresh"
    real_write = keyvid.write_safetensors_streamed
    written = []

    def failing_write(path, *a, **kw):
        if len(written) == 3:
            raise OSError("disk full")
        written.append(path)
        return real_write(path, *a, **kw)

    monkeypatch.setattr(keyvid, "write_safetensors_streamed", failing_write)
    with pytest.raises(OSError, match="disk full"):
        with staged_outputs() as stage:
            _convert(release, fresh, ckpts=("gen",), stage=stage)
    assert len(written) == 3 and not any(fresh.iterdir())


def test_loader_node_wrong_file_names_the_file_its_folder_and_the_command(models_dir):
    from safetensors.torch import save_file

    from avsync.cli.common import run_node

    folder = models_dir / "avsync" / "keyvid"
    folder.mkdir(parents=True)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)},
              str(folder / "some_sd_model.safetensors"))
    with pytest.raises(ModelFormatError) as err:
        run_node("AVSyncKeyVIDGeneratorLoader", unet="some_sd_model.safetensors", precision="fp32")
    msg = str(err.value)
    assert str(folder / "some_sd_model.safetensors") in msg and "avsync convert keyvid" in msg
