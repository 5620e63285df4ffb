"""MTV's encoders: the wav2vec2 audio front end, T5 prompt encoding and the CogVideoX VAE wrapper.

Everything here wraps diffusers / transformers classes; what is MTV's own is the order of
operations and the numbers the released code (``suimuc/MTV_Framework`` @ 5704fe6) uses:

* audio: ``mtv/sgm/utils/audio_processor.py:AudioProcessor.preprocess`` (normalise, pad, run the
  ``mtv/sgm/models/wav2vec.py:Wav2VecModel`` order — CNN → interpolate to 24 fps → projection →
  encoder — keep all hidden states) and ``mtv/sample_video.py:process_audio_emb`` (±2 frames);
* text: ``mtv/sgm/modules/encoders/modules.py:FrozenT5Embedder`` (226 tokens, padded, no mask) with
  ``force_uc_zero_embeddings=["txt"]`` (the unconditional text is a zero tensor);
* VAE: ``scale_factor`` 0.7 (``configs/cogvideox_5b.yaml``), the posterior *sample* on encode
  (``vae_modules/regularizers.py:DiagonalGaussianRegularizer(sample=True)``) and the chunked
  decode with a carried convolution cache (``sample_video.py`` decode loop).

File loading lives in ``loaders/mtv_encoders.py``; this module only takes built modules.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------
# Audio: wav2vec2 in MTV's order
# --------------------------------------------------------------------------------------

WAV2VEC_SAMPLE_RATE = 16000
MTV_FPS = 24
MTV_WINDOW_FRAMES = 49  # the video frames of one window (13 latent frames); padding makes N = 1 + 48·k
MTV_AUDIO_CONTEXT = 2  # ±2 feature frames per video frame → 5
NORMALIZE_EPS = 1e-7  # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm


def normalize_waveform(waveform: torch.Tensor) -> torch.Tensor:
    """Zero mean / unit variance as ``transformers``' ``Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm``
    does it: in numpy float32 over the whole (unpadded) file, ``(x − mean) / sqrt(var + 1e-7)``.

    Done in numpy on purpose: numpy's pairwise float32 sums are what the released features
    were computed with, so this matches bit for bit (a float64 mean differs by ~1e-7)."""
    x = waveform.detach().to("cpu", torch.float32).numpy()
    normed = (x - x.mean()) / np.sqrt(x.var() + NORMALIZE_EPS)
    return torch.from_numpy(np.ascontiguousarray(normed, dtype=np.float32)).to(waveform.device)


def audio_context(features: torch.Tensor, context: int = MTV_AUDIO_CONTEXT) -> torch.Tensor:
    """``[N, ...] → [N, 2·context+1, ...]``: frame i gets frames i−context … i+context, indices clamped
    to the ends. ``mtv/sample_video.py:process_audio_emb`` (a Python loop there; one gather here)."""
    n = features.shape[0]
    offsets = torch.arange(-context, context + 1, device=features.device)
    index = (torch.arange(n, device=features.device)[:, None] + offsets[None]).clamp_(0, n - 1)
    return features[index]


class MTVAudioEncoder(nn.Module):
    """wav2vec2 features the way MTV computes them.

    ``mtv/sgm/models/wav2vec.py:Wav2VecModel.forward``: the CNN feature encoder (≈50 Hz) →
    ``F.interpolate(mode="linear", align_corners=True)`` to the **video** frame count → the feature
    projection → the transformer encoder; ``hidden_states[1:]`` (every layer's output, not the
    embedding) are kept (``audio_processor.py:AudioProcessor.preprocess``). Interpolating *before*
    the encoder is what makes MTV's features differ from running wav2vec2 and resampling after it
    (ComfyUI's WAN-S2V does the latter).

    ``normalize`` is the feature extractor's ``do_normalize`` (``preprocessor_config.json`` of the
    model folder; True for ``facebook/wav2vec2-base-960h``).
    """

    def __init__(self, wav2vec, normalize: bool = True):
        super().__init__()
        if getattr(wav2vec.config, "do_stable_layer_norm", False):
            raise ValueError("MTVAudioEncoder: wav2vec2 models with do_stable_layer_norm (the 'large' layout) "
                             "are not what MTV uses (wav2vec2-base-960h); their hidden states are ordered differently")
        self.wav2vec = wav2vec.eval()
        self.normalize = bool(normalize)

    @property
    def hidden_size(self) -> int:
        return int(self.wav2vec.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.wav2vec.config.num_hidden_layers)

    @staticmethod
    def frame_count(samples: int, sample_rate: int = WAV2VEC_SAMPLE_RATE, fps: int = MTV_FPS,
                    clip_length: int = MTV_WINDOW_FRAMES) -> tuple[int, int]:
        """``(seq_len, N)``: the video frames the audio covers, ``ceil(samples / rate · fps)``, and the padded
        count ``N = 1 + (clip_length − 1)·k`` (``AudioProcessor.preprocess``; the same float arithmetic)."""
        seq_len = math.ceil(samples / sample_rate * fps)
        period = clip_length - 1
        if period > 0 and (seq_len - 1) % period != 0:
            return seq_len, seq_len + period - (seq_len - 1) % period
        return seq_len, seq_len

    @staticmethod
    def pad_samples(samples: int, sample_rate: int = WAV2VEC_SAMPLE_RATE, fps: int = MTV_FPS,
                    clip_length: int = MTV_WINDOW_FRAMES) -> int:
        """Zeros appended to the normalised waveform: ``pad_frames · (rate // fps)`` = ``pad_frames · 666``
        at 16 kHz / 24 fps (``AudioProcessor.preprocess`` — 666, not 666.67: the padded audio is a little
        short of N frames, and the interpolation stretches it to N anyway)."""
        seq_len, n = MTVAudioEncoder.frame_count(samples, sample_rate, fps, clip_length)
        return int((n - seq_len) * (sample_rate // fps))

    @torch.no_grad()
    def hidden_states(self, waveform_16k: torch.Tensor, fps: int = MTV_FPS,
                      clip_length: int = MTV_WINDOW_FRAMES) -> torch.Tensor:
        """``[samples] → [N, layers, hidden]`` (before the ±2 context): the whole file in one pass."""
        if waveform_16k.dim() != 1:
            raise ValueError(f"waveform_16k must be 1-D mono samples at 16 kHz, got shape {tuple(waveform_16k.shape)}")
        samples = int(waveform_16k.shape[0])
        if samples < 400:  # the CNN's receptive field; shorter input gives no feature frame at all
            raise ValueError(f"the audio is too short for wav2vec2: {samples} samples (at least 400 at 16 kHz)")
        _, n = self.frame_count(samples, WAV2VEC_SAMPLE_RATE, fps, clip_length)
        param = next(self.wav2vec.parameters())
        x = normalize_waveform(waveform_16k) if self.normalize else waveform_16k.to(torch.float32)
        x = F.pad(x, (0, self.pad_samples(samples, WAV2VEC_SAMPLE_RATE, fps, clip_length)))
        x = x.to(device=param.device, dtype=param.dtype)[None]
        w = self.wav2vec
        feats = w.feature_extractor(x)  # [1, 512, ~50 Hz]
        feats = F.interpolate(feats, size=n, mode="linear", align_corners=True).transpose(1, 2)
        hidden, _ = w.feature_projection(feats)
        enc = w.encoder
        hidden = hidden + enc.pos_conv_embed(hidden)
        hidden = enc.dropout(enc.layer_norm(hidden))
        per_layer = []
        for layer in enc.layers:
            out = layer(hidden, attention_mask=None)
            hidden = out[0] if isinstance(out, tuple) else out
            per_layer.append(hidden)
        return torch.stack(per_layer, dim=2)[0]  # [N, layers, hidden]

    def features(self, waveform_16k: torch.Tensor, fps: int = MTV_FPS,
                 clip_length: int = MTV_WINDOW_FRAMES) -> torch.Tensor:
        """``[samples] (mono, 16 kHz) → [N, 5, layers, hidden]`` (``[N, 5, 12, 768]`` for wav2vec2-base):
        the features of the whole file with each frame's ±2-frame context; windows slice this."""
        return audio_context(self.hidden_states(waveform_16k, fps, clip_length))

    def forward(self, waveform_16k: torch.Tensor) -> torch.Tensor:
        return self.features(waveform_16k)


def to_wav2vec_input(waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """``[C, T]`` or ``[T]`` samples at any rate → mono 16 kHz ``[T']`` float32.

    The released code reads files with ``librosa.load(path, sr=16000)`` (mono = channel mean, then
    soxr "HQ" resampling); this uses the channel mean and ``core/audio.py:resample`` (Kaiser sinc, no
    torchaudio). The two resamplers differ slightly; docs/mtv_encoders.md gives the measured difference."""
    from ..core.audio import resample

    wav = waveform.to(torch.float32)
    if wav.dim() == 2:
        wav = wav.mean(dim=0)
    elif wav.dim() != 1:
        raise ValueError(f"waveform must be [channels, samples] or [samples], got shape {tuple(waveform.shape)}")
    return resample(wav, int(sample_rate), WAV2VEC_SAMPLE_RATE)


# --------------------------------------------------------------------------------------
# Text: T5 v1.1 XXL, 226 tokens, no mask
# --------------------------------------------------------------------------------------

MTV_TEXT_TOKENS = 226


@torch.no_grad()
def encode_prompt(t5, tokenizer, prompts: Sequence[str], max_length: int = MTV_TEXT_TOKENS) -> torch.Tensor:
    """``[B, 226, d_model]`` T5 encodings of ``prompts``.

    ``mtv/sgm/modules/encoders/modules.py:FrozenT5Embedder.forward``: truncated and padded to
    ``max_length`` tokens (``padding="max_length"``), and the encoder runs **without** an attention
    mask, so the padding tokens attend and are attended to (this is what the weights were trained
    with); the output is ``last_hidden_state`` in the encoder's dtype."""
    if isinstance(prompts, str):
        prompts = [prompts]
    batch = tokenizer(list(prompts), truncation=True, max_length=max_length, return_length=True,
                      return_overflowing_tokens=False, padding="max_length", return_tensors="pt")
    param = next(t5.parameters())
    return t5(input_ids=batch["input_ids"].to(param.device)).last_hidden_state


def uncond_prompt_embedding(cond: torch.Tensor) -> torch.Tensor:
    """The unconditional text: zeros shaped like the conditional one (``force_uc_zero_embeddings=["txt"]``
    in ``sample_video.py``), not T5("")."""
    return torch.zeros_like(cond)


# --------------------------------------------------------------------------------------
# VAE: CogVideoX 3D VAE, scale 0.7, posterior sample, SAT's decode chunks
# --------------------------------------------------------------------------------------

MTV_VAE_SCALE = 0.7
POSTERIOR_LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution (SAT and diffusers alike)


def decode_chunks(latent_frames: int, frames_per_chunk: int = 2) -> list[tuple[int, int]]:
    """Latent-frame ranges decoded one after another with the carried cache.

    ``sample_video.py`` decodes 13 latents as [0:3], [3:5], …, [11:13] (the first chunk takes the odd
    frame); diffusers' ``AutoencoderKLCogVideoX._decode`` computes the same ranges from
    ``num_latent_frames_batch_size = 2`` (tested). For an even count SAT's loop would drop the last
    frame; this follows diffusers there ([0:2], [2:4], …)."""
    n = int(latent_frames)
    if n < 1:
        raise ValueError(f"latent_frames must be ≥ 1, got {n}")
    batches = max(n // frames_per_chunk, 1)
    rest = n % frames_per_chunk
    return [(frames_per_chunk * i + (0 if i == 0 else rest), min(frames_per_chunk * (i + 1) + rest, n))
            for i in range(batches)]


class MTVVae:
    """diffusers ``AutoencoderKLCogVideoX`` with MTV's latent conventions.

    Latents are ``[B, T, 16, h, w]`` (frames second, as the transformer sees them) and scaled by 0.7;
    frames are ``[B, F, 3, H, W]`` in [-1, 1] with F = 1 + 4·(T − 1).
    ``tiling=True`` uses diffusers' spatially tiled decode (``AutoencoderKLCogVideoX.tiled_decode``:
    overlapping tiles blended, each tile still decoded in the same frame chunks) — less memory, not
    bit-equal to the plain decode near tile seams.
    """

    def __init__(self, vae, scale: float = MTV_VAE_SCALE, tiling: bool = False):
        self.vae = vae
        self.scale = float(scale)
        self.tiling = bool(tiling)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def posterior(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``frames [B, F, 3, H, W]`` in [-1, 1] → (mean, std), each ``[B, T, 16, h, w]``, unscaled."""
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(f"frames must be [B, F, 3, H, W], got shape {tuple(frames.shape)}")
        x = frames.permute(0, 2, 1, 3, 4).to(device=self.device, dtype=self.dtype)
        moments = self.vae._encode(x)  # diffusers' frame batching (8 + remainder) with the carried cache
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(*POSTERIOR_LOGVAR_RANGE))
        return mean.permute(0, 2, 1, 3, 4), std.permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor, noise) -> torch.Tensor:
        """Scaled latents of a posterior **sample**: ``0.7 · (mean + std · ε)``.

        ``diffusion_video.py:SATVideoDiffusionEngine.encode_first_stage`` samples the posterior
        (``DiagonalGaussianRegularizer(sample=True)``), it does not take its mean. ``noise`` is a core
        noise source (ε from its ``conditioning`` draw — the clean frames are conditioning: with
        ``InjectedNoise`` the given re-noise draws of the solver are not consumed; with ``SeededNoise`` it is
        one more draw from the run's generator, in run order), an ε tensor shaped like the latents, or
        None for the posterior mean."""
        mean, std = self.posterior(frames)
        if noise is None:
            z = mean
        else:
            eps = noise if isinstance(noise, torch.Tensor) else noise.conditioning(tuple(mean.shape))
            if tuple(eps.shape) != tuple(mean.shape):
                raise ValueError(f"posterior noise of shape {tuple(eps.shape)} does not fit the latents {tuple(mean.shape)}")
            z = mean + std * eps.to(device=mean.device, dtype=mean.dtype)
        return self.scale * z

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``latents [B, T, 16, h, w]`` (scaled) → ``frames [B, F, 3, H, W]``, the decoder's raw output
        (≈[-1, 1]; the caller clamps, as ``sample_video.py`` does after decoding).

        Chunks of :func:`decode_chunks` with the convolution cache carried from chunk to chunk: the
        released decode loop (``first_stage_model.decode(latent[:, :, a:b], clear_fake_cp_cache=…)``)
        and diffusers' ``_decode`` alike; peak memory is one chunk's activations."""
        if latents.dim() != 5:
            raise ValueError(f"latents must be [B, T, C, h, w], got shape {tuple(latents.shape)}")
        z = (latents / self.scale).permute(0, 2, 1, 3, 4).to(device=self.device, dtype=self.dtype)
        vae = self.vae
        if self.tiling:  # tile sizes: the VAE's (set with vae.enable_tiling(...)); defaults = half the frame
            return vae.tiled_decode(z, return_dict=False)[0].permute(0, 2, 1, 3, 4)
        cache = None
        parts = []
        for start, end in decode_chunks(z.shape[2], vae.num_latent_frames_batch_size):
            chunk = z[:, :, start:end]
            if vae.post_quant_conv is not None:
                chunk = vae.post_quant_conv(chunk)
            chunk, cache = vae.decoder(chunk, conv_cache=cache)
            parts.append(chunk)
        return torch.cat(parts, dim=2).permute(0, 2, 1, 3, 4)


__all__ = [
    "MTVAudioEncoder", "MTVVae", "encode_prompt", "uncond_prompt_embedding", "audio_context", "normalize_waveform",
    "to_wav2vec_input", "decode_chunks", "MTV_VAE_SCALE", "MTV_TEXT_TOKENS", "WAV2VEC_SAMPLE_RATE", "MTV_FPS",
]
