"""Tiny random-weight files for MTV's encoders, in the on-disk layouts users have.

* :func:`write_tiny_wav2vec_folder` — a transformers wav2vec2 folder (``config.json``,
  ``model.safetensors`` or ``pytorch_model.bin``, ``preprocessor_config.json``), optionally in the
  ``Wav2Vec2ForCTC`` layout of ``facebook/wav2vec2-base-960h`` (``wav2vec2.`` prefix, ``lm_head``);
* :func:`write_tiny_t5` — a T5 v1.1 encoder (gated-GELU) as a transformers folder, or as ComfyUI's
  single ``t5xxl_*.safetensors`` (same key names, no ``encoder.embed_tokens``; fp16, fp8_e4m3fn, or
  fp8 with ComfyUI's ``scale_weight`` / ``scaled_fp8`` markers); :func:`write_tiny_t5_tokenizer`
  writes a small SentencePiece-style (Unigram) T5 tokenizer folder with T5's special-token ids;
* :func:`tiny_cogvideox_vae` / :func:`write_tiny_cogvideox_vae` — an ``AutoencoderKLCogVideoX`` with
  the real 4× temporal / 8× spatial compression at tiny widths.

Seeds fix every weight; the sizes are in the ``TINY_*`` dicts. The pipeline engineer uses these for
end-to-end tests; ``tests/test_mtv_encoders.py`` uses them for the loaders.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_WAV2VEC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                    vocab_size=32)
# the feature extractor settings of facebook/wav2vec2-base-960h (preprocessor_config.json)
WAV2VEC_PREPROCESSOR = {"do_normalize": True, "feature_extractor_type": "Wav2Vec2FeatureExtractor",
                        "feature_size": 1, "padding_side": "right", "padding_value": 0.0,
                        "return_attention_mask": False, "sampling_rate": 16000}

TINY_T5 = dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, feed_forward_proj="gated-gelu",
               relative_attention_num_buckets=32, relative_attention_max_distance=128, vocab_size=40,
               layer_norm_epsilon=1e-6, is_encoder_decoder=False, tie_word_embeddings=False)

TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 16, 16),
                layers_per_block=1, norm_num_groups=4, temporal_compression_ratio=4,
                sample_height=32, sample_width=48, scaling_factor=0.7)


def _seeded_init(module: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Overwrite every parameter with seeded normal values (norm weights around 1) so that the
    outputs do not depend on a library's init scheme."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            v = torch.randn(p.shape, generator=g) * scale
            if name.endswith("weight") and ("norm" in name.lower() or "layer_norm" in name) and p.dim() == 1:
                v = 1.0 + v
            p.copy_(v)
    return module


# ------------------------------------------------------------------------------------------ wav2vec2

def tiny_wav2vec(seed: int = 0):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    return _seeded_init(Wav2Vec2Model(Wav2Vec2Config(**TINY_WAV2VEC)), seed).eval()


def write_tiny_wav2vec_folder(folder, seed: int = 0, *, ctc_layout: bool = False, pickled: bool = False,
                              do_normalize: bool = True):
    """A transformers wav2vec2 folder; returns ``(folder, model)``. ``ctc_layout`` writes the weights
    as ``Wav2Vec2ForCTC`` does (``wav2vec2.*`` plus an ``lm_head``), like the released base-960h."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_wav2vec(seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    if ctc_layout:
        state = {f"wav2vec2.{k}": v for k, v in state.items()}
        g = torch.Generator().manual_seed(seed + 1)
        state["lm_head.weight"] = torch.randn(TINY_WAV2VEC["vocab_size"], TINY_WAV2VEC["hidden_size"], generator=g)
        state["lm_head.bias"] = torch.zeros(TINY_WAV2VEC["vocab_size"])
        config["architectures"] = ["Wav2Vec2ForCTC"]
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "preprocessor_config.json").write_text(json.dumps(dict(WAV2VEC_PREPROCESSOR, do_normalize=do_normalize)))
    if pickled:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder, model


# ------------------------------------------------------------------------------------------ T5

def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    return _seeded_init(T5EncoderModel(T5Config(**TINY_T5)), seed).eval()


def _comfy_t5_state(model) -> dict:
    """ComfyUI's T5 key layout (``comfy/text_encoders/t5.py:T5``): transformers' names without the tied
    ``encoder.embed_tokens.weight`` copy."""
    return {k: v.contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}


def write_tiny_t5(path, seed: int = 0, *, layout: str = "transformers", dtype: str = "fp32"):
    """Write a tiny T5 encoder; returns ``(path, model)`` (``model`` holds the fp32 weights written).

    ``layout="transformers"``: a folder with ``config.json`` + ``model.safetensors``.
    ``layout="comfy"``: one safetensors file; ``dtype`` ``fp16`` (``t5xxl_fp16``), ``fp8_e4m3fn``
    (plain cast) or ``fp8_e4m3fn_scaled`` (per-linear ``scale_weight`` and the ``scaled_fp8`` marker, as
    ComfyUI's ``t5xxl_fp8_e4m3fn_scaled.safetensors``)."""
    from safetensors.torch import save_file

    model = tiny_t5(seed)
    path = Path(path)
    if layout == "transformers":
        path.mkdir(parents=True, exist_ok=True)
        model.config.to_json_file(str(path / "config.json"))
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"},
                  str(path / "model.safetensors"), metadata={"format": "pt"})
        return path, model
    if layout != "comfy":
        raise ValueError(f"layout must be transformers or comfy, got {layout!r}")
    state = _comfy_t5_state(model)
    if dtype == "fp16":
        state = {k: v.to(torch.float16) for k, v in state.items()}
    elif dtype == "fp8_e4m3fn":
        state = {k: v.to(torch.float8_e4m3fn) for k, v in state.items()}
    elif dtype == "fp8_e4m3fn_scaled":
        out = {}
        for k, v in state.items():
            if v.dim() == 2 and k.endswith(".weight") and "relative_attention_bias" not in k and k != "shared.weight":
                scale = v.abs().max().float() / 448.0
                out[k] = (v / scale).to(torch.float8_e4m3fn)
                out[k[: -len("weight")] + "scale_weight"] = scale.reshape(())
            else:
                out[k] = v.to(torch.float16)
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
        state = out
    elif dtype != "fp32":
        raise ValueError(f"dtype must be fp32, fp16, fp8_e4m3fn or fp8_e4m3fn_scaled, got {dtype!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path, model


T5_SPECIAL = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5's SentencePiece model
TINY_T5_PIECES = ["▁", "▁a", "▁person", "▁is", "▁speaking", "▁one", "▁conversation", ".", ",", "▁scene",
                  "▁no", "▁the", "▁dog", "▁barks", "a", "e", "i", "o", "s", "t", "n", "r", "l", "p", "k", "g", "d", "c"]


def write_tiny_t5_tokenizer(folder) -> Path:
    """A T5-style fast tokenizer (Unigram + Metaspace, ``</s>`` appended, ``<pad>`` = 0) with a small
    vocabulary (< ``TINY_T5["vocab_size"]`` ids) — enough to tokenize the test prompts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = [(t, 0.0) for t in T5_SPECIAL] + [(p, -float(i + 1)) for i, p in enumerate(TINY_T5_PIECES)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)
    folder = Path(folder)
    fast.save_pretrained(str(folder))
    return folder


# ------------------------------------------------------------------------------------------ VAE

def tiny_cogvideox_vae(seed: int = 0):
    from diffusers import AutoencoderKLCogVideoX

    return _seeded_init(AutoencoderKLCogVideoX(**TINY_VAE), seed, scale=0.1).eval()


def write_tiny_cogvideox_vae(folder, seed: int = 0):
    """A diffusers ``AutoencoderKLCogVideoX`` folder (``config.json`` + safetensors); returns ``(folder, vae)``."""
    vae = tiny_cogvideox_vae(seed)
    folder = Path(folder)
    vae.save_pretrained(str(folder), safe_serialization=True)
    return folder, vae
