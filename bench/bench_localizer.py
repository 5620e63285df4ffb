"""Keyframe localizer speed (``python bench/bench_localizer.py [--quick]``).

Prints numbers and ratios measured in the same run:

* onset method on a 60-s stereo 48 kHz file: real-time factor of the curve and of
  the whole ``localize`` call, and the speed-up over a naive onset path
  (band-limited resampling to 16 kHz + a 1-ms-hop STFT, the obvious way to get
  the same precision);
* learned method front end: batched kaldi fbank of all 2-s windows of 60 s vs
  torchaudio's per-clip ``kaldi.fbank`` (what the reference code calls);
* learned method with the real-size ImageBind audio config (768 wide, 12 blocks,
  random weights): seconds per 2-s window, real-time factor with 1-s hop windows,
  batched windows vs one window at a time.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


from avsync.core.audio import resample  # noqa: E402
from avsync.core.fbank import imagebind_input  # noqa: E402
from avsync.core.localize import WINDOW_SAMPLES, localize, window_starts  # noqa: E402
from avsync.core.onset import frame_envelope, normalise, onset_curve  # noqa: E402
from avsync.core.timeline import Timeline  # noqa: E402
from _report import best_of, row  # noqa: E402  (bench/ is the script's folder)


def naive_onset(wav: torch.Tensor, sr: int, tl: Timeline) -> np.ndarray:
    """The straightforward path: resample to 16 kHz, 16-ms window, 1-ms hop, log-mel flux."""
    import torchaudio

    x = resample(wav.mean(0), sr, 16000)
    mel = torchaudio.transforms.MelSpectrogram(16000, n_fft=256, hop_length=16, n_mels=40, f_min=30.0)(x)
    logmel = torch.log1p(1000 * mel / mel.max())
    flux = torch.relu(logmel[:, 1:] - logmel[:, :-1]).sum(0).numpy()
    pos = (np.arange(1, len(flux) + 1) * 16 * sr / 16000).astype(np.int64)
    return normalise(frame_envelope(flux, pos, tl))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the real-size learned model")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    import os

    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, device {args.device}, "
          f"load average {os.getloadavg()[0]:.1f} (other processes share these cores: times are upper bounds)")

    sr, dur = 48000, 60.0
    g = torch.Generator().manual_seed(0)
    wav = 0.1 * torch.randn(2, int(sr * dur), generator=g)
    tl = Timeline(24, sr, wav.shape[-1])
    # the onset path is a handful of memory-bound ops: on a busy machine a second
    # thread mostly waits for a time slice, so both settings are shown
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        t_curve = best_of(lambda: onset_curve(wav, tl), repeat=7)
        t_all = best_of(lambda: localize(wav, sr, tl, "onset"), repeat=7)
        t_naive = best_of(lambda: naive_onset(wav, sr, tl), repeat=2)
        print(f"[{n} thread(s)] onset curve, 60 s stereo 48 kHz: {t_curve * 1000:.0f} ms = "
              f"{dur / t_curve:.0f}x real time")
        print(f"[{n} thread(s)] onset localize (curve + peaks + selection): {t_all * 1000:.0f} ms = "
              f"{dur / t_all:.0f}x real time")
        print(f"[{n} thread(s)] naive onset path: {t_naive * 1000:.0f} ms; ours is {t_naive / t_curve:.1f}x faster")
        row(f"onset curve 60 s 48 kHz, {n} thread(s)", dur / t_curve, "x real time", ratio=t_curve / t_naive,
            vs="naive onset path")
    torch.set_num_threads(threads)

    x16 = 0.1 * torch.randn(int(16000 * dur), generator=g)
    starts = window_starts(len(x16))
    clips = torch.stack([x16[s:s + WINDOW_SAMPLES] for s in starts])

    def per_clip():
        import torchaudio

        for c in clips:
            c = c - c.mean()
            torchaudio.compliance.kaldi.fbank(c[None], htk_compat=True, sample_frequency=16000, use_energy=False,
                                              window_type="hanning", num_mel_bins=128, dither=0.0,
                                              frame_length=25, frame_shift=10)

    t_fb = best_of(lambda: imagebind_input(clips), repeat=3)
    t_fb_ref = best_of(per_clip, repeat=3)
    print(f"fbank of {len(starts)} windows (60 s): batched {t_fb * 1000:.0f} ms vs per-clip torchaudio "
          f"{t_fb_ref * 1000:.0f} ms ({t_fb_ref / t_fb:.1f}x)")
    row("fbank of all 2-s windows of 60 s", t_fb * 1000, "ms", ratio=t_fb / t_fb_ref, vs="per-clip torchaudio fbank")

    if args.quick:
        return
    from avsync.networks.imagebind_audio import KeyframeLocalizerNet, LocalizerConfig

    torch.manual_seed(0)
    net = KeyframeLocalizerNet(LocalizerConfig()).eval().to(args.device)
    print(f"real-size localizer: {sum(p.numel() for p in net.parameters()) / 1e6:.1f} M parameters")
    mel = imagebind_input(clips[:2]).to(args.device)

    def run(batch):
        with torch.inference_mode():
            for i in range(0, 2, batch):
                net(mel[i:i + batch])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    reps = 1 if args.device == "cpu" else 5
    t1 = best_of(lambda: run(1), repeat=reps) / 2
    t2 = best_of(lambda: run(2), repeat=reps) / 2
    # windows every second: a T-second file needs about T - 1 windows
    print(f"learned, one window at a time: {t1:.2f} s per 2-s window = {1.0 / t1:.2f}x real time (1-s hop)")
    print(f"learned, 2 windows per batch: {t2:.2f} s per window = {1.0 / t2:.2f}x real time; "
          f"batching {t1 / t2:.2f}x")
    row(f"learned localizer real size ({args.device}), 2 windows/batch", 1.0 / t2, "x real time", ratio=t2 / t1,
        vs="one window at a time")


if __name__ == "__main__":
    main()
