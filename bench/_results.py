"""Where a benchmark's figures go: ``bench/results/<name>-<date>.json`` (git-ignored; the write-up
is docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import statistics
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_results(name: str, res: dict, out: str = RESULTS) -> str:
    """``res`` (with its ``date``) as ``<out>/<name>-<date>.json``; its path."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}-{res['date']}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    return path


def alternated(cases: dict, reps: int) -> dict:
    """Median seconds of each of ``cases`` (name -> callable) over ``reps`` repetitions, the order
    of the cases reversed on every other repetition."""
    times = {k: [] for k in cases}
    for r in range(reps):
        for k in list(cases)[:: 1 if r % 2 == 0 else -1]:
            t0 = time.perf_counter()
            cases[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
