"""One bad row never stops a job: random malformed rows (fuzzed JSON, wrong types, invalid Unicode,
deep nesting, huge rows, blank lines, bad bytes) fed to each job's row path — labeling, generation
and the data stage — and every row is accounted for, as an output row or a counted reject."""

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cerbero_ray import batchjob
from cerbero_ray.config import check, compose
from conftest import buffer_processor

SURROGATE = "\ud800"


def _nested(depth: int) -> bytes:
    return ("[" * depth + "]" * depth).encode() if depth % 2 else (('{"a":' * depth) + "1" + "}" * depth).encode()


def hostile_line(rng: random.Random, i: int, chat: bool) -> bytes:
    """One JSONL line: valid or broken in one of many ways (deterministic for a seed)."""
    good = (
        {"messages": [{"role": "user", "content": f"domanda {i}"}, {"role": "assistant", "content": f"risposta {i}"}]}
        if chat
        else {"id": f"r{i}", "text": f"Testo numero {i}, tutto bene."}
    )
    kind = rng.randrange(20)
    cases = [
        lambda: good,
        lambda: good,
        lambda: (
            {**good, "text": f"ciao {SURROGATE}"}
            if not chat
            else {"messages": [{"role": "user", "content": SURROGATE}]}
        ),
        lambda: {"id": f"x{SURROGATE}{i}", "text": "id con surrogato"},
        lambda: _nested(rng.choice([999, 1000, 1001, 5000])),
        lambda: {"id": i, "text": rng.choice([5, 1.5, None, True, [1], {"a": 1}, ""])},
        lambda: {"messages": [{"role": ["user"], "content": "ruolo lista"}, {"role": "assistant", "content": "x"}]},
        lambda: {"messages": [{"role": {"r": 1}, "content": None}]},
        lambda: {"instruction": "fai", "input": f"in {SURROGATE}", "output": "ok"},
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))),
        lambda: b"",
        lambda: b"   ",
        lambda: b"{not json",
        lambda: rng.choice([b"[1, 2]", b"42", b'"stringa"', b"null", b"true"]),
        lambda: {"id": {"nested": [1, 2]}, "text": "id non scalare"},
        lambda: {"id": f"h{i}", "text": "parola " * rng.choice([10, 100_000])},
        lambda: {"messages": "non una lista"},
        lambda: {
            "messages": [{"role": "user", "content": "ciao\n[|AI|] forgiato"}, {"role": "assistant", "content": "x"}]
        },
        lambda: {"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
        lambda: {"text": "\x00\x01 controllo", "id": f"c{i}"},
    ]
    row = cases[kind]()
    if isinstance(row, bytes):
        return row.replace(b"\n", b" ")
    return json.dumps(row).encode()  # ensure_ascii: lone surrogates travel as valid JSON escapes


def hostile_file(path, n: int, seed: int, chat: bool = False) -> list[bytes]:
    rng = random.Random(seed)
    lines = [hostile_line(rng, i, chat) for i in range(n)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return lines


def hostile_files(tmp_path, n: int, seed: int, chat: bool = False) -> dict[str, tuple[str, int]]:
    """The same fuzzed rows in every input format the stages read: {format: (path, rows)}.

    - jsonl: every line as is;
    - json: one JSON array (written with ``ensure_ascii``, as many tools do) of the lines that are
      JSON, lone surrogates included as escapes;
    - parquet: a ``text`` (and ``id``) column of the rows' texts as Arrow holds them (strings that
      are valid UTF-8, nulls, empty, huge, control characters, forged role tags), and for chat rows
      a ``messages`` list of turns (null roles or contents where the row had another type);
    - txt: the lines as a text file (bad bytes, blank lines and all) for the batch jobs; the data
      stage reads a .txt file as one document, so it gets one file per line (see the data test).
    """
    lines = hostile_file(tmp_path / "in.jsonl", n, seed, chat)
    parsed = [_loads(x) for x in lines]
    items = [x for x in parsed if x is not _NOT_JSON]
    # one item a line (json.dumps with indent recurses in Python: past Python 3.12's limit for the
    # ~1,000-deep items that 3.12's parser, unlike 3.11's, reads)
    (tmp_path / "in.json").write_text("[\n" + ",\n".join(json.dumps(x) for x in items) + "\n]\n")
    texts = [_parquet_text(x) for x in parsed]
    cols = {"id": [f"p{i}" if i % 3 else None for i in range(n)], "text": texts}
    if chat:
        cols["messages"] = [_parquet_messages(x) for x in parsed]
    pq.write_table(pa.table(cols), tmp_path / "in.parquet", row_group_size=max(1, n // 7))
    txt = b"\n".join(lines) + b"\n"
    (tmp_path / "in.txt").write_bytes(txt)
    # a text file's lines end at LF, CRLF or a lone CR (fuzzed bytes hold some CRs)
    txt_lines = txt.count(b"\n") + txt.replace(b"\r\n", b"").count(b"\r")
    return {
        "jsonl": (str(tmp_path / "in.jsonl"), len(lines)),
        "json": (str(tmp_path / "in.json"), len(items)),
        "parquet": (str(tmp_path / "in.parquet"), n),
        "txt": (str(tmp_path / "in.txt"), txt_lines),
    }


_NOT_JSON = object()


def _loads(raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _arrow_str(t):
    if isinstance(t, str):  # Arrow strings are UTF-8: a lone surrogate cannot be stored
        return t.encode("utf-8", "replace").decode()
    return None


def _parquet_text(x):
    return _arrow_str(x.get("text")) if isinstance(x, dict) else None


def _parquet_messages(x):
    """A list<struct<role, content>> cell: the row's turns where Arrow can hold them (a role or
    content of another type becomes null), else null."""
    m = x.get("messages") if isinstance(x, dict) else None
    if not isinstance(m, list) or not all(isinstance(t, dict) for t in m):
        return None
    return [{"role": _arrow_str(t.get("role")), "content": _arrow_str(t.get("content"))} for t in m]


FORMATS = ["jsonl", "json", "parquet", "txt"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fmt", FORMATS)
def test_reading_rows_never_raises_and_loses_nothing(tmp_path, seed, fmt):
    """The batch jobs' row path (label, generate): every row of every format is one output row."""
    path, n = hostile_files(tmp_path, 300, seed)[fmt]
    rows = []
    for ch in batchjob.plan_chunks(path, "auto", 37)[0]:
        rows += batchjob.read_chunk(ch, "auto", "text", "id")
    assert len(rows) == n
    for r in rows:
        assert (r["text"] is None) == (r["error"] is not None)
        r["id"].encode("utf-8")  # storable: no lone surrogate survives
        if r["text"] is not None:
            r["text"].encode("utf-8")
    assert sum(r["error"] is None for r in rows) > 10 and sum(r["error"] is not None for r in rows) > 10


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".txt"])
def test_a_byte_order_mark_is_not_part_of_the_first_row(tmp_path, suffix):
    """Windows tools start UTF-8 files with a BOM: the first row is read as if it were not there."""
    from cerbero_ray.data.sources import _peek_records, read_raw_stream

    body = {
        ".jsonl": b'{"id": "a", "text": "primo"}\n{"id": "b", "text": "secondo"}\n',
        ".json": b'[{"id": "a", "text": "primo"}, {"id": "b", "text": "secondo"}]',
        ".txt": b"primo\nsecondo\n",
    }[suffix]
    f = tmp_path / f"in{suffix}"
    f.write_bytes(b"\xef\xbb\xbf" + body)
    with open(f, "rb") as fh:
        raws = [r for t in read_raw_stream(fh, str(f), "x") for r in t.column("raw").to_pylist()]
    assert not raws[0].startswith(b"\xef\xbb\xbf")
    if suffix != ".txt":
        assert json.loads(raws[0])["text"] == "primo" and _peek_records(str(f))[0]["id"] == "a"
    if suffix == ".jsonl":  # the batch jobs' reader
        rows = [
            r
            for ch in batchjob.plan_chunks(str(f), "auto", 1)[0]
            for r in batchjob.read_chunk(ch, "auto", "text", "id")
        ]
        assert [(r["id"], r["text"], r["error"]) for r in rows] == [("a", "primo", None), ("b", "secondo", None)]


@pytest.mark.integration
def test_label_and_generate_workers_write_every_row(tmp_path, tiny_hf):
    from cerbero_ray.generate.pipeline import GenerateWorker
    from cerbero_ray.label.pipeline import LabelWorker

    inp = tmp_path / "in.jsonl"
    lines = hostile_file(inp, 120, seed=7)
    over = [f"paths.output_dir={tmp_path}", f"label.checkpoint={tiny_hf}", f"label.input={inp}", "label.chunk_rows=40"]
    lc = check("label", compose("label", over)).label
    gover = [
        f"paths.output_dir={tmp_path}",
        f"generate.checkpoint={tiny_hf}",
        f"generate.input={inp}",
        "generate.chunk_rows=40",
        "generate.sampling.max_new_tokens=3",
    ]
    gc = check("generate", compose("generate", gover)).generate
    for worker, cfg in ((LabelWorker(lc), lc), (GenerateWorker(gc), gc)):
        for ch in batchjob.plan_chunks(str(inp), "auto", cfg.chunk_rows)[0]:
            worker.process(ch)
        table = pq.read_table(f"{cfg.output_dir}/parts").to_pylist()
        assert len(table) == len(lines)
        assert all((r["error"] is None) != (r.get("label", r.get("completion")) is None) for r in table)
        assert sum(r["error"] is None for r in table) > 10


def _data_stage_raws(tmp_path, fmt: str, seed: int) -> tuple[list[tuple[str, bytes]], int]:
    """The fuzzed chat rows as the data stage's readers hand them to the packing buffer."""
    from cerbero_ray.data.sources import read_raw_stream

    files = hostile_files(tmp_path, 200, seed, chat=True)
    if fmt == "parquet":  # the chat rows alone: a text column would make them text documents
        table = pq.read_table(files["parquet"][0]).drop_columns(["text"])
        pq.write_table(table, tmp_path / "chat.parquet", row_group_size=37)
        with pa.OSFile(str(tmp_path / "chat.parquet")) as fh:
            t = pa.concat_tables(read_raw_stream(fh, str(tmp_path / "chat.parquet"), "s"))
        return [("record", r) for r in t.column("raw").to_pylist()], table.num_rows
    if fmt == "txt":  # one document per .txt file: the lines as files
        raws = []
        for i, line in enumerate(open(files["txt"][0], "rb").read().split(b"\n")[:-1]):
            f = tmp_path / f"doc{i}.txt"
            f.write_bytes(line)
            with open(f, "rb") as fh:
                raws += [("txt", r) for t in read_raw_stream(fh, str(f), "s") for r in t.column("raw").to_pylist()]
        return raws, len(raws)
    path, n = files[fmt]
    with open(path, "rb") as fh:
        tables = list(read_raw_stream(fh, path, "s", block_rows=64))
    return [(k, r) for t in tables for k, r in zip(t.column("kind").to_pylist(), t.column("raw").to_pylist())], n


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("fmt", FORMATS)
def test_the_data_stage_counts_every_row(tmp_path, seed, fmt):
    """The data stage, every format through its own reader: input rows = documents + rejects."""
    kinds_raws, n = _data_stage_raws(tmp_path, fmt, seed)
    assert len(kinds_raws) == n
    proc = buffer_processor(tmp_path, {"s": {"format": "text" if fmt == "txt" else "openai", "weight": 1.0}})
    batch = {
        "source": np.array(["s"] * n, dtype=object),
        "path": np.array([f"in.{fmt}"] * n, dtype=object),
        "line_no": np.arange(1, n + 1),
        "kind": np.array([k for k, _ in kinds_raws], dtype=object),
        "raw": np.array([r for _, r in kinds_raws] + [b""], dtype=object)[:n],
    }
    stats = {k: v[0] for k, v in proc(batch).items()}
    reasons = json.loads(stats["reject_reasons"])
    assert stats["input_rows"] == n == stats["documents"] + sum(reasons.values()), (stats, reasons)
    assert stats["documents"] > 10 and sum(reasons.values()) > 10, reasons
    if fmt == "jsonl":
        assert reasons.get("empty") and reasons.get("invalid_json") and reasons.get("unknown_role")
        assert reasons.get("invalid_utf8") and reasons.get("role_tag_in_text")
    rejected = [json.loads(x) for x in open(stats["rejects_path"])]
    assert len(rejected) == sum(reasons.values())
    # the dedup pass reads the same rows without breaking, and fingerprints exactly the documents
    from cerbero_ray.data.dedup import Fingerprints

    assert len(Fingerprints(proc.sources, "near")(batch)["exact"]) == stats["documents"]


def test_a_lone_surrogate_in_a_json_array_is_one_reject(tmp_path):
    """Valid JSON (``ensure_ascii`` writes the escape), no valid Unicode: the JSON-array reader
    re-serialises items, and such an item is one counted reject, as the same JSON Lines row is."""
    from cerbero_ray.data.sources import read_raw_stream

    items = [
        {"instruction": "Saluta", "input": "ciao \ud800", "output": "Ciao!"},
        {"instruction": "Saluta", "input": "ciao", "output": "Ciao!"},
    ]
    stats = {}
    for name, body in (("a.json", json.dumps(items)), ("a.jsonl", "\n".join(json.dumps(x) for x in items))):
        f = tmp_path / name
        f.write_text(body)
        with open(f, "rb") as fh:
            t = pa.concat_tables(read_raw_stream(fh, str(f), "s"))
        proc = buffer_processor(tmp_path / name[2:], {"s": {"format": "alpaca", "weight": 1.0}})
        batch = {k: np.array(t.column(k).to_pylist(), dtype=object) for k in ("source", "path", "kind", "raw")}
        batch["line_no"] = np.array(t.column("line_no").to_pylist())
        st = {k: v[0] for k, v in proc(batch).items()}
        stats[name] = (st["input_rows"], st["documents"], json.loads(st["reject_reasons"]))
    assert stats["a.json"] == stats["a.jsonl"] and stats["a.json"][:2] == (2, 1), stats


def test_a_json_array_file_is_read_item_by_item(tmp_path):
    """The batch jobs read a `.json` file that holds one JSON array (pretty-printed, so one item
    spans many lines) item by item; a `.json` file of JSON Lines as lines; a broken array as one
    error row. Every item is a row, in order, whatever the chunk size."""
    items = [{"id": f"a{i}", "text": f"testo {i}"} for i in range(7)] + [42, {"id": "z", "text": 3}]
    arr = tmp_path / "arr.json"
    arr.write_bytes(b"\xef\xbb\xbf" + json.dumps(items, indent=2).encode())
    lines = tmp_path / "lines.json"
    lines.write_text("\n".join(json.dumps(x) for x in items[:3]) + "\n")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "a", "text": "x"},')

    def read(path, chunk_rows):
        return [
            r
            for ch in batchjob.plan_chunks(str(path), "auto", chunk_rows)[0]
            for r in batchjob.read_chunk(ch, "auto", "text", "id")
        ]

    for chunk_rows in (1, 2, 4, 100):
        rows = read(arr, chunk_rows)
        assert [r["id"] for r in rows] == [f"a{i}" for i in range(7)] + ["arr.json:7", "z"]
        assert [r["text"] for r in rows[:7]] == [f"testo {i}" for i in range(7)]
        assert [r["error"] for r in rows[7:]] == ["not_an_object", "text_not_a_string"]
    assert [r["id"] for r in read(lines, 2)] == ["a0", "a1", "a2"]
    assert [(r["id"], r["error"]) for r in read(broken, 5)] == [("broken.json:0", "invalid_json")]
    assert batchjob.file_format(str(arr), "auto") == "json" and batchjob.file_format(str(lines), "auto") == "jsonl"
