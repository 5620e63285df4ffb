"""Parity of KeyVID's frozen encoders, built by AVSync's loaders on transformers / diffusers
classes, with the released reference code on the same tiny random weights.

Fixtures: tests/data/keyvid_loading/*_parity.safetensors (how they were made: README.md there).
Each holds the reference model's tensors under ``model.`` in the released layout (prefix
removed), the inputs and the reference outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from avsync.loaders import keyvid
from avsync.networks.keyvid_encoders import kornia_resize

DATA = Path(__file__).parent / "data" / "keyvid_loading"


def _fixture(name):
    with safe_open(str(DATA / name), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    model = {k[len("model."):]: v.float() for k, v in tensors.items() if k.startswith("model.")}
    return model, tensors, meta


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_text_encoder_matches_frozen_openclip_embedder_penultimate():
    # FrozenOpenCLIPEmbedder(layer="penultimate").encode_with_transformer: blocks 0..L-2, then ln_final
    state, t, meta = _fixture("text_encoder_parity.safetensors")
    enc = keyvid.build_text_encoder(state, {"head_dim": int(meta["head_dim"])}, torch.float32)
    with torch.no_grad():
        out = enc(t["tokens"])
    # measured 0.0 on AMD and with ATEN_CPU_CAPABILITY=default (same op order); 1e-6 leaves room for other BLAS
    assert _rel(out, t["output"]) <= 1e-6
    assert enc.model.config.num_hidden_layers == 2  # 3 released blocks, the last one never runs


def test_image_encoder_matches_frozen_openclip_image_embedder_v2():
    state, t, meta = _fixture("image_encoder_parity.safetensors")
    enc = keyvid.build_image_encoder(state, {"head_dim": int(meta["head_dim"])}, torch.float32)
    with torch.no_grad():
        out = enc(t["image"].float())            # 240x400 -> 224: antialias blur + bicubic
        out_small = enc(t["image_small"].float())  # 96x160 -> 224: bicubic only
    assert out.shape == (1, 257, 80)
    # measured 2.5e-7 (blur: conv2d vs kornia's filter2d summation order), 0.0 without the blur
    assert _rel(out, t["output"]) <= 2e-6
    assert _rel(out_small, t["output_small"]) <= 2e-6


def test_kornia_resize_downscale_blurs_first():
    # without the antialias blur the 240x400 -> 224 result is far from the reference
    state, t, meta = _fixture("image_encoder_parity.safetensors")
    enc = keyvid.build_image_encoder(state, {"head_dim": int(meta["head_dim"])}, torch.float32)
    enc.antialias = False
    with torch.no_grad():
        out = enc(t["image"].float())
    assert _rel(out, t["output"]) > 1e-3
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(kornia_resize(x, (8, 8)), x)


def test_vae_matches_lvdm_autoencoder_kl():
    state, t, meta = _fixture("vae_parity.safetensors")
    params = {"first_stage_config": {"params": {"embed_dim": int(meta["embed_dim"]),
                                                "ddconfig": json.loads(meta["ddconfig"])}},
              "scale_factor": 0.18215}
    vae = keyvid.build_vae(state, params, torch.float32)
    with torch.no_grad():
        moments = vae.encode(t["x"]).latent_dist.parameters
        decoded = vae.decode(t["z"]).sample
    # measured 9e-7 / 1.5e-6 (diffusers' attention and resnet op order vs lvdm's)
    assert _rel(moments, t["moments"]) <= 1e-5
    assert _rel(decoded, t["decoded"]) <= 1e-5


def _clip_vocab_dir():
    """A CLIP BPE vocabulary to test with: $AVSYNC_TEST_CLIP_VOCAB, or a ComfyUI checkout's
    comfy/sd1_tokenizer next to this repository (the files are not shipped with AVSync)."""
    import os

    for d in [os.environ.get("AVSYNC_TEST_CLIP_VOCAB")] + [str(p / "comfy" / "comfy" / "sd1_tokenizer")
                                                         for p in Path(__file__).resolve().parents]:
        if d and (Path(d) / "vocab.json").is_file() and (Path(d) / "merges.txt").is_file():
            return Path(d)
    return None


def test_tokenizer_matches_open_clip_tokenize():
    import pytest

    vocab = _clip_vocab_dir()
    if vocab is None:
        pytest.skip("no CLIP BPE vocabulary here (set AVSYNC_TEST_CLIP_VOCAB to a folder with vocab.json, merges.txt)")
    data = json.loads((DATA / "openclip_tokens.json").read_text())
    tok = keyvid.openclip_tokenizer(vocab)
    ids = tok(data["prompts"])
    assert ids.shape == (len(data["prompts"]), 77)
    for row, want in zip(ids.tolist(), data["tokens"]):
        assert row == want + [0] * (77 - len(want))   # index for index, zero padding included


def test_tokenizer_missing_names_where_to_get_it(models_dir):
    import pytest

    from avsync.core.errors import MissingModelError

    with pytest.raises(MissingModelError) as err:
        keyvid.openclip_tokenizer()
    assert "vocab.json" in str(err.value) and "sd1_tokenizer" in str(err.value)
