"""The machinery of the real-audio demix evaluation (bench/demix_eval.py): mixing from
recipes, the scorer on hand-made stems, and the manifest with its checksums. The
numbers of the benchmark itself are printed by bench/bench_demix_quality.py, not
asserted here."""

import math

import numpy as np
import pytest

from avsync.core.metrics import si_sdr
from bench import demix_eval as E

from tests.factories import audio as A


def test_si_sdr_of_known_distortions():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 4000))
    noise = rng.standard_normal((2, 4000))
    noise -= (noise.ravel() @ ref.ravel()) / (ref.ravel() @ ref.ravel()) * ref   # orthogonal to ref
    noise *= math.sqrt((ref ** 2).sum() / (noise ** 2).sum()) / 10 ** (6 / 20)      # 6 dB under it
    assert si_sdr(ref + noise, ref) == pytest.approx(6.0, abs=1e-9)
    assert si_sdr(3.0 * (ref + noise), ref) == pytest.approx(6.0, abs=1e-9)      # scale-invariant
    assert si_sdr(np.zeros_like(ref), ref) == float("-inf")
    assert math.isnan(si_sdr(ref, np.zeros_like(ref)))


def _fake_cache(sr):
    """Hand-made "recordings": a pulsed tone as speech, clicks as effects, a chord as music."""
    speech = (A.speech_like(1.5, sr, seed=3) * 0.5)[None]
    hit = np.zeros((1, int(0.3 * sr)))
    hit[0, int(0.05 * sr):] = A.clicks([0.0], 0.25, sr, amp=0.8, seed=1)[: hit.shape[1] - int(0.05 * sr)]
    music = np.stack([A.chord(duration=4.0, sr=sr), A.chord((246.94, 311.13, 369.99), 4.0, sr)])
    return {"speech": (speech, sr), "hit": (hit, sr), "music": (music, sr)}


def _recipe(sr, ch):
    return {"name": "fake", "part": "tune", "case": "plain", "sample_rate": sr, "channels": ch, "seconds": 3.0,
            "speech": [{"source": "speech", "at": 0.2, "from": 0.0, "seconds": 1.5, "gain_db": 0.0, "pan": 0.0}],
            "effects": [{"source": "hit", "at": t, "from": 0.0, "seconds": 0.3, "gain_db": -2.0, "pan": 0.5}
                        for t in (0.5, 1.4, 2.3)],
            "music": [{"source": "music", "at": 0.0, "from": 0.5, "seconds": 3.0, "gain_db": -4.0, "pan": 0.0}]}


@pytest.mark.parametrize("sr,ch", [(16000, 1), (44100, 2)])
def test_mixture_is_the_sum_of_its_stems_at_the_recipe_levels(sr, ch):
    mix = E.build_mixture(_recipe(sr, ch), _fake_cache(sr))
    for k in ("mixture", *E.STEMS):
        assert mix[k].shape == (ch, 3 * sr) and mix[k].dtype == np.float32
    assert np.abs(mix["speech"] + mix["effects"] + mix["music"] - mix["mixture"]).max() == 0.0
    active = np.zeros(3 * sr, dtype=bool)
    active[int(0.2 * sr): int(1.7 * sr)] = True   # the utterance's span
    assert 20 * math.log10(math.sqrt((mix["speech"][:, active].astype(np.float64) ** 2).mean())) == \
        pytest.approx(-20.0, abs=1e-3)
    assert 20 * math.log10(math.sqrt((mix["music"].astype(np.float64) ** 2).mean())) == pytest.approx(-30.0, abs=1e-3)
    # each event: peak -12 dBFS before panning; it starts 50 ms into its file (first sample >= 10 % of its peak)
    assert mix["events"] == pytest.approx([0.55, 1.45, 2.35], abs=2 / sr)
    assert mix["event_frames"] == [math.floor(t * 24) for t in mix["events"]]
    if ch == 2:   # pan 0.5: right louder than left, constant power
        right, left = np.abs(mix["effects"][1]).max(), np.abs(mix["effects"][0]).max()
        assert right / left == pytest.approx(math.tan(0.75 * math.pi / 2), rel=1e-3)


def test_scorer_on_hand_made_stems():
    sr = 16000
    mix = E.build_mixture(_recipe(sr, 1), _fake_cache(sr))
    perfect = np.stack([mix[s] for s in E.STEMS])
    r = E.score(mix, perfect)
    for s in E.STEMS:
        assert r[f"{s}_est"] > 100 and r[f"{s}_imp"] == pytest.approx(r[f"{s}_est"] - r[f"{s}_mix"])
        assert r[f"{s}_mix"] == pytest.approx(si_sdr(mix["mixture"], mix[s]))
    assert r["p3_oracle"] == 1.0 and r["ap3_oracle"] == 1.0 and r["p3_fx"] == 1.0
    lazy = np.stack([mix["mixture"]] * 3)   # every "stem" is the mixture: no improvement anywhere
    r = E.score(mix, lazy)
    assert all(abs(r[f"{s}_imp"]) < 1e-9 for s in E.STEMS)
    assert r["p3_fx"] == r["p3_mix"] and r["ap3_fx"] == r["ap3_mix"]


def test_manifest_names_each_source_once_with_package_licence_and_checksum():
    m = E.load_manifest()
    by_path = {s["path"]: s for s in m["sources"]}
    assert len(by_path) == len(m["sources"])
    for s in m["sources"]:
        assert s["package"] in E.PACKAGES and s["version"] == m["packages"][s["package"]]
        assert s["licence"] != "unknown" and len(s["sha256"]) == 64
    used = {"tune": set(), "heldout": set()}
    formats = {}
    for r in m["mixtures"]:
        formats.setdefault(r["part"], set()).add((r["sample_rate"], r["channels"], r["case"]))
        for stem in E.STEMS:
            for it in r[stem]:
                assert it["source"] in by_path
                used[r["part"]].add(it["source"])
    assert not used["tune"] & used["heldout"], "the held-out part shares recordings with the tuning part"
    assert formats["tune"] == formats["heldout"] == {(sr, ch, c) for sr, ch in E.FORMATS for c in E.CASES}


@pytest.mark.skipif(not E.sources_present(), reason="the Debian source packages are not installed "
                    "(apt-get install hedgewars-data asterisk-core-sounds-en-g722 sound-theme-freedesktop)")
def test_installed_sources_match_the_manifest_and_rebuild():
    m = E.load_manifest()
    assert E.check_sources(m) == []
    first = {}
    for recipe, mix in E.iter_mixtures(manifest={**m, "mixtures": [m["mixtures"][16]]}):
        first[recipe["part"]] = mix
        n = int(recipe["seconds"] * recipe["sample_rate"])
        assert mix["mixture"].shape == (recipe["channels"], n)
        assert np.abs(mix["speech"] + mix["effects"] + mix["music"] - mix["mixture"]).max() == 0.0
        assert len(mix["event_frames"]) == len(recipe["effects"]) and all(0 <= f < 240 for f in mix["event_frames"])
    assert set(first) == {"heldout"}


def test_onset_sweep_and_the_equal_ap_operating_point():
    """Peaks above a higher height are a subset of those above a lower one (so AP@3 falls as the
    height rises), the sweep at ONSET_HEIGHT is the plain score, and the operating point is the
    highest swept height whose mean AP@3 reaches the mixture's."""
    import bench.bench_demix_quality as Q

    sr = 16000
    mix = E.build_mixture(_recipe(sr, 1), _fake_cache(sr))
    est = np.stack([mix["speech"], mix["effects"] + 0.3 * mix["music"], mix["music"]])
    r = E.score(mix, est)
    aps = [r[f"ap3_fx@{h:g}"] for h in E.SWEEP_HEIGHTS]
    assert aps == sorted(aps, reverse=True)
    oracle = [r[f"ap3_oracle@{h:g}"] for h in E.SWEEP_HEIGHTS]
    assert oracle == sorted(oracle, reverse=True) and r[f"p3_oracle@{E.ONSET_HEIGHT:g}"] == r["p3_oracle"]
    assert (r[f"p3_fx@{E.ONSET_HEIGHT:g}"], r[f"ap3_fx@{E.ONSET_HEIGHT:g}"]) == (r["p3_fx"], r["ap3_fx"])
    frames, heights = E.onset_peaks(est[1], sr, 0.05)
    assert set(E.onset_peaks(est[1], sr, 0.3)[0]) == {f for f, h in zip(frames, heights) if h >= 0.3}
    rows = [{"ap3_mix": 0.8, **{f"ap3_fx@{h:g}": 1.0 - h for h in E.SWEEP_HEIGHTS}},
            {"ap3_mix": 0.6, **{f"ap3_fx@{h:g}": 0.9 - h for h in E.SWEEP_HEIGHTS}}]
    assert Q.equal_ap_height(rows) == 0.25        # mean AP 0.95 - h >= 0.7
    assert Q.equal_ap_height([{**rows[0], "ap3_mix": 1.0}]) == min(E.SWEEP_HEIGHTS)
    oracle_rows = [{"ap3_mix": 0.7, **{f"ap3_oracle@{h:g}": 1.0 - h for h in E.SWEEP_HEIGHTS}}]
    assert Q.equal_ap_height(oracle_rows, "oracle") == 0.3


def test_event_report_tells_a_kept_event_from_one_sent_to_speech():
    sr = 16000
    mix = E.build_mixture(_recipe(sr, 1), _fake_cache(sr))
    perfect = np.stack([mix[s] for s in E.STEMS])
    kept = E.event_report(mix, perfect)
    assert [e["found"] for e in kept] == [True] * 3
    assert all(e["kept_db"] == pytest.approx(0.0, abs=1e-9) and e["under_mix_db"] < 0 and
               e["speech_error_db"] < -150 for e in kept)
    moved = perfect.copy()
    a = int(round(mix["events"][1] * sr))
    span = slice(a - int(0.05 * sr), a + int(0.3 * sr))
    moved[0][:, span] += 0.99 * mix["effects"][:, span]     # the second event sent to speech (-40 dB left)
    moved[1][:, span] *= 0.01
    r = E.event_report(mix, moved)
    assert [e["found"] for e in r] == [True, False, True]
    assert r[1]["kept_db"] == pytest.approx(-40.0, abs=1e-6)
    assert r[1]["speech_error_db"] == pytest.approx(20 * math.log10(0.99), abs=1e-6)
    assert r[1]["music_error_db"] < -150 and r[0]["kept_db"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("flag", ["--model", "--learned-weights"])
def test_quality_bench_refuses_a_wrong_model_file_in_one_line(tmp_path, flag):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    bad = tmp_path / "notes.safetensors"
    bad.write_text("not a model")
    res = subprocess.run([sys.executable, str(root / "bench" / "bench_demix_quality.py"), flag, str(bad)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bench_demix_quality.py: error: {flag}: {bad}")
