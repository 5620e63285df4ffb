"""``python -m bench`` collects every benchmark's BENCH_ROW lines into one table."""

import importlib
import sys

import pytest


@pytest.fixture()
def runner():
    return importlib.import_module("bench.__main__")


def test_rows_exit_code_and_peak_memory_of_one_process(runner, tmp_path):
    script = tmp_path / "bench_fake.py"
    script.write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom _report import row\n"
        "block = bytearray(64 * 2**20)  # 64 MiB, touched\n"
        "for i in range(0, len(block), 4096): block[i] = 1\n"
        "print('human line')\nrow('fake speed', 12.5, 'x real time', ratio=0.5, vs='naive')\n" % str(runner.HERE))
    res = runner.run_one(script, [], timeout=60)
    assert res["exit"] == 0 and res["rows"][0]["name"] == "fake speed" and res["rows"][0]["ratio"] == 0.5
    assert res["peak_rss_mb"] >= 64
    text = runner.table([res], markdown=True)
    assert "| bench_fake | fake speed | 12.5 | x real time | 0.5 | naive |" in text
    bad = tmp_path / "bench_bad.py"
    bad.write_text("raise SystemExit('boom')\n")
    res = runner.run_one(bad, [], timeout=60)
    assert res["exit"] == 1 and "FAILED (exit 1): boom" in runner.table([res], markdown=False)


def test_every_benchmark_has_a_plan(runner):
    names = {p.stem for p in runner.HERE.glob("bench_*.py")}
    assert names <= set(runner.PLANS), names - set(runner.PLANS)


def test_unknown_only_is_a_usage_error(runner, capsys):
    with pytest.raises(SystemExit) as e:
        runner.main(["--only", "bench_nothing"])
    assert e.value.code == 2 and "bench_nothing" in capsys.readouterr().err
    sys.modules.pop("bench.__main__", None)
