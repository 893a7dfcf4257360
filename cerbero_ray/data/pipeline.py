"""The data stage: Italian corpora → packed ``seq_len``-token Parquet shards + ``manifest.json``.

Ray Data streams raw rows from every source (never the whole corpus in memory) into a pool of
actors; each actor takes ``buffer_docs`` rows at a time and runs :class:`BufferProcessor`:
validate → render chat → tokenize → loss mask → pack → write one shard (and a rejects file), then
its record (``buffers/<key>.json``: its stats). Before that, unless ``data.dedup=none`` and no
``data.decontaminate.paths``, a lighter pass over the same inputs finds the rows that repeat an
earlier one (:mod:`cerbero_ray.data.dedup`) or share a passage with an evaluation set
(:mod:`cerbero_ray.data.decontaminate`), which the actors reject. The driver only sees one small stats record per
shard, from which it writes the manifest, last. A run stopped before it resumes on the same
command: ``run.json`` (written first) names its config and input files, and the buffers with a
record are not processed again.

    python jobs/data.py data=mix_sample          # embedded local cluster
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from omegaconf import DictConfig
from tqdm import tqdm

from cerbero_ray import storage
from cerbero_ray.cluster import actor_share
from cerbero_ray.config import check
from cerbero_ray.config.data import DataStageConfig
from cerbero_ray.data.decontaminate import eval_sets, eval_stamp
from cerbero_ray.data.dedup import (
    FileIds,
    Fingerprints,
    duplicates_meta,
    find_duplicates,
    read_duplicates,
    write_duplicates,
)
from cerbero_ray.data.manifest import build_manifest, config_hash, format_summary, read_manifest, write_manifest
from cerbero_ray.data.process import BUFFERS, BufferProcessor
from cerbero_ray.data.sources import build_dataset, inspect_sources, local_batches, no_rows

log = logging.getLogger(__name__)


def finished_run(out: str, cfg: DataStageConfig, plans, evals: str = "") -> tuple[dict | None, str]:
    """The manifest of a complete earlier run of this same config on the same input files (the same
    files, sizes and, for a manifest that records them, modification times), else None; and how the
    finished run there differs, for the refusal ("" when none is there)."""
    try:
        m = read_manifest(out)
    except FileNotFoundError:
        return None, ""
    if m.get("config_hash") != config_hash(cfg):
        return None, " of another config"
    if (m.get("dedup") or {}).get("evaluation_stamp", "") != evals:
        return None, " checked against the evaluation files of data.decontaminate.paths as they were"
    edited = _edited(m, plans)
    if not edited:
        return m, ""
    names = ", ".join(f"data.sources.{n}" for n in edited)
    return None, f" of the files of {names} as they were (other files, sizes or times since)"


def _edited(m: dict, plans) -> list[str]:
    """The sources whose input files differ from the manifest's run (names)."""
    recorded = m.get("sources", {})
    out = []
    for p in plans:
        v = recorded.get(p.name) or {}
        if (p.files, p.bytes) != (v.get("files"), v.get("bytes")) or v.get("stamp", p.stamp) != p.stamp:
            out.append(p.name)
    return out + sorted(set(recorded) - {p.name for p in plans})


RUN_RECORD = "run.json"  # what a run writes first: its config and input files (an unfinished run resumes on it)


def run_record(cfg: DataStageConfig, plans, evals: str = "") -> dict:
    """What fixes a run's shards: its config, its input files (each source's files, sizes and
    modification times) and the evaluation files it is checked against (their stamp)."""
    return {
        "config_hash": config_hash(cfg),
        "sources": {p.name: {"files": p.files, "bytes": p.bytes, "stamp": p.stamp} for p in plans},
        "evaluation_stamp": evals,
    }


def prepare_output(out: str, overwrite: bool, why: str = "", record: dict | None = None) -> bool:
    """Refuse to mix two runs in one folder (``why``: how the one there differs); with ``overwrite``
    clear the old run first. An unfinished run (no manifest yet) of the same ``record`` is resumed:
    returns True, its finished buffers kept; one of another config or other files is cleared."""
    fs, p = storage.resolve(out)
    info = fs.get_file_info(p)
    if info.type == storage.pafs.FileType.NotFound:
        fs.create_dir(p, recursive=True)
        return _start(out, record)
    existing = [
        i
        for i in fs.get_file_info(storage.pafs.FileSelector(p))
        if i.base_name in ("shards", "rejects", "manifest.json", BUFFERS, RUN_RECORD, DUPLICATES)
    ]
    finished = any(i.base_name == "manifest.json" for i in existing)
    if existing and not finished:  # the manifest comes last: a run stopped before it is unfinished
        if not overwrite and record is not None and _recorded(out) == record:
            done = len(fs.get_file_info(storage.pafs.FileSelector(f"{p}/{BUFFERS}", allow_not_found=True)))
            log.info(f"[data] {out} holds an unfinished run of this config and input: resumed, {done} buffer(s) done")
            return True
        log.info(f"[data] {out} holds an unfinished run (no manifest.json) of another config or other files: cleared")
    elif existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds a data run{why}; pass data.overwrite=true or another data.output_dir"
        )
    for i in existing:
        fs.delete_dir(i.path) if i.type == storage.pafs.FileType.Directory else fs.delete_file(i.path)
    return _start(out, record)


def _recorded(out: str) -> dict | None:
    try:
        return storage.read_json(storage.join(out, RUN_RECORD))
    except (FileNotFoundError, ValueError):
        return None


def _start(out: str, record: dict | None) -> bool:
    if record is not None:
        storage.write_json(storage.join(out, RUN_RECORD), record)
    return False


def _drop_other_buffers(out: str, stats: list[dict]) -> int:
    """Delete what an unfinished run left of buffers this run has not (its rows were batched
    otherwise: a kept shard of them would put rows in twice): every file in the shards, rejects and
    buffer records that this run's ``stats`` do not name. Returns how many files went."""
    keep = {f"{s['key']}.json" for s in stats}
    keep |= {x.rsplit("/", 1)[-1] for s in stats for x in (s["shard"], s["rejects_path"]) if x}
    gone = 0
    for sub in ("shards", "rejects", BUFFERS):
        fs, p = storage.resolve(storage.join(out, sub))
        for i in fs.get_file_info(storage.pafs.FileSelector(p, allow_not_found=True)):
            if i.is_file and i.base_name not in keep:
                fs.delete_file(i.path)
                gone += 1
    return gone


DUPLICATES = "duplicates.parquet"  # the dedup pass's rows to drop: written after run.json, before any buffer
LOCAL_PASS_BYTES = 32 << 20  # inputs this small are fingerprinted in the driver: a Ray Data job's start costs more


def dedup_pass(out: str, d, plans, resumed: bool, workers: int, actor_cpus: float) -> tuple[str, dict]:
    """Fingerprint every document of every source without tokenizing (a Ray Data pass over the
    inputs; in this process for inputs under ``LOCAL_PASS_BYTES``), each checked against the
    evaluation sets of ``data.decontaminate``; find the rows that repeat an earlier one or share a
    passage with an evaluation set and write them to ``<out>/duplicates.parquet`` for the packing
    actors. Returns its path and counts; a resumed run reuses the one it wrote."""
    import ray.data

    path = storage.join(out, DUPLICATES)
    if resumed:
        with contextlib.suppress(OSError, pa.ArrowException):
            if meta := duplicates_meta(read_duplicates(path)):
                log.info(f"[data] dedup: the unfinished run's {DUPLICATES} reused")
                return path, meta
    t0, dc = time.perf_counter(), d.decontaminate
    sets = eval_sets(dc.paths, dc.ngram, dc.min_words)
    for s in sets:
        whole = sum(len(h) for n, h in s.runs.items() if n < dc.ngram)
        short = f" and {whole:,} whole texts of {dc.min_words}-{dc.ngram - 1} words" if dc.min_words < dc.ngram else ""
        passages = len(s.runs.get(dc.ngram, ()))
        log.info(f"[data] decontaminate: {passages:,} distinct {dc.ngram}-word passages{short} in {s.path}")
    args = (d.sources, d.dedup, [s.runs for s in sets])
    if sum(p.bytes for p in plans) <= LOCAL_PASS_BYTES:
        batches = map(Fingerprints(*args), local_batches(plans))
    else:
        batches = (
            build_dataset(plans)
            .map_batches(
                Fingerprints,
                fn_constructor_args=args,  # once per actor: the evaluation sets may be large
                batch_size=1024,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=workers),
                num_cpus=actor_cpus,
            )
            .iter_batches(batch_size=None, batch_format="numpy")
        )
    files = FileIds([(p.name, storage.resolve(f)[1]) for p in plans for f in p.files])
    parts = []
    with tqdm(unit=" docs", desc=f"dedup ({d.dedup})", dynamic_ncols=True) as bar:
        for b in batches:
            parts.append(files.compact(b))
            bar.update(len(b["exact"]))
    if not parts:  # no row parses: the packing pass rejects them all
        parts = [files.compact(Fingerprints(*args)(no_rows()))]
    fp = {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
    del parts
    table = find_duplicates(fp, files, list(dc.paths))
    reasons = Counter(table.column("reason").to_pylist())
    bad = Counter(table.filter(pc.equal(table["reason"], "contaminated")).column("of_path").to_pylist())
    meta = {
        "mode": d.dedup,
        "documents": len(fp["exact"]),
        "duplicates": reasons["duplicate"],
        "near_duplicates": reasons["near_duplicate"],
        "contaminated": reasons["contaminated"],
        "ngram": dc.ngram,
        "min_words": dc.min_words,
        "evaluation_sets": {p: bad[p] for p in dc.paths},
        "evaluation_sha256": {s.path: s.sha256 for s in sets},  # the evaluate stage's file identity
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_duplicates(table, path, **meta)
    log.info(
        f"[data] dedup ({d.dedup}): {meta['duplicates']:,} exact and {meta['near_duplicates']:,} near duplicate(s) "
        f"and {meta['contaminated']:,} contaminated of {meta['documents']:,} documents, in {meta['seconds']} s"
    )
    return path, meta


def run_data(cfg: DictConfig | dict | DataStageConfig) -> dict:
    """Run the data stage on an initialised Ray; returns the manifest (also written to
    ``<data.output_dir>/manifest.json``)."""
    import ray
    import ray.data

    c = check("data", cfg)
    d = c.data
    plans = inspect_sources(d.sources, d.output_dir)
    for p in plans:
        d.sources[p.name].format = p.format
    evals = eval_stamp(d.decontaminate.paths)  # each file there, before any work
    out = d.output_dir
    done, why = (None, "") if d.overwrite else finished_run(out, c, plans, evals)
    if done:  # a rerun of the same config on the same files: the shards are already there
        log.info(
            f"[data] {out} is up to date ({done['rows']:,} rows, config {done['config_hash']}); "
            "data.overwrite=true redoes it",
        )
        return done
    resumed = prepare_output(out, d.overwrite, why, run_record(c, plans, evals))
    cpus = float(ray.cluster_resources().get("CPU", 1))
    reserve = 1.0 if cpus >= 2 else cpus / 2  # reads must always get a CPU, or the stream stalls
    workers = d.workers or int(max(1, cpus - reserve))
    actor_cpus = min(1.0, actor_share(cpus - reserve, workers, "data.workers"))
    dups, dedup = "", {"mode": "none"}
    if d.dedup != "none" or d.decontaminate.paths:
        dups, dedup = dedup_pass(out, d, plans, resumed, workers, actor_cpus)
        dedup["evaluation_stamp"] = evals

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same inputs + seed -> same shards
    ds = build_dataset(plans).map_batches(
        BufferProcessor,
        fn_constructor_args=(d, c.tokenizer, max(1, int(cpus) // workers), dups),
        batch_size=d.buffer_docs,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=actor_cpus,
    )

    total = sum(p.bytes for p in plans)
    stats, t0 = [], time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, desc="data", dynamic_ncols=True) as bar:
        for row in ds.iter_rows():
            stats.append(row)
            bar.update(min(row["input_bytes"], total - bar.n))
            bar.set_postfix(tokens=f"{sum(s['tokens'] for s in stats) / 1e6:.1f}M", shards=len(stats))
        bar.update(total - bar.n)  # file sizes count newlines the rows do not
    seconds = time.perf_counter() - t0
    if resumed and (gone := _drop_other_buffers(out, stats)):
        log.info(f"[data] {gone} file(s) of the unfinished run's other buffers deleted (rows batched otherwise)")
    manifest = build_manifest(stats, c, plans, seconds, dedup)
    write_manifest(manifest, out)
    fs, p = storage.resolve(out)
    with contextlib.suppress(OSError):  # the manifest says it all now
        fs.delete_dir(f"{p}/{BUFFERS}")
    for name in (DUPLICATES, RUN_RECORD):  # the rejects name every duplicate and what it repeats
        with contextlib.suppress(OSError):
            fs.delete_file(f"{p}/{name}")
    log.info(format_summary(manifest, out))
    return manifest
