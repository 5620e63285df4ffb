"""Regressions from trying the pack as a new user (README commands copy-pasted, real recordings,
wrong paths, silly values): every README command parses as written, and each user error found is
one line naming the flag, exit code 2, no traceback, nothing written, before any model is loaded."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from avsync.cli import build_parser, main
from tests.factories import audio as synth
from tests.factories.audio_files import write_wav

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "example_workflows"
FIRST, LAST = EXAMPLES / "avsync_inbetween_first.png", EXAMPLES / "avsync_inbetween_last.png"
CLIP = EXAMPLES / "movie_hello_512x288.mp4"


def readme_commands() -> list[str]:
    """Every ``avsync …`` line of the README's bash blocks."""
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += [line for line in block.splitlines() if line.startswith("avsync ")]
    return lines


@pytest.fixture(scope="module")
def wav(tmp_path_factory):
    p = tmp_path_factory.mktemp("ut") / "in.wav"
    write_wav(p, synth.clicks([0.3, 0.9], 1.2, 16000)[None], 16000)
    return p


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "not audio é.wav"  # a text file with an audio name, in a unicode path with spaces
    p.write_text("hello world\n")
    return p


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_readme_commands_parse_as_written():
    parser, seen = build_parser(), set()
    for line in readme_commands():
        argv = shlex.split(line, comments=True)[1:]
        assert not any(a.startswith("[") for a in argv), line  # optional parts as [..] do not paste
        args, unknown = parser.parse_known_args(argv)
        assert not unknown and args.func, line
        seen.add(args.command)
        for a in argv:  # every file the examples read is in the repository
            if a.startswith("example_workflows/"):
                assert (ROOT / a).is_file(), line
    assert seen >= {"info", "localize", "demix", "animate", "mtv", "inbetween", "score"}


@pytest.mark.parametrize("command", ["animate", "mtv", "inbetween"])
def test_readme_model_commands_stop_at_the_missing_model(command, tmp_path, capsys, monkeypatch):
    line = next(c for c in readme_commands() if f" {command} " in c)
    argv = shlex.split(line, comments=True)[1:]
    argv[argv.index("--models") + 1] = str(tmp_path / "models")
    out = argv.index("--out") + 1
    argv[out] = str(tmp_path / argv[out])
    monkeypatch.chdir(ROOT)
    rc, err = _run(argv, capsys)
    assert rc == 2 and "not found in the" in _one_line(err) and "Get it from" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_unknown_option_is_reported_by_the_command(wav, tmp_path, capsys):
    rc, err = _run(["demix", wav, "--out", tmp_path / "s", "--sample-rate", "100"], capsys)
    assert rc == 2 and _one_line(err) == ("avsync demix: error: unrecognized arguments: --sample-rate 100 "
                                         "(see 'avsync demix --help')")
    rc, err = _run(["convert", "demix", "a.pth", "b.safetensors", "--bogus"], capsys)
    assert rc == 2 and _one_line(err).startswith("avsync convert demix: error: unrecognized arguments: --bogus")
    rc, err = _run(["score", "--video", CLIP, "[--audio", "track.wav]"], capsys)  # the README's old line
    assert rc == 2 and "avsync score: error: unrecognized arguments: [--audio track.wav]" in _one_line(err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--first", "--last"])
def test_inbetween_image_that_is_not_an_image_names_the_flag(flag, text_file, tmp_path, capsys):
    images = {"--first": FIRST, "--last": LAST, flag: text_file}
    rc, err = _run(["inbetween", *[x for kv in images.items() for x in kv], "--out", tmp_path / "b.mp4"], capsys)
    assert rc == 2 and _one_line(err) == (f"avsync inbetween: error: {flag}: {text_file}: "
                                         "not an image file Pillow can read")
    assert sorted(p.name for p in tmp_path.iterdir()) == [text_file.name]


def test_sizes_are_checked_before_the_model_is_loaded(wav, tmp_path, capsys):
    # the models folder is empty: the size must be refused before the missing model is noticed
    models = tmp_path / "models"
    rc, err = _run(["--models", models, "inbetween", "--first", FIRST, "--last", LAST, "--out", tmp_path / "b.mp4",
                    "--width", "65"], capsys)
    assert rc == 2 and _one_line(err) == "avsync inbetween: error: --width: must be a positive multiple of 8 px, got 65"
    rc, err = _run(["--models", models, "animate", "--image", FIRST, "--audio", wav, "--prompt", "x",
                    "--out", tmp_path / "a.mp4", "--height", "100"], capsys)
    assert rc == 2 and _one_line(err) == "avsync animate: error: --height: must be a positive multiple of 8 px, got 100"
    assert list(tmp_path.iterdir()) == []


def test_inbetween_node_validates_its_size_alone():
    from avsync.nodes.inbetween_nodes import AVSyncDualDirectionalSampler as node

    assert node.VALIDATE_INPUTS() is True
    assert node.VALIDATE_INPUTS(width=1024, height=576) is True
    assert node.VALIDATE_INPUTS(height=100) == "height: must be a positive multiple of 8 px, got 100"
    # ComfyUI skips its own range check for an input VALIDATE_INPUTS takes: the range is checked here
    assert node.VALIDATE_INPUTS(width=4096) == "width: must be between 64 and 2048, got 4096"
    # a linked (converted) widget arrives as None: checked when the node runs
    assert node.VALIDATE_INPUTS(width=None, height=None) is True


def test_unreadable_audio_names_its_flag(wav, text_file, tmp_path, capsys):
    rc, err = _run(["localize", wav, "--out", tmp_path / "k.json", "--driving-audio", text_file], capsys)
    assert rc == 2 and _one_line(err).startswith(f"avsync localize: error: --driving-audio: {text_file}: "
                                                 "cannot be read as audio or video")
    rc, err = _run(["animate", "--image", FIRST, "--audio", text_file, "--prompt", "x", "--out", tmp_path / "a.mp4"],
                   capsys)
    assert rc == 2 and _one_line(err).startswith(f"avsync animate: error: --audio: {text_file}:")
    rc, err = _run(["mtv", "--audio", wav, "--speech", text_file, "--prompt", "x", "--out", tmp_path / "m.mp4"],
                   capsys)
    assert rc == 2 and _one_line(err).startswith(f"avsync mtv: error: --speech: {text_file}:")
    assert sorted(p.name for p in tmp_path.iterdir()) == [text_file.name]


@pytest.mark.parametrize("content, why", [
    ('{"fps": 24}', "(has no keyframes, num_frames fields)"),
    ("[1, 2]", "(holds a JSON list, not an object)"),
    ("hello", "(invalid JSON: Expecting value: line 1 column 1 (char 0))"),
])
def test_score_keyframes_file_says_what_is_wrong(content, why, tmp_path, capsys):
    kf = tmp_path / "kf.json"
    kf.write_text(content)
    rc, err = _run(["score", "--video", CLIP, "--keyframes", kf, "--out", tmp_path / "r.json"], capsys)
    assert rc == 2 and _one_line(err) == (f"avsync score: error: --keyframes: {kf}: not a keyframes JSON from "
                                         f"`avsync localize` {why}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kf.json"]


def test_score_unreadable_audio_names_the_flag(text_file, tmp_path, capsys):
    rc, err = _run(["score", "--video", CLIP, "--audio", text_file], capsys)
    assert rc == 2 and _one_line(err).startswith(f"avsync score: error: --audio: {text_file}: cannot be read")


@pytest.fixture(scope="module")
def bench_runner():
    return importlib.import_module("bench.__main__")


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf", "soon"])
def test_bench_timeout_must_be_positive(bench_runner, timeout, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_runner.main(["--only", "bench_sync_score", "--timeout", timeout])
    assert exit_.value.code == 2 and "--timeout" in capsys.readouterr().err


def test_bench_json_checked_before_any_benchmark_runs(bench_runner, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_runner, "run_one", lambda *a: pytest.fail("a benchmark ran"))
    for target, why in ((tmp_path / "no" / "r.json", "does not exist"), (tmp_path, "is a directory")):
        with pytest.raises(SystemExit) as exit_:
            bench_runner.main(["--only", "bench_sync_score", "--json", str(target)])
        assert exit_.value.code == 2 and why in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
