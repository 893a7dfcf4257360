"""What an experiment tracker costs a training step (``train.tracker``; CPU, no Ray, no model): rank
0's ``Tracker.log`` of the scalars the loop logs each step (``train/loss``, ``train/lr``, …), timed
per call, for no tracker, MLflow (a ``file:`` store here; a server adds its round trips to the
sending thread, not to the step) and W&B (offline), in turn, the order alternated over repetitions
after a warm-up of each; medians. Also the time ``flush`` waits at the end (what the sending
thread had not sent yet: the step time it would cost at a checkpoint) and the whole run's steps
per second of logging.

    python bench/bench_tracker.py                 # 500 steps x 3 repetitions (~1 minute)
    python bench/bench_tracker.py --steps 2000 --reps 5

Writes bench/results/tracker-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _results import RESULTS, write_results  # noqa: E402 (bench/, the script's own folder)

SCALARS = [  # what the loop's Writer.scalars sends at each step
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/tokens_per_s",
    "train/mfu",
    "train/step_s",
    "train/loss_tokens",
    "train/tokens",
    "train/epoch",
    "train/data_wait_s",
]


def one_run(kind: str, steps: int, root: str) -> dict:
    """A fresh tracker run of ``kind`` logging ``steps`` steps: per-call seconds, flush seconds."""
    from cerbero_ray.config.common import TrackerConfig
    from cerbero_ray.tracking import Tracker, open_run

    folder = tempfile.mkdtemp(dir=root)
    tc = TrackerConfig(kind=kind, project="bench", uri=f"file:{root}/mlruns" if kind == "mlflow" else None)
    rec = open_run(tc, "train.tracker", "bench", folder, {"train.lr": 1e-5})
    t = Tracker(rec, {"train.lr": 1e-5}, folder, "train.tracker") if rec else None
    calls = []
    t0 = time.perf_counter()
    for step in range(steps):
        values = {k: 1.0 / (step + 1) + i for i, k in enumerate(SCALARS)}
        c0 = time.perf_counter()
        if t is not None:
            t.log(step, values)
        calls.append(time.perf_counter() - c0)
    f0 = time.perf_counter()
    if t is not None:
        t.flush()
    flush = time.perf_counter() - f0
    total = time.perf_counter() - t0
    if t is not None:
        t.finish()
        assert not t.broken, f"{kind}: the tracker turned itself off"
    return {
        "call_us_median": statistics.median(calls) * 1e6,
        "call_us_p99": sorted(calls)[int(0.99 * len(calls))] * 1e6,
        "flush_s": flush,
        "steps_per_s": steps / total,
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--kinds", default="none,mlflow,wandb")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--cpu-smoke", action="store_true", help="20 steps, one repetition: checks the script runs")
    a = p.parse_args()
    if a.cpu_smoke:
        a.steps, a.reps = 20, 1
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    kinds = a.kinds.split(",")
    root = tempfile.mkdtemp(prefix="bench-tracker-")
    for k in kinds:  # warm-up: imports, the first run of each
        one_run(k, 5, root)
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for rep in range(a.reps):
        for k in kinds if rep % 2 == 0 else kinds[::-1]:
            runs[k].append(one_run(k, a.steps, root))
    res = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "steps": a.steps,
        "reps": a.reps,
        "scalars_per_step": len(SCALARS),
        "kinds": {k: {m: round(statistics.median(r[m] for r in rs), 4) for m in rs[0]} for k, rs in runs.items()},
    }
    print(json.dumps(res, indent=1))
    if not a.cpu_smoke:
        write_results("tracker", res, a.out)


if __name__ == "__main__":
    main()
