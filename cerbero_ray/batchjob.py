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

import collections
import concurrent.futures
import contextlib
import functools
import hashlib
import itertools
import json
import logging
import os
import posixpath
import re
import threading
from dataclasses import dataclass
from typing import Iterator, Optional, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cerbero_ray import inputs, storage
from cerbero_ray.config.label import BatchInferenceConfig
from cerbero_ray.inference.batch import text_error

log = logging.getLogger(__name__)

FORMATS = ("auto", "jsonl", "json", "parquet", "txt")  # json: one JSON array of objects, read whole


@dataclass(frozen=True)
class Chunk:
    path: str
    start: int  # first row (Parquet) or first line (JSONL / .txt), 0-based
    stop: int
    byte_start: int = 0
    byte_stop: int = 0
    # how the rows are found: "" a byte range of the file; "stream" lines start..stop of the
    # decompressed stream (a compressed file); "decoded" lines of the whole file decoded (UTF-16/32);
    # "unreadable" one error row for what could not be read (a file, a stream's end)
    mode: str = ""
    error: str = ""

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.path}|{self.start}|{self.stop}".encode()).hexdigest()[:16]


def file_format(path: str, fmt: str, key: str = "format") -> str:
    """The format a file is read as: ``fmt``, or with ``auto`` its name's (a ``.json`` file holds a
    JSON array, or JSON Lines under another name: its first byte tells)."""
    if fmt != "auto":
        return fmt
    suffix = inputs.format_suffix(path)
    if suffix == ".json":
        with inputs.open_stream(path) as fh:
            head = inputs.to_utf8(fh.read(1 << 16)).lstrip()
        return "json" if head.startswith(b"[") else "jsonl"
    for ext, f in ((".parquet", "parquet"), (".jsonl", "jsonl"), (".txt", "txt")):
        if suffix == ext:
            return f
    raise ValueError(f"{key}: cannot tell the format of {path}; set it (jsonl | json | parquet | txt)")


def _whole(path: str) -> bytes:
    with inputs.open_stream(path) as fh:
        return fh.read()


@functools.lru_cache(maxsize=2)
def _json_items(path: str, size: int, mtime_ns: int | None):
    """A JSON array file's items (read whole; cached for the chunks after the first), or ``_BAD``
    when the file is not a JSON array."""
    try:
        data = inputs.to_utf8(_whole(path))
        items = json.loads(data)
    except (ValueError, RecursionError, OSError):
        return _BAD
    return items if isinstance(items, list) else _BAD


def _identity(path: str) -> tuple[int, int | None]:
    fs, p = storage.resolve(path)
    info = fs.get_file_info(p)
    return info.size, info.mtime_ns


def json_items(path: str):
    return _json_items(path, *_identity(path))


@functools.lru_cache(maxsize=2)
def _decoded_lines(path: str, size: int, mtime_ns: int | None) -> list[bytes]:
    """A UTF-16/32 file's lines, decoded whole and as UTF-8 (cached for the chunks after the first)."""
    return split_lines(inputs.to_utf8(_whole(path)), universal=True)


def split_lines(data: bytes, universal: bool) -> list[bytes]:
    """Lines without their ends; ``universal``: CR, LF and CRLF all end a line (text files), else
    LF (JSON Lines, where a CR can only be whitespace). A last line without its end is a line."""
    lines = re.split(rb"\r\n|\r|\n", data) if universal else data.split(b"\n")
    return lines[:-1] if lines and not lines[-1] else lines


def _line_ends(block: np.ndarray, universal: bool) -> np.ndarray:
    """Offsets just past each line end in ``block`` (whose last byte is never a lone CR: the caller
    holds one back until the next block says whether an LF follows)."""
    lf = block == 10
    if not universal:
        return np.flatnonzero(lf) + 1
    cr = block == 13
    lone_cr = cr & ~np.concatenate([lf[1:], [False]])
    return np.flatnonzero(lf | lone_cr) + 1


def _plan_file(
    f: str,
    kind: str,
    chunk_rows: int,
    key: str,
    digests: dict | None = None,
    fields: dict | None = None,
    stop: threading.Event | None = None,
) -> list[Chunk]:
    """The chunks of one input file. What cannot be read becomes an ``unreadable`` chunk (one error
    row) instead of stopping the job: a Parquet file whose footer is broken, a compressed stream
    cut short (the lines before the break are planned as usual). A line file read whole puts the
    hash of its (decompressed) bytes in ``digests``: the scan for line ends reads them anyway; the
    fields of its first records go in ``fields`` (:func:`check_fields`). ``stop`` set: the scan
    ends at its next block (:class:`PlanStopped`)."""
    fields = {} if fields is None else fields
    if kind == "parquet":
        try:
            with parquet_file(f) as pf:
                n = pf.metadata.num_rows
                fields[f] = set(pf.schema_arrow.names)
        except (OSError, ValueError, pa.ArrowException) as e:
            return [Chunk(f, 0, 1, mode="unreadable", error=f"unreadable_file: {_short(e)}")]
        return [Chunk(f, a, min(a + chunk_rows, n)) for a in range(0, n, chunk_rows)]
    if kind == "json":  # a file that is no JSON array is one row, an error row
        items = json_items(f)
        n = 1 if items is _BAD else len(items)
        if items is not _BAD:
            fields[f] = _keys(items[:SAMPLE_ROWS])
        return [Chunk(f, a, min(a + chunk_rows, n)) for a in range(0, n, chunk_rows)]
    universal, wide = kind == "txt", False
    chunks, line, at, start_byte, last, held = [], 0, 0, 0, b"", b""
    digest = hashlib.sha256() if digests is not None else None
    fs, p = storage.resolve(f)
    with fs.open_input_file(p) as raw:  # opened once: three requests per file on a bucket
        fh = inputs.decompressed(raw)
        compressed = fh is not raw
        try:
            while True:
                if stop is not None and stop.is_set():
                    raise PlanStopped(f)
                block = fh.read(_block(compressed))
                if not at and not held and inputs.is_wide(block[:4]):
                    wide = True  # UTF-16/32: decoded whole below, chunked by line
                    break
                if not at and kind == "jsonl":
                    fields[f] = _keys(
                        _json(ln) for ln in storage.strip_bom(block).split(b"\n", SAMPLE_ROWS)[:SAMPLE_ROWS]
                    )
                if digest is not None:
                    digest.update(block)
                data = held + block
                held = data[-1:] if block and data.endswith(b"\r") and universal else b""
                data = data[: len(data) - len(held)]
                if not data:
                    break
                ends = _line_ends(np.frombuffer(data, dtype=np.uint8), universal) + at
                numbers = line + 1 + np.arange(len(ends))
                for n, end in zip(numbers[numbers % chunk_rows == 0], ends[numbers % chunk_rows == 0]):
                    chunks.append(Chunk(f, int(n) - chunk_rows, int(n), start_byte, int(end)))
                    start_byte = int(end)
                line += len(ends)
                at += len(data)
                last = data[-1:]
        except (OSError, pa.ArrowException, EOFError) as e:  # a compressed stream cut short or corrupt
            broken = Chunk(f, line, line + 1, mode="unreadable", error=f"unreadable_file: {_short(e)}")
            last = b"\n"  # a line the break cut is part of what could not be read
        else:
            broken = None
            if digest is not None and not wide:
                digests[f] = digest.hexdigest()[:16]
    if wide:
        n = len(_decoded_lines(f, *_identity(f)))
        return [Chunk(f, a, min(a + chunk_rows, n), mode="decoded") for a in range(0, n, chunk_rows)]
    if at > start_byte:
        start = line - line % chunk_rows if line % chunk_rows else line
        chunks.append(Chunk(f, start, line + (last not in (b"\n", b"\r")), start_byte, at))
    if compressed:  # no byte ranges in a compressed file: lines of the decompressed stream
        chunks = [Chunk(c.path, c.start, c.stop, mode="stream") for c in chunks]
    if broken:  # after the lines read before the break
        at_line = chunks[-1].stop if chunks else 0
        chunks.append(Chunk(f, at_line, at_line + 1, mode="unreadable", error=broken.error))
    return chunks


class PlanStopped(Exception):
    """A file's scan ended because the plan failed elsewhere or was interrupted."""


SAMPLE_ROWS = 20  # a file's first records whose fields the plan notes


def _keys(records) -> set:
    """The fields of those of ``records`` that are objects."""
    return {k for r in records if isinstance(r, dict) for k in r}


def check_fields(stage: str, text_field: str, id_field: str | None, fields: dict) -> None:
    """``<stage>.text_field`` against the fields of each file's first records (:func:`plan_chunks`'s
    ``fields``): in none of the files that have records, a wrong key (every row would be an error
    row: ``no_text``): refused, naming the fields there are; missing from some files only: a
    warning naming them (their rows become error rows). An ``id_field`` no file has: a line saying
    the rows are named by file and line."""
    known = {f: names for f, names in fields.items() if names}
    if id_field and known and not any(id_field in names for names in known.values()):
        log.info(
            f"[{stage}] no input file has {id_field!r} ({stage}.id_field) in its first records: rows are <file>:<line>"
        )
    lacking = [f for f, names in known.items() if text_field not in names]
    if not lacking:
        return
    found = sorted(set().union(*(known[f] for f in lacking)))
    shown = ", ".join(map(repr, found[:12])) + (f" and {len(found) - 12} more" if len(found) > 12 else "")
    if len(lacking) == len(known):
        raise ValueError(
            f"{stage}.text_field={text_field!r}: no input file has that field in its first records (their "
            f"fields: {shown}); every row would be an error row. Set {stage}.text_field to the field of the text"
        )
    names = ", ".join(posixpath.basename(f) for f in lacking[:5]) + (" …" if len(lacking) > 5 else "")
    log.warning(
        f"[{stage}] {len(lacking)} of {len(known)} input file(s) have no {text_field!r} field in their first "
        f"records ({names}; their fields: {shown}): their rows become error rows (no_text)"
    )


def _block(compressed: bool) -> int:
    """Bytes read at a time: small for a compressed stream, whose read fails whole at a break (what
    a failed read held is counted as unreadable, so it stays small)."""
    return 1 << 16 if compressed else 1 << 23


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:200]


def input_files(path: str, fmt: str, exclude: str | None = None) -> tuple[list[str], list[dict]]:
    """The files a batch stage reads under ``path`` in format ``fmt`` and those it skips, with why
    (:func:`cerbero_ray.inputs.list_inputs`; ``exclude``: the stage's output folder)."""
    return inputs.list_inputs(path, inputs.FORMAT_SUFFIXES if fmt == "auto" else (), exclude)


PLAN_THREADS = 8  # files planned at once (each holds a block of up to 8 MiB and its line ends)
PLAN_BAR = 16  # files from which planning shows a progress bar


def plan_chunks(
    path: str,
    fmt: str,
    chunk_rows: int,
    key: str = "format",
    exclude: str | None = None,
    listed=None,
    digests: dict | None = None,
    desc: str | None = None,
    fields: dict | None = None,
) -> tuple[list[Chunk], list[dict]]:
    """Chunks of every input file (for line formats, byte ranges found by scanning for line ends),
    and the files of a folder that are not read, with why (:func:`input_files`; ``listed``: its
    answer, when it was asked already; ``digests``: filled with each line file's contents hash;
    ``desc``: a progress bar's, shown from :data:`PLAN_BAR` files on; ``fields``: filled with the
    fields of each file's first records, :func:`check_fields`)."""
    if fmt not in FORMATS:
        raise ValueError(f"{key} must be one of {FORMATS}, got {fmt!r}")
    files, skipped = listed or input_files(path, fmt, exclude)

    stop = threading.Event()  # set when the plan fails or is interrupted: the other scans end too

    def plan(f: str) -> list[Chunk]:
        return _plan_file(f, file_format(f, fmt, key), chunk_rows, key, digests, fields, stop)

    from cerbero_ray.logs import progress

    # files planned side by side (reads, decompression and hashing let go of the GIL; on a bucket,
    # each file's requests wait on the network), in the listing's order
    pool = concurrent.futures.ThreadPoolExecutor(max(1, min(PLAN_THREADS, len(files))))
    planned = []
    try:
        with progress(total=len(files), unit=" file", desc=desc, disable=desc is None or len(files) < PLAN_BAR) as bar:
            for cs in pool.map(plan, files):
                planned.append(cs)
                bar.update(1)
    except BaseException:  # a SIGTERM or Ctrl-C too: no scan of a large file goes on after it
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return [ch for cs in planned for ch in cs], skipped


def read_chunk(chunk: Chunk, fmt: str, text_field: str, id_field: str | None) -> list[dict]:
    """The chunk's rows as ``{id, text, error}`` (``text`` None when ``error`` is set). Whatever a
    line holds (bad bytes, bad or deeply nested JSON, wrong types, lone surrogates) it becomes a
    row, with ``error`` set when it cannot be used: no row is lost and none raises."""
    name = os.path.basename(chunk.path)
    if chunk.mode == "unreadable":
        return [{"id": f"{name}:{chunk.start}", "text": None, "error": chunk.error}]
    kind = file_format(chunk.path, fmt)
    if kind == "parquet":
        return _parquet_rows(chunk, name, text_field, id_field)
    if kind == "json":
        items = json_items(chunk.path)
        if items is _BAD:
            return [{"id": f"{name}:0", "text": None, "error": "invalid_json"}]
        return [
            _guarded(_record, r, f"{name}:{chunk.start + i}", text_field, id_field)
            for i, r in enumerate(items[chunk.start : chunk.stop])
        ]
    if chunk.mode == "decoded":
        lines = _decoded_lines(chunk.path, *_identity(chunk.path))[chunk.start : chunk.stop]
    elif chunk.mode == "stream":
        lines = _stream_lines(chunk, kind == "txt")
    else:
        fs, p = storage.resolve(chunk.path)
        with fs.open_input_file(p) as fh:
            fh.seek(chunk.byte_start)
            data = fh.read(chunk.byte_stop - chunk.byte_start)
        if chunk.byte_start == 0:
            data = storage.strip_bom(data)
        lines = split_lines(data, kind == "txt")[: chunk.stop - chunk.start]
    # 1-based line numbers, as editors show them
    return [
        _guarded(_line, raw, f"{name}:{chunk.start + i + 1}", kind, text_field, id_field) for i, raw in enumerate(lines)
    ]


def _stream_lines(chunk: Chunk, universal: bool) -> list[bytes]:
    """Lines ``start..stop`` of a compressed file. A compressed stream has no byte offsets to seek
    to: the lines come from a :class:`_Cursor` of this process that goes on where the chunk before
    left it when this chunk lies further on (an actor is handed a file's chunks in order), so each
    actor decompresses a file about once, not once per chunk."""
    key = ("stream", chunk.path, universal, _identity(chunk.path))
    with _kept(key, lambda: _Cursor(chunk.path, universal), lambda c: c.at <= chunk.start) as cursor:
        return cursor.take(chunk.start, chunk.stop)


@contextlib.contextmanager
def _kept(key: tuple, make, usable):
    """The reader this process keeps under ``key`` (a file's identity in it) when ``usable(reader)``,
    else a new one, ``make()``; kept again afterwards (the last :data:`_KEPT` used), closed when
    reading failed."""
    with _READERS_LOCK:
        reader = _READERS.pop(key, None)
        if reader is not None and not usable(reader):
            reader.close()
            reader = None
        reader = reader or make()
        try:
            yield reader
        except BaseException:
            reader.close()
            raise
        _READERS[key] = reader  # the most recently used last
        while len(_READERS) > _KEPT:
            _READERS.pop(next(iter(_READERS))).close()


_READERS: collections.OrderedDict = collections.OrderedDict()
_KEPT = 4  # files an actor may be between (the chunks of two files meet at their boundary)
_READERS_LOCK = threading.Lock()


class _Cursor:
    """A compressed file's decompressing stream and the index of the next line it gives."""

    def __init__(self, path: str, universal: bool):
        self.fh = inputs.open_stream(path)
        self.lines, self.at = iter_lines(self.fh, universal, _block(True)), 0

    def take(self, start: int, stop: int) -> list[bytes]:
        """Lines ``start..stop`` (``start`` at or past :attr:`at`); not one read more: past the
        planned lines a stream may be broken."""
        skipped = sum(1 for _ in itertools.islice(self.lines, start - self.at))
        out = list(itertools.islice(self.lines, stop - start)) if skipped == start - self.at else []
        self.at = self.at + skipped + len(out)
        return out

    def close(self) -> None:
        self.lines.close()
        self.fh.close()


def iter_lines(fh, universal: bool, block_size: int = 1 << 23) -> Iterator[bytes]:
    """The lines of a stream, as :func:`split_lines` cuts them, a block at a time (a UTF-8
    byte-order mark at the start dropped)."""
    rest, first = b"", True
    while True:
        block = fh.read(block_size)
        if first:
            block, first = storage.strip_bom(block), False
        data = rest + block
        if not block:
            yield from split_lines(data, universal)
            return
        hold = 1 if universal and data.endswith(b"\r") else 0  # an LF may follow in the next block
        body = data[: len(data) - hold]
        parts = re.split(rb"\r\n|\r|\n", body) if universal else body.split(b"\n")
        rest = parts.pop() + data[len(data) - hold :]
        yield from parts


@contextlib.contextmanager
def parquet_file(path: str):
    """A Parquet file opened for reading (compressed whole, it is decompressed into memory first)."""
    fs, p = storage.resolve(path)
    with fs.open_input_file(p) as fh:
        codec = inputs.sniff(fh.read(4))
        fh.seek(0)
        yield pq.ParquetFile(pa.BufferReader(pa.CompressedInputStream(fh, codec).read()) if codec else fh)


def _parquet_rows(chunk: Chunk, name: str, text_field: str, id_field: str | None) -> list[dict]:
    """The chunk's rows, read row group by row group through the file's :class:`_Groups` of this
    process: a row group that cannot be read (corrupt data pages) gives an error row for each of
    its rows in the chunk, and the others are read as usual."""
    rows = []
    key = ("parquet", chunk.path, text_field, id_field, _identity(chunk.path))
    with _kept(key, lambda: _Groups(chunk.path, (text_field, id_field)), lambda g: True) as groups:
        first = 0
        for g, n in enumerate(groups.sizes):
            lo, hi = max(chunk.start, first), min(chunk.stop, first + n)
            if lo < hi:
                try:
                    records = groups.take(g, lo - first, hi - first)
                except (OSError, ValueError, pa.ArrowException) as e:
                    groups.drop()
                    err = f"unreadable_row_group: {g}: {_short(e)}"
                    records = [None] * (hi - lo)
                rows += [
                    _guarded(_row, r, f"{name}:{lo + i}", text_field, id_field)
                    if r is not None
                    else {"id": f"{name}:{lo + i}", "text": None, "error": err}
                    for i, r in enumerate(records)
                ]
            first += n
    return rows


class _Groups:
    """An open Parquet file read for the columns a batch stage uses (the text and id fields, those
    of them it has), a row group at a time in batches: a chunk further on in the row group being
    read goes on from the chunk before. A row group (a million rows by pyarrow's default) was read
    whole, every column, for each chunk of its rows."""

    BATCH = 256  # rows decoded at a time (a batch of long texts is what an actor holds)

    def __init__(self, path: str, fields: tuple):
        self.stack = contextlib.ExitStack()
        self.pf = self.stack.enter_context(parquet_file(path))
        names = set(self.pf.schema_arrow.names)
        self.columns = [c for c in dict.fromkeys(fields) if c in names]
        self.sizes = [self.pf.metadata.row_group(g).num_rows for g in range(self.pf.metadata.num_row_groups)]
        self.drop()

    def take(self, group: int, start: int, stop: int) -> list[dict]:
        """Rows ``start..stop`` of row group ``group``: the batches before ``start`` are decoded
        (Parquet pages are read in order) but never turned into records."""
        if not self.columns:  # neither field: every row is one without text
            return [{} for _ in range(start, min(stop, self.sizes[group]))]
        if group != self.group or self.at > start:
            self.drop()
            self.group = group
            self.batches = self.pf.iter_batches(self.BATCH, row_groups=[group], columns=self.columns, use_threads=False)
        self.at, out = max(self.at, start), []
        while self.at < stop:
            while self.end <= self.at:  # on to the batch that holds row ``at``
                batch = next(self.batches, None)
                if batch is None:
                    return out
                self.batch, self.begin, self.end = batch, self.end, self.end + batch.num_rows
            upto = min(stop, self.end)
            out += self.batch.slice(self.at - self.begin, upto - self.at).to_pylist()
            self.at = upto
        return out

    def drop(self) -> None:
        """Forget the row group being read (it failed, or a chunk lies behind): read from its start."""
        self.group, self.batches, self.batch, self.begin, self.end, self.at = None, iter(()), None, 0, 0, 0

    def close(self) -> None:
        self.stack.close()


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


# a run record's key for what its checkpoint held (storage.version); records written before it was
# kept lack it, and match whatever the checkpoint holds now
CHECKPOINT_VERSION = "checkpoint_version"
# ... and for what its input files were (inputs.stamp: names, sizes, times): a file grown since
# would make a chunk of new line numbers beside the old one's part (its rows twice), one edited
# in place keep labels of rows it no longer holds; records from before it match whatever is there
INPUT_VERSION = "input_version"
# ... and what the input files hold, when every one is a line file (JSONL, text: the plan's scan
# reads their bytes): files written again with the same contents (copied again, `touch`ed) are the
# same input, so a rerun resumes instead of labeling everything again; None for Parquet and JSON
INPUT_CONTENT = "input_content"
_SINCE = (CHECKPOINT_VERSION, INPUT_VERSION, INPUT_CONTENT)


def input_content(files: list[str], digests: dict) -> str | None:
    """The hash of the input files' names and contents (:func:`plan_chunks`'s ``digests``), or None
    when one of them has none (Parquet, a JSON array, a file that could not be read whole)."""
    if not files or any(f not in digests for f in files):
        return None
    return hashlib.sha256(json.dumps([[f, digests[f]] for f in files]).encode()).hexdigest()[:16]


def _recorded(out: str, run_file: str) -> dict | None:
    """The run record ``<out>/<run_file>``, or None when there is none."""
    path = storage.join(out, run_file)
    return storage.read_json(path) if storage.is_file(path) else None


def _differ(old: dict | None, ident: dict) -> list[str] | None:
    """What differs between this run (``ident``, as it reads back) and the run record ``old``: the
    keys (empty: the same run), or None when there is no record."""
    if old is None:
        return None
    old = {**{k: ident.get(k) for k in _SINCE if k in ident}, **old}
    return [k for k in ident if ident[k] != old.get(k)] + [k for k in old if k not in ident]


def _present(out: str, names) -> list:
    """The ``FileInfo`` of each of ``names`` (files or folders) that is in ``out``."""
    fs, p = storage.resolve(out)
    return [i for i in fs.get_file_info([f"{p}/{n}" for n in names]) if i.type != storage.pafs.FileType.NotFound]


# each batch stage's run record in its output folder: another stage's in the folder means its parts
# and summary are there, and a run of this one would mix its parts with them and write over them
RUN_FILES = {"label": "label_run.json", "generate": "generate_run.json"}


def check_own_folder(out: str, run_file: str, stage: str) -> None:
    """``FileExistsError`` when ``out`` holds what a batch stage writes (``parts/``, ``summary.json``)
    but no run of this stage: another stage's run (a generate run's folder for label, a training run
    folder's summary): this stage's parts would mix with those and its summary replace the other's.
    ``overwrite`` deletes only this stage's own run (``run_file``), so it is refused with it too."""
    if storage.is_file(storage.join(out, run_file)):
        return
    for other, name in RUN_FILES.items():
        if name != run_file and storage.is_file(storage.join(out, name)):
            raise FileExistsError(
                f"{out} holds a {other} run ({name}): this {stage} run's parts would mix with its parts and "
                f"its summary.json be written over; give {stage}.output_dir a folder of its own"
            )
    found = [i.base_name for i in _present(out, OUTPUTS)]
    if found:
        raise FileExistsError(
            f"{out} holds {' and '.join(found)} of no {stage} run (another job's output: a training run's "
            f"summary, a run of another stage); give {stage}.output_dir a folder of its own"
        )


OUTPUTS = ("parts", "summary.json")  # what every batch stage writes in its output folder (and its run file)


def check_claim(out: str, run_file: str, ident: dict, stage: str, contents_later: bool = False) -> None:
    """``FileExistsError`` when ``out`` holds a run with other settings than ``ident`` (its parts would
    mix with ours), naming them; a checkpoint written again since that run (same path, other files)
    counts as another setting, and so does an input written since, unless its contents are the
    same (:data:`INPUT_CONTENT`). Reads only: also the stage's check before Ray starts, which has
    not read the files (``contents_later``): the run decides on their contents."""
    ident = json.loads(json.dumps(ident))  # as it reads back: tuples become lists
    old = _recorded(out, run_file)
    differ = [k for k in _differ(old, ident) or [] if not (contents_later and k == INPUT_CONTENT)]
    if not differ:
        return
    if set(differ) <= {INPUT_VERSION, INPUT_CONTENT}:
        if INPUT_VERSION not in differ:  # the same files by names, sizes and times
            return
        recorded = old.get(INPUT_CONTENT)
        if recorded and (contents_later or INPUT_CONTENT not in differ):  # the same bytes, written again
            if not contents_later:
                log.info(f"[{stage}] {stage}.input was written again since the run began, same contents: resumed")
            return
        raise FileExistsError(
            f"{out} holds a {stage} run of {stage}.input ({ident['input']}) as its files were: one was "
            f"written, added or removed since (names, sizes or times differ, and for JSONL and text files "
            f"their contents); pass {stage}.overwrite=true to start over with them, or another {stage}.output_dir"
        )
    if differ == [CHECKPOINT_VERSION]:
        raise FileExistsError(
            f"{out} holds a {stage} run of {ident['checkpoint']} as it was before: it was written again "
            f"since (its files differ); pass {stage}.overwrite=true to start over with it, or another "
            f"{stage}.output_dir"
        )
    raise FileExistsError(
        f"{out} holds a {stage} run with other settings ({', '.join(differ)} differ); "
        f"pass {stage}.overwrite=true or another {stage}.output_dir"
    )


def claim_output(out: str, run_file: str, ident: dict, overwrite: bool, stage: str, outputs: tuple = ()) -> None:
    """Record what this run is in ``<out>/<run_file>``; refuse an output folder that holds a run with
    other settings (:func:`check_claim`) unless ``overwrite``, which deletes that run first: what the
    stage writes (:data:`OUTPUTS`, ``run_file`` and the stage's ``outputs``), never another file
    of the folder (a user's own, beside the run)."""
    ident = json.loads(json.dumps(ident))
    check_own_folder(out, run_file, stage)
    if not overwrite:
        check_claim(out, run_file, ident, stage)
    elif _differ(_recorded(out, run_file), ident):
        fs, _ = storage.resolve(out)
        for i in _present(out, (*OUTPUTS, *outputs, run_file)):
            if i.type == storage.pafs.FileType.Directory:
                fs.delete_dir(i.path)
            elif i.type == storage.pafs.FileType.File:
                fs.delete_file(i.path)
    storage.write_json(storage.join(out, run_file), ident)


def precheck_output(stage: str, b, run_file: str, ident, before: frozenset) -> None:
    """A batch stage's precheck (the stage table's): its output folder's record against this run
    (``ident()``, computed only when it counts), before Ray starts; not when the job trains the
    checkpoint first (``before`` holds train: it may be written again) or with ``overwrite``."""
    check_own_folder(b.output_dir, run_file, stage)
    if not b.overwrite and "train" not in before:
        ident = ident()
        if storage.is_file(storage.join(b.output_dir, run_file)):  # the input is listed only when it counts
            ident[INPUT_VERSION] = inputs.stamp(_listed(stage, b)[0])[1]
        check_claim(b.output_dir, run_file, ident, stage, contents_later=True)


def _listed(stage: str, b) -> tuple[list[str], list[dict]]:
    """:func:`input_files` of ``b.input`` (never in ``b.output_dir``), a missing input named as
    ``<stage>.input``."""
    try:
        return input_files(b.input, b.format, b.output_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{stage}.input: {e}") from None


def start_run(
    stage: str, b: BatchInferenceConfig, run_file: str, ident: dict, outputs: tuple = ()
) -> tuple[list[Chunk], list[Chunk], list[dict]]:
    """Plan ``b.input`` (never what lies in ``b.output_dir``: an output folder inside the input
    folder), claim ``b.output_dir`` for this run (``ident``: what fixes its output; ``outputs``: the
    stage's files there besides :data:`OUTPUTS`), delete what a killed run left half-written;
    returns (every chunk, the chunks whose part is still missing, the input files skipped). A
    missing input is reported as such (naming ``<stage>.input``) before the output folder is
    looked at."""
    out = b.output_dir
    listed = _listed(stage, b)
    digests, fields = {}, {}
    plan = dict(listed=listed, digests=digests, desc=f"{stage}: plan", fields=fields)
    chunks, skipped = plan_chunks(b.input, b.format, b.chunk_rows, f"{stage}.format", **plan)
    check_fields(stage, b.text_field, b.id_field, fields)
    if skipped:
        log.warning(f"[{stage}] {inputs.describe_skipped(skipped)}; all listed in summary.json")
    ident = {**ident, INPUT_VERSION: inputs.stamp(listed[0])[1], INPUT_CONTENT: input_content(listed[0], digests)}
    claim_output(out, run_file, ident, b.overwrite, stage, outputs)
    clean_partial(out)
    done = done_keys(out)
    return chunks, [ch for ch in chunks if ch.key not in done], skipped


def clean_partial(out: str) -> None:
    """Remove temporary files a killed run left behind."""
    storage.delete_tmp(storage.join(out, "parts"))


def write_part(out: str, chunk: Chunk, table: pa.Table) -> str:
    """Write the chunk's part whole or not at all (:func:`cerbero_ray.storage.open_output`)."""
    dest = part_path(out, chunk)
    with storage.open_output(dest) as f:
        pq.write_table(table, f, compression="zstd")
    return dest


class ChunkWorker:
    """Base of the model actors: Ray Data hands over chunk records; ``process(chunk)`` returns one
    stats dict per chunk (the same keys every time)."""

    def process(self, chunk: Chunk) -> dict:
        raise NotImplementedError

    def __call__(self, batch: dict) -> dict:
        chunks = [
            Chunk(**{k: (str(v[i]) if k in ("path", "mode", "error") else int(v[i])) for k, v in batch.items()})
            for i in range(len(batch["path"]))
        ]
        stats = [self.process(ch) for ch in chunks]
        return {k: [s[k] for s in stats] for k in stats[0]}


class Pool(Protocol):
    """What sizes a pool of model actors (``BatchInferenceConfig`` has it, and evaluation's ``ModelRun``)."""

    workers: Optional[int]  # None: one per GPU, or the cluster's CPUs - 1
    gpus_per_worker: float
    cpus_per_worker: float


CHUNKS_PER_CALL = 16  # most chunks one actor call takes (:func:`map_chunks`)


def map_chunks(todo: list[Chunk], worker: type, cfg: BatchInferenceConfig, stage: str, desc: str) -> Iterator[dict]:
    """Run ``worker(cfg)`` actors over the chunks on the current Ray cluster; yields each chunk's
    stats, with a progress bar in rows. An actor call takes several consecutive chunks when there
    are many (up to :data:`CHUNKS_PER_CALL`, while each actor still gets 16 calls or more): Ray
    Data spends some milliseconds on each call whatever it holds (15 ms on a 2-core box, as much
    as a GPU labels a few rows in), and an actor reading a file's chunks in a row goes on reading."""
    rows = sum(ch.stop - ch.start for ch in todo)
    yield from map_items([ch.__dict__ for ch in todo], worker, cfg, stage, desc, rows, batch_size=None)


def map_items(
    items: list[dict],
    worker: type,
    cfg: Pool,
    stage: str,
    desc: str,
    total_rows: int,
    batch_size: int | None = 1,
    batch_format: str = "numpy",
) -> Iterator[dict]:
    """Run a pool of ``worker(cfg)`` model actors over ``items`` (``batch_size`` per call, each a
    row of columns; None: as many as :func:`map_chunks` says) on the current Ray cluster (``cfg``:
    ``workers``, ``gpus_per_worker``, ``cpus_per_worker``, set under the config key ``stage``);
    yields each result row, whose ``rows`` drives a progress bar of ``total_rows``."""
    import ray
    import ray.data

    from cerbero_ray.cluster import actor_share, check_fits
    from cerbero_ray.logs import progress

    res = ray.cluster_resources()
    gpus, cpus = float(cfg.gpus_per_worker), float(res.get("CPU", 1))
    check_fits({"GPU": gpus}, f"{stage}.gpus_per_worker={gpus:g} (one model actor's)")
    workers = cfg.workers or (int(res.get("GPU", 0) // gpus) if gpus else max(1, int(cpus - 1)))
    if batch_size is None:  # as many as leave each actor 16 calls or more, up to CHUNKS_PER_CALL
        batch_size = max(1, min(CHUNKS_PER_CALL, len(items) // (16 * max(1, workers))))
    batches = -(-len(items) // batch_size)
    workers = max(1, min(workers, batches))
    share = actor_share(max(cpus - 1, 0.5), workers, f"{stage}.workers")
    ray.data.DataContext.get_current().execution_options.preserve_order = False
    ds = ray.data.from_items(items, override_num_blocks=batches)
    ds = ds.map_batches(
        worker,
        fn_constructor_args=(cfg,),
        batch_size=batch_size,
        batch_format=batch_format,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=gpus or None,
        num_cpus=min(float(cfg.cpus_per_worker), share),
    )
    with progress(total=total_rows, unit="row", desc=desc) as bar:
        for row in ds.iter_rows():
            bar.update(row["rows"])
            yield row
