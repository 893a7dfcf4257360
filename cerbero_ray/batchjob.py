"""Resumable, exactly-once batch jobs over a corpus (labeling, generation).

The input (JSONL, a JSON array, Parquet or .txt files; local or object-store) is cut into *chunks*:
fixed runs of rows of one file (``chunk_rows`` lines / rows / array items), known before any work
starts. Each chunk is processed whole and written as one Parquet part,
``parts/part-<chunk id>.parquet``, by writing a temporary file and renaming it, so a part either
exists complete or not at all. A rerun lists the
parts present and processes only the missing chunks: kill a job midway, run it again, and every
input row appears exactly once in the output.

Rows: ``id`` is the input's id column when it has one, else ``<file name>:<line or row number>``
(stable across runs). A row that cannot be used (invalid UTF-8, not JSON, no text, empty text)
still gets an output row, with ``error`` set, and never stops the job.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cerbero_ray import storage
from cerbero_ray.inference.batch import text_error

FORMATS = ("auto", "jsonl", "json", "parquet", "txt")  # json: one JSON array of objects, read whole


@dataclass(frozen=True)
class Chunk:
    path: str
    start: int  # first row (Parquet) or first line (JSONL / .txt), 0-based
    stop: int
    byte_start: int = 0
    byte_stop: int = 0

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.path}|{self.start}|{self.stop}".encode()).hexdigest()[:16]


def file_format(path: str, fmt: str, key: str = "format") -> str:
    if fmt != "auto":
        return fmt
    if path.endswith(".json"):  # a JSON array, or JSON Lines under another name: the first byte tells
        fs, p = storage.resolve(path)
        with fs.open_input_stream(p) as fh:
            head = storage.strip_bom(fh.read(1 << 16)).lstrip()
        return "json" if head.startswith(b"[") else "jsonl"
    for ext, f in ((".parquet", "parquet"), (".jsonl", "jsonl"), (".txt", "txt")):
        if path.endswith(ext):
            return f
    raise ValueError(f"{key}: cannot tell the format of {path}; set it (jsonl | json | parquet | txt)")


@functools.lru_cache(maxsize=2)
def _json_items(path: str, size: int, mtime_ns: int | None):
    """A JSON array file's items (read whole; cached for the chunks after the first), or ``_BAD``
    when the file is not a JSON array."""
    fs, p = storage.resolve(path)
    with fs.open_input_stream(p) as fh:
        data = storage.strip_bom(fh.readall())
    try:
        items = json.loads(data)
    except (ValueError, RecursionError):
        return _BAD
    return items if isinstance(items, list) else _BAD


def json_items(path: str):
    fs, p = storage.resolve(path)
    info = fs.get_file_info(p)
    return _json_items(path, info.size, info.mtime_ns)


def plan_chunks(path: str, fmt: str, chunk_rows: int, key: str = "format") -> list[Chunk]:
    """Chunks of every input file (for line formats, byte ranges found by scanning for newlines)."""
    if fmt not in FORMATS:
        raise ValueError(f"{key} must be one of {FORMATS}, got {fmt!r}")
    chunks = []
    for f in storage.list_files(path, (".parquet", ".jsonl", ".json", ".txt") if fmt == "auto" else ()):
        kind = file_format(f, fmt, key)
        fs, p = storage.resolve(f)
        if kind in ("parquet", "json"):
            if kind == "parquet":
                with fs.open_input_file(p) as fh:
                    n = pq.ParquetFile(fh).metadata.num_rows
            else:  # a file that is no JSON array is one row, an error row
                items = json_items(f)
                n = 1 if items is _BAD else len(items)
            chunks += [Chunk(f, a, min(a + chunk_rows, n)) for a in range(0, n, chunk_rows)]
            continue
        with fs.open_input_stream(p) as fh:
            line, at, start_byte, last = 0, 0, 0, b""
            while block := fh.read(1 << 23):
                ends = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10) + at + 1  # byte after each newline
                numbers = line + 1 + np.arange(len(ends))
                for n, end in zip(numbers[numbers % chunk_rows == 0], ends[numbers % chunk_rows == 0]):
                    chunks.append(Chunk(f, int(n) - chunk_rows, int(n), start_byte, int(end)))
                    start_byte = int(end)
                line += len(ends)
                at += len(block)
                last = block[-1:]
            if at > start_byte:
                start = line - line % chunk_rows if line % chunk_rows else line
                chunks.append(Chunk(f, start, line + (last != b"\n"), start_byte, at))
    return chunks


def read_chunk(chunk: Chunk, fmt: str, text_field: str, id_field: str | None) -> list[dict]:
    """The chunk's rows as ``{id, text, error}`` (``text`` None when ``error`` is set). Whatever a
    line holds (bad bytes, bad or deeply nested JSON, wrong types, lone surrogates) it becomes a
    row, with ``error`` set when it cannot be used: no row is lost and none raises."""
    kind = file_format(chunk.path, fmt)
    name = os.path.basename(chunk.path)
    fs, p = storage.resolve(chunk.path)
    if kind == "parquet":
        with fs.open_input_file(p) as fh:
            table = pq.ParquetFile(fh).read().slice(chunk.start, chunk.stop - chunk.start)
        return [
            _guarded(_row, r, f"{name}:{chunk.start + i}", text_field, id_field)
            for i, r in enumerate(table.to_pylist())
        ]
    if kind == "json":
        items = json_items(chunk.path)
        if items is _BAD:
            return [{"id": f"{name}:0", "text": None, "error": "invalid_json"}]
        return [
            _guarded(_record, r, f"{name}:{chunk.start + i}", text_field, id_field)
            for i, r in enumerate(items[chunk.start : chunk.stop])
        ]
    with fs.open_input_file(p) as fh:
        fh.seek(chunk.byte_start)
        data = fh.read(chunk.byte_stop - chunk.byte_start)
    if chunk.byte_start == 0:
        data = storage.strip_bom(data)
    lines = data.split(b"\n")[: chunk.stop - chunk.start]
    # 1-based line numbers, as editors show them
    return [
        _guarded(_line, raw, f"{name}:{chunk.start + i + 1}", kind, text_field, id_field) for i, raw in enumerate(lines)
    ]


def _guarded(parse, raw, rid: str, *args) -> dict:
    """``parse(raw, rid, …)``, or an error row naming what went wrong: one row never stops a chunk."""
    try:
        return parse(raw, rid, *args)
    except Exception as e:  # a case the parsers below do not foresee still becomes an error row
        return {"id": _safe(rid), "text": None, "error": f"unreadable:{type(e).__name__}"}


def _line(raw: bytes, rid: str, kind: str, text_field: str, id_field: str | None) -> dict:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:  # keep the row's own id when the rest of the line parses
        rec = _json(raw.decode("utf-8", errors="replace")) if kind == "jsonl" else None
        return {"id": _id(rec, rid, id_field), "text": None, "error": "invalid_utf8"}
    if kind == "txt":
        return _checked(rid, line.strip())
    if not line.strip():
        return {"id": rid, "text": None, "error": "empty"}
    record = _json(line)
    if record is _BAD:
        return {"id": rid, "text": None, "error": "invalid_json"}
    return _record(record, rid, text_field, id_field)


def _record(record, rid: str, text_field: str, id_field: str | None) -> dict:
    if not isinstance(record, dict):
        return {"id": rid, "text": None, "error": "not_an_object"}
    return _row(record, rid, text_field, id_field)


_BAD = object()


def _json(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser allows
        return _BAD


def _safe(s: str) -> str:
    """``s`` with lone surrogates written as escapes, so it can be stored as UTF-8."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _id(record, default_id: str, id_field: str | None) -> str:
    v = record.get(id_field) if id_field and isinstance(record, dict) else None
    return _safe(str(v)) if isinstance(v, (str, int, float, bool)) else default_id


def _row(record: dict, default_id: str, text_field: str, id_field: str | None) -> dict:
    rid = _id(record, default_id, id_field)
    text = record.get(text_field)
    if text is not None and not isinstance(text, str):
        return {"id": rid, "text": None, "error": f"{_safe(text_field)}_not_a_string"}
    return _checked(rid, text)


def _checked(rid: str, text: str | None) -> dict:
    error = text_error(text)
    return {"id": rid, "text": None if error else text, "error": error}


def part_path(out: str, chunk: Chunk) -> str:
    return storage.join(out, "parts", f"part-{chunk.key}.parquet")


def done_keys(out: str) -> set[str]:
    """Chunks whose part exists (complete: parts appear by rename)."""
    fs, p = storage.resolve(storage.join(out, "parts"))
    if fs.get_file_info(p).type == storage.pafs.FileType.NotFound:
        return set()
    return {
        i.base_name[5:-8]
        for i in fs.get_file_info(storage.pafs.FileSelector(p))
        if i.base_name.startswith("part-") and i.base_name.endswith(".parquet")
    }


def claim_output(out: str, run_file: str, ident: dict, overwrite: bool, stage: str) -> None:
    """Record what this run is in ``<out>/<run_file>``; refuse an output folder that holds a run with
    other settings (its parts would mix with ours) unless ``overwrite``, which clears it first."""
    ident = json.loads(json.dumps(ident))  # as it reads back: tuples become lists
    path = storage.join(out, run_file)
    if storage.is_file(path):
        old = storage.read_json(path)
        if old != ident:
            if not overwrite:
                raise FileExistsError(
                    f"{out} holds a {stage} run with other settings "
                    f"({', '.join(k for k in ident if ident[k] != old.get(k))} differ); "
                    f"pass {stage}.overwrite=true or another {stage}.output_dir"
                )
            fs, p = storage.resolve(out)
            fs.delete_dir_contents(p)
    storage.write_json(path, ident)


def start_run(
    out: str, run_file: str, ident: dict, overwrite: bool, stage: str, path: str, fmt: str, chunk_rows: int
) -> tuple[list[Chunk], list[Chunk]]:
    """Plan the input, claim ``out`` for this run, delete what a killed run left half-written;
    returns (every chunk, the chunks whose part is still missing). A missing input is reported as
    such (naming ``<stage>.input``) before the output folder is looked at."""
    try:
        chunks = plan_chunks(path, fmt, chunk_rows, key=f"{stage}.format")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{stage}.input: {e}") from None
    claim_output(out, run_file, ident, overwrite, stage)
    clean_partial(out)
    done = done_keys(out)
    return chunks, [ch for ch in chunks if ch.key not in done]


def clean_partial(out: str) -> None:
    """Remove temporary files a killed run left behind."""
    fs, p = storage.resolve(storage.join(out, "parts"))
    if fs.get_file_info(p).type != storage.pafs.FileType.NotFound:
        for i in fs.get_file_info(storage.pafs.FileSelector(p)):
            if i.base_name.endswith(".tmp"):
                fs.delete_file(i.path)


def write_part(out: str, chunk: Chunk, table: pa.Table) -> str:
    """Write atomically: a temporary name, then a rename (object stores: the upload is atomic)."""
    dest = part_path(out, chunk)
    fs, p = storage.resolve(dest)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    if storage.is_uri(dest):
        with fs.open_output_stream(p) as f:
            pq.write_table(table, f, compression="zstd")
        return dest
    tmp = f"{p}.{uuid.uuid4().hex}.tmp"
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, p)
    return dest


class ChunkWorker:
    """Base of the model actors: Ray Data hands over chunk records; ``process(chunk)`` returns one
    stats dict per chunk (the same keys every time)."""

    def process(self, chunk: Chunk) -> dict:
        raise NotImplementedError

    def __call__(self, batch: dict) -> dict:
        chunks = [
            Chunk(**{k: (str(v[i]) if k == "path" else int(v[i])) for k, v in batch.items()})
            for i in range(len(batch["path"]))
        ]
        stats = [self.process(ch) for ch in chunks]
        return {k: [s[k] for s in stats] for k in stats[0]}


def map_chunks(todo: list[Chunk], worker: type, cfg: dict, desc: str) -> Iterator[dict]:
    """Run ``worker(cfg)`` actors over the chunks on the current Ray cluster; yields each chunk's
    stats, with a progress bar in rows."""
    yield from map_items([ch.__dict__ for ch in todo], worker, cfg, desc, sum(ch.stop - ch.start for ch in todo))


def map_items(items: list[dict], worker: type, cfg: dict, desc: str, total_rows: int) -> Iterator[dict]:
    """Run a pool of ``worker(cfg)`` model actors over ``items`` (one per call) on the current Ray
    cluster (``cfg``: ``workers``, ``gpus_per_worker``, ``cpus_per_worker``); yields each item's
    result, whose ``rows`` drives a progress bar of ``total_rows``."""
    import ray
    import ray.data
    from tqdm import tqdm

    res = ray.cluster_resources()
    gpus, cpus = float(cfg["gpus_per_worker"]), float(res.get("CPU", 1))
    workers = cfg.get("workers") or (int(res.get("GPU", 0) // gpus) if gpus else max(1, int(cpus - 1)))
    workers = max(1, min(workers, len(items)))
    ray.data.DataContext.get_current().execution_options.preserve_order = False
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        worker,
        fn_constructor_args=(cfg,),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=gpus or None,
        num_cpus=min(float(cfg["cpus_per_worker"]), max(cpus - 1, 0.5) / workers),
    )
    with tqdm(total=total_rows, unit="row", desc=desc, dynamic_ncols=True) as bar:
        for row in ds.iter_rows():
            bar.update(row["rows"])
            yield row
