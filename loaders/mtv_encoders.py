"""Loading MTV's encoders from the files users have: wav2vec2, T5 v1.1 XXL, the CogVideoX VAE.

* wav2vec2 (``facebook/wav2vec2-base-960h``): a transformers folder (``config.json`` +
  ``model.safetensors``, or ``pytorch_model.bin`` read with ``weights_only=True``; the
  ``preprocessor_config.json`` gives ``do_normalize``), or one ``.safetensors`` file (the base-960h
  sizes inferred from the tensors, or a ``config`` JSON in the file's metadata). The released folder
  holds a ``Wav2Vec2ForCTC``: its ``wav2vec2.`` prefix is stripped and the CTC head dropped, as
  ``Wav2VecModel.from_pretrained`` (``mtv/sgm/utils/audio_processor.py``) does.
* T5: a transformers folder (``T5EncoderModel``, e.g. ``THUDM/CogVideoX-2b/text_encoder``) or
  ComfyUI's ``t5xxl_fp16.safetensors`` / ``t5xxl_fp8_e4m3fn.safetensors`` /
  ``t5xxl_fp8_e4m3fn_scaled.safetensors``: ComfyUI's T5 (``comfy/text_encoders/t5.py:T5``) uses
  transformers' key names (``shared``, ``encoder.block.{i}.layer.{0,1}…``, ``encoder.final_layer_norm``),
  so the file loads into ``T5EncoderModel`` as it is; fp8 weights are widened (times their
  ``scale_weight`` in the scaled files) to the compute dtype. The tokenizer: a folder, or ComfyUI's
  ``comfy/text_encoders/t5_tokenizer`` (found through :mod:`avsync.compat`).
* VAE: a diffusers ``AutoencoderKLCogVideoX`` folder (or a model folder with ``vae/``). The SAT
  ``3d-vae.pt`` conversion is ``loaders/mtv.py``'s (the converter's) job.

Every network is built on the meta device and filled with :func:`loaders.svd._assign` (exact key match,
missing / unexpected names in the error).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch

from ..core.errors import ModelFormatError
from ..networks.mtv_encoders import MTV_VAE_SCALE, MTVAudioEncoder, MTVVae
from .checked_file import load_pickled_checked, open_checked
from .common import _assign, _meta_module, count_indexed
from .svd import LazyStateDict, _weight_files, parse_dtype

def _read_all(files, what: str) -> LazyStateDict:
    """The tensors of one or more (sharded) safetensors files, each file checked by :func:`open_checked`;
    read when accessed, so converting tensor by tensor peaks at the converted model plus one tensor."""
    return LazyStateDict(list(files), what=what)


def read_transformers_folder(folder: Path, what: str) -> tuple[dict, Mapping[str, torch.Tensor]]:
    """``(config, tensors)`` of a transformers model folder: ``config.json`` and ``model.safetensors``
    (sharded too; lazy) or ``pytorch_model.bin`` (``torch.load(weights_only=True)``)."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelFormatError(f"{folder}: no config.json; expected {what}")
    files = _weight_files(folder, "model")
    if files:
        raw: Mapping[str, torch.Tensor] = _read_all(files, what)
    elif (folder / "pytorch_model.bin").is_file():
        raw = load_pickled_checked(folder / "pytorch_model.bin", what=what)
    else:
        raise ModelFormatError(f"{folder}: no model.safetensors or pytorch_model.bin; expected {what}")
    return json.loads(cfg_path.read_text()), raw


# --------------------------------------------------------------------------------------
# wav2vec2
# --------------------------------------------------------------------------------------

WAV2VEC_WHAT = "a wav2vec2 model (facebook/wav2vec2-base-960h: a transformers folder or one .safetensors file)"
_WAV2VEC_DROPPED = ("lm_head.", "quantizer.", "project_hid.", "project_q.", "dropout_features.")


def wav2vec_state(raw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``Wav2Vec2Model`` names from a ``Wav2Vec2Model`` / ``Wav2Vec2ForCTC`` / ``Wav2Vec2ForPreTraining``
    state dict: the ``wav2vec2.`` prefix stripped, heads dropped, the positional convolution's old
    ``weight_g``/``weight_v`` names mapped to torch's ``parametrizations.weight.original0/1``."""
    out = {}
    for k in raw:
        name = k[len("wav2vec2."):] if k.startswith("wav2vec2.") else k
        if name.startswith(_WAV2VEC_DROPPED):
            continue
        name = name.replace("pos_conv_embed.conv.weight_g", "pos_conv_embed.conv.parametrizations.weight.original0")
        name = name.replace("pos_conv_embed.conv.weight_v", "pos_conv_embed.conv.parametrizations.weight.original1")
        out[name] = raw[k]
    return out


def infer_wav2vec_config(state: Mapping[str, torch.Tensor]) -> dict:
    """A ``Wav2Vec2Config`` dict for a bare state dict: the base-960h layout (strides, norms) with the sizes
    read from the tensors. Heads are not visible in the weights: hidden/64 (12 for base)."""
    shape = (lambda k: tuple(state.shape(k))) if hasattr(state, "shape") else (lambda k: tuple(state[k].shape))
    keys = list(state)
    try:
        hidden = shape("feature_projection.projection.weight")[0]
        convs = count_indexed(keys, r"feature_extractor\.conv_layers\.(\d+)\.conv\.weight")
        conv_dim = tuple(shape(f"feature_extractor.conv_layers.{i}.conv.weight")[0] for i in range(convs))
        conv_kernel = tuple(shape(f"feature_extractor.conv_layers.{i}.conv.weight")[2] for i in range(convs))
        pos = shape("encoder.pos_conv_embed.conv.parametrizations.weight.original1")
        layers = count_indexed(keys, r"encoder\.layers\.(\d+)\.")
        inter = shape("encoder.layers.0.feed_forward.intermediate_dense.weight")[0]
    except KeyError as err:
        raise ModelFormatError(f"the weights lack {err} and are not {WAV2VEC_WHAT}") from None
    if "encoder.layers.0.layer_norm.weight" not in state:
        raise ModelFormatError("unexpected wav2vec2 layout; MTV uses wav2vec2-base-960h")
    layer_norm_convs = "feature_extractor.conv_layers.1.layer_norm.weight" in state
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                intermediate_size=inter, conv_dim=conv_dim, conv_kernel=conv_kernel,
                conv_stride=(5,) + (2,) * (convs - 1), conv_bias="feature_extractor.conv_layers.0.conv.bias" in state,
                feat_extract_norm="layer" if layer_norm_convs else "group",
                num_conv_pos_embeddings=pos[2], num_conv_pos_embedding_groups=hidden // pos[1],
                do_stable_layer_norm=False)


def _build_wav2vec(config: dict, state: Mapping[str, torch.Tensor], dtype: torch.dtype, source: str):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    cfg = Wav2Vec2Config(**{k: v for k, v in config.items() if not k.startswith("_")})
    model = _meta_module(lambda: Wav2Vec2Model(cfg))
    tensors = {k: state[k].to(dtype) for k in state}
    own = model.state_dict()
    if "masked_spec_embed" in own and "masked_spec_embed" not in tensors:
        # only used to mask time steps in training; some exports leave it out
        tensors["masked_spec_embed"] = torch.zeros(tuple(own["masked_spec_embed"].shape), dtype=dtype)
    return _assign(model, tensors, f"wav2vec2 ({source})")


def load_mtv_audio_encoder(path, dtype=torch.float32, device="cpu", normalize: Optional[bool] = None) -> MTVAudioEncoder:
    """:class:`MTVAudioEncoder` from a transformers folder or one ``.safetensors`` file.

    ``normalize`` defaults to the folder's ``preprocessor_config.json`` ``do_normalize`` (True for
    base-960h, and when there is no such file). The released code runs wav2vec2 in fp32."""
    path = Path(path)
    dtype = parse_dtype(dtype)
    do_normalize = True
    if path.is_dir():
        config, raw = read_transformers_folder(path, WAV2VEC_WHAT)
        pp = path / "preprocessor_config.json"
        if pp.is_file():
            do_normalize = bool(json.loads(pp.read_text()).get("do_normalize", True))
        state = wav2vec_state(raw)
    elif path.is_file():
        h = open_checked(path, what=WAV2VEC_WHAT)
        state = wav2vec_state({k: h[k] for k in h})
        meta = h.metadata or {}
        config = json.loads(meta["config"]) if "config" in meta else infer_wav2vec_config(state)
        if "do_normalize" in meta:
            do_normalize = meta["do_normalize"].lower() == "true"
    else:
        raise ModelFormatError(f"{path}: no such file or folder; expected {WAV2VEC_WHAT}")
    model = _build_wav2vec(config, state, dtype, path.name).to(device)
    return MTVAudioEncoder(model, normalize=do_normalize if normalize is None else normalize)


# --------------------------------------------------------------------------------------
# T5
# --------------------------------------------------------------------------------------

T5_WHAT = ("a T5 v1.1 encoder (a transformers folder such as CogVideoX's text_encoder/, or ComfyUI's "
           "t5xxl_fp16 / t5xxl_fp8_e4m3fn(_scaled) .safetensors)")
_T5_MARKERS = ("scaled_fp8",)


def comfy_t5_state(raw: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """ComfyUI-layout T5 tensors → ``T5EncoderModel`` tensors in ``dtype``.

    fp8 weights are widened; in the scaled files (``scaled_fp8`` marker) each linear weight is
    multiplied by its ``scale_weight`` (``comfy/ops.py:scaled_fp8_ops`` dequantises the same way);
    ``scale_input`` tensors (fp8 matmul inputs) are not needed for a widened weight."""
    out = {}
    for k in raw:
        if k in _T5_MARKERS or k.endswith((".scale_weight", ".scale_input")) or k.startswith(("decoder.", "lm_head.")):
            continue  # markers, scales (applied below), and a full T5's decoder
        t = raw[k]
        scale_key = k[: -len("weight")] + "scale_weight" if k.endswith(".weight") else None
        if scale_key is not None and scale_key in raw:
            t = t.to(torch.float32) * raw[scale_key].to(torch.float32)
        out[k] = t.to(dtype)
    if "shared.weight" in out:
        out.setdefault("encoder.embed_tokens.weight", out["shared.weight"])
    return out


def infer_t5_config(state: Mapping[str, torch.Tensor]) -> dict:
    """``T5Config`` for an encoder-only state dict (sizes from the tensors; v1.1 gated-GELU when ``wi_0``
    is present, v1.0 ReLU otherwise)."""
    keys = list(state)
    try:
        vocab, d_model = state["shared.weight"].shape
        heads = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[1]
        inner = state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    except KeyError as err:
        raise ModelFormatError(f"the weights lack {err} and are not {T5_WHAT}") from None
    if "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in state:
        raise ModelFormatError("this is a UMT5 encoder (relative attention bias in every block), not T5 v1.1")
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state
    d_ff = state["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"].shape[0]
    return dict(vocab_size=int(vocab), d_model=int(d_model), d_kv=int(inner) // int(heads), d_ff=int(d_ff),
                num_layers=count_indexed(keys, r"encoder\.block\.(\d+)\."), num_heads=int(heads),
                feed_forward_proj="gated-gelu" if gated else "relu", relative_attention_num_buckets=32,
                relative_attention_max_distance=128, layer_norm_epsilon=1e-6, is_encoder_decoder=False,
                tie_word_embeddings=False)


def _build_t5(config: dict, state: dict, source: str):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(**{k: v for k, v in config.items() if not k.startswith("_")})
    model = _meta_module(lambda: T5EncoderModel(cfg))
    model = _assign(model, state, f"T5 encoder ({source})")
    model.encoder.embed_tokens = model.shared  # one embedding, as in T5EncoderModel
    return model


def load_t5_encoder(path, dtype=torch.bfloat16, device="cpu"):
    """``transformers.T5EncoderModel`` from a transformers folder (``config.json`` + ``model.safetensors``,
    sharded, or ``pytorch_model.bin`` read with ``weights_only``), or a ComfyUI ``t5xxl_*.safetensors``.
    The released code runs T5 in bf16 (SAT casts the whole engine)."""
    path = Path(path)
    dtype = parse_dtype(dtype)
    if path.is_dir():
        folder = path / "text_encoder" if (path / "text_encoder" / "config.json").is_file() else path
        config, raw = read_transformers_folder(folder, T5_WHAT)
        config["is_encoder_decoder"] = False
    elif path.is_file():
        raw = open_checked(path, what=T5_WHAT, required_prefixes=("encoder.block.", "shared."))  # lazy
        config = None
    else:
        raise ModelFormatError(f"{path}: no such file or folder; expected {T5_WHAT}")
    state = comfy_t5_state(raw, dtype)
    if config is None:
        config = infer_t5_config(state)
    return _build_t5(config, state, path.name).to(device).eval()


def load_t5_tokenizer(folder=None):
    """The T5 tokenizer from ``folder`` (tokenizer.json / spiece.model), else ComfyUI's own copy
    (``comfy/text_encoders/t5_tokenizer``, the same T5 v1.1 vocabulary)."""
    from transformers import AutoTokenizer

    from .. import compat

    if folder is None:
        folder = compat.comfy_t5_tokenizer_dir()
        if folder is None:
            raise ModelFormatError("no T5 tokenizer: give a tokenizer folder (e.g. CogVideoX's tokenizer/), or run "
                                   "inside ComfyUI, which ships one (comfy/text_encoders/t5_tokenizer)")
    folder = Path(folder)
    if (folder / "tokenizer" / "tokenizer_config.json").is_file():
        folder = folder / "tokenizer"
    if not folder.is_dir():
        raise ModelFormatError(f"{folder}: not a tokenizer folder")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


# --------------------------------------------------------------------------------------
# CogVideoX VAE
# --------------------------------------------------------------------------------------

VAE_WHAT = "a diffusers AutoencoderKLCogVideoX folder (config.json + diffusion_pytorch_model.safetensors)"


def load_cogvideox_vae(path, dtype=torch.float32, device="cpu", tiling: bool = False) -> MTVVae:
    """:class:`MTVVae` from a diffusers folder (``vae/`` of a CogVideoX model folder, or the VAE folder
    itself). The scale is MTV's 0.7 whatever the config says (``configs/cogvideox_5b.yaml``)."""
    from .mtv import load_mtv_vae   # the one CogVideoX VAE loader (strict, scale 0.7)

    path = Path(path)
    dtype = parse_dtype(dtype)
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    files = _weight_files(folder, "diffusion_pytorch_model") if folder.is_dir() else []
    if not (folder / "config.json").is_file() or not files:
        raise ModelFormatError(f"{path}: expected {VAE_WHAT}")
    config = json.loads((folder / "config.json").read_text())
    if config.get("_class_name", "AutoencoderKLCogVideoX") != "AutoencoderKLCogVideoX":
        raise ModelFormatError(f"{folder}: a {config.get('_class_name')}, not an AutoencoderKLCogVideoX")
    vae = load_mtv_vae(folder, device, dtype)
    return MTVVae(vae, scale=MTV_VAE_SCALE, tiling=tiling)
