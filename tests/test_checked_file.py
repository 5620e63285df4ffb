"""The one checked reader every loader opens model files through (loaders/checked_file.py):
empty, truncated, padded, garbage, pickled-as-safetensors and wrong-family files all give a
ModelFormatError that names the file and what was expected, for every loader."""

from __future__ import annotations

import struct

import pytest
import torch
from safetensors.torch import save_file

from avsync.core.errors import ModelFormatError
from avsync.loaders.checked_file import describe_family, load_pickled_checked, open_checked

WHAT = "a test model"


def _good(tmp_path, name="good.safetensors"):
    p = tmp_path / name
    save_file({"a.weight": torch.arange(6, dtype=torch.float16).reshape(2, 3),
               "b.bias": torch.ones(4, dtype=torch.bfloat16)}, str(p), metadata={"k": "v"})
    return p


def test_good_file_is_lazy_keeps_dtype_and_metadata(tmp_path):
    state = open_checked(_good(tmp_path), what=WHAT, required_prefixes=("a.", "b."))
    assert sorted(state) == ["a.weight", "b.bias"] and len(state) == 2
    assert state.metadata == {"k": "v"}
    assert state.shape("a.weight") == (2, 3) and state.dtype_name("b.bias") == "BF16"
    assert state["a.weight"].dtype == torch.float16 and state["b.bias"].dtype == torch.bfloat16
    assert torch.equal(state["a.weight"], torch.arange(6, dtype=torch.float16).reshape(2, 3))
    with pytest.raises(KeyError):
        state["nope"]


def _corrupt(tmp_path, kind):
    p = tmp_path / f"{kind}.safetensors"
    good = _good(tmp_path).read_bytes()
    data = {
        "empty": b"",
        "tiny": b"\x01\x02\x03",
        "garbage": bytes(range(256)) * 4,
        "html": b"<!DOCTYPE html><html><body>403 Forbidden</body></html>",
        "lfs": b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 9000000000\n",
        "zip": b"PK\x03\x04" + b"\x00" * 100,
        "truncated": good[:-5],
        "padded": good + b"\x00" * 16,
        "notjson": struct.pack("<Q", 4) + b"abcd",
        "badentry": struct.pack("<Q", 20) + b'{"x": {"dtype": 1}} ',
        "wrongsize": (lambda h: struct.pack("<Q", len(h)) + h + b"\x00" * 8)(
            b'{"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}'),
    }[kind]
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("kind, message", [
    ("empty", "empty"), ("tiny", "too short"), ("garbage", "not a safetensors file"), ("html", "HTML"),
    ("lfs", "git LFS pointer"), ("zip", "pickled PyTorch checkpoint"), ("truncated", "truncated.*5 missing"),
    ("padded", "16 bytes after the last tensor"), ("notjson", "not JSON"), ("badentry", "malformed header entry"),
    ("wrongsize", "needs 12 bytes"),
])
def test_broken_files_name_the_file_the_problem_and_what_was_expected(tmp_path, kind, message):
    p = _corrupt(tmp_path, kind)
    with pytest.raises(ModelFormatError, match=message) as err:
        open_checked(p, what=WHAT, family_hint="get it from X")
    assert str(p) in str(err.value) and "expected a test model (get it from X)" in str(err.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelFormatError, match="no such file"):
        open_checked(tmp_path / "nope.safetensors", what=WHAT)
    with pytest.raises(ModelFormatError, match="is a directory"):
        open_checked(tmp_path, what=WHAT)


def test_wrong_family_says_what_it_looks_like(tmp_path):
    p = tmp_path / "sd.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(p))
    with pytest.raises(ModelFormatError, match=r"no tensors under first_stage_model\.\*; it looks like a Stable "
                                               r"Diffusion \(ldm layout\) checkpoint; expected a test model"):
        open_checked(p, what=WHAT, required_prefixes=("model.diffusion_model.", "first_stage_model."))
    assert describe_family(["imagebindMoodel.x"]) == "KeyVID's keyframe localizer"
    assert describe_family(["unknown"]) is None


def test_pickled_reader_unwraps_and_refuses_what_it_cannot_read(tmp_path):
    p = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2), "step": 3}, "epoch": 1}, p)
    state = load_pickled_checked(p, what=WHAT, required_prefixes=("w",))
    assert list(state) == ["w"] and torch.equal(state["w"], torch.ones(2))
    with pytest.raises(ModelFormatError, match="no tensors under v"):
        load_pickled_checked(p, what=WHAT, required_prefixes=("v",))
    with pytest.raises(ModelFormatError, match="safetensors file, not a pickled"):
        load_pickled_checked(_good(tmp_path), what=WHAT)
    for kind, message in (("empty", "empty"), ("html", "HTML"), ("garbage", "weights-only")):
        with pytest.raises(ModelFormatError, match=message):
            load_pickled_checked(_corrupt(tmp_path, kind), what=WHAT)
    torch.save([torch.ones(1)], tmp_path / "list.pth")
    with pytest.raises(ModelFormatError, match="holds a list, not a state dict"):
        load_pickled_checked(tmp_path / "list.pth", what=WHAT)


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated"])
def test_every_loader_gives_the_same_clear_error(tmp_path, kind):
    from avsync.loaders import demix, localizer, svd

    p = _corrupt(tmp_path, kind)
    for load, expected in ((svd.load_svd_single_file, "SVD-XT single-file"),
                           (svd.load_backward_delta, "backward-motion"),
                           (svd.read_unet_state_dict, "SVD UNet"),
                           (localizer.load_localizer, "KeyVID localizer"),
                           (demix.load_demix_model, "MRX or BandIt v2 demix model")):
        with pytest.raises(ModelFormatError, match=expected) as err:
            load(p)
        assert str(p) in str(err.value), load
    pth = tmp_path / "x.pth"
    pth.write_bytes(p.read_bytes())
    for convert in (localizer.convert_checkpoint, demix.convert_checkpoint):
        with pytest.raises(ModelFormatError, match=str(pth).replace(".", r"\.")):
            convert(pth, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_loaders_refuse_the_wrong_family(tmp_path):
    from avsync.loaders import demix, localizer

    p = tmp_path / "other.safetensors"
    save_file({"imagebindMoodel.modality_trunks.audio.blocks.0.norm_1.weight": torch.zeros(2)}, str(p))
    with pytest.raises(ModelFormatError, match="no tensors under _encoders.*KeyVID's keyframe localizer"):
        demix.load_demix_model(p)
    save_file({"_encoders.0.layer.1.weight": torch.zeros(2), "_decoders.0.x": torch.zeros(1)}, str(p))
    with pytest.raises(ModelFormatError, match="it looks like an MRX demix model; expected a converted KeyVID"):
        localizer.load_localizer(p)
