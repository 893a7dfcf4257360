"""Input sources → one Ray Dataset of raw rows (``source, path, line_no, kind, raw``).

Rows stay raw bytes until the packing buffer parses them, so that a line with invalid UTF-8 or
broken JSON becomes a counted reject instead of crashing a reader. Before any work starts,
:func:`inspect_sources` lists every source's files and checks on its first rows that a usable
format is there (a schema-level problem is a ``ValueError`` naming the source).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from cerbero_ray import storage
from cerbero_ray.data.formats import FORMATS, detect_format, to_document

SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
PEEK_ROWS = 50


@dataclass
class SourcePlan:
    name: str
    files: list[str]
    format: str
    bytes: int


def _peek_records(path: str) -> list:
    fs, p = storage.resolve(path)
    if path.endswith(".parquet"):
        with fs.open_input_file(p) as f:
            pf = pq.ParquetFile(f)
            if pf.metadata.num_rows == 0:
                return []
            return pf.read_row_group(0).slice(0, PEEK_ROWS).to_pylist()
    with fs.open_input_stream(p) as f:
        head = storage.strip_bom(f.read(1 << 20) if path.endswith(".jsonl") else f.readall())
    if path.endswith(".json"):
        try:
            obj = json.loads(head)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); use JSON Lines for large files") from None
        return (obj if isinstance(obj, list) else [obj])[:PEEK_ROWS]
    records = []
    for line in head.split(b"\n")[: -1 if len(head) == 1 << 20 else None][: PEEK_ROWS * 4]:
        try:
            records.append(json.loads(line))
        except (ValueError, RecursionError):  # bad rows are the rejects' business, not a config error
            continue
        if len(records) >= PEEK_ROWS:
            break
    return records


def inspect_sources(sources: dict[str, dict]) -> list[SourcePlan]:
    """Files, format and size of each source; ``ValueError`` if a source has no usable data."""
    if not sources:
        raise ValueError("data.sources is empty: give at least one source (see conf/data/*.yaml)")
    plans = []
    for name, src in sources.items():
        fmt = src.get("format", "auto")
        if fmt != "auto" and fmt not in FORMATS:
            raise ValueError(f"data.sources.{name}.format={fmt!r}: expected auto or one of {FORMATS}")
        if float(src.get("weight", 1.0)) < 0:
            raise ValueError(f"data.sources.{name}.weight must be >= 0, got {src['weight']}")
        files = storage.list_files(src["path"], SUFFIXES)
        fs, _ = storage.resolve(files[0])
        size = sum(fs.get_file_info(storage.resolve(f)[1]).size for f in files)
        text_field = src.get("text_field", "text")
        if all(f.endswith(".txt") for f in files):
            fmt = "text"
        else:
            records = [r for f in files[:4] if not f.endswith(".txt") for r in _peek_records(f)]
            dicts = [r for r in records if isinstance(r, dict)]
            if fmt == "auto":
                found = [x for x in (detect_format(r, text_field) for r in dicts) if x]
                if not found:
                    cols = sorted({k for r in dicts for k in r})[:20]
                    raise ValueError(
                        f"data.sources.{name}: no usable column in {src['path']} (saw {cols or 'no JSON objects'}); "
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
                    f"data.sources.{name}: none of the first {len(dicts)} rows of {src['path']} "
                    f"is a valid '{fmt}' record; check data.sources.{name}.format/text_field"
                )
        plans.append(SourcePlan(name, files, fmt, size))
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
    (the file is read whole), a .txt file as one document. Blank JSONL lines are rows too (rejected
    as ``empty`` downstream), so that input rows = documents + rejects holds for every file."""
    if path.endswith(".txt"):
        yield _table(source, path, "txt", [0], [storage.strip_bom(f.read())])
        return
    if path.endswith(".json"):
        data = storage.strip_bom(f.read())
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            yield _table(source, path, "record", [0], [data])  # rejected downstream, with its reason
            return
        items = obj if isinstance(obj, list) else [obj]
        for s in range(0, len(items), block_rows):
            chunk = items[s : s + block_rows]
            yield _table(
                source,
                path,
                "record",
                list(range(s, s + len(chunk))),
                [record_bytes(x) for x in chunk],
            )
        return
    rest, line_no, nos, raws = b"", 0, [], []
    while True:
        chunk = f.read(8 << 20)
        if line_no == 0 and not rest:
            chunk = storage.strip_bom(chunk)
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
    if raws:
        yield _table(source, path, "jsonl", nos, raws)


def parquet_to_raw(batch: pa.Table, source: str) -> pa.Table:
    """Parquet rows as raw JSON records; ``line_no`` is a content hash (row order is not stable)."""
    raws = [record_bytes(r) for r in batch.drop_columns([c for c in ("path",) if c in batch.column_names]).to_pylist()]
    paths = batch.column("path").to_pylist() if "path" in batch.column_names else [""] * len(raws)
    nos = [int.from_bytes(hashlib.blake2b(r, digest_size=7).digest(), "little") for r in raws]
    t = _table(source, "", "record", nos, raws)
    return t.set_column(1, "path", pa.array(paths, pa.string()))


def build_dataset(plans: list[SourcePlan], block_rows: int = 1024):
    """One Ray Dataset of raw rows over every source, in config order."""
    import ray.data
    from ray.data.datasource import FileBasedDatasource

    class RawRecords(FileBasedDatasource):
        def __init__(self, paths, source: str, **kwargs):
            super().__init__(paths, **kwargs)
            self._source = source

        def _read_stream(self, f, path: str):
            yield from read_raw_stream(f, path, self._source, block_rows)

    parts = []
    for plan in plans:
        fs, _ = storage.resolve(plan.files[0])
        paths = [storage.resolve(p)[1] for p in plan.files]
        pq_files = [p for p in paths if p.endswith(".parquet")]
        other = [p for p in paths if not p.endswith(".parquet")]
        if other:
            parts.append(ray.data.read_datasource(RawRecords(other, plan.name, filesystem=fs)))
        if pq_files:
            ds = ray.data.read_parquet(pq_files, filesystem=fs, include_paths=True)
            parts.append(
                ds.map_batches(
                    parquet_to_raw, fn_kwargs={"source": plan.name}, batch_format="pyarrow", batch_size=block_rows
                )
            )
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
