"""KeyVID's conditioning-token plumbing, reproduced exactly as released (pure functions).

From ``lvdm/models/ddpm3d.py:LatentVisualAudioDiffusion`` (``_auto_split``,
``split_audio``, ``select_keyframes``, ``expand_keyframes``) and the two inference
pipelines (``scripts/evaluation/asva/pipeline_audio_cond_animation_keyframe_add_idx.py:
image_guided_synthesis`` for the generator, ``…_freenoise_inpainting_new.py:
image_guided_synthesis`` for the interpolator).

Audio. The ImageBind trunk output (diffusion configuration) is ``[B, 1 + 12·48, 768]``:
a CLS token, then 12 frequency rows × 48 time columns, frequency-major.

1. :func:`split_audio` gives each of the 48 frames of the 24-fps grid the CLS token plus
   the 12 frequency tokens of its time column: ``[B, 48, 13, 768]``.
2. The release then flattens that to ``48·13 = 624`` tokens and **regroups them in
   chunks of 12** (``num_queries`` of the unused audio resampler): 52 chunks
   (:func:`regroup_audio`). Chunk ``k`` holds flat tokens ``12k … 12k+11``, which start
   in frame ``⌊12k/13⌋`` and usually straddle two frames (:func:`chunk_start_frame`):
   chunk 47 starts at frame 43, so the last keyframes see audio from a few frames
   *earlier* than their own. Training did the same, so the weights expect it; this module
   reproduces it and does not "fix" it.
3. Generator: :func:`select_keyframes` picks chunk ``frame_idx[b, i]`` for each keyframe
   (chunk index = 24-fps frame index) → ``[B, 12, 12, 768]``
   (:func:`generator_audio_tokens`).
4. Interpolator: :func:`expand_keyframes` resamples the 52 chunks to 48 along the chunk
   axis, bilinear with ``align_corners=False`` (only the chunk axis changes) →
   ``[B, 48, 12, 768]`` (:func:`interpolator_audio_tokens`).

Image. The Resampler gives ``[B, 48·16, 1024]`` (16 tokens per 24-fps frame). The
generator keeps its keyframes' groups with :func:`select_keyframes`; the interpolator
keeps all 48 (``expand_keyframes`` to 48 is a no-op).

Context. The UNet takes ``[text (77 tokens); image (16 per frame)]`` = ``77 + 16·T``
tokens (:func:`build_context`); any other length raises in the UNet.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

TEXT_TOKENS = 77
IMAGE_TOKENS_PER_FRAME = 16
AUDIO_FREQ_ROWS = 12          # ImageBind audio: 128 mel bins, kernel 16, stride 10 -> 12 rows
AUDIO_CHUNK = 12              # audio_proj_stage_config.params.num_queries
VIDEO_LENGTH = 48             # audio_proj_stage_config.params.video_length (24-fps frames)


def auto_split_mask(n: int, n_chunk: int) -> torch.Tensor:
    """``ddpm3d.py:_auto_split``: ``[n_chunk, n]`` bool mask; chunk ``i`` covers
    ``ceil(n/n_chunk)`` consecutive columns starting at ``round(linspace(0, n-size,
    n_chunk))[i]`` (numpy rounding, half to even)."""
    size = int(math.ceil(n / n_chunk))
    starts = np.round(np.linspace(0, n - size, n_chunk, endpoint=True)).astype(np.int32)
    mask = torch.zeros(n_chunk, n, dtype=torch.bool)
    for i, s in enumerate(starts):
        mask[i, s:s + size] = True
    return mask


def split_audio(tokens: torch.Tensor, n_segment: int = VIDEO_LENGTH, freq_rows: int = AUDIO_FREQ_ROWS) -> torch.Tensor:
    """``ddpm3d.py:split_audio``: ImageBind trunk output ``[B, 1 + F·T, D]`` (CLS, then
    ``F`` frequency rows × ``T`` time columns, frequency-major) → ``[B, n_segment,
    1 + F·c, D]``: per segment the CLS token followed by, for each frequency row in turn,
    the ``c = ceil(T/n_segment)`` time columns of that segment. With the released
    ``T = n_segment = 48`` that is CLS + the 12 tokens of one time column: 13 tokens."""
    b, n, d = tokens.shape
    t = (n - 1) // freq_rows
    if 1 + freq_rows * t != n:
        raise ValueError(f"audio tokens: expected 1 + {freq_rows}·T rows, got {n}")
    cols = auto_split_mask(t, n_segment)                                   # [s, t]
    keep = torch.cat([torch.ones(n_segment, 1, dtype=torch.bool),
                      cols[:, None, :].expand(n_segment, freq_rows, t).reshape(n_segment, -1)], dim=1)  # [s, 1+F·t]
    per_segment = int(keep[0].sum())
    index = keep.nonzero()[:, 1].view(n_segment, per_segment).to(tokens.device)  # row order as masked_select
    return tokens[:, index]                                                # [B, s, per_segment, D]


def regroup_audio(per_frame: torch.Tensor, chunk: int = AUDIO_CHUNK) -> torch.Tensor:
    """The release's ``rearrange('b t l c -> b (t l) c')`` followed by
    ``rearrange('b (t q) c -> b t q c', q=12)``: ``[B, 48, 13, D]`` → ``[B, 52, 12, D]``.
    Chunks do **not** line up with frames (see :func:`chunk_start_frame`)."""
    b, t, l, d = per_frame.shape
    if (t * l) % chunk:
        raise ValueError(f"{t}·{l} audio tokens do not split into chunks of {chunk}")
    return per_frame.reshape(b, t * l // chunk, chunk, d)


def chunk_start_frame(k, tokens_per_frame: int = 1 + AUDIO_FREQ_ROWS, chunk: int = AUDIO_CHUNK):
    """Frame in which regrouped chunk ``k`` starts: ``⌊chunk·k / tokens_per_frame⌋``
    (``⌊12k/13⌋`` as released; chunk 47 starts in frame 43). Works on ints and tensors."""
    return (chunk * k) // tokens_per_frame


def select_keyframes(emb: torch.Tensor, frame_idx: torch.Tensor, num_queries: int) -> torch.Tensor:
    """``ddpm3d.py:select_keyframes``: ``[B, G·q, C]`` viewed as ``G`` groups of
    ``q = num_queries`` rows; keep groups ``frame_idx[b]`` (``take_along_dim`` on the
    group axis) → ``[B, K·q, C]``."""
    b, l, c = emb.shape
    groups = emb.reshape(b, l // num_queries, num_queries, c)
    idx = frame_idx.long().to(emb.device).view(b, -1, 1, 1).expand(-1, -1, num_queries, c)
    return torch.take_along_dim(groups, idx, dim=1).reshape(b, -1, c)


def expand_keyframes(emb: torch.Tensor, target_len: int, num_queries: int) -> torch.Tensor:
    """``ddpm3d.py:expand_keyframes``: ``[B, G·q, C]`` (``G`` groups of ``q`` rows) →
    ``[B, target_len·q, C]`` by ``F.interpolate(mode="bilinear")`` (``align_corners``
    False) over a ``[B, q, C, G]`` view to size ``(C, target_len)``; the C axis keeps its
    size, so this is linear interpolation along the group axis. No-op when
    ``G == target_len``."""
    b, l, c = emb.shape
    g = emb.reshape(b, l // num_queries, num_queries, c).permute(0, 2, 3, 1)   # b q c t
    if g.shape[3] == target_len:
        return g.permute(0, 3, 1, 2).reshape(b, -1, c)
    g = F.interpolate(g, size=(c, target_len), mode="bilinear")
    return g.permute(0, 3, 1, 2).reshape(b, -1, c)


def generator_audio_tokens(trunk_out: torch.Tensor, frame_idx: torch.Tensor,
                           video_length: int = VIDEO_LENGTH, chunk: int = AUDIO_CHUNK) -> torch.Tensor:
    """Keyframe generator's ``c_audio`` (``…_keyframe_add_idx.py:image_guided_synthesis``,
    ``select_keyframe`` True): split into 48 frames, regroup into chunks of 12, keep chunk
    ``frame_idx`` → ``[B, K, 12, D]``."""
    flat = split_audio(trunk_out, video_length)
    b, t, l, d = flat.shape
    sel = select_keyframes(flat.reshape(b, t * l, d), frame_idx, chunk)
    return sel.reshape(b, -1, chunk, d)


def interpolator_audio_tokens(trunk_out: torch.Tensor, target_len: int = VIDEO_LENGTH,
                              video_length: int = VIDEO_LENGTH, chunk: int = AUDIO_CHUNK) -> torch.Tensor:
    """Interpolator's ``c_audio`` (``…_freenoise_inpainting_new.py:image_guided_synthesis``,
    ``select_keyframe`` False): split into 48 frames, regroup into 52 chunks of 12,
    resample the chunk axis 52 → ``target_len`` (48) → ``[B, 48, 12, D]``."""
    flat = split_audio(trunk_out, video_length)
    b, t, l, d = flat.shape
    out = expand_keyframes(flat.reshape(b, t * l, d), target_len, chunk)
    return out.reshape(b, target_len, chunk, d)


def generator_image_tokens(resampled: torch.Tensor, frame_idx: torch.Tensor,
                           num_queries: int = IMAGE_TOKENS_PER_FRAME) -> torch.Tensor:
    """Resampler output ``[B, 48·16, C]`` → the keyframes' groups ``[B, K·16, C]``."""
    return select_keyframes(resampled, frame_idx, num_queries)


def interpolator_image_tokens(resampled: torch.Tensor, target_len: int = VIDEO_LENGTH,
                              num_queries: int = IMAGE_TOKENS_PER_FRAME) -> torch.Tensor:
    """Resampler output for the interpolator: ``expand_keyframes`` to 48 (a no-op for the
    released 48-frame resampler)."""
    return expand_keyframes(resampled, target_len, num_queries)


def build_context(text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """``c_crossattn = cat([text [B, 77, C], image [B, 16·T, C]], dim=1)`` → ``[B, 77 + 16·T, C]``."""
    if text.shape[1] != TEXT_TOKENS:
        raise ValueError(f"text context must have {TEXT_TOKENS} tokens, got {text.shape[1]}")
    if image.shape[1] % IMAGE_TOKENS_PER_FRAME:
        raise ValueError(f"image context must have 16 tokens per frame, got {image.shape[1]} tokens")
    return torch.cat([text, image], dim=1)


def context_frames(context_len: int) -> int:
    """``T`` from a context length ``77 + 16·T`` (raises if it is not of that form)."""
    t, rem = divmod(context_len - TEXT_TOKENS, IMAGE_TOKENS_PER_FRAME)
    if rem or t < 1:
        raise ValueError(f"context length {context_len} is not 77 + 16·T")
    return t
