"""Where a benchmark's figures go: ``bench/results/<name>-<date>.json`` (git-ignored; the write-up
is docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_results(name: str, res: dict, out: str = RESULTS) -> str:
    """``res`` (with its ``date``) as ``<out>/<name>-<date>.json``; its path."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}-{res['date']}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    return path
