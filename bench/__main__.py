"""``python -m bench [--quick] [--only NAME ...]``: every benchmark in bench/, one table.

Each ``bench/bench_*.py`` runs as its own process (so one benchmark's memory does not
hide another's) with the arguments below, prints its usual lines, and one
``BENCH_ROW {json}`` line per result (bench/_report.py). This collects those rows and
prints one table — value, ratio against the naive/reference path of the same run, peak
memory where the row measures one, and each process's peak resident set — headed by the
machine, the date and the git commit. With CUDA present, the real-size GPU variants run
too. Output: the table on stdout (``--markdown`` for README-ready rows), and ``--json FILE``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _report import PREFIX  # noqa: E402

# arguments per benchmark: (quick, full, cuda-only extra run or None). A new bench_*.py
# with no entry runs without arguments.
PLANS = {
    "bench_localizer": (["--quick"], [], ["--device", "cuda"]),
    "bench_demix": (["--quick"], [], None),
    "bench_inbetween": (["--repeats", "1"], [], ["--device", "cuda", "--real-config"]),
    "bench_svd_loading": ([], [], ["--size", "real"]),
    "bench_sync_score": (["--quick"], [], None),
    # needs the Debian-packaged evaluation sources (bench/demix_eval.py says which); fails naming them
    "bench_demix_quality": (["--part", "heldout"], [], None),
    # the UNet forward has its own entry below, so the models bench skips its nested run; the
    # released size (~15.6 GB checkpoint, ~35 GB disk) is a RAM/disk job, not a GPU one: --real by hand
    "bench_keyvid_models": (["--sizes", "S", "--skip-unet-forward"], ["--skip-unet-forward"], None),
    "bench_keyvid_unet": (["--frames", "4"], ["--repeats", "3"], ["--real", "--device", "cuda", "--repeats", "3"]),
    "bench_sampling_core": (["--repeats", "2"], [], ["--device", "cuda"]),
    "bench_asg": (["--frames", "2", "--height", "8", "--width", "8", "--repeats", "1", "--steps", "2"], [],
                  ["--device", "cuda", "--real", "--frames", "12", "--height", "40", "--width", "64"]),
    "bench_keyvid": (["--only", "estimate"], ["--mem-height", "160", "--mem-width", "256"],
                     ["--device", "cuda", "--real-config"]),
    # small config on the CPU; the released config (random weights) only with CUDA
    "bench_mtv": (["--repeats", "1", "--settings", "resident", "resident two-calls", "resident no-cache"], [],
                  ["--device", "cuda", "--real", "--settings", "swap 21", "swap 0", "fp8", "resident two-calls"]),
}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "os": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_one(script: Path, args: list[str], timeout: float) -> dict:
    """Run one benchmark; its rows, wall time, exit code and peak RSS (``wait4`` of that child)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    rows, tail = [], []
    deadline = t0 + timeout
    assert proc.stdout is not None
    for line in proc.stdout:  # pass the benchmark's own lines through as they come
        if line.startswith(PREFIX):
            rows.append(json.loads(line[len(PREFIX):]))
        else:
            sys.stderr.write(f"  {script.stem}| {line}")
            tail = (tail + [line.rstrip()])[-5:]
        if time.perf_counter() > deadline:
            proc.kill()
            break
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return {"bench": script.stem, "args": args, "rows": rows, "seconds": time.perf_counter() - t0, "exit": code,
            "peak_rss_mb": usage.ru_maxrss / 1024.0, "tail": tail}


def _fmt(v, digits=3):
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"


def table(results: list[dict], markdown: bool) -> str:
    head = ["benchmark", "row", "value", "unit", "ratio", "vs", "peak MB (row)", "peak RSS MB (process)"]
    lines = []
    for r in results:
        label = r["bench"] + (" " + " ".join(r["args"]) if r["args"] else "")
        if r["exit"] != 0:
            lines.append([label, f"FAILED (exit {r['exit']}): {(r['tail'] or [''])[-1][:80]}", "", "", "", "", "",
                          _fmt(r["peak_rss_mb"], 4)])
        for row in r["rows"]:
            lines.append([label, row["name"], _fmt(row["value"]), row["unit"], _fmt(row["ratio"]), row["vs"] or "",
                          _fmt(row["peak_mb"], 4), _fmt(r["peak_rss_mb"], 4)])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)] if lines else [len(h) for h in head]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*["-" * w for w in widths])] + [fmt.format(*l) for l in lines])


def _positive_seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text}")
    return v


def _unwritable(path: Path) -> str:
    """Why ``path`` cannot be written as a new or replaced file ('' when it can)."""
    if path.is_dir():
        return "is a directory; expected a file name"
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return f"folder {parent} does not exist"
    try:  # a real write probe: os.access says yes to root on a read-only or immutable folder
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.probe-", dir=parent)
    except OSError as err:
        return f"cannot be written ({err.strerror or err})"
    os.close(fd)
    os.unlink(probe)
    return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="each benchmark's short variant (minutes, not tens of minutes)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these (e.g. bench_sync_score)")
    p.add_argument("--no-gpu", action="store_true", help="skip the real-size GPU variants even when CUDA is present")
    p.add_argument("--timeout", type=_positive_seconds, default=3600.0, help="seconds per benchmark process (default 3600)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown (README)")
    p.add_argument("--json", metavar="FILE", help="also write every row and the header as JSON")
    args = p.parse_args(argv)

    if args.json:  # refused now, not after hours of benchmarks
        problem = _unwritable(Path(args.json))
        if problem:
            p.error(f"--json: {args.json}: {problem}")
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        wanted = {n.removesuffix(".py") for n in args.only}
        unknown = wanted - {s.stem for s in scripts}
        if unknown:
            p.error(f"--only: no benchmark named {', '.join(sorted(unknown))} "
                    f"(have: {', '.join(s.stem for s in scripts)})")
        scripts = [s for s in scripts if s.stem in wanted]
    try:
        import torch

        cuda = torch.cuda.is_available() and not args.no_gpu
    except ImportError:
        cuda = False
    runs = []
    for s in scripts:
        quick, full, gpu = PLANS.get(s.stem, ([], [], None))
        runs.append((s, quick if args.quick else full))
        if cuda and gpu is not None:
            runs.append((s, gpu))
    header = {"machine": machine(), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "commit": git_commit(), "command": "python -m bench " + " ".join(argv if argv is not None else
                                                                                 sys.argv[1:])}
    results = []
    for script, extra in runs:
        sys.stderr.write(f"running {script.name} {' '.join(extra)}\n")
        results.append(run_one(script, extra, args.timeout))
    m = header["machine"]
    print(f"{header['command'].strip()} — {header['date']}, commit {header['commit']}")
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m.get('gpu', 'no GPU')}, torch {m.get('torch', '?')}, "
          f"Python {m['python']}")
    print(table(results, args.markdown))
    if args.json:  # temporary name + rename: an interrupted write leaves no half-written file
        tmp = Path(args.json).with_name(f".{Path(args.json).name}.partial-{os.getpid()}")
        tmp.write_text(json.dumps({"header": header, "results": results}, indent=2) + "\n")
        os.replace(tmp, args.json)
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
