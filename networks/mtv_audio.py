"""MTV's audio modules (speech / effects / music conditioning of the CogVideoX backbone).

Rebuilt from the released SAT code (``suimuc/MTV_Framework`` @ 5704fe6,
``mtv/sgm/models/transformer.py`` and ``mtv/dit_video_concat.py``). Module and parameter
names follow the SAT ones (the state-dict keys are the SAT keys minus the prefix
``model.diffusion_model.transformer.``) so the converter only strips a prefix.

* :class:`AudioProjModel` — ``transformer.py:AudioProjModel``: per video frame, the
  ±2-frame × 12-layer wav2vec window → 3 linears → ``tokens × 768``; then ONE strided
  ``Conv1d`` applied twice with shared weights (frame 0 passes through each time), which
  turns 49 video frames into 13 latent frames; then LayerNorm.
* :class:`AudioDualBlock` / :class:`AudioCombineModel` — ``transformer.py:Audio_Dual_Block``
  / ``AudioCombineModel``: joint self-attention over [speech; (speaker 2;) effects] tokens of
  each latent frame, time-modulated with batch ROW 0 of the time embedding as released.
* :class:`AudioCrossAttention` — ``transformer.py:CrossAttention`` with the
  ``transformer_defaults.py:cross_attention_forward_default`` arithmetic: video tokens of one
  latent frame attend to that frame's audio tokens; the backbone block's q/k LayerNorms
  are shared and RoPE (frame-0 positions) is applied to the query only. It is an *audio
  layer* (``networks/audio_layers.py``): Audio Sync Guidance can switch it off per sample.
* :class:`MTVLayerAudio` — the per-backbone-layer audio modules and their step between the
  attention residual and ``norm2`` (``dit_video_concat.py:AdaLNMixin.layer_forward``):
  ``x += Σ cross-attentions`` (no gate, no time modulation), then the music
  ``x·(1+scale)+shift`` from the mean music token (chunk order scale, shift).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .audio_layers import AudioLayerInfo, AudioSwitch


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class AudioProjModel(nn.Module):
    """``transformer.py:AudioProjModel``. ``[B, F, context, layers, dim]`` wav2vec windows
    (F = 49 video frames) → ``[B, 13, tokens, dim]``. The released sizes are hard-coded
    there (tokens 32, hidden 512); here they are arguments."""

    def __init__(self, context: int = 5, layers: int = 12, dim: int = 768, hidden: int = 512, tokens: int = 32):
        super().__init__()
        self.tokens, self.dim = tokens, dim
        self.proj1 = nn.Linear(context * layers * dim, hidden)
        self.proj2 = nn.Linear(hidden, hidden)
        self.proj3 = nn.Linear(hidden, tokens * dim)
        self.norm = nn.LayerNorm(dim)
        self.conv1 = nn.Conv1d(tokens * dim, tokens * dim, kernel_size=2, stride=2, padding=0)

    def _halve(self, x: torch.Tensor) -> torch.Tensor:
        # [B, C, F] → [B, C, 1 + (F-1)/2]: frame 0 passes through, the rest pair up (odd F),
        # as the released loop does; an even F is convolved whole.
        if x.shape[-1] % 2 == 1:
            first, rest = x[..., :1], x[..., 1:]
            if rest.shape[-1] > 0:
                rest = self.conv1(rest)
            return torch.cat([first, rest], dim=-1)
        return self.conv1(x)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        b, f = windows.shape[:2]
        x = windows.reshape(b * f, -1)
        x = torch.relu(self.proj1(x))
        x = torch.relu(self.proj2(x))
        x = self.proj3(x).reshape(b, f, self.tokens * self.dim)       # "(bz f) m c -> bz f (m c)"
        c = x.shape[-1]
        for _ in range(2):
            x = self._halve(x.permute(0, 2, 1))
            x = x.reshape(b, c, x.shape[-1]).permute(0, 2, 1)
        x = x.reshape(b, x.shape[1], self.tokens, self.dim)
        return self.norm(x)


def _standard_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``transformer_defaults.py:standard_attention`` without mask (scale the query first)."""
    scores = torch.matmul(q / math.sqrt(q.shape[-1]), k.transpose(-1, -2))
    return torch.matmul(F.softmax(scores, dim=-1), v)


class AudioSelfAttention(nn.Module):
    """``transformer.py:SelfAttention_Audio``: fused qkv (thirds), plain softmax attention,
    no RoPE, no qk-norm."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query_key_value = nn.Linear(dim, 3 * dim)
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (t.reshape(b, n, -1, d // self.heads).permute(0, 2, 1, 3)
                   for t in self.query_key_value(x).chunk(3, dim=-1))
        out = _standard_attention(q, k, v).permute(0, 2, 1, 3).reshape(b, n, d)
        return self.dense(out)


class AudioMLP(nn.Module):
    """``transformer.py:MLP_Audio``: Linear → tanh-GELU → Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(dim, hidden)
        self.dense_4h_to_h = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(_gelu_tanh(self.dense_h_to_4h(x)))


def _row0(x: torch.Tensor) -> torch.Tensor:
    # transformer.py:c_dim0_2_to_1 / modulate: the released code keeps batch row 0 of every
    # time modulation (fine under CFG, where all rows share t).
    return x[:1]


def _modulate_row0(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + _row0(scale).unsqueeze(1)) + _row0(shift).unsqueeze(1)


class AudioDualBlock(nn.Module):
    """``transformer.py:Audio_Dual_Block``. Streams are ``[B·13, tokens, dim]``; speaker 2
    (``speakers=2``) shares the vocal LayerNorm and modulation."""

    def __init__(self, dim: int, heads: int, time_embed_dim: int, mlp_dim: int, eps: float = 1e-5):
        super().__init__()
        self.vocal_layernorm = nn.LayerNorm(dim, eps=eps)
        self.accm_layernorm = nn.LayerNorm(dim, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(dim, eps=eps)
        self.adaLN_modulations = nn.Sequential(nn.SiLU(), nn.Linear(time_embed_dim, 12 * dim))
        self.attention = AudioSelfAttention(dim, heads)
        self.mlp = AudioMLP(dim, mlp_dim)

    def forward(self, vocal: torch.Tensor, vocal2: Optional[torch.Tensor], accm: torch.Tensor, emb: torch.Tensor):
        (v_shift_msa, v_scale_msa, v_gate_msa, v_shift_mlp, v_scale_mlp, v_gate_mlp,
         a_shift_msa, a_scale_msa, a_gate_msa, a_shift_mlp, a_scale_mlp, a_gate_mlp) = \
            self.adaLN_modulations(emb).chunk(12, dim=1)
        vocals = [vocal] if vocal2 is None else [vocal, vocal2]
        n = vocal.shape[1]
        inputs = [_modulate_row0(self.vocal_layernorm(v), v_shift_msa, v_scale_msa) for v in vocals]
        inputs.append(_modulate_row0(self.accm_layernorm(accm), a_shift_msa, a_scale_msa))
        attn = self.attention(torch.cat(inputs, dim=1))
        vocals = [v + _row0(v_gate_msa) * attn[:, i * n:(i + 1) * n] for i, v in enumerate(vocals)]
        accm = accm + _row0(a_gate_msa) * attn[:, len(vocals) * n:]

        inputs = [_modulate_row0(self.post_attention_layernorm(v), v_shift_mlp, v_scale_mlp) for v in vocals]
        inputs.append(_modulate_row0(self.post_attention_layernorm(accm), a_shift_mlp, a_scale_mlp))
        mlp = self.mlp(torch.cat(inputs, dim=1))
        vocals = [v + _row0(v_gate_mlp) * mlp[:, i * n:(i + 1) * n] for i, v in enumerate(vocals)]
        accm = accm + _row0(a_gate_mlp) * mlp[:, len(vocals) * n:]
        return vocals[0], (vocals[1] if vocal2 is not None else None), accm


class AudioCombineModel(nn.Module):
    """``transformer.py:AudioCombineModel``: the dual blocks, output ``[speech|(spk2)|effects]``
    along the token axis."""

    def __init__(self, blocks: int, dim: int, heads: int, time_embed_dim: int, mlp_dim: int):
        super().__init__()
        self.dual_blocks = nn.ModuleList(AudioDualBlock(dim, heads, time_embed_dim, mlp_dim) for _ in range(blocks))

    def forward(self, vocal, vocal2, accm, emb):
        for block in self.dual_blocks:
            vocal, vocal2, accm = block(vocal, vocal2, accm, emb)
        return torch.cat([vocal, accm] if vocal2 is None else [vocal, vocal2, accm], dim=1)


class AudioCrossAttention(nn.Module):
    """``transformer.py:CrossAttention`` as MTV calls it: ``query`` on video tokens, fused
    ``key_value`` (K = first half) on audio tokens, the backbone layer's q/k LayerNorms,
    RoPE on the query only, SDPA, ``dense``. An audio layer (``audio_layer_info`` /
    ``audio_switch``)."""

    def __init__(self, hidden: int, heads: int, audio_dim: int, info: AudioLayerInfo):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key_value = nn.Linear(audio_dim, 2 * hidden)
        self.dense = nn.Linear(hidden, hidden)
        self.audio_layer_info = info
        self.audio_switch = AudioSwitch()

    def forward(self, x: torch.Tensor, audio: torch.Tensor, norm_q: nn.Module, norm_k: nn.Module,
                query_rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        from diffusers.models.embeddings import apply_rotary_emb

        bt, n, d = x.shape
        head = d // self.heads
        q = self.query(x).reshape(bt, n, -1, head).permute(0, 2, 1, 3)
        k, v = (t.reshape(bt, audio.shape[1], -1, head).permute(0, 2, 1, 3)
                for t in self.key_value(audio).chunk(2, dim=-1))
        q, k = norm_q(q), norm_k(k)
        q = apply_rotary_emb(q, query_rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.dense(out.permute(0, 2, 1, 3).reshape(bt, n, d))


class MTVLayerAudio(nn.Module):
    """The audio modules of one backbone layer (``transformer.py:BaseTransformerLayer``,
    ``add_audio_module``) and their step (``dit_video_concat.py:AdaLNMixin.layer_forward``,
    between the attention residual and ``post_attention_layernorm``)."""

    def __init__(self, layer: int, hidden: int, heads: int, audio_dim: int, speakers: int, eps: float):
        super().__init__()
        per_layer = speakers + 1
        first = layer * per_layer
        self.audio_input_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.audio_attn = AudioCrossAttention(hidden, heads, audio_dim, AudioLayerInfo(first, "transformer", layer, 0))
        if speakers == 2:
            self.audio_input_layernorm_second = nn.LayerNorm(hidden, eps=eps)
            self.audio_attn_second = AudioCrossAttention(hidden, heads, audio_dim,
                                                         AudioLayerInfo(first + 1, "transformer", layer, 0))
        self.audio_input_layernorm_effect = nn.LayerNorm(hidden, eps=eps)
        self.audio_attn_effect = AudioCrossAttention(hidden, heads, audio_dim,
                                                     AudioLayerInfo(first + per_layer - 1, "transformer", layer, 0))
        self.audio_music_adaLn = nn.Linear(audio_dim, 2 * hidden)
        nn.init.zeros_(self.audio_music_adaLn.weight)   # zero_module in the reference
        nn.init.zeros_(self.audio_music_adaLn.bias)
        self.speakers = speakers

    def forward(self, video: torch.Tensor, frames: int, streams: list[torch.Tensor], music_mean: torch.Tensor,
                norm_q: nn.Module, norm_k: nn.Module, query_rope) -> torch.Tensor:
        """``video`` [B, T·S, D]; ``streams`` [speech, (speech 2,) effects] each [B·T, n, audio_dim];
        ``music_mean`` [B, audio_dim]. Returns the new video hidden states."""
        b, ts, d = video.shape
        pairs = [(self.audio_input_layernorm, self.audio_attn)]
        if self.speakers == 2:
            pairs.append((self.audio_input_layernorm_second, self.audio_attn_second))
        pairs.append((self.audio_input_layernorm_effect, self.audio_attn_effect))
        # every cross-attention reads the same pre-audio hidden states; "b (t n) d -> (b t) n d"
        inputs = [norm(video).reshape(b * frames, ts // frames, d) for norm, _ in pairs]
        x = video.reshape(b * frames, ts // frames, d)
        for (_, attn), inp, stream in zip(pairs, inputs, streams):
            x = attn.audio_switch.apply(
                x, lambda attn=attn, inp=inp, stream=stream: attn(inp, stream, norm_q, norm_k, query_rope))
        x = x.reshape(b, ts, d)
        scale, shift = self.audio_music_adaLn(music_mean).unsqueeze(1).chunk(2, dim=2)
        return x * (1 + scale) + shift


class MTVAudio(nn.Module):
    """Every MTV audio module; state-dict keys = SAT keys minus
    ``model.diffusion_model.transformer.`` (``layers.{i}.audio_attn.query.weight``,
    ``audio_proj_effect.conv1.weight``, ``audio_combine.dual_blocks.{j}.…``,
    ``audio_vocal_embedding``)."""

    def __init__(self, config):
        super().__init__()
        c = config
        hidden = c.num_heads * c.head_dim
        self.speakers = c.speakers
        self.layers = nn.ModuleList(MTVLayerAudio(i, hidden, c.num_heads, c.audio_dim, c.speakers, c.norm_eps)
                                    for i in range(c.num_layers))
        if c.speakers == 2:
            self.audio_vocal_embedding = nn.Parameter(torch.zeros(c.audio_dim))
            self.audio_vocal_embedding_1 = nn.Parameter(torch.zeros(c.audio_dim))
        proj = dict(context=c.audio_context, layers=c.audio_layers_per_frame, dim=c.audio_dim,
                    hidden=c.audio_proj_hidden, tokens=c.audio_tokens)
        self.audio_proj = AudioProjModel(**proj)
        self.audio_proj_effect = AudioProjModel(**proj)
        self.audio_proj_music = AudioProjModel(**proj)
        self.audio_combine = AudioCombineModel(c.dual_blocks, c.audio_dim, c.dual_heads, c.time_embed_dim,
                                               c.dual_mlp_dim)

    #: the projection models (``transformer.py:AudioProjModel``), 3.73 B of the 11.59 B parameters
    PROJECTIONS = ("audio_proj", "audio_proj_effect", "audio_proj_music")

    def projection(self, name: str) -> AudioProjModel:
        """A projection model, whether registered or held outside the module tree
        (:meth:`hold_projections_outside`)."""
        held = self.__dict__.get("_held_projections")
        return held[name] if held else getattr(self, name)

    @property
    def projections_held_outside(self) -> bool:
        return bool(self.__dict__.get("_held_projections"))

    def hold_projections_outside(self) -> None:
        """Take the three projection models out of the module tree, so that ``.to(device)``,
        ``parameters()``, ``state_dict()`` and ComfyUI's model management no longer see them:
        they stay where they are (the CPU) and :meth:`project` moves each to the features'
        device only while it runs. Only worth it when the tokens are computed once per window
        (``samplers/mtv.py:MTVBranchModel``), not at every step."""
        if self.projections_held_outside:
            return
        held = {name: self._modules.pop(name) for name in self.PROJECTIONS}
        object.__setattr__(self, "_held_projections", held)

    def restore_projections(self) -> None:
        held = self.__dict__.pop("_held_projections", None)
        for name, module in (held or {}).items():
            self._modules[name] = module

    def _project(self, name: str, windows: torch.Tensor) -> torch.Tensor:
        # one sample at a time: the tokens of a batch row never depend on the other rows' count
        # (a GEMM's blocking can change with the row count), so tokens projected once per branch
        # are bit-equal to tokens projected inside a batched CFG call
        model = self.projection(name)
        home = next(model.parameters()).device
        borrowed = home != windows.device
        if borrowed:   # held on the CPU: on the features' device only for this call
            model.to(windows.device)
        try:
            return torch.cat([model(windows[i:i + 1]) for i in range(windows.shape[0])])
        finally:
            if borrowed:
                model.to(home)

    def project(self, speech, effects, music, speech2=None) -> "MTVAudioTokens":
        """The timestep-independent part of ``transformer.py:BaseTransformer.forward``: the three
        projections (+ the speaker embeddings of the two-speaker variant). ``[B, 49, 5, 12, 768]``
        per stream → tokens ``[B, 13, tokens, dim]``."""
        vocal = self._project("audio_proj", speech)
        vocal2 = self._project("audio_proj", speech2) if self.speakers == 2 else None
        accm = self._project("audio_proj_effect", effects)
        music = self._project("audio_proj_music", music)
        if self.speakers == 2:
            vocal = vocal + self.audio_vocal_embedding
            vocal2 = vocal2 + self.audio_vocal_embedding_1
        return MTVAudioTokens(vocal, accm, music, vocal2)

    def combine(self, tokens: "MTVAudioTokens", emb: torch.Tensor):
        """The time-modulated part: the dual blocks on (speech, effects) tokens. Returns the
        per-layer cross-attention streams ``[speech, (speech 2,) effects]`` (each
        ``[B·T, tokens, dim]``) and the mean music token ``[B, dim]`` the music modulation uses."""
        vocal, accm, music, vocal2 = tokens.speech, tokens.effects, tokens.music, tokens.speech2
        b, f = vocal.shape[:2]
        flat = [t.reshape(b * f, *t.shape[2:]) for t in (vocal, accm, music)]
        vocal2 = vocal2.reshape(b * f, *vocal2.shape[2:]) if vocal2 is not None else None
        combined = self.audio_combine(flat[0], vocal2, flat[1], emb)
        streams = list(combined.chunk(self.speakers + 1, dim=1))
        # "(b t) n d -> b (t n) d" then mean over all music tokens of the window
        music_mean = flat[2].reshape(b, -1, flat[2].shape[-1]).mean(dim=1)
        return streams, music_mean

    def encode(self, speech, effects, music, speech2, emb: torch.Tensor):
        """``transformer.py:BaseTransformer.forward`` (audio part): :meth:`project` then :meth:`combine`."""
        return self.combine(self.project(speech, effects, music, speech2), emb)


@dataclass(frozen=True)
class MTVAudioTokens:
    """The projected audio tokens of a window, ``[B, 13, tokens, dim]`` per stream (``speech2``
    only for the two-speaker variant): what :meth:`MTVAudio.project` makes and
    ``MTVTransformer.forward(..., audio_tokens=)`` takes instead of the wav2vec features. They
    depend on the features only, not on the timestep."""

    speech: torch.Tensor
    effects: torch.Tensor
    music: torch.Tensor
    speech2: Optional[torch.Tensor] = None

    def as_dict(self) -> dict:
        out = {"speech": self.speech, "effects": self.effects, "music": self.music}
        if self.speech2 is not None:
            out["speech2"] = self.speech2
        return out
