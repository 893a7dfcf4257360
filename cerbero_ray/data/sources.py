"""Input sources → one Ray Dataset of raw rows (``source, path, line_no, kind, raw``).

Rows stay raw bytes until the packing buffer parses them, so that a line with invalid UTF-8 or
broken JSON becomes a counted reject instead of crashing a reader. Before any work starts,
:func:`inspect_sources` lists every source's files and checks on its first rows that a usable
format is there (a schema-level problem is a ``ValueError`` naming the source).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cerbero_ray import inputs, storage
from cerbero_ray.config.data import SourceConfig
from cerbero_ray.data.formats import FORMATS, detect_format, to_document

SUFFIXES = inputs.FORMAT_SUFFIXES
PEEK_ROWS = 50


@dataclass
class SourcePlan:
    name: str
    files: list[str]
    format: str
    bytes: int
    skipped: list[dict] = field(default_factory=list)  # files of the folder not read, with why
    # each file's size and modification time, hashed: a file edited since a run (even to the same
    # size: a case fix) makes that run's shards out of date
    stamp: str = ""


def _peek_records(path: str) -> list:
    """The first records of a file, to tell a source's format; ``[]`` for a file that cannot be read
    (the run makes it a counted reject)."""
    try:
        return _peek(path)
    except (OSError, pa.ArrowException, EOFError):
        return []


def _peek(path: str) -> list:
    suffix = inputs.format_suffix(path)
    if suffix == ".parquet":
        from cerbero_ray.batchjob import parquet_file

        with parquet_file(path) as pf:
            if pf.metadata.num_rows == 0:
                return []
            # the first rows only: a row group (a million rows by pyarrow's default) decoded whole
            # to peek at 50 rows cost seconds and GBs per file
            first = next(pf.iter_batches(PEEK_ROWS, row_groups=[0], use_threads=False), None)
            return first.to_pylist() if first is not None else []  # an empty first row group: as before
    with inputs.open_stream(path) as f:
        head = f.read(1 << 20) if suffix == ".jsonl" else f.read()
    wide = inputs.is_wide(head)
    if wide and suffix == ".jsonl":
        with inputs.open_stream(path) as f:
            head = f.read()
    head = inputs.to_utf8(head)
    if suffix == ".json":
        try:
            obj = json.loads(head)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); use JSON Lines for large files") from None
        return (obj if isinstance(obj, list) else [obj])[:PEEK_ROWS]
    records = []
    for line in head.split(b"\n")[: -1 if len(head) == 1 << 20 and not wide else None][: PEEK_ROWS * 4]:
        try:
            records.append(json.loads(line))
        except (ValueError, RecursionError):  # bad rows are the rejects' business, not a config error
            continue
        if len(records) >= PEEK_ROWS:
            break
    return records


def inspect_sources(sources: dict[str, SourceConfig], exclude: str | None = None) -> list[SourcePlan]:
    """Files, format and size of each source (never one in the folder ``exclude``: the data stage's
    output, inside a source's folder); ``ValueError`` if a source has no usable data."""
    if not sources:
        raise ValueError("data.sources is empty: give at least one source (see conf/data/*.yaml)")
    plans = []
    for name, src in sources.items():
        fmt = src.format
        if fmt != "auto" and fmt not in FORMATS:
            raise ValueError(f"data.sources.{name}.format={fmt!r}: expected auto or one of {FORMATS}")
        if float(src.weight) < 0:
            raise ValueError(f"data.sources.{name}.weight must be >= 0, got {src.weight}")
        try:
            files, skipped = inputs.list_inputs(src.path, SUFFIXES, exclude)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"data.sources.{name}.path: {e}") from None
        if not files:  # one file named, and it is empty
            raise ValueError(f"data.sources.{name}.path: {skipped[0]['path']}: {skipped[0]['reason']}")
        size, stamp = inputs.stamp(files)
        text_field = src.text_field
        if all(inputs.format_suffix(f) == ".txt" for f in files):
            fmt = "text"
        else:
            peek = [f for f in files if inputs.format_suffix(f) != ".txt"]
            records = []
            for f in peek:  # the first few files that can be read
                records += _peek_records(f)
                if len(records) >= PEEK_ROWS:
                    break
            dicts = [r for r in records if isinstance(r, dict)]
            if fmt == "auto":
                found = [x for x in (detect_format(r, text_field) for r in dicts) if x]
                if not found:
                    cols = sorted({k for r in dicts for k in r})[:20]
                    raise ValueError(
                        f"data.sources.{name}: no usable column in {src.path} (saw {cols or 'no JSON objects'}); "
                        f"expected 'messages', 'conversations', 'instruction'+'output' or '{text_field}' "
                        f"(set data.sources.{name}.text_field for another text column)"
                    )
                fmt = max(set(found), key=found.count)
            ok = 0
            for r in dicts:
                try:
                    to_document(r, fmt, text_field)
                    ok += 1
                except Exception:  # Reject, or a row odd enough to break the parser: not this row's verdict
                    pass
            if dicts and ok == 0:
                raise ValueError(
                    f"data.sources.{name}: none of the first {len(dicts)} rows of {src.path} "
                    f"is a valid '{fmt}' record; check data.sources.{name}.format/text_field"
                )
        plans.append(SourcePlan(name, files, fmt, size, skipped, stamp))
    return plans


def _table(source: str, path: str, kind: str, line_nos: list[int], raws: list[bytes]) -> pa.Table:
    n = len(raws)
    return pa.table(
        {
            "source": pa.array([source] * n, pa.string()),
            "path": pa.array([path] * n, pa.string()),
            "line_no": pa.array(line_nos, pa.int64()),
            "kind": pa.array([kind] * n, pa.string()),
            "raw": pa.array(raws, pa.binary()),
        }
    )


def record_bytes(record) -> bytes:
    """A parsed record as the raw JSON bytes of a row. A string with a lone surrogate (valid JSON
    as an escape, ``"\\ud800"``, but no UTF-8) keeps its escapes, so the row is parsed and rejected
    downstream exactly as the same JSON Lines row is, instead of failing to encode here."""
    try:
        return json.dumps(record, ensure_ascii=False, default=str).encode()
    except UnicodeEncodeError:
        return json.dumps(record, default=str).encode()


def read_raw_stream(f, path: str, source: str, block_rows: int = 1024) -> Iterator[pa.Table]:
    """Raw rows of one file, streamed in blocks: JSONL line by line, a JSON array element by element
    (the file is read whole), a .txt file as one document, Parquet row group by row group. ``f`` is
    the file as stored (random access): a compressed one is decompressed here (by its first bytes),
    a UTF-16/32 one decoded. Blank JSONL lines are rows too (rejected as ``empty`` downstream), so
    that input rows = documents + rejects holds for every file; what cannot be read (a corrupt
    Parquet row group or footer, a compressed stream cut short) is one ``unreadable`` row each,
    rejected downstream naming the file."""
    suffix = inputs.format_suffix(path)
    try:
        if suffix == ".parquet":
            yield from _parquet_raw(f, path, source, block_rows)
            return
        stream = inputs.decompressed(f)
        if suffix == ".txt":
            yield _table(source, path, "txt", [0], [inputs.to_utf8(stream.read())])
            return
        if suffix == ".json":
            yield from _json_raw(inputs.to_utf8(stream.read()), path, source, block_rows)
            return
        yield from _jsonl_raw(stream, path, source, block_rows)
    except (OSError, pa.ArrowException, EOFError) as e:
        yield _table(source, path, "unreadable", [-1], [f"{type(e).__name__}: {e}"[:500].encode()])


def _json_raw(data: bytes, path: str, source: str, block_rows: int) -> Iterator[pa.Table]:
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        yield _table(source, path, "record", [0], [data])  # rejected downstream, with its reason
        return
    items = obj if isinstance(obj, list) else [obj]
    for s in range(0, len(items), block_rows):
        chunk = items[s : s + block_rows]
        yield _table(source, path, "record", list(range(s, s + len(chunk))), [record_bytes(x) for x in chunk])


def _jsonl_raw(f, path: str, source: str, block_rows: int) -> Iterator[pa.Table]:
    head = f.read(8 << 20)
    if inputs.is_wide(head):  # UTF-16/32: decoded whole
        lines = inputs.to_utf8(head + f.read()).split(b"\n")
        lines = lines[:-1] if lines and not lines[-1] else lines
        for s in range(0, len(lines), block_rows):
            chunk = lines[s : s + block_rows]
            yield _table(source, path, "jsonl", list(range(s + 1, s + len(chunk) + 1)), chunk)
        return
    rest, line_no, nos, raws, chunk = b"", 0, [], [], storage.strip_bom(head)
    while True:
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()  # a line not ended yet (at the end of the file: a last line with no newline, or b"")
        if not chunk and rest:
            lines.append(rest)
        for line in lines:
            line_no += 1
            nos.append(line_no)
            raws.append(line)
            if len(raws) >= block_rows:
                yield _table(source, path, "jsonl", nos, raws)
                nos, raws = [], []
        if not chunk:
            break
        try:
            chunk = f.read(8 << 20)
        except (OSError, pa.ArrowException, EOFError) as e:  # a compressed stream's break: the lines
            if raws:  # before it are kept; the cut line (``rest``) is part of what could not be read
                yield _table(source, path, "jsonl", nos, raws)
            yield _table(source, path, "unreadable", [line_no + 1], [f"{type(e).__name__}: {e}"[:500].encode()])
            return
    if raws:
        yield _table(source, path, "jsonl", nos, raws)


def _parquet_raw(f, path: str, source: str, block_rows: int) -> Iterator[pa.Table]:
    """Parquet rows as raw JSON records, ``line_no`` their row number; a row group that cannot be
    read is one ``unreadable`` row naming it."""
    codec = inputs.sniff(f.read(4))
    f.seek(0)
    pf = pq.ParquetFile(pa.BufferReader(pa.CompressedInputStream(f, codec).read()) if codec else f)
    first = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        at = first  # a row group streamed in blocks (decoded whole it held a million rows as dicts)
        try:
            for batch in pf.iter_batches(block_rows, row_groups=[g], use_threads=False):
                part = batch.to_pylist()
                yield _table(source, path, "record", list(range(at, at + len(part))), [record_bytes(r) for r in part])
                at += len(part)
        except (OSError, ValueError, pa.ArrowException) as e:  # the rest of the row group: one row naming it
            detail = f"row group {g} (rows {at}..{first + n - 1}): {type(e).__name__}: {e}"[:500]
            yield _table(source, path, "unreadable", [at], [detail.encode()])
        first += n


def local_batches(plans: list[SourcePlan], block_rows: int = 1024) -> Iterator[dict[str, np.ndarray]]:
    """The raw rows of every source read in this process, as numpy batches like the ones
    :func:`build_dataset` streams through Ray Data: for inputs so small that a Ray Data job's
    start would cost more than reading them."""
    for plan in plans:
        for f in plan.files:
            fs, p = storage.resolve(f)
            with fs.open_input_file(p) as fh:
                for t in read_raw_stream(fh, p, plan.name, block_rows):
                    batch = {k: np.array(t.column(k).to_pylist() + [None], dtype=object)[:-1] for k in _TEXT_COLUMNS}
                    yield {**batch, "line_no": t.column("line_no").to_numpy()}


_TEXT_COLUMNS = ("source", "path", "kind", "raw")


def no_rows() -> dict[str, np.ndarray]:
    """A batch of raw rows with none in it (:func:`local_batches`' columns)."""
    return {k: np.zeros(0, object) for k in _TEXT_COLUMNS} | {"line_no": np.zeros(0, np.int64)}


def build_dataset(plans: list[SourcePlan], block_rows: int = 1024):
    """One Ray Dataset of raw rows over every source, in config order."""
    import ray.data
    from ray.data.datasource import FileBasedDatasource

    class RawRecords(FileBasedDatasource):
        def __init__(self, paths, source: str, **kwargs):
            super().__init__(paths, **kwargs)
            self._source = source

        def _open_input_source(self, filesystem, path: str, **open_args):
            return filesystem.open_input_file(path)  # as stored: read_raw_stream decompresses by content

        def _read_stream(self, f, path: str):
            yield from read_raw_stream(f, path, self._source, block_rows)

    parts = []
    for plan in plans:
        fs, _ = storage.resolve(plan.files[0])
        paths = [storage.resolve(p)[1] for p in plan.files]
        parts.append(ray.data.read_datasource(RawRecords(paths, plan.name, filesystem=fs)))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
