"""A weights-free speech / effects / music separator (the Demixer's ``dsp`` method).

It works on one STFT of the clip (masks from the channel-averaged power, applied to
every channel) and splits every time-frequency bin between the three stems with
power-1.5 soft masks that sum to one, built from three magnitude estimates:

1. **music = the stationary bed**: a low percentile (20th) over 5 s of time (a plain
   form of repetition-based background estimation, minimum statistics: what is
   always there). Everything above it ("excess") is speech or effects.
2. **effects = percussive excess**: a running median across ~400 Hz keeps what is
   broadband and short (Fitzgerald 2010), minus the bed, weighed by ``margin``; for
   stereo, plus the excess that is **off-centre** (dialogue is mixed to the centre,
   so energy whose left and right disagree is taken as effects).
3. **speech = excess with speech evidence**: in 100-4000 Hz, an envelope deeply
   modulated at the syllable rate (3-8 Hz) with most of its modulation energy at
   that rate (an isolated hit spreads its modulation over all rates), times, for
   stereo, the **centre cue**; plus, without evidence, a ``speech_floor`` share of the
   excess that is also steady over 0.1 s (voiced sound; the geometric mean of the
   excess and its 0.1-s running median, so short bursts are left to effects).

Tuned on the ``tune`` part of the real-audio evaluation set (``bench/demix_eval.py``;
the ``heldout`` part was not looked at while tuning); see docs/demix.md for numbers.

The speech and music stems are inverted from the masked STFT; the effects stem is
``input - speech - music``, so the three stems add back to the input to float
precision by construction. Running medians are Tukey ninthers (cheap and robust);
above ``detail_hz`` the masks are estimated on pooled bins (no speech cue there).

Limits (it separates by signal shape, not by meaning): music that changes faster than
the 5-s bed (solos, melodies, drums) leaks into speech and effects; consonants and
plosives go to effects; long steady effects (engines, hum, rain) become part of the
bed and go to music; reverb tails and ambiences are split between stems; mono and
multichannel input get no centre or side cue. Use a neural model where quality matters; the timing of
the effects stem (what the KeyframeLocalizer needs) is what this method is for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .stft import hann, istft, stft

STEMS = ("speech", "effects", "music")


@dataclass(frozen=True)
class DSPDemixConfig:
    window_seconds: float = 0.046        # STFT window (rounded to a power of two in samples)
    hop_fraction: float = 0.25
    harmonic_kernel_seconds: float = 0.1  # median over time
    percussive_kernel_hz: float = 400.0   # median over frequency
    stationary_kernel_seconds: float = 5.0  # long window over time: the music bed ...
    stationary_quantile: float = 0.2        # ... is a low percentile there (minimum statistics)
    margin: float = 0.5                   # weight of the percussive estimate against the others
    power: float = 1.5                    # soft-mask exponent (2: Wiener-like; 1.5 splits contested bins softer)
    speech_floor: float = 0.3             # share of the energy above the bed that speech claims without evidence
    side_weight: float = 1.0              # stereo: weight of off-centre energy above the bed as effects
    speech_band_hz: tuple = (100.0, 4000.0)
    syllable_band_hz: tuple = (3.0, 8.0)
    envelope_smoothing_hz: float = 150.0  # smooth envelopes across frequency (pitch jitter)
    modulation_window_seconds: float = 0.5
    depth_threshold: float = 0.2          # modulation depth (std / mean) where speech evidence is 1/2
    ratio_threshold: float = 0.25         # share of modulation energy in the syllable band at 1/2
    centre_cue: bool = True
    detail_hz: float = 8000.0             # full frequency resolution below this ...
    high_pool: int = 4                    # ... and bins pooled by this above it


DEFAULT_CONFIG = DSPDemixConfig()


def stft_size(sample_rate: int, config: DSPDemixConfig = DEFAULT_CONFIG) -> tuple[int, int]:
    """``(n_fft, hop)``: the window closest to ``window_seconds`` that is a power of two."""
    n_fft = 2 ** max(6, int(round(math.log2(config.window_seconds * sample_rate))))
    return n_fft, max(1, int(n_fft * config.hop_fraction))


def _rank_filter(x: torch.Tensor, k: int, dim: int, quantile: float = 0.5) -> torch.Tensor:
    """The ``quantile`` (0.5: median) over a centred window of ``k`` (odd) along ``dim``
    of a 2-D tensor, edges replicated."""
    if k <= 1:
        return x
    y = x if dim == 1 else x.transpose(0, 1)
    y = F.pad(y.unsqueeze(0), (k // 2, k // 2), mode="replicate")[0].unfold(1, k, 1)
    rank = min(k, max(1, int(round(quantile * (k - 1))) + 1))
    y = y.median(dim=-1).values if rank == k // 2 + 1 else y.kthvalue(rank, dim=-1).values
    return y if dim == 1 else y.transpose(0, 1).contiguous()


def _median3(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))


def _ninther_filter(x: torch.Tensor, span: int, dim: int) -> torch.Tensor:
    """Tukey's ninther (median of three medians of three) of nine samples spread evenly
    over a centred window of about ``span`` along ``dim`` of a 2-D tensor, edges
    replicated. A robust stand-in for a running median of that span at a fraction of
    its cost (16 element-wise min/max instead of a sort per bin)."""
    d = max(1, int(round((span - 1) / 8)))
    if span <= 2:
        return x
    y = x if dim == 1 else x.transpose(0, 1)
    n = y.shape[1]
    p = F.pad(y.unsqueeze(0), (4 * d, 4 * d), mode="replicate")[0]
    taps = [p[:, i * d: i * d + n] for i in range(9)]
    m = _median3(_median3(*taps[0:3]), _median3(*taps[3:6]), _median3(*taps[6:9]))
    return m if dim == 1 else m.transpose(0, 1)


def _odd(n: float) -> int:
    n = max(1, int(round(n)))
    return n if n % 2 else n + 1


def _bandpass_fir(frame_rate: float, low: float, high: float, seconds: float = 1.0) -> torch.Tensor:
    """A Hann-windowed sinc band-pass over envelope frames (zero gain at DC)."""
    n = _odd(seconds * frame_rate)
    t = (torch.arange(n, dtype=torch.float64) - n // 2) / frame_rate
    hi = min(high, 0.45 * frame_rate)
    lo = min(low, hi * 0.5)

    def lowpass(fc):
        return 2 * fc * torch.special.sinc(2 * fc * t)

    win = torch.hann_window(n + 2, periodic=False, dtype=torch.float64)[1:-1]
    h = (lowpass(hi) - lowpass(lo)) / frame_rate * win
    h = h - h.sum() * win / win.sum()  # exactly zero gain at DC: a steady envelope gives no syllabic energy
    return h.float()


def _filter_time(x: torch.Tensor, fir: torch.Tensor) -> torch.Tensor:
    """Zero-phase (centred) FIR filtering of every row of ``[F, N]`` by FFT, edges replicated."""
    k = fir.numel()
    n = x.shape[1]
    if n == 1:
        return x * fir.sum()
    p = F.pad(x.unsqueeze(0), (k // 2, k // 2), mode="replicate")[0]
    size = 1 << (p.shape[1] + k - 1).bit_length()
    y = torch.fft.irfft(torch.fft.rfft(p, size) * torch.fft.rfft(fir, size), size)
    return y[:, k - 1: k - 1 + n]


def _smooth_time(x: torch.Tensor, n: int) -> torch.Tensor:
    """Moving average over ``n`` frames (odd), edges replicated, of ``[F, N]`` (running
    sums in float64: O(1) per output whatever ``n``)."""
    if n <= 1:
        return x
    y = F.pad(x.unsqueeze(0), (n // 2 + 1, n // 2), mode="replicate")[0].double()
    c = y.cumsum(dim=1)
    return ((c[:, n:] - c[:, :-n]) / n).to(x.dtype)


def _smooth_freq(x: torch.Tensor, n: int) -> torch.Tensor:
    return _smooth_time(x.transpose(0, 1), n).transpose(0, 1) if n > 1 else x


def speech_likelihood(mag: torch.Tensor, freqs: torch.Tensor, frame_rate: float,
                      config: DSPDemixConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """Per-bin speech evidence in [0, 1] from syllabic modulation of ``[F, N]`` envelopes
    (computed only for the bins inside the speech band; zero elsewhere)."""
    lo, hi = config.speech_band_hz
    octave_in = torch.clamp(torch.log2(freqs.clamp_min(1.0) / lo) + 0.5, 0.0, 1.0)   # half-octave fade-in
    octave_out = torch.clamp(torch.log2(hi / freqs.clamp_min(1.0)) + 0.5, 0.0, 1.0)  # half-octave fade-out
    band_weight = (octave_in * octave_out).to(mag)
    out = torch.zeros_like(mag)
    inside = torch.nonzero(band_weight > 0).flatten()
    if inside.numel() == 0:
        return out
    bin_hz = float(freqs[1] - freqs[0]) if len(freqs) > 1 else 1.0
    smooth = _odd(config.envelope_smoothing_hz / bin_hz)
    # smoothing across frequency needs a margin of bins on both sides of the band
    a = max(0, int(inside[0]) - smooth // 2)
    b = min(mag.shape[0], int(inside[-1]) + 1 + smooth // 2)
    env = _smooth_freq(mag[a:b], smooth)
    fir = _bandpass_fir(frame_rate, *config.syllable_band_hz).to(mag)
    band = _filter_time(env, fir)
    w = _odd(config.modulation_window_seconds * frame_rate)
    mean = _smooth_time(env, w)
    syllabic = _smooth_time(band.square(), w)
    total = _smooth_time((env - mean).square(), w)
    eps = 1e-8 * float(mag.max().clamp_min(1e-20))
    depth = (2.0 * syllabic).sqrt() / (mean + eps)
    ratio = syllabic / (total + eps ** 2 + 1e-30)
    s = torch.sigmoid((depth - config.depth_threshold) / (0.25 * config.depth_threshold)) * \
        torch.sigmoid((ratio - config.ratio_threshold) / 0.08)
    out[a:b] = s * band_weight[a:b].unsqueeze(1)
    return out


def centre_likelihood(spec: torch.Tensor) -> torch.Tensor:
    """Stereo ``[2, F, N]`` → [0, 1]: 1 where left and right are equal (centre-panned),
    0 where they are uncorrelated or opposite. Power-weighted over a small neighbourhood."""
    l, r = spec[0], spec[1]
    mid, side = l + r, l - r
    mid = mid.real.square() + mid.imag.square()   # |.|^2 without the square root of abs()
    side = side.real.square() + side.imag.square()
    c = (mid - side) / (mid + side + torch.finfo(mid.dtype).tiny)  # 1 centre, 0 uncorrelated, -1 anti-phase
    return c.clamp(0.0, 1.0)


def _time_pool(x: torch.Tensor, q: int) -> torch.Tensor:
    if q <= 1:
        return x
    return F.avg_pool1d(x.unsqueeze(0), q, stride=q, ceil_mode=True)[0]


def _time_unpool(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.shape[1] == n:
        return x
    return F.interpolate(x.unsqueeze(0), size=n, mode="linear", align_corners=False)[0]


def _masks_for(mag: torch.Tensor, centre: Optional[torch.Tensor], first_hz: float, bin_hz: float,
               frame_rate: float, config: DSPDemixConfig):
    """Speech and music masks of a ``[F, N]`` magnitude whose rows start at ``first_hz``
    and are ``bin_hz`` apart (see :func:`stem_masks`)."""
    n_frames = mag.shape[1]
    harm = _ninther_filter(mag, _odd(config.harmonic_kernel_seconds * frame_rate), dim=1)
    perc = _ninther_filter(mag, _odd(config.percussive_kernel_hz / bin_hz), dim=0)
    # the stationary bed: a low percentile over a long window, on a time-pooled grid
    # (it is smooth in time anyway)
    q = max(1, int(round(frame_rate * config.stationary_kernel_seconds / 11)))
    stationary = _time_unpool(_rank_filter(_time_pool(mag, q), _odd(config.stationary_kernel_seconds * frame_rate / q),
                                           dim=1, quantile=config.stationary_quantile), n_frames)
    stationary = torch.minimum(stationary, mag)
    excess = mag - stationary                       # what is not the bed: speech or effects
    moving = harm - torch.minimum(stationary, harm)  # ... of it, what is steady over 0.1 s (voiced, tonal)
    freqs = first_hz + torch.arange(mag.shape[0], dtype=torch.float32) * bin_hz
    s = speech_likelihood(moving, freqs, frame_rate, config)
    if centre is not None:
        s = s * centre
    # speech claims what has speech evidence, and a share of what is steady over 0.1 s
    # (voiced sound) even without it; short bursts (not steady) it leaves to effects
    e_speech = config.speech_floor * (moving * excess).sqrt() + (1.0 - config.speech_floor) * s * excess
    e_music = stationary
    e_fx = (perc - torch.minimum(perc, stationary)) * config.margin
    if centre is not None and config.side_weight:
        e_fx = e_fx + config.side_weight * (1.0 - centre) * excess   # dialogue is centred; panned events are not
    z = torch.stack([e_speech, e_music, e_fx]).clamp_min(0.0)
    z = z / z.amax(0, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)  # no overflow in the power
    if config.power == 2.0:
        z = z.square()
    elif config.power == 1.5:
        z = z * z.sqrt()
    else:
        z = z.pow(config.power)
    masks = z / z.sum(0, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)
    return masks[0], masks[1]


def _pool_rows(x: torch.Tensor, p: int) -> torch.Tensor:
    f = x.shape[0]
    pad = (-f) % p
    if pad:
        x = torch.cat([x, x[-1:].expand(pad, -1)])
    return x.reshape(-1, p, x.shape[1]).mean(1)


def stem_masks(spec: torch.Tensor, sample_rate: int, hop: int, config: DSPDemixConfig = DEFAULT_CONFIG):
    """Speech and music masks ``[F, N]`` (effects is one minus both) for a ``[C, F, N]`` STFT.

    Three magnitude estimates compete per bin through Wiener-style soft masks:
    effects = the percussive (frequency-median) estimate; music = the stationary
    part (a low percentile over a long window, a plain form of repetition-based
    background estimation) plus non-stationary harmonic energy without speech
    evidence; speech = non-stationary harmonic energy with speech evidence. Above
    ``detail_hz`` (no speech cue there, few resolved partials) the masks are estimated
    on bins pooled by ``high_pool``, which halves the cost at 44.1 kHz.
    """
    n_fft = 2 * (spec.shape[-2] - 1)
    power = (spec.real.square() + spec.imag.square()).mean(0)
    frame_rate = sample_rate / hop
    bin_hz = sample_rate / n_fft
    centre = centre_likelihood(spec) if config.centre_cue and spec.shape[0] == 2 else None
    split = int(math.ceil(config.detail_hz / bin_hz))
    p = max(1, int(config.high_pool))
    if p == 1 or power.shape[0] - split < 2 * p:
        return _masks_for(power.sqrt(), centre, 0.0, bin_hz, frame_rate, config)
    low = _masks_for(power[:split].sqrt(), None if centre is None else centre[:split], 0.0, bin_hz, frame_rate, config)
    n_high = power.shape[0] - split
    high = _masks_for(_pool_rows(power[split:], p).sqrt(), None if centre is None else _pool_rows(centre[split:], p),
                      split * bin_hz, bin_hz * p, frame_rate, config)
    return tuple(torch.cat([lo, hi.repeat_interleave(p, dim=0)[:n_high]]) for lo, hi in zip(low, high))


def demix_dsp(waveform: torch.Tensor, sample_rate: int, config: DSPDemixConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """Split ``[C, T]`` into ``[3, C, T]`` stems in :data:`STEMS` order (speech, effects,
    music); the stems sum to the input to float precision."""
    if waveform.dim() != 2:
        raise ValueError(f"waveform must be [C, T], got {tuple(waveform.shape)}")
    x = waveform.float()
    c, t = x.shape
    out = torch.zeros(3, c, t, dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    n_fft, hop = stft_size(sample_rate, config)
    if t < 2 or not bool(x.abs().max() > 0):
        # nothing to separate (a single sample has no spectrum; silence has no content): all of it is effects
        out[1] = x
        return out
    window = hann(n_fft, x)
    spec = stft(x, n_fft, hop, window)
    m_speech, m_music = stem_masks(spec, sample_rate, hop, config)
    out[0] = istft(spec * m_speech, n_fft, hop, t, window)
    out[2] = istft(spec * m_music, n_fft, hop, t, window)
    out[1] = x - out[0] - out[2]
    return out
