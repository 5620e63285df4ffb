"""The one machine-readable line every ``bench/bench_*.py`` prints per result, so that
``python -m bench`` can collect them into one table (the human-readable lines stay)."""

from __future__ import annotations

import json
import time

PREFIX = "BENCH_ROW "


def row(name: str, value: float, unit: str, ratio: float | None = None, vs: str = "", peak_mb: float | None = None,
        note: str = "") -> None:
    """``ratio``: ours / the naive or reference path measured in the same run (``vs`` names it);
    ``peak_mb``: peak memory of this row's measurement, where the benchmark measures one."""
    print(PREFIX + json.dumps({"name": name, "value": float(value), "unit": unit,
                               "ratio": None if ratio is None else float(ratio), "vs": vs,
                               "peak_mb": None if peak_mb is None else float(peak_mb), "note": note}), flush=True)


def best_of(fn, repeat: int = 5) -> float:
    """Shortest of ``repeat`` timed calls after one warm-up call (seconds): the machine's
    load only ever adds time."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)
