"""MTV's transformer: diffusers' CogVideoX-5B (I2V layout) backbone + MTV's audio modules.

The released network is SAT's ``DiffusionTransformer`` (``suimuc/MTV_Framework`` @ 5704fe6,
``mtv/dit_video_concat.py``) with the audio modules of ``mtv/sgm/models/transformer.py``.
Here the backbone is ``diffusers.CogVideoXTransformer3DModel`` (its state-dict keys are the
ones ``scripts/convert_cogvideox_to_diffusers.py`` produces) and the audio modules are
:mod:`.mtv_audio` (SAT names). :class:`MTVTransformer` runs its own block loop on the
diffusers submodules because MTV needs two things ``CogVideoXBlock.forward`` cannot do:

* the audio step between the attention residual and ``norm2``
  (``dit_video_concat.py:AdaLNMixin.layer_forward``), and
* the t = 0 AdaLN shift/scale/gate for the ``clean_frames`` leading latent frames (window
  hand-over; SAT's ``latent_frame_mask`` / ``emb_t0`` / ``t_mask_select``). Here the per-frame
  parameters are picked before the modulation (``x·(1+scale_f)+shift_f``), the same
  elementwise arithmetic as SAT's select-after.

Numerics that differ between SAT and diffusers follow SAT (what the weights were trained
with): the final LayerNorm before the output modulation has eps 1e-6 (diffusers'
``norm_out`` 1e-5; :attr:`MTVConfig.final_norm_eps`). RoPE tables are SAT's
(``Rotary3DPositionEmbeddingMixin``: float32, positions 0..n-1), which equal diffusers' at
480×720.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn as nn

from .mtv_audio import MTVAudio, MTVAudioTokens


@dataclass(frozen=True)
class MTVConfig:
    """Sizes of the MTV transformer; defaults are the released ones
    (``configs/cogvideox_5b.yaml``; the audio sizes are hard-coded in ``transformer.py``)."""

    num_layers: int = 42
    num_heads: int = 48
    head_dim: int = 64
    in_channels: int = 32
    out_channels: int = 16
    patch_size: int = 2
    text_dim: int = 4096
    text_tokens: int = 226
    time_embed_dim: int = 512
    latent_frames: int = 13
    latent_height: int = 60
    latent_width: int = 90
    audio_dim: int = 768
    audio_layers_per_frame: int = 12
    audio_context: int = 5
    audio_window_frames: int = 49
    audio_tokens: int = 32
    audio_proj_hidden: int = 512
    dual_blocks: int = 4
    dual_heads: int = 48
    speakers: int = 1
    dual_mlp_dim: int = 3072            # Audio_Dual_Block MLP (4 × 768)
    mlp_ratio: int = 4                  # backbone MLP inner = 4 × hidden
    temporal_compression: int = 4       # VAE: 1 + 4k frames → 1 + k latents
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5              # block / audio LayerNorms (layernorm_epsilon)
    final_norm_eps: float = 1e-6        # FinalLayerMixin.norm_final (diffusers' norm_out: 1e-5)

    @property
    def hidden(self) -> int:
        return self.num_heads * self.head_dim

    @classmethod
    def released(cls, variant: str = "single") -> "MTVConfig":
        """``single`` (one speaker), ``accm`` (same network, effects/music focus) or ``multi``
        (two speakers: ``audio_attn_second``, ``audio_vocal_embedding{,_1}``)."""
        if variant in ("single", "accm"):
            return cls()
        if variant == "multi":
            return cls(speakers=2)
        raise ValueError(f"MTV variant must be 'single', 'accm' or 'multi', got {variant!r}")

    def validate(self) -> None:
        if self.speakers not in (1, 2):
            raise ValueError(f"MTVConfig.speakers must be 1 or 2, got {self.speakers}")
        if self.head_dim % 8:
            raise ValueError(f"MTVConfig.head_dim must be a multiple of 8 for 3D RoPE, got {self.head_dim}")
        if self.audio_dim % self.dual_heads:
            raise ValueError(f"MTVConfig.audio_dim {self.audio_dim} is not divisible by dual_heads {self.dual_heads}")
        if self.latent_height % self.patch_size or self.latent_width % self.patch_size:
            raise ValueError("MTVConfig latent height/width must be multiples of patch_size")


def build_backbone(config: MTVConfig):
    """The diffusers CogVideoX transformer in the 5B I2V layout (learned positional
    embedding + 3D RoPE, 32 input channels)."""
    from diffusers import CogVideoXTransformer3DModel

    c = config
    model = CogVideoXTransformer3DModel(
        num_attention_heads=c.num_heads, attention_head_dim=c.head_dim, in_channels=c.in_channels,
        out_channels=c.out_channels, flip_sin_to_cos=True, freq_shift=0, time_embed_dim=c.time_embed_dim,
        text_embed_dim=c.text_dim, num_layers=c.num_layers, sample_width=c.latent_width,
        sample_height=c.latent_height, sample_frames=(c.latent_frames - 1) * c.temporal_compression + 1,
        patch_size=c.patch_size, temporal_compression_ratio=c.temporal_compression,
        max_text_seq_length=c.text_tokens, norm_eps=c.norm_eps,
        use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True)
    model.norm_out.norm.eps = c.final_norm_eps
    return model


def rope_tables(frames: int, height: int, width: int, head_dim: int, theta: float = 10000.0):
    """``dit_video_concat.py:Rotary3DPositionEmbeddingMixin``: (cos, sin) ``[t·h·w, head_dim]``,
    channel split t/h/w = head/4, 3·head/8, 3·head/8, interleaved pairs, float32."""
    dims = (head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3)
    parts = []
    for n, dim in zip((frames, height, width), dims):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        parts.append(torch.repeat_interleave(torch.arange(n, dtype=torch.float32)[:, None] * freqs, 2, dim=-1))
    ft, fh, fw = parts
    freqs = torch.cat([ft[:, None, None].expand(frames, height, width, -1),
                       fh[None, :, None].expand(frames, height, width, -1),
                       fw[None, None, :].expand(frames, height, width, -1)], dim=-1).reshape(-1, head_dim)
    return freqs.cos(), freqs.sin()


def _modulation(norm_zero, emb: torch.Tensor):
    """CogVideoXLayerNormZero's six chunks: video shift/scale/gate, text shift/scale/gate."""
    return norm_zero.linear(norm_zero.silu(emb)).chunk(6, dim=1)


def _per_frame(p: torch.Tensor, p0: Optional[torch.Tensor], frames: int, clean: int) -> torch.Tensor:
    """[B, D] → [B, T, 1, D]; the first ``clean`` frames take the t = 0 value."""
    p = p[:, None, None, :].expand(-1, frames, 1, -1)
    if not clean:
        return p
    return torch.cat([p0[:, None, None, :].expand(-1, clean, 1, -1), p[:, clean:]], dim=1)


class MTVTransformer(nn.Module):
    """MTV's DiT. ``backbone`` is diffusers' ``CogVideoXTransformer3DModel``; ``audio`` holds
    MTV's modules (:class:`~.mtv_audio.MTVAudio`). State-dict keys: ``backbone.<diffusers>``
    and ``audio.<SAT key minus model.diffusion_model.transformer.>``."""

    def __init__(self, config: MTVConfig = MTVConfig()):
        super().__init__()
        config.validate()
        self.config = config
        self.backbone = build_backbone(config)
        self.audio = MTVAudio(config)
        self._rope_cache: dict = {}

    def _rope(self, frames, height, width, device):
        key = (frames, height, width, str(device))
        if key not in self._rope_cache:
            cos, sin = rope_tables(frames, height, width, self.config.head_dim, self.config.rope_theta)
            self._rope_cache = {key: (cos.to(device), sin.to(device))}
        return self._rope_cache[key]

    def project_audio(self, speech: torch.Tensor, effects: torch.Tensor, music: torch.Tensor,
                      speech2: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None) -> MTVAudioTokens:
        """The audio projections of a window (``transformer.py:AudioProjModel`` ×3, 3.73 B parameters at
        the released size): wav2vec features ``[B, 49, 5, 12, 768]`` per stream → :class:`MTVAudioTokens`.
        They do not depend on the timestep, so a sampler computes them once per window and passes
        them to :meth:`forward` as ``audio_tokens`` (bit-equal to projecting inside every call).
        ``dtype``: the compute dtype the features are cast to (forward casts to the latents')."""
        if (speech2 is not None) != (self.config.speakers == 2):
            raise ValueError("MTVTransformer: speech2 is required for speakers=2 and not accepted otherwise")
        cast = [a.to(dtype) if a is not None and dtype is not None else a for a in (speech, effects, music, speech2)]
        return self.audio.project(*cast)

    def forward(self, latents: torch.Tensor, text: torch.Tensor, timestep: torch.Tensor,
                speech: Optional[torch.Tensor] = None, effects: Optional[torch.Tensor] = None,
                music: Optional[torch.Tensor] = None, speech2: Optional[torch.Tensor] = None,
                clean_frames: int = 0, audio_tokens: Optional[MTVAudioTokens] = None) -> torch.Tensor:
        """``latents`` [B, T, in_channels, H, W] (latent ‖ zero channels), ``text`` [B, 226, 4096],
        ``timestep`` [B] integer DDPM timesteps, audio [B, 49, 5, 12, 768] per stream
        (``speech2`` only for ``speakers=2``); ``clean_frames`` leading latent frames get the
        t = 0 AdaLN embedding. ``audio_tokens``: the window's :meth:`project_audio` output, given
        instead of the features (the projections are then skipped). Returns the v prediction
        [B, T, out_channels, H, W] (``dit_video_concat.py:DiffusionTransformer.forward``)."""
        c, bb = self.config, self.backbone
        b, frames, _, height, width = latents.shape
        if audio_tokens is None and (speech is None or effects is None or music is None):
            raise ValueError("MTVTransformer: give speech, effects and music features, or audio_tokens")
        if audio_tokens is not None and any(a is not None for a in (speech, effects, music, speech2)):
            raise ValueError("MTVTransformer: give either the audio features or audio_tokens, not both")
        if audio_tokens is None and (speech2 is not None) != (c.speakers == 2):
            raise ValueError("MTVTransformer: speech2 is required for speakers=2 and not accepted otherwise")
        if audio_tokens is not None and (audio_tokens.speech2 is not None) != (c.speakers == 2):
            raise ValueError("MTVTransformer: audio_tokens.speech2 is required for speakers=2 and not accepted "
                             "otherwise")
        if not 0 <= clean_frames <= frames:
            raise ValueError(f"MTVTransformer: clean_frames must be in [0, {frames}], got {clean_frames}")
        dtype = latents.dtype
        timestep = torch.as_tensor(timestep, device=latents.device).reshape(-1).expand(b)
        emb = bb.time_embedding(bb.time_proj(timestep).to(dtype))
        emb0 = bb.time_embedding(bb.time_proj(torch.zeros_like(timestep)).to(dtype)) if clean_frames else None

        hidden = bb.patch_embed(text, latents)
        text_len = text.shape[1]
        text_h, video = hidden[:, :text_len], hidden[:, text_len:]
        p = c.patch_size
        gh, gw = height // p, width // p
        rope = self._rope(frames, gh, gw, latents.device)
        query_rope = (rope[0][: gh * gw], rope[1][: gh * gw])   # audio query: frame-0 positions

        if audio_tokens is None:
            audio_tokens = self.project_audio(speech, effects, music, speech2, dtype)
        elif audio_tokens.speech.shape[0] != b:
            raise ValueError(f"MTVTransformer: audio_tokens have batch {audio_tokens.speech.shape[0]}, latents {b}")
        streams, music_mean = self.audio.combine(audio_tokens, emb)

        for block, audio in zip(bb.transformer_blocks, self.audio.layers):
            video, text_h = self._block(block, audio, video, text_h, emb, emb0, clean_frames, frames,
                                        rope, query_rope, streams, music_mean)

        video = bb.norm_final(video)
        video = bb.norm_out(video, temb=emb)
        video = bb.proj_out(video)
        out = video.reshape(b, frames, gh, gw, -1, p, p)
        return out.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)

    def _block(self, block, audio, video, text_h, emb, emb0, clean, frames, rope, query_rope, streams, music_mean):
        """``CogVideoXBlock.forward`` with MTV's audio step and per-frame t = 0 modulation."""
        b, ts, d = video.shape

        def modulate_video(norm_zero, x, chunks, chunks0):
            shift, scale, gate = chunks[:3]
            x = norm_zero.norm(x)
            if not clean:
                return x * (1 + scale)[:, None, :] + shift[:, None, :], gate[:, None, :]
            shift, scale, gate = (_per_frame(t, t0, frames, clean) for t, t0 in zip(chunks[:3], chunks0[:3]))
            x = x.reshape(b, frames, ts // frames, d) * (1 + scale) + shift
            return x.reshape(b, ts, d), gate

        def gated(gate, x):
            if gate.dim() == 3:
                return gate * x
            return (gate * x.reshape(b, frames, ts // frames, d)).reshape(b, ts, d)

        m1 = _modulation(block.norm1, emb)
        m1_0 = _modulation(block.norm1, emb0) if clean else None
        norm_video, gate_msa = modulate_video(block.norm1, video, m1, m1_0)
        norm_text = block.norm1.norm(text_h) * (1 + m1[4])[:, None, :] + m1[3][:, None, :]
        attn_video, attn_text = block.attn1(hidden_states=norm_video, encoder_hidden_states=norm_text,
                                            image_rotary_emb=rope)
        video = video + gated(gate_msa, attn_video)
        text_h = text_h + m1[5][:, None, :] * attn_text

        video = audio(video, frames, streams, music_mean, block.attn1.norm_q, block.attn1.norm_k, query_rope)

        m2 = _modulation(block.norm2, emb)
        m2_0 = _modulation(block.norm2, emb0) if clean else None
        norm_video, gate_ff = modulate_video(block.norm2, video, m2, m2_0)
        norm_text = block.norm2.norm(text_h) * (1 + m2[4])[:, None, :] + m2[3][:, None, :]
        ff = block.ff(torch.cat([norm_text, norm_video], dim=1))
        text_len = text_h.shape[1]
        video = video + gated(gate_ff, ff[:, text_len:])
        text_h = text_h + m2[5][:, None, :] * ff[:, :text_len]
        return video, text_h


# --- SAT checkpoint keys → MTVTransformer keys (used by the converter and the parity test) ---

_SAT_PREFIX = "model.diffusion_model."
_AUDIO_PREFIX = "transformer."

# convert_cogvideox_to_diffusers.py:TRANSFORMER_KEYS_RENAME_DICT (ordered substring renames)
_BACKBONE_RENAMES = (
    ("transformer.final_layernorm", "norm_final"), ("transformer", "transformer_blocks"),
    ("attention", "attn1"), ("mlp", "ff.net"), ("dense_h_to_4h", "0.proj"), ("dense_4h_to_h", "2"),
    (".layers", ""), ("dense", "to_out.0"), ("input_layernorm", "norm1.norm"),
    ("post_attn1_layernorm", "norm2.norm"), ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"), ("mixins.patch_embed", "patch_embed"),
    ("mixins.final_layer.norm_final", "norm_out.norm"), ("mixins.final_layer.linear", "proj_out"),
    ("mixins.final_layer.adaLN_modulation.1", "norm_out.linear"),
    ("mixins.pos_embed.pos_embedding", "patch_embed.pos_embedding"),
)
_DROPPED = ("freqs_sin", "freqs_cos", "position_embedding", "embed_tokens")
_SPLIT = re.compile(r"(query_key_value|query_layernorm_list|key_layernorm_list|adaLN_modulations)")


def sat_to_mtv_key(name: str) -> Optional[str]:
    """Our key for a SAT checkpoint key that maps one-to-one (prefix ``model.diffusion_model.``
    optional), or None when the key is not part of :class:`MTVTransformer` (``freqs_*``,
    ``position_embeddings``, anything outside the diffusion model) or must be split — use
    :func:`sat_to_mtv_tensors` for those (``query_key_value``, ``adaLN_modulations``,
    ``{query,key}_layernorm_list``). Every key containing ``audio`` is split off before the
    diffusers renames (they would rewrite e.g. ``audio_attn.dense``)."""
    if name.startswith(_SAT_PREFIX):
        name = name[len(_SAT_PREFIX):]
    elif name.startswith(("conditioner.", "first_stage_model.", "model.")):
        return None
    if "audio" in name:
        if name.startswith(_AUDIO_PREFIX):
            return "audio." + name[len(_AUDIO_PREFIX):]
        return None
    if any(d in name for d in _DROPPED) or _SPLIT.search(name):
        return None
    for old, new in _BACKBONE_RENAMES:
        name = name.replace(old, new)
    return "backbone." + name


def sat_to_mtv_tensors(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Every (our key, tensor) that SAT key ``name`` becomes: one for a plain rename, three for
    a fused ``query_key_value`` (``to_q/k/v``), two for an ``adaLN_modulations.{i}.1``
    (``norm1.linear`` = chunks 0-2 + 6-8, ``norm2.linear`` = 3-5 + 9-11, as
    ``convert_cogvideox_to_diffusers.py:reassign_adaln_norm_inplace``), one for a q/k
    LayerNorm (``attn1.norm_{q,k}``); none for a dropped key. Audio keys are never split
    (the fused ``key_value``/``query_key_value`` stay fused in :mod:`.mtv_audio`)."""
    short = name[len(_SAT_PREFIX):] if name.startswith(_SAT_PREFIX) else name
    if "audio" in short or not _SPLIT.search(short) or any(d in short for d in _DROPPED):
        key = sat_to_mtv_key(name)
        return [] if key is None else [(key, tensor)]
    if name.startswith(("conditioner.", "first_stage_model.")):
        return []
    m = re.match(r"transformer\.layers\.(\d+)\.attention\.query_key_value\.(weight|bias)$", short)
    if m:
        i, kind = m.groups()
        q, k, v = tensor.chunk(3, dim=0)
        base = f"backbone.transformer_blocks.{i}.attn1."
        return [(base + f"to_q.{kind}", q), (base + f"to_k.{kind}", k), (base + f"to_v.{kind}", v)]
    m = re.match(r"mixins\.adaln_layer\.(query|key)_layernorm_list\.(\d+)\.(weight|bias)$", short)
    if m:
        which, i, kind = m.groups()
        return [(f"backbone.transformer_blocks.{i}.attn1.norm_{which[0]}.{kind}", tensor)]
    m = re.match(r"mixins\.adaln_layer\.adaLN_modulations\.(\d+)\.1\.(weight|bias)$", short)
    if m:
        i, kind = m.groups()
        chunks = tensor.chunk(12, dim=0)
        base = f"backbone.transformer_blocks.{i}."
        return [(base + f"norm1.linear.{kind}", torch.cat(chunks[0:3] + chunks[6:9], dim=0)),
                (base + f"norm2.linear.{kind}", torch.cat(chunks[3:6] + chunks[9:12], dim=0))]
    raise KeyError(f"sat_to_mtv_tensors: no rule for SAT key {name!r}")


def sat_to_mtv_state_dict(sat: dict) -> dict:
    """A whole SAT state dict → :class:`MTVTransformer` state dict (in memory; the converter
    streams key by key with :func:`sat_to_mtv_tensors`)."""
    out = {}
    for name, tensor in sat.items():
        for key, value in sat_to_mtv_tensors(name, tensor):
            out[key] = value
    return out


def with_overrides(config: MTVConfig, **overrides) -> MTVConfig:
    """``config`` with some fields replaced (the converter infers sizes from a file's shapes)."""
    return replace(config, **overrides)
