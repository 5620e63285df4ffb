"""Train the Demixer's ``learned`` method (:class:`avsync.networks.small_demixer.SmallDemixer`).

Data: random 4-s mixtures summed on the fly from the **tune** part's source pools of
``bench/demix_eval.py`` only (``demix_eval._pools()["tune"]``: even-numbered Allison
prompts, the British / Classic / Surfer / HillBilly voice packs, even-numbered effects
and music tracks of the Debian packages named there; per-file licences in
``bench/demix_eval_manifest.json``). No file of the held-out part is read, so the
held-out numbers of ``bench/bench_demix_quality.py`` stay held out.

Each mixture: 16 / 44.1 / 48 kHz, mono or stereo (one format per batch; 16 kHz in 40 % of the batches); speech
utterances one after another (-20 dBFS RMS +-6 dB; left out one time in twenty), one to
four effect events (peak -12 dBFS -8..+4 dB, played 0.85-1.15x faster or slower, panned
within +-0.6 in stereo; left out one time in twenty), a music excerpt (-26 dBFS RMS
-10..+3 dB, or 30-40 dB lower one time in six; left out one time in twelve). Loss:
per stem, ``10 log10((|s - s_hat|^2 + 1e-3 |s|^2 + f) / (|s|^2 + f))`` with ``f`` 40 dB
under the mixture's energy: minus the SDR, capped at 30 dB, and for an absent stem up to
+40 dB for leaking the whole mixture into it; averaged. Adam, cosine
learning rate from 1e-3, gradient norm clipped at 5, seed 0, two CPU threads. The shipped
network: the first 1000 steps of a 3200-step schedule without the dsp guide, then 2400
steps with it (``--dsp-guide --init``: the guide's input weights start at zero, so the
network starts out as it was).

    apt-get install --no-install-recommends hedgewars-data asterisk-core-sounds-en-g722 sound-theme-freedesktop
    # the shipped weights, in two stages (about 15 + 55 minutes on 2 cores):
    python tools/train_small_demixer.py --steps 3200 --stop-after 1000 --out stage1.safetensors
    python tools/train_small_demixer.py --dsp-guide --init stage1.safetensors --steps 2400 \
        --out weights/small_demixer.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RATES = (16000, 44100, 48000)
RATE_SHARES = (0.4, 0.3, 0.3)   # 16 kHz steps are the cheapest; the grid features are the same at every rate
SECONDS = 4.0


class TunePool:
    """The tune part's sources, decoded once and resampled once per rate."""

    def __init__(self):
        from bench import demix_eval as E

        self.E = E
        self.paths = E._pools()["tune"]
        self.native = {}
        self.at_rate: dict = {}

    def get(self, path: str, rate: int) -> np.ndarray:
        key = (path, rate)
        if key not in self.at_rate:
            from scipy.signal import resample_poly

            if path not in self.native:
                self.native[path] = self.E._decode(path)
            x, sr = self.native[path]
            if sr != rate:
                g = math.gcd(sr, rate)
                x = resample_poly(x, rate // g, sr // g, axis=1)
            self.at_rate[key] = x.astype(np.float32)
        return self.at_rate[key]


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt((x.astype(np.float64) ** 2).mean()) + 1e-12)


def example(pool: TunePool, rng: np.random.Generator, rate: int, ch: int) -> np.ndarray:
    """``[3, ch, n]`` true stems (speech, effects, music) of one random mixture."""
    n = int(SECONDS * rate)
    stems = np.zeros((3, ch, n), np.float32)
    if rng.random() > 0.05:
        t, active = float(rng.uniform(-1.0, 0.8)), np.zeros(n, bool)
        while t < SECONDS - 0.3:
            x = pool.E.to_channels(pool.get(str(rng.choice(pool.paths["speech"])), rate), ch)
            a, b = int(t * rate), int(t * rate) + x.shape[1]
            seg = x[:, max(0, -a): min(x.shape[1], n - a)]
            stems[0, :, max(a, 0): max(a, 0) + seg.shape[1]] += seg * 10 ** (rng.uniform(-3, 3) / 20)
            active[max(a, 0): max(0, min(b, n))] = True
            t = b / rate + float(rng.uniform(0.1, 0.9))
        level = _rms(stems[0][:, active]) if active.any() else 0.0
        stems[0] *= 10 ** ((-20 + rng.uniform(-6, 6)) / 20) / level if level > 1e-5 else 0.0   # near-silent: left out
    if rng.random() > 0.05:
        for _ in range(int(rng.integers(1, 5))):
            x = pool.get(str(rng.choice(pool.paths["effects"])), rate)
            speed = rng.uniform(0.85, 1.15)
            m = max(2, int(x.shape[1] / speed))
            x = np.stack([np.interp(np.linspace(0, x.shape[1] - 1, m), np.arange(x.shape[1]), c) for c in x])
            x = pool.E.to_channels(x, ch)[:, : int(2.5 * rate)]
            x = x * 10 ** ((-12 + rng.uniform(-8, 4)) / 20) / max(np.abs(x).max(), 1e-9)
            if ch == 2:
                x = pool.E.pan(x, rng.uniform(-0.6, 0.6))
            at = int(rng.uniform(-0.2, SECONDS - 0.2) * rate)
            seg = x[:, max(0, -at): max(0, min(x.shape[1], n - at))]
            stems[1, :, max(at, 0): max(at, 0) + seg.shape[1]] += seg
    if rng.random() > 1 / 12:
        x = pool.get(str(rng.choice(pool.paths["music"])), rate)
        a = int(rng.integers(0, max(1, x.shape[1] - n)))
        seg = pool.E.to_channels(x[:, a: a + n], ch)
        level = -26 + (rng.uniform(-40, -30) if rng.random() < 1 / 6 else rng.uniform(-10, 3))
        if _rms(seg) > 1e-5:   # not a silent stretch of the track
            stems[2, :, : seg.shape[1]] = seg * 10 ** (level / 20) / _rms(seg)
    return stems * np.float32(10 ** (rng.uniform(-10, 6) / 20))


def batch(pool: TunePool, rng: np.random.Generator, size: int, dsp_guide: bool = False):
    """``(stems [B, 3, C, T], guide, rate)``; ``guide``: the complex STFTs of the dsp stems of
    each mixture ``[B, 3, C, bins, frames]`` with ``dsp_guide``, else None."""
    rate, ch = int(rng.choice(RATES, p=RATE_SHARES)), int(rng.integers(1, 3))
    stems = torch.from_numpy(np.stack([example(pool, rng, rate, ch) for _ in range(size)]))
    guide = None
    if dsp_guide:
        from avsync.networks.small_demixer import dsp_guide_spec

        guide = torch.stack([dsp_guide_spec(m, rate) for m in stems.sum(1)])
    return stems, guide, rate


class Batches(torch.utils.data.IterableDataset):
    """Endless random batches, made in a worker process while the network trains."""

    def __init__(self, size: int, seed: int, dsp_guide: bool):
        self.size, self.seed, self.dsp_guide = size, seed, dsp_guide

    def __iter__(self):
        torch.set_num_threads(1)
        pool, rng = TunePool(), np.random.default_rng(self.seed)
        while True:
            yield batch(pool, rng, self.size, self.dsp_guide)


def capped_sdr_loss(err: torch.Tensor, ref: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Minus the SDR in dB, capped at 30 dB by ``1e-3 ref``; ``floor`` bounds the loss of a stem
    that is absent (``ref`` ~ 0) and leaks into."""
    return 10 * torch.log10((err + 1e-3 * ref + floor) / (ref + floor))


EVENT_SEGMENT_SECONDS = 0.25


def event_loss(est_fx: torch.Tensor, true_fx: torch.Tensor, mix: torch.Tensor, rate: int) -> torch.Tensor:
    """The effects stem's capped SDR loss per 0.25-s segment, averaged over the segments in which
    effects are present (their energy at most 30 dB under the mixture's there). The whole-clip
    loss weights an event by its energy, so a quiet event can be dropped at little cost; here
    each segment counts alike, which is what the onset localizer downstream needs: every event,
    quiet or loud, present in the effects stem."""
    seg = int(EVENT_SEGMENT_SECONDS * rate)
    k = est_fx.shape[-1] // seg

    def energy(x):   # [B, C, T] -> [B, k]
        return x[..., : k * seg].unflatten(-1, (k, seg)).pow(2).sum((1, 3))

    err, ref, mix_e = energy(est_fx - true_fx), energy(true_fx), energy(mix)
    present = ref > 1e-3 * mix_e + 1e-12
    per_segment = capped_sdr_loss(err, ref, torch.full_like(ref, 1e-12))   # only present segments count
    return (per_segment * present).sum() / present.sum().clamp(min=1)


def loss_fn(net, stems: torch.Tensor, rate: int, guide=None, event_weight: float = 0.0) -> torch.Tensor:
    from avsync.networks import small_demixer as S

    b, _, ch, _ = stems.shape
    mix = stems.sum(1)                                                   # [B, C, T]
    spec = S.spectrogram(mix.flatten(0, 1), rate).unflatten(0, (b, ch))  # [B, C, bins, frames]
    feats = S.features(spec, rate, mix.pow(2).mean((1, 2)).sqrt())
    if guide is not None:
        feats = torch.cat([feats, S.guide_features(guide, spec, rate)], -1)
    est = S.stems_from_masks(spec, net(feats), mix, rate)               # [B, 3, C, T]
    floor = 1e-4 * mix.pow(2).sum((1, 2))[:, None] + 1e-12
    err = (est - stems).pow(2).sum((2, 3))
    ref = stems.pow(2).sum((2, 3))
    loss = capped_sdr_loss(err, ref, floor).mean()
    if event_weight:
        loss = loss + event_weight * event_loss(est[:, 1], stems[:, 1], mix, rate)
    return loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2400, help="length of the cosine learning-rate schedule")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (and save) after this many steps, part-way through the schedule")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "weights" / "small_demixer.safetensors")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--dsp-guide", action="store_true", help="the network also reads the dsp stems (as shipped)")
    p.add_argument("--init", type=Path, default=None,
                   help="start from this network (one without the dsp guide: its input layer gets zero "
                        "weights for the guide features, so it starts out as it was)")
    p.add_argument("--event-weight", type=float, default=0.0,
                   help="weight of the per-segment effects loss (event_loss), which counts quiet events alike "
                        "with loud ones")
    args = p.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    from safetensors.torch import save_file

    from avsync.networks.small_demixer import SmallDemixer, SmallDemixerConfig, parameter_count

    batches = iter(torch.utils.data.DataLoader(Batches(args.batch, args.seed, args.dsp_guide), batch_size=None,
                                               num_workers=1, prefetch_factor=4))
    net = SmallDemixer(SmallDemixerConfig(dsp_guide=args.dsp_guide))
    if args.init is not None:
        from safetensors.torch import load_file

        sd = load_file(str(args.init))
        w = sd["inp.weight"]
        if w.shape[1] < net.inp.weight.shape[1]:
            sd["inp.weight"] = torch.cat([w, w.new_zeros(w.shape[0], net.inp.weight.shape[1] - w.shape[1])], 1)
        net.load_state_dict(sd)
        print(f"started from {args.init}", flush=True)
    opt = torch.optim.Adam(net.parameters(), args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps, eta_min=args.lr / 100)
    print(f"{parameter_count(net)} parameters", flush=True)
    t0, running = time.time(), []

    def save(step: int) -> None:
        meta = {"avsync_family": "small_demixer", "avsync_config": json.dumps(net.config.to_dict()),
                "trained": json.dumps({"steps": step, "batch": args.batch, "seconds": SECONDS, "seed": args.seed,
                                       "lr": args.lr, "init": args.init.name if args.init else None,
                                       "event_weight": args.event_weight,
                                       "data": "bench/demix_eval.py tune pools"})}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(args.out), metadata=meta)

    last = min(args.steps, args.stop_after or args.steps)
    for step in range(1, last + 1):
        stems, guide, rate = next(batches)
        rate = int(rate)
        loss = loss_fn(net, stems, rate, guide, args.event_weight)
        if not torch.isfinite(loss):
            print(f"step {step}: loss {loss.item()} (batch at {rate} Hz, peak {stems.abs().max():.3g}); skipped",
                  flush=True)
            continue
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        sched.step()
        running.append(loss.item())
        if step % 50 == 0:
            print(f"step {step}: {time.time() - t0:.0f} s, loss {np.mean(running):.2f} dB", flush=True)
            running = []
        if step % args.save_every == 0 or step == last:
            save(step)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
