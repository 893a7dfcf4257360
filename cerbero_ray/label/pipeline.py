"""Bulk labeling on Ray Data: ``run_label(cfg)``.

The input is planned into chunks (:mod:`cerbero_ray.batchjob`); Ray Data hands the missing chunks
to a pool of model actors (``ActorPoolStrategy``; one GPU each on GPU clusters); each actor loads
the checkpoint once, reads its chunk, scores every usable row with the inference core's
:class:`~cerbero_ray.inference.scorer.Scorer` (:func:`~cerbero_ray.inference.batch.label_columns`) and writes the
chunk's Parquet part atomically. Output columns: ``id``, ``label``, ``p_<label>`` for every label,
``truncated``, ``error`` (null when the row was labeled), ``task``, ``model``, ``prompt_hash``. An
``extract`` task (:mod:`cerbero_ray.inference.extract`) writes, in place of ``label`` and the
``p_<label>`` columns, one typed column per schema property, ``json`` (the raw answer) and
``new_tokens``.

    python jobs/label.py label/task=irony label.input=corpus.jsonl     # embedded local cluster
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig

from cerbero_ray import batchjob, storage
from cerbero_ray.checkpoints import check_checkpoint
from cerbero_ray.config import check
from cerbero_ray.config.label import LabelConfig, LabelStageConfig
from cerbero_ray.config.label_task import LabelTask, resolve_task
from cerbero_ray.inference.batch import Labeler

log = logging.getLogger(__name__)
RUN_FILE = batchjob.RUN_FILES["label"]
CHART = "label_distribution.png"  # the labels' distribution, beside the parts


class LabelWorker(batchjob.ChunkWorker):
    """A Ray Data actor: one model, one chunk per call."""

    def __init__(self, lc: LabelConfig):
        self.lc = lc
        self.labeler = Labeler(
            lc.checkpoint,
            resolve_task(lc),
            lc.dtype,
            max_text_tokens=lc.max_text_tokens,
            max_batch_tokens=lc.max_batch_tokens,
            sort_window=lc.sort_window,
            base=lc.base,
            slots=lc.slots,
        )
        self.task, self.hash = self.labeler.task, self.labeler.prompt_hash

    def process(self, chunk: batchjob.Chunk) -> dict:
        lc = self.lc
        rows = batchjob.read_chunk(chunk, lc.format, lc.text_field, lc.id_field)
        cols = {
            "id": [r["id"] for r in rows],
            **self.labeler.columns([r["text"] for r in rows], [r["error"] for r in rows]),
        }
        outcome = cols["label"] if "label" in cols else [None if e else "extracted" for e in cols["error"]]
        counts = Counter(lab or f"error:{err}" for lab, err in zip(outcome, cols["error"]))
        n = len(rows)
        table = pa.table(
            {**cols, "task": [self.task.name] * n, "model": [lc.checkpoint] * n, "prompt_hash": [self.hash] * n},
            schema=pa.schema(
                [
                    ("id", pa.string()),
                    *self.labeler.fields,
                    ("truncated", pa.bool_()),
                    ("error", pa.string()),
                    ("task", pa.string()),
                    ("model", pa.string()),
                    ("prompt_hash", pa.string()),
                ]
            ),
        )
        batchjob.write_part(lc.output_dir, chunk, table)
        return {"rows": n, "counts": json.dumps(counts), "truncated": sum(cols["truncated"])}


def run_identity(lc: LabelConfig, task: LabelTask) -> dict:
    """What fixes a labeling run's output: another run into the same folder must match it."""
    return {
        "task": task.identity(),
        "checkpoint": lc.checkpoint,
        # what the checkpoint holds now: one written again under the same path is another run
        batchjob.CHECKPOINT_VERSION: [storage.version(x) for x in (lc.checkpoint, lc.base) if x],
        "input": lc.input,
        "text_field": lc.text_field,
        "id_field": lc.id_field,
        "chunk_rows": lc.chunk_rows,
        "max_text_tokens": lc.max_text_tokens,
    }


def summarize(
    out: str, task: LabelTask, seconds: float, processed: int, skipped: int, skipped_files: list[dict] = ()
) -> dict:
    """The run's ``summary.json``: rows, distinct ids, the label distribution (an extract task:
    ``extracted``, the rows with an answer), errors by reason, and the chart."""
    fs, p = storage.resolve(storage.join(out, "parts"))
    columns = ["id", "error", "truncated"] + (["label"] if task.kind == "classify" else [])
    table = pq.read_table(p, filesystem=fs, columns=columns)
    ids = table.column("id").to_pylist()
    errors = Counter(_reason(x) for x in table.column("error").to_pylist() if x is not None)
    if task.kind == "classify":
        dist = Counter(x for x in table.column("label").to_pylist() if x is not None)
        outcome = {k: dist.get(k, 0) for k in task.labels}
    else:
        outcome = {"extracted": len(ids) - sum(errors.values())}
    summary = {
        "rows": len(ids),
        "unique_ids": len(set(ids)),
        "labels": outcome,
        "errors": dict(errors),
        "truncated": int(sum(table.column("truncated").to_pylist())),
        "chunks_processed": processed,
        "chunks_skipped": skipped,
        "skipped_files": list(skipped_files),  # files of the input folder not read, with why
        "seconds": round(seconds, 2),
        "output": storage.join(out, "parts"),
    }
    storage.write_json(storage.join(out, "summary.json"), summary)
    summary["chart"] = distribution_png(summary, out)
    return summary


def _reason(error: str) -> str:
    """An error's kind (``incomplete_json: the answer reached …`` counts as ``incomplete_json``)."""
    return error.split(":", 1)[0]


def distribution_png(summary: dict, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["labels"]) + (["errors"] if summary["errors"] else [])
    values = list(summary["labels"].values()) + ([sum(summary["errors"].values())] if summary["errors"] else [])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    bars = ax.bar(
        names, values, color=["#4C72B0"] * len(summary["labels"]) + ["#C44E52"] * (len(names) - len(summary["labels"]))
    )
    ax.bar_label(bars)
    ax.set_ylabel("rows")
    ax.set_title(f"label distribution ({summary['rows']:,} rows)")
    fig.tight_layout()
    local = storage.resolve(out)[1] if not storage.is_uri(out) else "/tmp"
    path = os.path.join(local, CHART)
    fig.savefig(path)
    plt.close(fig)
    if storage.is_uri(out):
        return storage.upload_file(path, storage.join(out, CHART))
    return path


def precheck(c: LabelStageConfig, before: frozenset = frozenset()) -> None:
    """The stage table's precheck: an output folder holding another labeling run (another task or
    input, the checkpoint written again since) is refused before Ray starts."""
    lc = c.label
    batchjob.precheck_output("label", lc, RUN_FILE, lambda: run_identity(lc, resolve_task(lc)), before)


def run_label(cfg: DictConfig | dict | LabelStageConfig) -> dict:
    """Label ``label.input`` on an initialised Ray; returns the summary (also ``summary.json``)."""
    c = check("label", cfg)
    lc = c.label
    task = resolve_task(lc)
    check_checkpoint(lc.checkpoint, "label.checkpoint", lc.base)
    out = lc.output_dir
    chunks, todo, skipped = batchjob.start_run("label", lc, RUN_FILE, run_identity(lc, task), (CHART,))
    log.info(
        f"[label] {task.name}: {len(chunks)} chunks of up to {lc.chunk_rows} rows; "
        f"{len(chunks) - len(todo)} already done, {len(todo)} to go -> {out}",
    )
    t0 = time.perf_counter()
    if todo:
        for _ in batchjob.map_chunks(todo, LabelWorker, lc, "label", f"label {task.name}"):
            pass  # the parts are the output; the stats rows only drive the progress bar
    summary = summarize(out, task, time.perf_counter() - t0, len(todo), len(chunks) - len(todo), skipped)
    if summary["rows"] != summary["unique_ids"]:
        log.warning("%d rows but %d distinct ids: the input repeats ids", summary["rows"], summary["unique_ids"])
    dist = ", ".join(f"{k} {v:,} ({100 * v / max(summary['rows'], 1):.1f}%)" for k, v in summary["labels"].items())
    log.info(
        f"[label] {summary['rows']:,} rows -> {summary['output']}\n[label] distribution: {dist}"
        f"{'; errors ' + str(summary['errors']) if summary['errors'] else ''}\n[label] chart: {summary['chart']}",
    )
    return summary
