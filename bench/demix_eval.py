"""A real-audio evaluation set for the demixer, rebuilt from Debian packages.

Mixtures are sums of real recordings with exact stems (speech, effects, music) and
the true effect event times. Nothing audible is committed: ``demix_eval_manifest.json``
(beside this file) names every source file by package, version, path, licence and
sha256, and gives each mixture's exact recipe; :func:`build` rebuilds the set from
the installed packages into a cache folder, checking every checksum.

Sources (install them first; about 170 MB)::

    apt-get update && apt-get install --no-install-recommends \\
        hedgewars-data asterisk-core-sounds-en-g722 sound-theme-freedesktop

- speech: Allison Smith's recorded prompts (``asterisk-core-sounds-en-g722``, 16 kHz,
  CC-BY-SA-3.0) and the voice packs of ``hedgewars-data`` (real actors, 44.1/48 kHz,
  GFDL-1.3) - real recordings, no synthetic speech;
- effects: ``hedgewars-data`` Sounds (explosions, guns, impacts, splashes; GFDL-1.3 /
  CC-BY-SA-3.0) and ``sound-theme-freedesktop`` (bells, shutter, alerts);
- music: ``hedgewars-data`` Music (GPL-2), stereo 44.1 kHz.

The set has two parts that share no source file: ``tune`` (the only part anyone may
tune on) and ``heldout`` (reported, never tuned on). Each part has 16 mixtures of 10 s:
four formats (16 kHz mono, 44.1 kHz mono, 44.1 kHz stereo, 48 kHz stereo) times four
cases (``plain``; ``fx_under_speech``: every event inside an utterance;
``percussive_music``: the most percussive tracks of the part; ``quiet_music``: music
35 dB under the speech).

``python bench/demix_eval.py --regenerate`` writes the manifest anew from the
installed packages (fixed seed; the file selection and licences are read from the
packages' files and their ``copyright`` files); ``python bench/demix_eval.py``
rebuilds the cache (default ``~/.cache/avsync/demix_eval``).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Optional

import numpy as np

MANIFEST = Path(__file__).with_name("demix_eval_manifest.json")
DEFAULT_CACHE = Path(os.environ.get("AVSYNC_DEMIX_EVAL", Path.home() / ".cache" / "avsync" / "demix_eval"))
STEMS = ("speech", "effects", "music")
FPS = 24
SECONDS = 10.0
FORMATS = ((16000, 1), (44100, 1), (44100, 2), (48000, 2))
CASES = ("plain", "fx_under_speech", "percussive_music", "quiet_music")
PACKAGES = ("hedgewars-data", "asterisk-core-sounds-en-g722", "sound-theme-freedesktop")

HW = "/usr/share/games/hedgewars/Data"
ALLISON = "/usr/share/asterisk/sounds/en_US_f_Allison"
FREEDESKTOP = "/usr/share/sounds/freedesktop/stereo"
# effects that are not effects: musical notes, tunes, chants, spoken channel names, test tones
_NOT_EFFECTS = ("1C", "2D", "3E", "4F", "5G", "6A", "7B", "8C", "9D", "ride_of_the_valkyries", "hogchant3",
                "Yoohoo", "Hellish", "audio-channel-", "audio-test-signal", "custom")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _decode(path: str):
    from avsync.core.audio_io import decode_audio_file

    d = decode_audio_file(path, max_seconds=3600)
    return d.samples.astype(np.float64), d.sample_rate


def _resample(x: np.ndarray, sr: int, target: int) -> np.ndarray:
    if sr == target:
        return x
    import torch

    from avsync.core.audio import resample

    return resample(torch.from_numpy(x).float(), sr, target).double().numpy()


def _onset_seconds(x: np.ndarray, sr: int, rel: float = 0.1) -> float:
    """Where a sound starts: its first sample above ``rel`` of its peak (channels pooled)."""
    env = np.abs(x).max(0)
    return float(np.argmax(env >= rel * env.max()) / sr)


# ----------------------------------------------------------------------------------------
# Manifest: which files, and how each mixture is put together
# ----------------------------------------------------------------------------------------

# installed prefix -> the source layout the package's copyright file names paths in
_LAYOUT = {"hedgewars-data": (f"{HW}/", "share/hedgewars/Data/"),
           "asterisk-core-sounds-en-g722": (f"{ALLISON}/", ""),
           "sound-theme-freedesktop": ("/usr/share/sounds/freedesktop/", "")}


def _copyright_licence(package: str, path: str) -> str:
    """The licence of ``path`` from the package's machine-readable copyright file (DEP-5:
    the last ``Files`` stanza whose pattern matches wins)."""
    text = Path(f"/usr/share/doc/{package}/copyright").read_text(errors="replace")
    licence, files = "unknown", []
    for para in text.split("\n\n"):
        fields = {}
        key = None
        for line in para.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, val = line.partition(":")
                fields[key.strip()] = val.strip()
        if "Files" in fields and "License" in fields:
            files.append((fields["Files"].split(), fields["License"].split()[0] if fields["License"] else ""))
    installed, upstream = _LAYOUT[package]
    rel = upstream + path[len(installed):] if path.startswith(installed) else path
    for patterns, lic in files:
        if any(fnmatch.fnmatchcase(rel, p) for p in patterns):   # DEP-5's "*" spans folders, as fnmatch's does
            licence = lic
    return licence


def _package_version(package: str) -> str:
    return subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True,
                          check=True).stdout.strip()


def _pools() -> dict:
    """Candidate files per role and part (tune / heldout), from the installed packages."""
    def listing(folder, pattern):
        return sorted(str(p) for p in Path(folder).glob(pattern))

    allison = listing(ALLISON, "*.g722")
    voices = {v: listing(f"{HW}/Sounds/voices/{v}", "*.ogg") for v in
              ("British", "Classic", "Default", "Mobster", "Pirate", "Surfer", "Singer", "HillBilly")}
    fx = [p for p in listing(f"{HW}/Sounds", "*.ogg") + listing(FREEDESKTOP, "*.oga")
          if not any(Path(p).name.startswith(n) for n in _NOT_EFFECTS)
          and _copyright_licence("sound-theme-freedesktop" if p.startswith(FREEDESKTOP) else "hedgewars-data", p)
          != "unknown"]   # four freedesktop sounds have no licence in the package's copyright file
    music = listing(f"{HW}/Music", "*.ogg")
    return {
        "tune": {"speech": allison[0::2] + voices["British"] + voices["Classic"] + voices["Surfer"] + voices["HillBilly"],
                 "effects": fx[0::2], "music": music[0::2]},
        "heldout": {"speech": allison[1::2] + voices["Default"] + voices["Mobster"] + voices["Pirate"] +
                    voices["Singer"],
                    "effects": fx[1::2], "music": music[1::2]},
    }


def _percussiveness(path: str) -> float:
    """Onset density of a track's middle minute (spectral flux peaks per second)."""
    import torch

    from avsync.core.onset import onset_strength

    x, sr = _decode(path)
    mid = x.shape[1] // 2
    seg = x[:, max(0, mid - 30 * sr): mid + 30 * sr].mean(0, keepdims=True)
    values, _ = onset_strength(torch.from_numpy(seg).float(), sr)
    v = np.asarray(values, dtype=np.float64)
    v = v / (v.max() + 1e-12)
    peaks = ((v[1:-1] > v[:-2]) & (v[1:-1] >= v[2:]) & (v[1:-1] > 0.3)).sum()
    return float(peaks / (seg.shape[1] / sr))


def regenerate(seed: int = 11) -> dict:
    """Choose sources and mixture recipes from the installed packages (deterministic)."""
    rng = np.random.default_rng(seed)
    pools = _pools()
    sources: dict[str, dict] = {}
    durations: dict[str, float] = {}

    def use(path: str) -> str:
        if path not in sources:
            package = next(p for p in PACKAGES if path.startswith(
                {"hedgewars-data": HW, "asterisk-core-sounds-en-g722": ALLISON,
                 "sound-theme-freedesktop": FREEDESKTOP}[p]))
            x, sr = _decode(path)
            durations[path] = x.shape[1] / sr
            sources[path] = {"package": package, "version": _package_version(package), "path": path,
                             "licence": _copyright_licence(package, path), "sha256": sha256_file(Path(path)),
                             "sample_rate": sr, "channels": int(x.shape[0]), "seconds": round(x.shape[1] / sr, 4)}
        return path

    mixtures = []
    for part in ("tune", "heldout"):
        pool = pools[part]
        ranked = sorted(pool["music"], key=_percussiveness, reverse=True)
        percussive, others = ranked[:3], ranked[3:]
        for fi, (sr, ch) in enumerate(FORMATS):
            for case in CASES:
                name = f"{part}_{sr // 1000}k_{'stereo' if ch == 2 else 'mono'}_{case}"
                # speech: utterances one after another with pauses, until the clip is full
                speech, t = [], float(rng.uniform(0.2, 0.9))
                while t < SECONDS - 0.8:
                    src = use(str(rng.choice(pool["speech"])))
                    dur = min(durations[src], SECONDS - t)
                    speech.append({"source": src, "at": round(t, 3), "from": 0.0, "seconds": round(dur, 3),
                                   "gain_db": round(float(rng.uniform(-3, 3)), 2), "pan": 0.0})
                    t += dur + float(rng.uniform(0.25, 0.9))
                # effects: five events at least 0.9 s apart (inside utterances for fx_under_speech)
                events: list[dict] = []
                tries = 0
                while len(events) < 5 and tries < 1000:
                    tries += 1
                    at = float(rng.uniform(0.1, SECONDS - 0.6))
                    if case == "fx_under_speech" and not any(u["at"] + 0.1 < at < u["at"] + u["seconds"] - 0.1
                                                             for u in speech):
                        continue
                    if any(abs(at - e["at"]) < 0.9 for e in events):
                        continue
                    src = use(str(rng.choice(pool["effects"])))
                    dur = min(durations[src], SECONDS - at, 2.5)
                    events.append({"source": src, "at": round(at, 3), "from": 0.0, "seconds": round(dur, 3),
                                   "gain_db": round(float(rng.uniform(-4, 2)), 2),
                                   "pan": round(float(rng.uniform(-0.6, 0.6)), 2) if ch == 2 else 0.0})
                events.sort(key=lambda e: e["at"])
                track = use(str(rng.choice(percussive if case == "percussive_music" else others)))
                start = float(rng.uniform(5.0, max(5.0, durations[track] - SECONDS - 5.0)))
                music = [{"source": track, "at": 0.0, "from": round(start, 3), "seconds": SECONDS,
                          "gain_db": -35.0 if case == "quiet_music" else round(float(rng.uniform(-8, -2)), 2),
                          "pan": 0.0}]
                mixtures.append({"name": name, "part": part, "case": case, "sample_rate": sr, "channels": ch,
                                 "seconds": SECONDS, "speech": speech, "effects": events, "music": music})
    return {
        "about": "AVSync demix evaluation set: recipes over Debian-packaged recordings; rebuild with "
                 "bench/demix_eval.py. Levels: speech stem at -20 dBFS RMS over its utterances' spans, effect events "
                 "at -12 dBFS peak and music at -26 dBFS RMS, each then times 10^(gain_db/20); 'at' and 'from' in "
                 "seconds; pan -1 left .. 1 right (constant power); stereo sources are averaged for mono "
                 "mixtures, mono sources duplicated for stereo ones.",
        "seed": seed, "fps": FPS, "packages": {p: _package_version(p) for p in PACKAGES},
        "sources": sorted(sources.values(), key=lambda s: s["path"]),
        "mixtures": mixtures,
    }


# ----------------------------------------------------------------------------------------
# Building the stems
# ----------------------------------------------------------------------------------------

def to_channels(x: np.ndarray, ch: int) -> np.ndarray:
    """``[C, T]`` as ``ch`` (1 or 2) channels: stereo averaged for mono, mono duplicated for stereo."""
    return x.mean(0, keepdims=True) if ch == 1 else (x if x.shape[0] == 2 else np.repeat(x[:1], 2, 0))


def pan(x: np.ndarray, position: float) -> np.ndarray:
    """Constant-power pan of a stereo ``[2, T]`` (``position`` -1 left .. 1 right; 0 leaves it as it is)."""
    theta = (position + 1) * math.pi / 4
    return x * np.array([[math.cos(theta)], [math.sin(theta)]]) * math.sqrt(2)


def _place(items: list, stem: str, sr: int, ch: int, n: int, cache: dict) -> tuple[np.ndarray, list]:
    """Sum the items of one stem into ``[ch, n]``; also the onset time of each item."""
    out = np.zeros((ch, n))
    onsets = []
    for it in items:
        x, native = cache[it["source"]]   # decoded at its own rate; the used part is resampled
        a = int(round(it["from"] * native))
        seg = _resample(x[:, a: a + int(math.ceil(it["seconds"] * native))], native, sr)
        seg = seg[:, : int(round(it["seconds"] * sr))]
        seg = to_channels(seg, ch)
        seg = seg * 10 ** (it["gain_db"] / 20)
        if stem == "effects":
            seg = seg * (10 ** (-12 / 20) / max(np.abs(seg).max(), 1e-9))
            if ch == 2:
                seg = pan(seg, it["pan"])
            onsets.append(it["at"] + _onset_seconds(seg, sr))
        b = int(round(it["at"] * sr))
        m = min(seg.shape[1], n - b)
        out[:, b:b + m] += seg[:, :m]
    return out, onsets


def build_mixture(recipe: dict, cache: dict) -> dict:
    """``{"speech", "effects", "music"}`` ``[C, T]`` float32 and their sum ``mixture``
    (``cache``: source path -> ``(samples [C, T], sample_rate)``),
    plus ``events`` (seconds) and ``event_frames`` (at 24 fps)."""
    sr, ch = recipe["sample_rate"], recipe["channels"]
    n = int(round(recipe["seconds"] * sr))
    speech, _ = _place(recipe["speech"], "speech", sr, ch, n, cache)
    active = np.zeros(n, dtype=bool)   # inside an utterance
    for u in recipe["speech"]:
        active[int(round(u["at"] * sr)): int(round((u["at"] + u["seconds"]) * sr))] = True
    rms = math.sqrt(float((speech[:, active] ** 2).mean())) if active.any() else 1.0
    speech *= 10 ** (-20 / 20) / max(rms, 1e-9)
    effects, onsets = _place(recipe["effects"], "effects", sr, ch, n, cache)
    music, _ = _place([{**m, "gain_db": 0.0} for m in recipe["music"]], "music", sr, ch, n, cache)
    music *= 10 ** ((-26 + recipe["music"][0]["gain_db"]) / 20) / max(math.sqrt(float((music ** 2).mean())), 1e-9)
    stems = {"speech": speech, "effects": effects, "music": music}
    out = {k: v.astype(np.float32) for k, v in stems.items()}
    out["mixture"] = out["speech"] + out["effects"] + out["music"]
    out["events"] = onsets
    out["event_frames"] = [int(math.floor(t * FPS)) for t in onsets]
    out["sample_rate"] = sr
    return out


def check_sources(manifest: dict) -> list[str]:
    """Problems with the manifest's source files (missing, or a different sha256)."""
    problems = []
    for s in manifest["sources"]:
        p = Path(s["path"])
        if not p.is_file():
            problems.append(f"{p}: missing (apt-get install {s['package']})")
        elif sha256_file(p) != s["sha256"]:
            problems.append(f"{p}: sha256 differs from the manifest ({s['package']} {s['version']} expected)")
    return problems


def load_manifest(path: Path = MANIFEST) -> dict:
    return json.loads(Path(path).read_text())


def sources_present(manifest: Optional[dict] = None) -> bool:
    manifest = manifest or load_manifest()
    return all(Path(s["path"]).is_file() for s in manifest["sources"])


def iter_mixtures(part: Optional[str] = None, manifest: Optional[dict] = None):
    """Yield ``(recipe, mixture)`` of the manifest's mixtures (of one part), decoding each
    source once; raises if a source is missing or changed."""
    manifest = manifest or load_manifest()
    problems = check_sources(manifest)
    if problems:
        raise FileNotFoundError("demix evaluation sources:\n  " + "\n  ".join(problems))
    decoded: dict = {}
    for recipe in manifest["mixtures"]:
        if part and recipe["part"] != part:
            continue
        for stem in STEMS:
            for it in recipe[stem]:
                if it["source"] not in decoded:
                    decoded[it["source"]] = _decode(it["source"])
        yield recipe, build_mixture(recipe, decoded)


def build(cache: Path = DEFAULT_CACHE, manifest: Optional[dict] = None) -> Path:
    """Write every mixture's stems and mixture as float WAV plus ``events.json`` under ``cache``."""
    from avsync.core.audio_io import encode_wav

    for recipe, mix in iter_mixtures(manifest=manifest):
        folder = Path(cache) / recipe["part"] / recipe["name"]
        for key in ("mixture", *STEMS):
            encode_wav(folder / f"{key}.wav", mix[key], mix["sample_rate"], bits=32)
        (folder / "events.json").write_text(json.dumps({"events": mix["events"], "event_frames": mix["event_frames"],
                                                        "fps": FPS}, indent=1))
    return Path(cache)


# ----------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------

ONSET_HEIGHT = 0.2   # peaks of the KeyframeLocalizer's onset curve above this, >= 3 frames apart
TOLERANCE = 3        # frames, for precision@3 / AP@3
# peak heights swept for the effects stem, to compare its precision with the mixture's at equal AP@3
# (the height that gives the effects stem the mixture's AP@3 is chosen on the tune part)
SWEEP_HEIGHTS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)


def onset_peaks(waveform: np.ndarray, sample_rate: int, height: float = ONSET_HEIGHT) -> tuple[list, list]:
    """``(frames, heights)`` of the peaks of ``core.onset.onset_curve`` (24 fps) above
    ``height``, at least 3 frames apart. scipy drops the smaller of two close peaks, so a
    lower ``height`` never removes a higher peak: the peaks at or above ``h >= height``
    are those that ``onset_peaks(..., h)`` finds."""
    import torch
    from scipy.signal import find_peaks

    from avsync.core.onset import onset_curve
    from avsync.core.timeline import Timeline

    x = torch.as_tensor(np.asarray(waveform), dtype=torch.float32)
    curve = onset_curve(x, Timeline(FPS, sample_rate, x.shape[-1]))
    peaks, props = find_peaks(curve, height=height, distance=3)
    return [int(p) for p in peaks], [float(h) for h in props["peak_heights"]]


def onset_frames(waveform: np.ndarray, sample_rate: int) -> list[int]:
    """Event frames (24 fps) as the KeyframeLocalizer's ``onset`` method sees them: peaks
    of ``core.onset.onset_curve`` above ``ONSET_HEIGHT``, at least 3 frames apart."""
    return onset_peaks(waveform, sample_rate)[0]


EVENT_WINDOW = 0.15   # seconds from a true event's onset over which its level is measured


def event_report(mix: dict, estimate: np.ndarray) -> list[dict]:
    """Per true effect event, for ``estimate`` (``[3, C, T]`` in STEMS order): ``found`` (a
    peak of the effects stem's onset curve above the lowest swept height within
    ``TOLERANCE`` frames) and, over ``EVENT_WINDOW`` from its onset: ``under_mix_db`` (the
    event's energy against the mixture's; negative: under the mix) and, in dB against the
    true event's energy there, ``kept_db`` (the effects stem's energy) and ``speech_error_db`` /
    ``music_error_db`` (each of those stems' error against its true stem). A missed event
    with ``kept_db`` near 0 was under the peak threshold; one far below 0 was taken out of
    the effects stem, and the stem whose error is near 0 dB took it."""
    sr = mix["sample_rate"]
    frames, _ = onset_peaks(estimate[1], sr, min(SWEEP_HEIGHTS))

    def energy(x, a, b):
        return float((np.asarray(x[:, a:b], np.float64) ** 2).mean()) + 1e-20

    def db(x, a, b, ref):
        return 10 * math.log10(energy(x, a, b) / ref)

    out = []
    for t, f in zip(mix["events"], mix["event_frames"]):
        a = int(round(t * sr))
        b = a + int(round(EVENT_WINDOW * sr))
        true = energy(mix["effects"], a, b)
        out.append({"found": any(abs(p - f) <= TOLERANCE for p in frames),
                    "under_mix_db": -db(mix["mixture"], a, b, true),
                    "kept_db": db(estimate[1], a, b, true),
                    "speech_error_db": db(estimate[0] - mix["speech"], a, b, true),
                    "music_error_db": db(estimate[2] - mix["music"], a, b, true)})
    return out


def score(mix: dict, estimate: np.ndarray) -> dict:
    """SI-SDR of the mixture and of ``estimate`` (``[3, C, T]`` in STEMS order) against each
    true stem, and onset precision@3 / recall (AP@3) against the true events for the
    mixture, the estimated effects stem and the true effects stem (the oracle), at
    ``ONSET_HEIGHT``; for the effects stem and the oracle also at each of ``SWEEP_HEIGHTS``
    (``p3_fx@h`` / ``ap3_fx@h``, ``p3_oracle@h`` / ``ap3_oracle@h``)."""
    from avsync.core.metrics import match_rate, precision_rate, si_sdr

    out: dict = {}
    for i, stem in enumerate(STEMS):
        ref = mix[stem]
        out[f"{stem}_mix"] = si_sdr(mix["mixture"], ref)
        out[f"{stem}_est"] = si_sdr(estimate[i], ref)
        out[f"{stem}_imp"] = out[f"{stem}_est"] - out[f"{stem}_mix"]
    truth = mix["event_frames"]
    for name, wav in (("mix", mix["mixture"]), ("fx", estimate[1]), ("oracle", mix["effects"])):
        frames, heights = onset_peaks(wav, mix["sample_rate"], min(SWEEP_HEIGHTS))
        for h in sorted({ONSET_HEIGHT, *(SWEEP_HEIGHTS if name != "mix" else ())}):
            pred = [f for f, v in zip(frames, heights) if v >= h]
            keys = ([name] if h == ONSET_HEIGHT else []) + ([f"{name}@{h:g}"] if name != "mix" else [])
            for key in keys:
                out[f"p3_{key}"] = precision_rate(truth, pred, TOLERANCE)
                out[f"ap3_{key}"] = match_rate(truth, pred, TOLERANCE)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--regenerate", action="store_true", help="write the manifest anew from the installed packages")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"output folder (default {DEFAULT_CACHE})")
    args = p.parse_args()
    if args.regenerate:
        m = regenerate()
        MANIFEST.write_text(json.dumps(m, indent=1) + "\n")
        print(f"{MANIFEST}: {len(m['sources'])} sources, {len(m['mixtures'])} mixtures")
        return
    print(f"built {build(args.cache)}")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
