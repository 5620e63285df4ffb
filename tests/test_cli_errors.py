"""The command line's user errors (issue 13): exit code 2, one line naming the option or file,
no traceback, nothing written; flags generated from the node schemas; progress off a terminal."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest

from avsync.cli import build_parser, main
from avsync.cli.common import ProgressReporter
from avsync.cli.schema_args import all_bindings, is_widget, iter_inputs
from tests.factories import audio as synth
from tests.factories.audio_files import write_wav


@pytest.fixture(scope="module")
def wav(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli") / "in.wav"
    write_wav(p, synth.clicks([0.3, 0.9], 1.2, 16000)[None], 16000)
    return p


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.err


def _one_clean_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if not line.startswith(("usage:", " "))]
    assert len(lines) == 1, err
    return lines[0]


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_localize_out_is_an_existing_directory(wav, tmp_path, capsys):
    (tmp_path / "d").mkdir()
    rc, err = _run(["localize", wav, "--out", tmp_path / "d"], capsys)
    assert rc == 2 and "--out" in _one_clean_line(err) and "is a directory" in err
    assert _listing(tmp_path) == ["d"] and _listing(tmp_path / "d") == []


def test_demix_out_is_an_existing_file(wav, tmp_path, capsys):
    f = tmp_path / "stems.wav"
    f.write_bytes(b"keep")
    rc, err = _run(["demix", wav, "--out", f], capsys)
    assert rc == 2 and "--out" in _one_clean_line(err) and "is a file; expected a folder" in err
    assert f.read_bytes() == b"keep" and _listing(tmp_path) == ["stems.wav"]


def test_out_in_an_unwritable_place(wav, tmp_path, capsys):
    rc, err = _run(["localize", wav, "--out", "/proc/kf.json"], capsys)
    assert rc == 2 and "--out: /proc/kf.json cannot be written" in _one_clean_line(err)
    (tmp_path / "file").write_text("x")
    rc, err = _run(["localize", wav, "--out", tmp_path / "file" / "kf.json"], capsys)
    assert rc == 2 and "is a file, not a folder" in _one_clean_line(err)


def test_unknown_plot_extension_refused_before_any_work(wav, tmp_path, capsys):
    rc, err = _run(["localize", wav, "--out", tmp_path / "kf.json", "--plot", tmp_path / "plot.xyz"], capsys)
    line = _one_clean_line(err)
    assert rc == 2 and "--plot" in line and "'.xyz'" in line and ".png" in line
    assert _listing(tmp_path) == []


def test_existing_outputs_need_force(wav, tmp_path, capsys):
    out = tmp_path / "kf.json"
    out.write_text("old")
    rc, err = _run(["localize", wav, "--out", out], capsys)
    assert rc == 2 and "--force" in _one_clean_line(err) and out.read_text() == "old"
    assert _run(["localize", wav, "--out", out, "--force", "-q"], capsys)[0] == 0
    assert out.read_text().startswith("{")
    stems = tmp_path / "stems"
    assert _run(["demix", wav, "--out", stems, "-q"], capsys)[0] == 0
    rc, err = _run(["demix", wav, "--out", stems], capsys)
    assert rc == 2 and "already holds speech.wav, effects.wav, music.wav; pass --force" in _one_clean_line(err)
    assert _run(["demix", wav, "--out", stems, "--force", "-q"], capsys)[0] == 0
    assert _listing(stems) == ["effects.wav", "music.wav", "speech.wav"]  # no temporary files left


def test_garbage_model_file_is_one_line(wav, tmp_path, capsys):
    bad = tmp_path / "svd_xt.safetensors"
    bad.write_bytes(b"")
    png = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (64, 64)).save(png)
    rc, err = _run(["inbetween", "--first", png, "--last", png, "--out", tmp_path / "v.mp4", "--svd", bad], capsys)
    line = _one_clean_line(err)
    assert rc == 2 and str(bad) in line and "empty" in line and "SVD" in line
    rc, err = _run(["demix", wav, "--out", tmp_path / "o", "--model", bad], capsys)
    assert rc == 2 and "MRX or BandIt v2 demix model" in _one_clean_line(err)
    rc, err = _run(["localize", wav, "--out", tmp_path / "kf.json", "--method", "learned", "--model", bad], capsys)
    assert rc == 2 and "KeyVID localizer" in _one_clean_line(err) and str(bad) in err
    assert not (tmp_path / "kf.json").exists()
    assert not (tmp_path / "v.mp4").exists() and not (tmp_path / "o").exists()


def test_input_paths_are_reported_as_a_command_line_user_expects(tmp_path, capsys):
    rc, err = _run(["localize", tmp_path / "missing.wav", "--out", tmp_path / "kf.json"], capsys)
    line = _one_clean_line(err)
    assert rc == 2 and "missing.wav: no such file" in line and "ComfyUI" not in line
    rc, err = _run(["demix", tmp_path, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "is a directory" in _one_clean_line(err) and "ComfyUI" not in err
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("argv, flag", [
    (["--fps", "100000"], "--fps"), (["--peak-distance", "0"], "--peak-distance"),
    (["--prominence", "-1"], "--prominence"), (["--max-duration", "0"], "--max-duration"),
    (["--fps", "nan"], "--fps"), (["--num-keyframes", "1.5"], "--num-keyframes"),
])
def test_nonsense_numbers_are_refused_with_the_schema_range(wav, tmp_path, capsys, argv, flag):
    rc, err = _run(["localize", wav, "--out", tmp_path / "kf.json", *argv], capsys)
    line = _one_clean_line(err)
    assert rc == 2 and f"argument {flag}" in line
    assert _listing(tmp_path) == []


def test_over_the_duration_limit_names_flags_that_exist(tmp_path, capsys):
    long = tmp_path / "long.wav"
    write_wav(long, np.zeros((1, 8000 * 3)), 8000)
    for cmd, extra in (("localize", ["--out", tmp_path / "kf.json"]), ("demix", ["--out", tmp_path / "o"])):
        rc, err = _run([cmd, long, "--max-duration", "2", *extra], capsys)
        line = _one_clean_line(err)
        assert rc == 2 and "--duration" in line and "--max-duration" in line, line
        _assert_flags_exist(cmd, line)
    # and --max-duration really lets a long file through
    assert _run(["localize", long, "--max-duration", "5", "--out", tmp_path / "kf.json", "-q"], capsys)[0] == 0


def _assert_flags_exist(cmd: str, message: str) -> None:
    parser = _subparser(cmd)
    options = {o for a in parser._actions for o in a.option_strings}
    for flag in re.findall(r"(--[a-z][a-z0-9-]*)", message):
        assert flag in options, f"{cmd}: message names {flag}, which does not exist: {message}"
    inputs = {name for b in parser._avsync_bindings for name, *_ in iter_inputs(b.node_id)}
    for quoted in re.findall(r"'([a-z_]+)'", message):
        assert quoted not in inputs, f"{cmd}: message names node input {quoted!r} instead of its flag: {message}"


def _subparser(cmd: str):
    parser = build_parser()
    return next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices[cmd]


@pytest.mark.parametrize("cmd, argv", [
    ("localize", ["--method", "learned", "--model", "nope.safetensors"]),
    ("localize", ["--drive-with", "driving_audio"]),
    ("localize", ["--num-keyframes", "60"]),
    ("demix", ["--method", "model"]),
    ("localize", ["--start", "9"]),
])
def test_error_hints_name_flags_that_exist(wav, tmp_path, capsys, cmd, argv):
    out = tmp_path / ("kf.json" if cmd == "localize" else "o")
    rc, err = _run(["--models", tmp_path / "models", cmd, wav, "--out", out, *argv], capsys)
    line = _one_clean_line(err)
    assert rc == 2, line
    _assert_flags_exist(cmd, line)
    assert _listing(tmp_path) in ([], ["models"])


def test_every_node_input_has_a_flag_with_help():
    parser = build_parser()
    for cmd, bindings in all_bindings(parser).items():
        sub = _subparser(cmd)
        by_dest = {a.dest: a for a in sub._actions}
        for b in bindings:
            for name, kind, _opts, _section in iter_inputs(b.node_id):
                if name in b.skipped:
                    assert b.skipped[name], (cmd, name)
                    continue
                if not is_widget(kind):
                    continue
                action = by_dest[b.dests[name]]
                assert action.help and len(action.help) > 20, (cmd, name)
                if action.default is not None:
                    assert "default" in action.help, (cmd, name, action.help)
    # every hand-written option has help too
    for cmd in all_bindings(parser):
        for a in _subparser(cmd)._actions:
            if a.__class__.__name__ != "_SubParsersAction":
                assert a.help, (cmd, a.option_strings or a.dest)
    bound = {cmd for cmd, bindings in all_bindings(parser).items() if bindings}
    assert {"localize", "demix", "inbetween", "score"} <= bound, bound


def test_internal_error_is_short_and_points_to_the_log(wav, tmp_path, capsys, monkeypatch):
    from avsync.cli import cmd_localize

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))

    def boom(*a, **k):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr("avsync.cli.common.run_node", boom)
    rc, err = _run(["localize", wav, "--out", tmp_path / "kf.json"], capsys)
    line = _one_clean_line(err)
    log = tmp_path / "state" / "avsync" / "last-error.log"
    assert rc == 1 and "internal error: RuntimeError: something inside broke" in line and str(log) in line
    assert "Traceback" in log.read_text()
    rc, err = _run(["localize", wav, "--out", tmp_path / "kf.json", "-v"], capsys)
    assert rc == 1 and "Traceback" in err
    assert not (tmp_path / "kf.json").exists()
    assert cmd_localize  # imported for monkeypatch's module lookup


def test_progress_off_a_terminal_is_a_line_every_few_seconds():
    now = [0.0]
    out = io.StringIO()
    rep = ProgressReporter("demix", stream=out, interval=5.0, clock=lambda: now[0])
    for i in range(1, 11):
        now[0] = i * 2.0
        rep(i, 10, "AVSync demix")
    lines = out.getvalue().splitlines()
    # timed from the first update (t = 2 s, step 1): a line at t = 8, 14 s and at the end
    assert lines == ["avsync demix: demix 4/10 (40%), 6 s elapsed, ETA 12 s",
                     "avsync demix: demix 7/10 (70%), 12 s elapsed, ETA 6 s",
                     "avsync demix: demix 10/10 (100%), 18 s elapsed, done"]
    quiet = io.StringIO()
    rep = ProgressReporter("demix", stream=quiet, quiet=True, clock=lambda: now[0])
    rep(1, 2, "x")
    assert quiet.getvalue() == ""
    fast = io.StringIO()  # a job done within one interval prints nothing
    rep = ProgressReporter("demix", stream=fast, interval=5.0, clock=lambda: 0.0)
    rep(1, 1, "x")
    assert fast.getvalue() == ""
