"""Training metrics for people: the progress line, TensorBoard events (and an experiment
tracker's run, :mod:`cerbero_ray.tracking`), metrics.jsonl, the loss PNG.

Written by rank 0 only. ``metrics.jsonl`` and ``loss.png`` are rebuilt from the history carried in
every checkpoint, so a resumed run shows each step once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time

from cerbero_ray import storage
from cerbero_ray.tracking import SUMMARY

log = logging.getLogger(__name__)


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_line(m: dict, total_steps: int) -> str:
    parts = [
        f"step {m['step']}/{total_steps} ({100 * m['step'] / max(total_steps, 1):.0f}%)",
        f"epoch {m['epoch']}",
        f"loss {m['loss']:.4f}",
        f"lr {m['lr']:.2e}",
        f"gnorm {m['grad_norm']:.3f}",
        f"{m['tokens_per_s'] / 1e3:.1f}k tok/s",
    ]
    if m.get("mfu") is not None:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    parts.append(f"ETA {format_eta(m['eta_s'])}")
    return "[train] " + " | ".join(parts)


class Writer:
    """Rank 0's outputs under the run folder (a local path, or staged locally and uploaded)."""

    def __init__(self, run_dir: str, resume_step: int, tracker=None):
        self.run_dir = run_dir
        self.local = (
            storage.resolve(run_dir)[1] if not storage.is_uri(run_dir) else tempfile.mkdtemp(prefix="cerbero-run-")
        )
        os.makedirs(self.local, exist_ok=True)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed attempt logged after the checkpoint we resume from
            self.tb = SummaryWriter(os.path.join(self.local, "tensorboard"), purge_step=resume_step or None)
        except ImportError:  # tensorboard is a dependency; tolerate a trimmed install
            pass
        self.tracker = tracker  # train.tracker's run (cerbero_ray.tracking.Tracker), or None
        self.t0 = time.time()

    def scalars(self, step: int, values: dict) -> None:
        named = {
            f"train/{k}" if not k.startswith("eval") else k.replace("_", "/", 1): v
            for k, v in values.items()
            if isinstance(v, (int, float)) and v is not None
        }
        if self.tb is not None:
            for k, v in named.items():
                self.tb.add_scalar(k, v, step)
        if self.tracker is not None:
            self.tracker.log(step, named)

    def history(self, history: list[dict]) -> None:
        with open(os.path.join(self.local, "metrics.jsonl"), "w") as f:
            for h in history:
                f.write(json.dumps(h) + "\n")

    def sync(self) -> None:
        if self.tb is not None:
            self.tb.flush()
        if self.tracker is not None:
            self.tracker.flush()
        if storage.is_uri(self.run_dir):
            storage.upload_folder(self.local, self.run_dir, markers=False)

    def close(self, summary: dict | None = None) -> None:
        """The end of the run: TensorBoard closed; the tracker run gets the ``summary``'s figures
        (``summary/<key>``, at the last step), the loss curve and the summary as files, and is
        finished; the folder uploaded."""
        if self.tb is not None:
            self.tb.close()
        if self.tracker is not None:
            if summary is not None:
                figures = {
                    f"summary/{k}": v
                    for k, v in summary.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("steps", "resumed_from")
                }
                self.tracker.summary(int(summary["steps"]), figures, once=True)  # a rerun at the end: once
                with tempfile.TemporaryDirectory(prefix="cerbero-summary-") as d:
                    with open(os.path.join(d, SUMMARY), "w") as f:
                        json.dump(summary, f, indent=2)
                    png = os.path.join(self.local, "loss.png")
                    self.tracker.files([p for p in (png, f.name) if os.path.isfile(p)])
            self.tracker.finish()
        self.sync()
        if storage.is_uri(self.run_dir):
            shutil.rmtree(self.local, ignore_errors=True)


def loss_png(history: list[dict], path: str, title: str) -> str:
    """The training and held-out loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    held = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (token-weighted mean)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def summarize(
    run_dir: str, history: list[dict], step: int, resumed_from: int | None, extra: dict | None = None
) -> dict:
    """What ``summary.json`` holds: the run's figures from its ``history`` (``extra``: the method,
    trainable parameters and their share, peak memory, the adapter)."""
    evals = [h["eval_loss"] for h in history if h.get("eval_loss") is not None]
    losses = [h["loss"] for h in history if "loss" in h]
    speeds = sorted(h["tokens_per_s"] for h in history if "tokens_per_s" in h)
    return {
        "steps": step,
        "resumed_from": resumed_from,
        "run_dir": run_dir,
        "hf_dir": storage.join(run_dir, "hf"),
        "loss_png": storage.join(run_dir, "loss.png"),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "eval_losses": evals,
        "tokens_per_s_median": speeds[len(speeds) // 2] if speeds else None,
        "train_s": sum(h.get("step_s", 0.0) for h in history),
        **(extra or {}),
    }


def write_summary(name: str, writer: Writer, history: list[dict], summary: dict) -> dict:
    """Rank 0 at the end: ``metrics.jsonl``, ``loss.png``, TensorBoard and the tracker closed,
    ``summary.json`` (:func:`summarize`) last; returns ``summary``."""
    writer.history(history)
    try:
        loss_png(history, os.path.join(writer.local, "loss.png"), f"{name}: {summary['steps']} steps")
    except ImportError:  # matplotlib is a dependency; a bare benchmark machine may lack it
        log.warning("no matplotlib: loss.png not written")
    writer.close(summary)
    # last: the run's mark of a finished run
    storage.write_json(storage.join(summary["run_dir"], SUMMARY), summary)
    return summary


def read_summary(run_dir: str) -> dict:
    """The summary rank 0 wrote at the end of the run."""
    return storage.read_json(storage.join(run_dir, SUMMARY))
