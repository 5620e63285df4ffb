"""Demixer quality on real recordings (plain script: ``python bench/bench_demix_quality.py``).

Uses the evaluation set of ``bench/demix_eval.py`` (mixtures summed from Debian-packaged
speech, effects and music recordings; install the packages named there first). For
each part (``tune``: what the dsp method may be tuned on; ``heldout``: reported,
never tuned on) and each format it prints, averaged over the mixtures:

- SI-SDR (dB) of the unprocessed mixture and of each estimated stem against the true
  stem, and the improvement (SI-SDRi);
- precision@3 and AP@3 (recall within 3 frames at 24 fps) of the onset peaks that the
  KeyframeLocalizer's ``onset`` method finds, against the true effect events, for the
  mixture, the estimated effects stem and the true effects stem (the oracle);
- the effects stem's precision@3 at the mixture's AP@3: its onset peak height is swept
  and the highest height that reaches the mixture's AP@3 is chosen on the tune part,
  then used unchanged on the held-out part.

Numbers are printed, not asserted. ``--methods`` picks among ``dsp`` and ``learned``
(default both); ``--model FILE`` also scores a converted demix model (e.g. MRX). ``--alone`` also feeds each true stem alone and
prints where its energy goes (e.g. how much of an effects track alone lands in the
effects stem).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import demix_eval as E  # noqa: E402
from bench._report import row  # noqa: E402

COLUMNS = ("speech", "effects", "music")


def _methods(args, parser):
    import torch

    from avsync.core.errors import ModelFormatError
    from avsync.samplers.demix import demix

    def load(flag, loader, path):   # a wrong file: one line naming the flag, exit code 2
        try:
            return loader(Path(path))
        except (ModelFormatError, OSError) as e:
            print(f"{parser.prog}: error: {flag}: {e}", file=sys.stderr)
            sys.exit(2)

    methods = {m: (lambda x, sr, m=m: demix(torch.from_numpy(x), sr, m).numpy()) for m in args.methods}
    if args.learned_weights:   # a candidate network of the learned method, scored beside the shipped one
        from avsync.loaders.demix import load_small_demixer
        from avsync.samplers.demix import learned_chunk_processor

        net = load("--learned-weights", load_small_demixer, args.learned_weights)
        methods[f"learned:{Path(args.learned_weights).stem}"] = \
            lambda x, sr: learned_chunk_processor(sr, net)(torch.from_numpy(x)).numpy()
    if args.model:
        from avsync.loaders.demix import load_demix_model

        model = load("--model", load_demix_model, args.model)
        methods[Path(args.model).stem] = lambda x, sr: demix(torch.from_numpy(x), sr, "model", model).numpy()
    return methods


def _fmt(recipe) -> str:
    return f"{recipe['sample_rate'] // 1000}k {'stereo' if recipe['channels'] == 2 else 'mono'}"


def report(rows: list, title: str) -> None:
    print(f"\n{title} ({len(rows)} mixtures)")
    print(f"  {'':18} " + " ".join(f"{c:>22}" for c in COLUMNS) + f" {'mean SI-SDRi':>12}")
    groups = defaultdict(list)
    for r in rows:
        groups[r["format"]].append(r)
        groups["all"].append(r)
    for g in sorted(k for k in groups if k != "all") + ["all"]:
        rs = groups[g]
        cells = []
        for c in COLUMNS:
            mix, est = np.mean([r[f"{c}_mix"] for r in rs]), np.mean([r[f"{c}_est"] for r in rs])
            cells.append(f"{mix:6.1f} -> {est:5.1f} ({est - mix:+5.1f})")
        mean_imp = np.mean([np.mean([r[f"{c}_imp"] for c in COLUMNS]) for r in rs])
        print(f"  {g:18} " + " ".join(f"{x:>22}" for x in cells) + f" {mean_imp:+12.2f}")
        if g == "all":
            for c in COLUMNS:
                row(f"{title}: {c} SI-SDRi", np.mean([r[f"{c}_imp"] for r in rs]), "dB", vs="unprocessed mix")
            row(f"{title}: mean SI-SDRi", mean_imp, "dB", vs="unprocessed mix")
    print("  onsets vs true events (precision@3 / AP@3):")
    for g in sorted(k for k in groups if k != "all") + ["all"]:
        rs = groups[g]
        vals = {k: np.mean([r[k] for r in rs]) for k in rs[0] if k.startswith(("p3_", "ap3_"))}
        print(f"  {g:18} mix {vals['p3_mix']:.2f} / {vals['ap3_mix']:.2f}   effects stem {vals['p3_fx']:.2f} / "
              f"{vals['ap3_fx']:.2f}   true effects (oracle) {vals['p3_oracle']:.2f} / {vals['ap3_oracle']:.2f}")
        if g == "all":
            row(f"{title}: onset precision@3 from the effects stem", vals["p3_fx"], "precision",
                ratio=vals["p3_fx"] / max(vals["p3_mix"], 1e-9), vs="from the mix")
    cases = defaultdict(list)
    for r in rows:
        cases[r["case"]].append(r)
    print("  SI-SDRi by case (speech / effects / music):")
    for case, rs in cases.items():
        print(f"  {case:18} " + " / ".join(f"{np.mean([r[f'{c}_imp'] for r in rs]):+5.1f}" for c in COLUMNS))


def equal_ap_height(rows: list, stem: str = "fx") -> float:
    """The highest of ``E.SWEEP_HEIGHTS`` at which the mean AP@3 of ``stem`` (``fx``: the
    estimated effects stem; ``oracle``: the true one) is at least the mixture's (at
    ``E.ONSET_HEIGHT``): the operating point for comparing precision at equal AP@3. Chosen
    on the tune part only; the lowest height when none reaches it."""
    target = np.mean([r["ap3_mix"] for r in rows])
    ok = [h for h in E.SWEEP_HEIGHTS if np.mean([r[f"ap3_{stem}@{h:g}"] for r in rows]) >= target - 1e-9]
    return max(ok) if ok else min(E.SWEEP_HEIGHTS)


def equal_ap_report(rows: list, heights, title: str) -> None:
    """``heights``: ``{"fx": h, "oracle": h}`` chosen on the tune part (None: not run)."""
    if heights is None:
        print("  (precision at equal AP@3 needs the tune part's choice of peak height: run with --part both)")
        return
    p_mix, ap_mix = np.mean([r["p3_mix"] for r in rows]), np.mean([r["ap3_mix"] for r in rows])
    for stem, what in (("fx", "effects stem"), ("oracle", "true effects stem (oracle)")):
        h = heights[stem]
        p, ap = (np.mean([r[f"{k}_{stem}@{h:g}"] for r in rows]) for k in ("p3", "ap3"))
        print(f"  at equal AP@3, {what} (peaks above {h:g}, chosen on the tune part): {p:.2f} / {ap:.2f} vs mix "
              f"{p_mix:.2f} / {ap_mix:.2f} (precision x{p / p_mix:.2f})")
        if stem == "fx":
            row(f"{title}: onset precision@3 from the effects stem at the mix's AP@3 (peaks > {h:g})", p,
                "precision", ratio=p / max(p_mix, 1e-9), vs=f"from the mix (AP@3 {ap:.2f} vs {ap_mix:.2f})")


def events_report(rows: list) -> None:
    """Found and missed true events (onset peaks above the lowest swept height): their level
    under the mixture, how much of them the effects stem keeps, and the speech and music
    stems' error there (the stem that took a missed event has an error near 0 dB)."""
    events = [e for r in rows for e in r["events"]]
    for label, group in (("found", [e for e in events if e["found"]]), ("missed", [e for e in events if not e["found"]])):
        if group:
            med = {k: np.median([e[k] for e in group]) for k in group[0] if k.endswith("_db")}
            print(f"  {label:6} {len(group):3} of {len(events)} true events (first {E.EVENT_WINDOW:g} s, medians, dB "
                  f"against the event): under the mix {med['under_mix_db']:+.1f}, kept in the effects stem "
                  f"{med['kept_db']:+.1f}; speech / music stem error {med['speech_error_db']:+.1f} / "
                  f"{med['music_error_db']:+.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description="demixer quality on the real-audio evaluation set")
    p.add_argument("--part", choices=("tune", "heldout", "both"), default="both")
    p.add_argument("--methods", nargs="+", choices=("dsp", "learned"), default=["dsp", "learned"],
                   help="weights-free / shipped methods to score (default: both)")
    p.add_argument("--model", default=None, help="also score this converted demix model (.safetensors)")
    p.add_argument("--learned-weights", default=None,
                   help="also score the learned method with this network (.safetensors; e.g. a training run's)")
    p.add_argument("--events", action="store_true",
                   help="also: which true events the effects stem's onsets miss, and whether the stem still holds them")
    p.add_argument("--alone", action="store_true", help="also: where the energy of each true stem fed alone goes")
    args = p.parse_args()
    import torch

    torch.set_num_threads(2)
    methods = _methods(args, p)   # a wrong --model / --learned-weights file is refused first
    manifest = E.load_manifest()
    problems = E.check_sources(manifest)
    if problems:
        sys.exit("the evaluation sources are not installed or differ:\n  " + "\n  ".join(problems[:10]) +
                 "\ninstall: apt-get install --no-install-recommends " + " ".join(E.PACKAGES))
    parts = ("tune", "heldout") if args.part == "both" else (args.part,)
    heights: dict = {}   # per method: the effects stem's onset peak height with the mixture's AP@3 (tune part)
    for part in parts:
        rows = defaultdict(list)
        seconds = defaultdict(float)
        audio = 0.0
        for recipe, mix in E.iter_mixtures(part, manifest):
            audio += recipe["seconds"]
            for name, run in methods.items():
                t0 = time.perf_counter()
                est = run(mix["mixture"], recipe["sample_rate"])
                seconds[name] += time.perf_counter() - t0
                assert np.abs(est.sum(0) - mix["mixture"]).max() < 1e-4 or name not in ("dsp", "learned")
                row = {"format": _fmt(recipe), "case": recipe["case"], **E.score(mix, est)}
                if args.events:
                    row["events"] = E.event_report(mix, est)
                if args.alone:
                    for i, stem in enumerate(COLUMNS):
                        energy = (run(mix[stem], recipe["sample_rate"]).astype(np.float64) ** 2).sum(axis=(1, 2))
                        row[f"alone_{stem}"] = energy / max(energy.sum(), 1e-30)
                rows[name].append(row)
        for name in methods:
            report(rows[name], f"{part}: {name} ({audio / seconds[name]:.0f}x real time)")
            if args.alone:
                print("  each true stem fed alone: share of its energy in the speech / effects / music stems")
                for stem in COLUMNS:
                    share = np.mean([r[f"alone_{stem}"] for r in rows[name]], axis=0)
                    print(f"  {stem:18} " + " / ".join(f"{v:.2f}" for v in share))
            if args.events:
                events_report(rows[name])
            if part == "tune":
                heights[name] = {stem: equal_ap_height(rows[name], stem) for stem in ("fx", "oracle")}
            equal_ap_report(rows[name], heights.get(name), f"{part}: {name}")


if __name__ == "__main__":
    main()
