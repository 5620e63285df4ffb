"""MTV's encoders: the wav2vec2 front end (parity with the released code from a waveform), T5 prompt
encoding and loading (transformers folder and ComfyUI layouts), the CogVideoX VAE wrapper."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from avsync.core.errors import ModelFormatError
from avsync.loaders.mtv_encoders import (
    infer_wav2vec_config, load_cogvideox_vae, load_mtv_audio_encoder, load_t5_encoder, load_t5_tokenizer,
    wav2vec_state,
)
from avsync.networks.mtv_encoders import (
    MTVAudioEncoder, MTVVae, audio_context, decode_chunks, encode_prompt, normalize_waveform, to_wav2vec_input,
    uncond_prompt_embedding,
)
from avsync.samplers.core.noise import InjectedNoise, SeededNoise
from tests.factories import mtv_encoder_files as ff

DATA = Path(__file__).parent / "data" / "mtv" / "encoders"
PARITY_LENGTHS = (20800, 32500, 40000)  # padded by 17 frames, not padded, padded to 97 frames


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small convolutions: with several threads on a shared CPU the VAE tests run 20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------ audio front end

@pytest.fixture(scope="module")
def parity():
    return load_file(str(DATA / "wav2vec_parity.safetensors"))


@pytest.fixture(scope="module")
def tiny_encoder():
    return load_mtv_audio_encoder(DATA / "tiny_wav2vec")


@pytest.mark.parametrize("samples", PARITY_LENGTHS)
def test_audio_features_match_released_code(parity, tiny_encoder, samples):
    """AudioProcessor.preprocess (librosa.load of a 16 kHz float WAV, Wav2Vec2FeatureExtractor, padding,
    Wav2VecModel) + process_audio_emb, transformers 4.45.2 as MTV pins it (tests/data/mtv/encoders/README.md)."""
    ours = tiny_encoder.features(parity[f"waveform_{samples}"])
    ref = parity[f"features_{samples}"]
    assert ours.shape == ref.shape
    # measured floor: 0.0 (bit-equal, AVX2 kernels, the machine that made the fixture); 3.2e-6 with
    # ATEN_CPU_CAPABILITY=default; values up to ~4
    assert (ours - ref).abs().max().item() <= 1e-5
    seq_len, n = MTVAudioEncoder.frame_count(samples)
    assert seq_len == int(parity[f"length_{samples}"]) and n == ref.shape[0]


def test_frame_count_and_padding_follow_released_arithmetic():
    # 10 s at 16 kHz: 240 frames → padded to 1 + 48·5 = 241 with 1·666 zero samples
    assert MTVAudioEncoder.frame_count(160000) == (240, 241)
    assert MTVAudioEncoder.pad_samples(160000) == 666
    # exactly 1 + 48k frames: no padding
    assert MTVAudioEncoder.frame_count(32500) == (49, 49)
    assert MTVAudioEncoder.pad_samples(32500) == 0
    # 1.3 s → ceil(31.2) = 32 frames → 49 (17 frames · 666 samples)
    assert MTVAudioEncoder.frame_count(20800) == (32, 49)
    assert MTVAudioEncoder.pad_samples(20800) == 17 * 666
    for samples in (400, 16000, 16001, 99999, 1234567):
        seq_len, n = MTVAudioEncoder.frame_count(samples)
        assert seq_len == math.ceil(samples / 16000 * 24) and (n - 1) % 48 == 0 and 0 <= n - seq_len < 48


def test_normalisation_is_the_feature_extractors():
    from transformers import Wav2Vec2FeatureExtractor

    x = torch.randn(12345) * 0.3 + 0.1
    fe = Wav2Vec2FeatureExtractor(**{k: v for k, v in ff.WAV2VEC_PREPROCESSOR.items() if k != "feature_extractor_type"})
    ref = torch.from_numpy(fe(x.numpy(), sampling_rate=16000).input_values[0])
    assert torch.equal(normalize_waveform(x), ref)  # same numpy float32 arithmetic: bit-equal


def test_interpolation_happens_before_the_encoder(tiny_encoder, parity):
    """Running the encoder at 50 Hz and interpolating its output afterwards (WAN-S2V's order) gives other
    features: the order matters, and ours is the released one (the parity test pins the numbers)."""
    x = parity["waveform_32500"]
    ours = tiny_encoder.hidden_states(x)
    w = tiny_encoder.wav2vec
    with torch.no_grad():
        out = w(normalize_waveform(x)[None], output_hidden_states=True)
        after = torch.stack(out.hidden_states[1:], dim=1)[0]  # [layers, T50, H]
        after = torch.nn.functional.interpolate(after.permute(0, 2, 1), size=ours.shape[0], mode="linear",
                                                align_corners=True).permute(2, 0, 1)
    assert after.shape == ours.shape
    assert (after - ours).abs().max() > 0.1


def test_audio_context_clamps_at_the_ends():
    f = torch.arange(6.0)[:, None]
    ctx = audio_context(f)[..., 0]
    assert ctx.shape == (6, 5)
    assert ctx[0].tolist() == [0, 0, 0, 1, 2]
    assert ctx[3].tolist() == [1, 2, 3, 4, 5]
    assert ctx[5].tolist() == [3, 4, 5, 5, 5]


def test_whole_file_once_windows_slice_it(tiny_encoder, parity):
    """Features of a 97-frame file are not those of its first 49 frames encoded alone (the encoder sees
    the whole file): windows must slice one pass, as the release does."""
    x = parity["waveform_40000"]
    whole = tiny_encoder.features(x)
    first = tiny_encoder.features(x[:32500])
    assert whole.shape[0] == 97 and first.shape[0] == 49
    assert (whole[:49] - first).abs().max() > 1e-3


def test_audio_input_errors(tiny_encoder):
    with pytest.raises(ValueError, match="1-D mono"):
        tiny_encoder.features(torch.zeros(2, 16000))
    with pytest.raises(ValueError, match="too short"):
        tiny_encoder.features(torch.zeros(100))


def test_resampled_input_is_mono_16k():
    sr = 44100
    t = torch.arange(sr, dtype=torch.float64) / sr  # float64 phases: float32 sin(2764 rad) is off by ~1e-4
    tone = torch.sin(2 * math.pi * 440 * t)
    y = to_wav2vec_input(torch.stack([tone, 0.5 * tone]).float(), sr)
    assert y.shape == (16000,)
    ref = 0.75 * torch.sin(2 * math.pi * 440 * torch.arange(16000, dtype=torch.float64) / 16000)
    err = (y[200:-200].double() - ref[200:-200]).abs().max().item()
    assert err < 1e-5, err  # away from the edges a 440 Hz tone passes: measured max error 4.2e-7


# ------------------------------------------------------------------------------ wav2vec loading

@pytest.mark.parametrize("ctc_layout,pickled", [(False, False), (True, False), (True, True)])
def test_wav2vec_folder_layouts_load_the_same_model(tmp_path, ctc_layout, pickled, parity):
    folder, model = ff.write_tiny_wav2vec_folder(tmp_path / "w2v", seed=3, ctc_layout=ctc_layout, pickled=pickled)
    enc = load_mtv_audio_encoder(folder)
    assert enc.normalize is True
    own = model.state_dict()
    for k, v in enc.wav2vec.state_dict().items():
        assert torch.equal(v, own[k]), k
    x = parity["waveform_20800"]
    assert torch.equal(enc.features(x), MTVAudioEncoder(model).features(x))  # same weights, same code path


def test_wav2vec_single_file_and_do_normalize(tmp_path):
    folder, model = ff.write_tiny_wav2vec_folder(tmp_path / "w2v", seed=1, do_normalize=False)
    assert load_mtv_audio_encoder(folder).normalize is False
    # a single file with the released CTC names: sizes inferred from the tensors (heads from metadata here,
    # since a 32-wide model has no hidden/64 head count)
    state = {f"wav2vec2.{k}": v.contiguous() for k, v in model.state_dict().items()}
    cfg = infer_wav2vec_config(wav2vec_state(state))
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_conv_pos_embeddings",
                "num_conv_pos_embedding_groups", "feat_extract_norm"):
        assert cfg[key] == getattr(model.config, key), key
    assert tuple(cfg["conv_dim"]) == tuple(model.config.conv_dim)
    assert tuple(cfg["conv_stride"]) == tuple(model.config.conv_stride)
    single = tmp_path / "wav2vec2_tiny.safetensors"
    save_file(state, str(single), metadata={"config": json.dumps(model.config.to_dict())})
    enc = load_mtv_audio_encoder(single)
    assert enc.normalize is True
    x = torch.randn(20000)
    assert torch.equal(enc.features(x), MTVAudioEncoder(model).features(x))


def test_wav2vec_errors_name_the_file(tmp_path):
    with pytest.raises(ModelFormatError, match="no config.json"):
        load_mtv_audio_encoder(tmp_path)
    folder, model = ff.write_tiny_wav2vec_folder(tmp_path / "w2v", seed=1)
    state = load_file(str(folder / "model.safetensors"))
    state.pop("encoder.layers.1.final_layer_norm.weight")
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ModelFormatError, match="final_layer_norm"):
        load_mtv_audio_encoder(folder)


# ------------------------------------------------------------------------------ T5

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_t5_tokenizer(ff.write_tiny_t5_tokenizer(tmp_path_factory.mktemp("tok")))


PROMPTS = ["One person conversation. A person is speaking.", "No conversation. The dog barks."]


def test_encode_prompt_pads_to_226_without_mask(tmp_path, tokenizer):
    folder, model = ff.write_tiny_t5(tmp_path / "t5", seed=2)
    t5 = load_t5_encoder(folder, dtype=torch.float32)
    emb = encode_prompt(t5, tokenizer, PROMPTS)
    assert emb.shape == (2, 226, ff.TINY_T5["d_model"]) and emb.dtype == torch.float32
    ids = tokenizer(PROMPTS, padding="max_length", max_length=226, truncation=True, return_tensors="pt")["input_ids"]
    assert (ids[:, 20:] == 0).all() and (ids[:, 0] != 0).all()  # padded with <pad> = 0
    with torch.no_grad():
        no_mask = model(input_ids=ids).last_hidden_state
        masked = model(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    # measured floor 0 (same weights, same call); a mask would change every position
    assert (emb - no_mask).abs().max().item() <= 1e-6
    assert (emb - masked).abs().max().item() > 1e-3
    # each prompt on its own gives the same rows: measured floor ~1e-7 (batch-size dependent kernels)
    alone = encode_prompt(t5, tokenizer, PROMPTS[1:])
    assert (alone[0] - emb[1]).abs().max().item() <= 1e-5
    assert torch.equal(uncond_prompt_embedding(emb), torch.zeros_like(emb))


def test_encode_prompt_matches_released_t5_embedder():
    """``FrozenT5Embedder.forward`` (transformers 4.45.2, sentencepiece ``T5Tokenizer``) on a tiny random T5
    and a tiny SentencePiece vocabulary (tests/data/mtv/encoders/README.md); ours reads the same vocabulary
    as a ``tokenizer.json`` (the form ComfyUI ships) and the encoder folder through our loader."""
    from safetensors import safe_open

    ref_path = DATA / "t5" / "t5_ref.safetensors"
    ref = load_file(str(ref_path))
    with safe_open(str(ref_path), "pt") as f:
        prompts = json.loads(f.metadata()["prompts"])
    tok = load_t5_tokenizer(DATA / "t5" / "tokenizer")
    ids = tok(prompts, truncation=True, max_length=226, padding="max_length", return_tensors="pt")["input_ids"]
    assert torch.equal(ids, ref["input_ids"])  # the same token ids as the released slow tokenizer
    t5 = load_t5_encoder(DATA / "t5" / "text_encoder", dtype=torch.float32)
    emb = encode_prompt(t5, tok, prompts)
    assert emb.shape == ref["z"].shape == (2, 226, 32)
    # measured floor 4.2e-5 (values up to 3.9): transformers 5 runs T5 attention with SDPA, 4.45 eagerly;
    # with attn_implementation="eager" the two are bit-equal
    assert (emb - ref["z"]).abs().max().item() <= 2e-4


def test_tokenizer_outside_comfyui_needs_a_folder():
    with pytest.raises(ModelFormatError, match="no T5 tokenizer"):
        load_t5_tokenizer()


def test_long_prompts_are_truncated_to_226_tokens(tmp_path, tokenizer):
    folder, _ = ff.write_tiny_t5(tmp_path / "t5", seed=2)
    t5 = load_t5_encoder(folder, dtype=torch.float32)
    assert encode_prompt(t5, tokenizer, ["a person is speaking " * 200]).shape == (1, 226, ff.TINY_T5["d_model"])


def _dequantised(raw: dict, key: str) -> torch.Tensor:
    """What a ComfyUI-layout weight means in fp32 (``comfy/ops.py:scaled_fp8_ops``: weight · scale_weight)."""
    w = raw[key].float()
    scale = raw.get(key[: -len("weight")] + "scale_weight")
    return w * scale.float() if scale is not None else w


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "fp8_e4m3fn", "fp8_e4m3fn_scaled"])
def test_comfy_t5_files_load_as_t5_encoder(tmp_path, tokenizer, dtype):
    path, model = ff.write_tiny_t5(tmp_path / f"t5xxl_{dtype}.safetensors", seed=4, layout="comfy", dtype=dtype)
    t5 = load_t5_encoder(path, dtype=torch.float32)
    assert t5.config.d_model == ff.TINY_T5["d_model"] and t5.config.num_layers == ff.TINY_T5["num_layers"]
    assert t5.config.num_heads == ff.TINY_T5["num_heads"] and t5.config.is_gated_act
    assert t5.encoder.embed_tokens is t5.shared
    # every weight is the file's value widened (and scaled): exact
    raw = load_file(str(path))
    loaded = t5.state_dict()
    for key in raw:
        if key == "scaled_fp8" or key.endswith(".scale_weight"):
            continue
        assert torch.equal(loaded[key], _dequantised(raw, key)), key
    got = encode_prompt(t5, tokenizer, PROMPTS)
    assert torch.isfinite(got).all()
    if dtype == "fp32":
        assert torch.equal(got, encode_prompt(model, tokenizer, PROMPTS))
    if dtype == "fp8_e4m3fn_scaled":  # the scales matter: without them the weights would be ~448/max too large
        w = raw["encoder.block.0.layer.0.SelfAttention.q.weight"].float()
        assert (loaded["encoder.block.0.layer.0.SelfAttention.q.weight"] - w).abs().max() > 1.0


def test_t5_folder_and_comfy_file_agree(tmp_path, tokenizer):
    folder, model = ff.write_tiny_t5(tmp_path / "t5", seed=5)
    path, _ = ff.write_tiny_t5(tmp_path / "t5xxl_fp32.safetensors", seed=5, layout="comfy")
    a = load_t5_encoder(folder, dtype=torch.float32)
    b = load_t5_encoder(path, dtype=torch.float32)
    assert a.encoder.embed_tokens is a.shared
    assert torch.equal(encode_prompt(a, tokenizer, PROMPTS), encode_prompt(b, tokenizer, PROMPTS))


def test_t5_wrong_file_is_named(tmp_path):
    p = tmp_path / "not_t5.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(2)}, str(p))
    with pytest.raises(ModelFormatError, match="T5"):
        load_t5_encoder(p)
    # a UMT5 file (relative attention bias in every block) is refused by name, not loaded wrongly
    path, _ = ff.write_tiny_t5(tmp_path / "umt5.safetensors", seed=0, layout="comfy")
    state = load_file(str(path))
    state["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = torch.zeros(32, 4)
    save_file(state, str(path))
    with pytest.raises(ModelFormatError, match="UMT5"):
        load_t5_encoder(path)


# ------------------------------------------------------------------------------ VAE

@pytest.fixture(scope="module")
def tiny_vae():
    return ff.tiny_cogvideox_vae(0)


def test_decode_chunks_are_sats():
    assert decode_chunks(13) == [(0, 3), (3, 5), (5, 7), (7, 9), (9, 11), (11, 13)]
    assert decode_chunks(3) == [(0, 3)]
    assert decode_chunks(1) == [(0, 1)]
    assert decode_chunks(4) == [(0, 2), (2, 4)]  # SAT's loop would drop frame 3 here; diffusers' ranges


def test_chunked_decode_equals_diffusers_frame_batching(tiny_vae):
    """The released decode loop ([0:3], [3:5], … with the carried cache) is diffusers' ``_decode``:
    same chunks, same cache → bit-equal (same model object, same arithmetic)."""
    wrapper = MTVVae(tiny_vae)
    latents = torch.randn(1, 13, 16, 2, 3)
    frames = wrapper.decode(latents)
    assert frames.shape == (1, 49, 3, 16, 24)
    with torch.no_grad():
        ref = tiny_vae.decode(latents.permute(0, 2, 1, 3, 4) / 0.7).sample.permute(0, 2, 1, 3, 4)
    assert torch.equal(frames, ref)
    # the cache is carried: decoding the chunks without it gives other frames
    with torch.no_grad():
        z = (latents / 0.7).permute(0, 2, 1, 3, 4)
        cold = torch.cat([tiny_vae.decoder(z[:, :, a:b])[0] for a, b in decode_chunks(13)], dim=2)
    assert (cold.permute(0, 2, 1, 3, 4) - frames).abs().max() > 1e-3


SAT_DECODER = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32, latent_channels=16,
                   sample_height=16, sample_width=24)  # SAT's Normalize3D hard-codes 32 groups


def test_decode_matches_sats_chunked_decoder():
    """The released decode loop (``sample_video.py``: chunks [0:3], [3:5], … through SAT's
    ``ContextParallelDecoder3D`` with ``clear_fake_cp_cache`` False until the last chunk) on a tiny random
    decoder, weights renamed with diffusers' ``convert_cogvideox_to_diffusers.py`` VAE rules
    (tests/data/mtv/encoders/README.md)."""
    from diffusers import AutoencoderKLCogVideoX

    data = load_file(str(DATA / "sat_vae_decode.safetensors"))
    vae = AutoencoderKLCogVideoX(**SAT_DECODER).eval()
    vae.decoder.load_state_dict({k[len("decoder."):]: v.float() for k, v in data.items() if k.startswith("decoder.")},
                                strict=True)
    latents = 0.7 * data["io.latent"].float().permute(0, 2, 1, 3, 4)  # MTVVae takes scaled [B, T, C, h, w]
    frames = MTVVae(vae).decode(latents).permute(0, 2, 1, 3, 4)
    ref = data["io.frames"]
    assert frames.shape == ref.shape == (1, 3, 49, 16, 24)
    # measured floor 3.8e-6 (5.0e-6 with ATEN_CPU_CAPABILITY=default) on values up to 5.2: the ×0.7 / ÷0.7
    # round trip and the convolutions' summation order
    assert (frames - ref).abs().max().item() <= 2e-5


def test_encode_is_a_scaled_posterior_sample(tiny_vae):
    wrapper = MTVVae(tiny_vae)
    frames = torch.rand(2, 5, 3, 16, 24) * 2 - 1
    mean, std = wrapper.posterior(frames)
    assert mean.shape == (2, 2, 16, 2, 3)  # the hand-over: 5 frames → 2 latents
    eps = torch.randn(mean.shape)
    z = wrapper.encode(frames, eps)
    with torch.no_grad():
        dist = tiny_vae.encode(frames.permute(0, 2, 1, 3, 4)).latent_dist
    ref = 0.7 * (dist.mean + dist.std * eps.permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)
    assert (z - ref).abs().max().item() <= 1e-6  # measured floor 0 (same ops)
    assert torch.equal(wrapper.encode(frames, None), 0.7 * mean)
    assert (z - 0.7 * mean).abs().max() > 1e-3  # a sample, not the mean (std ≈ 1 at random weights)
    # from a noise source: its conditioning draw (same seed → same latents; injected conditioning draws
    # are used, injected re-noise draws are left for the solver)
    a, b = wrapper.encode(frames, SeededNoise(7)), wrapper.encode(frames, SeededNoise(7))
    assert torch.equal(a, b)
    solver_draw = torch.randn(3)
    injected = InjectedNoise(conditioning=[eps], renoise=[solver_draw])
    assert torch.equal(wrapper.encode(frames, injected), z)
    assert torch.equal(injected.renoise((3,)), solver_draw)
    with pytest.raises(ValueError, match="does not fit"):
        wrapper.encode(frames, torch.randn(1, 2, 16, 2, 3))


def test_tiled_decode_runs_in_tiles(tiny_vae):
    """diffusers' spatial tiling, at the tiny VAE's analogue of the real 60×90-latent geometry (tiles of
    6×5 latents overlapping so that the cropped tiles add up to the frame: 40 + 40 + 16 = 96 rows,
    32 + 32 + 16 = 80 columns)."""
    wrapper = MTVVae(tiny_vae, tiling=True)
    tiny_vae.enable_tiling(tile_sample_min_height=48, tile_sample_min_width=40)
    try:
        latents = torch.randn(1, 1, 16, 12, 10)
        tiled = wrapper.decode(latents)
        plain = MTVVae(tiny_vae).decode(latents)
    finally:
        tiny_vae.use_tiling = False
    assert tiled.shape == plain.shape == (1, 1, 3, 96, 80)
    assert torch.isfinite(tiled).all()
    assert (tiled - plain).abs().max() > 0  # tiles see less context than the whole frame: not equal


def test_vae_folder_loads(tmp_path):
    folder, vae = ff.write_tiny_cogvideox_vae(tmp_path / "vae", seed=1)
    loaded = load_cogvideox_vae(tmp_path)  # a model folder with vae/ inside is also accepted
    assert loaded.scale == 0.7
    latents = torch.randn(1, 3, 16, 2, 3)
    assert torch.equal(loaded.decode(latents), MTVVae(vae).decode(latents))
    with pytest.raises(ModelFormatError, match="AutoencoderKLCogVideoX"):
        load_cogvideox_vae(tmp_path / "nothing")
