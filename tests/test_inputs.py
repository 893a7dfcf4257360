"""Every input file and every row accounted for: compressed files (by their bytes, whatever their
name), Parquet files that are corrupt or cut short, text files with CR line ends or in UTF-16/32,
and files a folder holds that no stage reads (listed with why, never silently dropped). Each case
through the batch jobs' reader (label, generate) and the data stage's reader."""

import bz2
import gzip
import hashlib
import json
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cerbero_ray import batchjob, inputs
from cerbero_ray.config.data import SourceConfig
from cerbero_ray.data.sources import inspect_sources, read_raw_stream

ROWS = [{"id": f"r{i}", "text": f"Testo numero {i}: va tutto bene."} for i in range(50)]
JSONL = b"".join(json.dumps(r).encode() + b"\n" for r in ROWS)


def read_all(path, fmt="auto", chunk_rows=7):
    chunks, skipped = batchjob.plan_chunks(str(path), fmt, chunk_rows)
    return [r for ch in chunks for r in batchjob.read_chunk(ch, fmt, "text", "id")], skipped


def raw_rows(path):
    with pa.OSFile(str(path)) as f:
        return [r for t in read_raw_stream(f, str(path), "s") for r in zip(t["kind"].to_pylist(), t["raw"].to_pylist())]


def _zstd(data: bytes) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(data)
    return sink.getvalue().to_pybytes()


COMPRESS = {"gzip": gzip.compress, "zstd": _zstd, "bz2": bz2.compress}


@pytest.mark.parametrize("codec", sorted(COMPRESS))
@pytest.mark.parametrize("name", ["in.jsonl.{ext}", "in.jsonl"])  # by name, and a compressed file under a plain name
def test_compressed_jsonl_is_read_whole_never_as_text(tmp_path, codec, name):
    ext = {"gzip": "gz", "zstd": "zst", "bz2": "bz2"}[codec]
    f = tmp_path / name.format(ext=ext)
    f.write_bytes(COMPRESS[codec](JSONL))
    for chunk_rows in (7, 50, 1000):
        rows, _ = read_all(f, chunk_rows=chunk_rows)
        assert [r["id"] for r in rows] == [r["id"] for r in ROWS] and all(r["error"] is None for r in rows)
    rows, _ = read_all(f, fmt="jsonl")  # the format given, as the old error message advised
    assert len(rows) == 50 and all(r["error"] is None for r in rows)
    assert [json.loads(raw)["id"] for _, raw in raw_rows(f)] == [r["id"] for r in ROWS]  # the data stage


@pytest.mark.parametrize("codec", sorted(COMPRESS))
def test_a_compressed_file_is_decompressed_once_per_reader_not_once_per_chunk(tmp_path, monkeypatch, codec):
    """A compressed line file has no byte offsets: a reader handed its chunks in order (as an actor
    is) goes on where the chunk before left the stream; out of order, across two files, or after the
    file changed, it starts again. The rows are the file's rows whatever the order."""
    ext = {"gzip": "gz", "zstd": "zst", "bz2": "bz2"}[codec]
    a, b = tmp_path / f"a.jsonl.{ext}", tmp_path / f"b.txt.{ext}"
    a.write_bytes(COMPRESS[codec](JSONL))
    b.write_bytes(COMPRESS[codec]("\n".join(r["text"] for r in ROWS).encode()))
    chunks = {f: batchjob.plan_chunks(str(f), "auto", 7)[0] for f in (a, b)}
    assert {ch.mode for cs in chunks.values() for ch in cs} == {"stream"} and len(chunks[a]) == 8
    opened = []
    real = inputs.open_stream
    monkeypatch.setattr(inputs, "open_stream", lambda p: opened.append(os.path.basename(p)) or real(p))

    def read(order):
        return [r for ch in order for r in batchjob.read_chunk(ch, "auto", "text", "id")]

    ids = [r["id"] for r in ROWS]
    every = read(chunks[a])
    assert [r["id"] for r in every] == ids and all(r["error"] is None for r in every) and opened == [a.name]
    opened.clear()  # one actor of three: every third chunk, still one pass
    assert [r["id"] for r in read(chunks[a][1::3])] == [i for k in range(1, 8, 3) for i in ids[7 * k : 7 * k + 7]]
    assert opened == [a.name]
    opened.clear()  # backwards: each chunk starts the stream again
    assert read(chunks[a][::-1]) == [r for k in range(7, -1, -1) for r in every[7 * k : 7 * k + 7]]
    assert opened == [a.name] * 8
    opened.clear()  # two files' chunks interleaved: each file's stream goes on
    mixed = [ch for pair in zip(chunks[a], chunks[b]) for ch in pair]
    got = read(mixed)
    assert [r["id"] for r in got if not r["id"].startswith("b.")] == ids
    assert [r["text"] for r in got if r["id"].startswith("b.")] == [r["text"] for r in ROWS]
    assert sorted(opened) == [a.name, b.name]
    opened.clear()  # the file written again between two chunks: its new bytes, from a new stream
    read(chunks[a][:2])
    a.write_bytes(COMPRESS[codec](JSONL.replace(b"Testo", b"Riga!")))
    assert {r["text"][:5] for r in read(chunks[a][2:4])} == {"Riga!"} and opened == [a.name, a.name]


def test_compressed_json_array_txt_and_parquet(tmp_path):
    (tmp_path / "a.json.gz").write_bytes(gzip.compress(json.dumps(ROWS).encode()))
    (tmp_path / "b.txt.zst").write_bytes(COMPRESS["zstd"]("\n".join(r["text"] for r in ROWS).encode()))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "c.parquet")
    (tmp_path / "c.parquet.gz").write_bytes(gzip.compress((tmp_path / "c.parquet").read_bytes()))
    os.remove(tmp_path / "c.parquet")
    rows, skipped = read_all(tmp_path)
    assert len(rows) == 150 and all(r["error"] is None for r in rows) and skipped == []
    assert [k for k, _ in raw_rows(tmp_path / "c.parquet.gz")] == ["record"] * 50


def test_a_compressed_stream_cut_short_keeps_its_lines_and_counts_the_break(tmp_path):
    f = tmp_path / "cut.jsonl.gz"
    whole = gzip.compress(JSONL * 400)
    f.write_bytes(whole[: len(whole) // 2])
    rows, _ = read_all(f, chunk_rows=100)
    good = [r for r in rows if r["error"] is None]
    assert good and rows[-1]["error"].startswith("unreadable_file") and len(rows) == len(good) + 1
    # the data stage: the lines before the break, then one unreadable row naming the error
    kinds = [k for k, _ in raw_rows(f)]
    assert kinds[-1] == "unreadable" and kinds.count("unreadable") == 1


@pytest.mark.parametrize("codec", ["gzip", "bz2"])
def test_every_complete_line_before_a_break_is_kept(tmp_path, codec):
    """Half of a 200-line file (gzip; bzip2 in 100 kB blocks): every line the readable half holds
    whole is a row, in both readers, and the break is one error row naming the next line."""
    import random
    import zlib

    rng = random.Random(0)
    rows = [
        {"id": f"r{i}", "text": " ".join(rng.choice(["ciao", "mare", "sole", "vento", "pane"]) for _ in range(400))}
        for i in range(200)
    ]
    data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    whole = gzip.compress(data) if codec == "gzip" else bz2.compress(data, compresslevel=1)
    cut = whole[: len(whole) // 2]
    if codec == "gzip":
        readable = zlib.decompressobj(zlib.MAX_WBITS | 16).decompress(cut)
    else:
        readable = b"".join(bz2.decompress(b) for b in _bz2_whole_blocks(data, cut))
    expected = readable.count(b"\n")
    assert 20 < expected < 200
    f = tmp_path / f"cut.jsonl.{'gz' if codec == 'gzip' else 'bz2'}"
    f.write_bytes(cut)
    got, _ = read_all(f, chunk_rows=16)
    assert [r["id"] for r in got if r["error"] is None] == [f"r{i}" for i in range(expected)]
    assert len(got) == expected + 1 and got[-1]["error"].startswith("unreadable_file: EOFError")
    raws = raw_rows(f)  # the data stage
    assert [json.loads(raw)["id"] for k, raw in raws if k == "jsonl"] == [f"r{i}" for i in range(expected)]
    assert [k for k, _ in raws][-1] == "unreadable" and b"cut short" in raws[-1][1]


def _bz2_whole_blocks(data: bytes, cut: bytes) -> list[bytes]:
    """The reference for a cut bzip2 file: what its complete blocks decompress to (bzip2 decodes
    block by block: a block the cut reaches is lost whole)."""
    d, out = bz2.BZ2Decompressor(), b""
    try:
        for i in range(0, len(cut), 1 << 12):
            out += d.decompress(cut[i : i + (1 << 12)])
    except (OSError, EOFError):
        pass
    return [bz2.compress(out)] if out else []


def _corrupt_parquet(path, groups=4):
    """A Parquet file with a valid footer whose first row group's data pages are garbage."""
    pq.write_table(pa.Table.from_pylist(ROWS * 2), path, row_group_size=25, compression="zstd")
    data = bytearray(path.read_bytes())
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(0).column(1)
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    data[start + 8 : start + col.total_compressed_size - 4] = os.urandom(col.total_compressed_size - 12)
    path.write_bytes(bytes(data))


def test_a_corrupt_parquet_row_group_becomes_error_rows_and_the_rest_is_read(tmp_path):
    good_jsonl = tmp_path / "a.jsonl"
    good_jsonl.write_bytes(JSONL)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "b.parquet")
    _corrupt_parquet(tmp_path / "c.parquet")
    rows, _ = read_all(tmp_path, chunk_rows=10)
    assert len(rows) == 50 + 50 + 100  # every row of every file, as a row
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 25 and all(r["error"].startswith("unreadable_row_group: 0") for r in bad), bad[:2]
    assert {r["id"] for r in bad} == {f"c.parquet:{i}" for i in range(25)}
    kinds = [k for k, _ in raw_rows(tmp_path / "c.parquet")]  # the data stage
    assert kinds.count("unreadable") == 1 and kinds.count("record") == 75


def test_the_data_stage_streams_a_row_group_and_keeps_the_rows_before_a_corrupt_page(tmp_path):
    """The data stage decoded each row group whole into Python records (a million rows by pyarrow's
    default: GBs in one worker) and lost all of it to one corrupt page. Now a row group is read in
    blocks: the rows before the page that cannot be read are records, the rest one row naming them."""
    rows = [{"id": f"r{i}", "text": f"Testo numero {i}: " + "parole diverse " * 5} for i in range(200)]
    f = tmp_path / "late.parquet"
    pq.write_table(pa.Table.from_pylist(rows), f, compression="none", data_page_size=512, use_dictionary=False)
    col = pq.ParquetFile(f).metadata.row_group(0).column(1)
    end = col.data_page_offset + col.total_compressed_size
    data = bytearray(f.read_bytes())
    data[end - 300 : end - 10] = b"\xff" * 290  # the text column's last page
    f.write_bytes(bytes(data))
    with pa.OSFile(str(f)) as fh:
        tables = list(read_raw_stream(fh, str(f), "s", block_rows=16))
    assert {t.num_rows for t in tables[:-1]} == {16}  # blocks, not the row group at once
    kinds = [k for t in tables for k in t["kind"].to_pylist()]
    kept = kinds.count("record")
    assert 100 < kept < 200 and kinds == ["record"] * kept + ["unreadable"]
    assert [json.loads(r)["id"] for t in tables[:-1] for r in t["raw"].to_pylist()] == [f"r{i}" for i in range(kept)]
    assert f"row group 0 (rows {kept}..199)" in tables[-1]["raw"].to_pylist()[0].decode()


def test_a_parquet_file_cut_short_is_one_error_row(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "t.parquet")
    data = (tmp_path / "t.parquet").read_bytes()
    (tmp_path / "t.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "ok.jsonl").write_bytes(JSONL)
    rows, _ = read_all(tmp_path)
    assert len(rows) == 51 and [r["id"] for r in rows if r["error"]] == ["t.parquet:0"]
    assert rows[-1]["error"].startswith("unreadable_file")
    assert [k for k, _ in raw_rows(tmp_path / "t.parquet")] == ["unreadable"]


@pytest.mark.parametrize("compressed", [False, True])
def test_a_parquet_row_group_is_read_once_per_reader_and_only_its_text_and_id(tmp_path, monkeypatch, compressed):
    """A row group (a million rows by pyarrow's default: most files are one) was read whole, every
    column, for each chunk of its rows (and a gzipped file decompressed whole for each). A reader
    handed the chunks in order now reads each row group once, only the text and id columns, and a
    chunk that lies behind starts the row group again; the rows are the same whatever the order."""
    rows = [{**r, "url": f"https://example.org/{i}", "meta": {"n": i}} for i, r in enumerate(ROWS)]
    f = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(rows), f, row_group_size=20)  # groups of 20, 20, 10
    if compressed:
        f.write_bytes(gzip.compress(f.read_bytes()))
    chunks = batchjob.plan_chunks(str(f), "auto", 7)[0]
    assert len(chunks) == 8
    opened, decoded = [], []
    real_open, real_batches = batchjob.parquet_file, pq.ParquetFile.iter_batches
    monkeypatch.setattr(batchjob, "parquet_file", lambda p: opened.append(p) or real_open(p))

    def batches(self, batch_size, row_groups, columns, **kw):
        decoded.append((tuple(row_groups), tuple(columns)))
        return real_batches(self, batch_size, row_groups=row_groups, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", batches)

    def read(order):
        return [r for ch in order for r in batchjob.read_chunk(ch, "auto", "text", "id")]

    every = read(chunks)
    assert [(r["id"], r["text"]) for r in every] == [(r["id"], r["text"]) for r in ROWS]
    assert len(opened) == 1 and decoded == [((g,), ("text", "id")) for g in range(3)]
    opened.clear(), decoded.clear()  # one reader of three: every third chunk, each group once
    assert read(chunks[::3]) == [r for k in range(0, 8, 3) for r in every[7 * k : 7 * k + 7]]
    assert not opened and [g for (g,), _ in decoded] == [0, 1, 2]
    decoded.clear()  # backwards: a chunk behind starts its row group again
    assert read(chunks[::-1]) == [r for k in range(7, -1, -1) for r in every[7 * k : 7 * k + 7]]
    assert len(decoded) > 3
    # ids from the id column only when there is one; without the text column every row says so
    pq.write_table(pa.Table.from_pylist([{"body": "x", "n": 1}] * 3), tmp_path / "other.parquet")
    got = read(batchjob.plan_chunks(str(tmp_path / "other.parquet"), "auto", 2)[0])
    assert [(r["id"], r["error"]) for r in got] == [(f"other.parquet:{i}", "no_text") for i in range(3)]


def test_text_line_ends_cr_lf_and_crlf(tmp_path):
    f = tmp_path / "cr.txt"
    for body in (b"uno\rdue\rtre\rquattro", b"uno\r\ndue\r\ntre\r\nquattro\r\n", b"uno\ndue\r\ntre\rquattro\n"):
        f.write_bytes(body)
        for chunk_rows in (1, 2, 3, 10):
            rows, _ = read_all(f, chunk_rows=chunk_rows)
            assert [r["text"] for r in rows] == ["uno", "due", "tre", "quattro"], (body, chunk_rows)
        f.with_suffix(".txt.gz").write_bytes(gzip.compress(body))  # the same through a compressed stream
        rows, _ = read_all(f.with_suffix(".txt.gz"), chunk_rows=3)
        assert [r["text"] for r in rows] == ["uno", "due", "tre", "quattro"], body
        os.remove(f.with_suffix(".txt.gz"))


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-be", "utf-32"])
def test_a_utf16_or_utf32_file_is_decoded(tmp_path, codec):
    text = "Perché sì.\nÈ così!\r\nCittà"
    data = text.encode(codec)
    if codec == "utf-16-be":
        data = b"\xfe\xff" + data
    (tmp_path / "w.txt").write_bytes(data)
    rows, _ = read_all(tmp_path / "w.txt", chunk_rows=2)
    assert [r["text"] for r in rows] == ["Perché sì.", "È così!", "Città"]
    lines = "\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS[:3]).encode(codec)
    (tmp_path / "w.jsonl").write_bytes((b"\xfe\xff" if codec == "utf-16-be" else b"") + lines)
    rows, _ = read_all(tmp_path / "w.jsonl")
    assert [r["id"] for r in rows] == ["r0", "r1", "r2"] and all(r["error"] is None for r in rows)
    assert [json.loads(raw)["id"] for _, raw in raw_rows(tmp_path / "w.jsonl")] == ["r0", "r1", "r2"]
    (_, raw), *_ = raw_rows(tmp_path / "w.txt")
    assert raw.decode("utf-8") == text


def test_files_a_folder_holds_but_no_stage_reads_are_listed_with_why(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(JSONL)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(JSONL))
    for name in ("c.csv", "d.tsv", "README.md", ".hidden.jsonl", "_SUCCESS"):
        (tmp_path / name).write_text("x")
    (tmp_path / "_tmp").mkdir()
    (tmp_path / "_tmp" / "e.jsonl").write_bytes(JSONL)
    files, skipped = inputs.list_inputs(str(tmp_path))
    assert [os.path.basename(f) for f in files] == ["a.jsonl", "b.jsonl.gz"]
    why = {os.path.relpath(s["path"], tmp_path): s["reason"] for s in skipped}
    assert why == {
        ".hidden.jsonl": "hidden name (starts with '.' or '_')",
        "README.md": "not an input format (.md)",
        "_SUCCESS": "hidden name (starts with '.' or '_')",
        "_tmp/e.jsonl": "hidden name (starts with '.' or '_')",
        "c.csv": "not an input format (.csv)",
        "d.tsv": "not an input format (.tsv)",
    }
    assert "6 file(s) skipped" in inputs.describe_skipped(skipped)
    (plan,) = inspect_sources({"s": SourceConfig(str(tmp_path))})
    assert plan.skipped == skipped and len(plan.files) == 2
    rows, listed = read_all(tmp_path)
    assert len(rows) == 100 and listed == skipped


def test_a_folder_link_loop_is_walked_once_and_named(tmp_path):
    """A folder holding a link to itself (and a second link to a file) is read once per real file:
    the 1-row file labeled once, not 41 times, and the loop listed as skipped."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "one.jsonl").write_bytes(JSONL[: JSONL.index(b"\n") + 1])
    os.symlink(d, d / "loop")
    os.symlink(d / "one.jsonl", d / "again.jsonl")
    rows, skipped = read_all(d)
    assert [r["id"] for r in rows] == ["r0"]
    reasons = {os.path.relpath(s["path"], d): s["reason"] for s in skipped}
    assert reasons["loop"].startswith("symbolic link loop") and "the same file as" in reasons["one.jsonl"]
    plan = inspect_sources({"s": SourceConfig(path=str(d))})[0]  # the data stage lists the same files
    assert [os.path.basename(f) for f in plan.files] == ["again.jsonl"] and len(plan.skipped) == 2


@pytest.mark.parametrize("name", ["e.jsonl", "e.txt", "e.jsonl.gz", "e.parquet"])
def test_an_empty_file_is_listed_as_skipped(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    (tmp_path / "ok.jsonl").write_bytes(JSONL)
    rows, skipped = read_all(tmp_path)
    assert len(rows) == 50 and all(r["error"] is None for r in rows)
    assert skipped == [{"path": str(tmp_path / name), "reason": "empty file (0 bytes)"}]
    files, skipped = inputs.list_inputs(str(tmp_path / name))  # named on its own: still listed
    assert files == [] and skipped[0]["reason"] == "empty file (0 bytes)"


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_a_glob_reads_the_folders_it_names_as_a_shell_does(tmp_path, where, request):
    """``corpus/*.jsonl`` is the folder's own files: it read every subfolder's too, by name (an
    ``archive/`` of older copies labeled beside the corpus). ``**`` reads every folder, a glob may
    name folders, and one that matches only deeper files says where they are; on a disk and in a
    bucket, for the batch jobs and the data stage alike."""
    from cerbero_ray import storage

    root = str(tmp_path / "corpus") if where == "local" else storage.join(request.getfixturevalue("bucket"), "corpus")
    names = (
        "a.jsonl",
        "b.json",
        "archive/a.jsonl",
        "2024-01/c.jsonl",
        "2024-02/d.jsonl",
        "2024-02/x/e.jsonl",
        "old/2023/f.jsonl",
    )
    for name in names:
        storage.write_bytes(storage.join(root, *name.split("/")), JSONL)
    cases = {
        "*.jsonl": ["a.jsonl"],
        "*.json*": ["a.jsonl", "b.json"],
        "*/*.jsonl": ["2024-01/c.jsonl", "2024-02/d.jsonl", "archive/a.jsonl"],
        "2024-*/*.jsonl": ["2024-01/c.jsonl", "2024-02/d.jsonl"],
        "**/*.jsonl": [
            "2024-01/c.jsonl",
            "2024-02/d.jsonl",
            "2024-02/x/e.jsonl",
            "a.jsonl",
            "archive/a.jsonl",
            "old/2023/f.jsonl",
        ],
        "2024-02/**/*.jsonl": ["2024-02/d.jsonl", "2024-02/x/e.jsonl"],
    }
    for pattern, want in cases.items():
        files, skipped = inputs.list_inputs(storage.join(root, pattern))
        assert files == [storage.join(root, *w.split("/")) for w in want] and skipped == [], pattern
    chunks, _ = batchjob.plan_chunks(storage.join(root, "*.jsonl"), "auto", 1000)
    assert len(chunks) == 1  # the batch jobs' reader: 50 rows of one file, not 100 of two
    (plan,) = inspect_sources({"s": SourceConfig(storage.join(root, "*.jsonl"))})  # the data stage's
    assert plan.files == [storage.join(root, "a.jsonl")]
    with pytest.raises(
        FileNotFoundError, match=r"1 file\(s\) in its subfolders match '\*\.jsonl'.*old/\*\*/\*\.jsonl reads"
    ):
        inputs.list_inputs(storage.join(root, "old", "*.jsonl"))  # its one file is a folder further down
    with pytest.raises(FileNotFoundError, match=r"under .*\*\.txt$"):  # nothing matches anywhere: no hint
        inputs.list_inputs(storage.join(root, "*.txt"))


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_an_output_folder_inside_the_input_folder_is_never_read(tmp_path, where, request):
    """``label.input=corpus/ label.output_dir=corpus/labels``: the rerun reads what the first run
    read, not the first run's parts and summary (before: 20 rows, then 86, then 177, growing on each
    rerun; the data stage's rerun refused its own folder as "other files since"). The output folder
    is listed once as skipped, whatever it holds; a glob and the data stage's sources alike, on a
    disk and in a bucket."""
    if where == "local":
        root, base = str(tmp_path / "corpus"), str(tmp_path)
    else:
        root = base = request.getfixturevalue("bucket")
    from cerbero_ray import storage

    put = storage.write_bytes
    put(storage.join(root, "a.jsonl"), JSONL)
    out = storage.join(root, "labels")
    for name in ("summary.json", "label_run.json", "parts/part-0.parquet", "parts/part-1.parquet"):
        put(storage.join(out, name), b'{"id": "own", "text": "own output"}\n')
    put(storage.join(root, "labels-2", "b.jsonl"), JSONL)  # a neighbour whose name starts alike: read
    ours = [storage.join(root, "a.jsonl"), storage.join(root, "labels-2", "b.jsonl")]
    for path, n in ((root, 4), (root + "/", 4), (storage.join(root, "**", "*.json*"), 2)):  # the glob: 2 of its 4
        files, skipped = inputs.list_inputs(path, exclude=out + "/")
        assert files == ours, path  # a bucket's folder named with a trailing "/" too (it gave s3://bbucket/...)
        assert skipped == [{"path": out + "/", "reason": f"the stage's output folder ({n} file(s)): never its input"}]
        assert inputs.list_inputs(path)[0] != files  # without it: the output is read
    chunks, skipped = batchjob.plan_chunks(root, "auto", 1000, exclude=out)
    assert len(chunks) == 2 and len(skipped) == 1
    (plan,) = inspect_sources({"s": SourceConfig(root)}, out)  # the data stage's listing
    assert len(plan.files) == 2 and plan.skipped == skipped
    assert inputs.list_inputs(root, exclude=storage.join(base, "elsewhere"))[1] == []  # not in the input
    with pytest.raises(FileNotFoundError, match=r"no input files .* under .*labels.*the stage's output folder"):
        inputs.list_inputs(out, exclude=out)  # the output folder named as the input: nothing of it is read
    put(f"{base}/run//x.json", b"1")  # s3://b/run//x.json: the key the folder s3://b/run/ meant
    assert storage.is_file(storage.join(base, "run", "x.json"))


def test_an_input_that_is_its_stage_s_output_folder_is_refused_before_ray_starts(tmp_path, bucket, monkeypatch):
    """The input folder (or a glob's) as the output folder: the stage would read its own output on a
    rerun; refused at config time for label, generate and the data stage, local or a bucket. An
    output folder inside the input, or a file named in the output folder, is fine."""
    from cerbero_ray.config import check, compose
    from cerbero_ray.storage import within

    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.jsonl").write_bytes(JSONL)
    os.symlink(d, tmp_path / "link")
    ck = ["label.checkpoint=" + str(tmp_path)]  # not looked at before the input
    says = "reads label.output_dir .*: a rerun would read the stage's own output as its input"
    for inp, out in (
        (d, d),
        (f"{d}/", d),
        (f"{d}/*.jsonl", d),
        (tmp_path / "link", d),
        (f"{bucket}/c", f"{bucket}/c/"),
    ):
        with pytest.raises(ValueError, match=f"label.input .*{says}"):
            check("label", compose("label", [f"label.input={inp}", f"label.output_dir={out}", *ck]))
    monkeypatch.chdir(d)  # a glob naming no folder: the working folder's files
    with pytest.raises(ValueError, match=f"label.input .*{says}"):
        check("label", compose("label", ["label.input=*.jsonl", "label.output_dir=.", *ck]))
    with pytest.raises(ValueError, match="generate.input .*reads generate.output_dir"):
        check("generate", compose("generate", [f"generate.input={d}", f"generate.output_dir={d}"]))
    with pytest.raises(ValueError, match="data.sources.chat.path .*reads data.output_dir"):
        check("data", compose("data", [f"data.sources.chat.path={d}/*.jsonl", f"data.output_dir={d}"]))
    for inp, out in ((d, d / "labels"), (d / "a.jsonl", d), (f"{bucket}/c", f"{bucket}/c/labels")):
        with pytest.raises(ValueError, match="label.checkpoint"):  # past the input check: the next one
            check("label", compose("label", [f"label.input={inp}", f"label.output_dir={out}", *ck]))
    # an input in the folders the stage writes there: a run started over deleted it (a label run's part
    # labeled again into its own folder with overwrite=true: the part gone, then a traceback)
    for name in ("parts/part-1.parquet", "rejects/r.jsonl"):
        os.makedirs(d / os.path.dirname(name), exist_ok=True)
        (d / name).write_bytes(JSONL)
    for key, inp, out in (
        ("label.input", d / "parts" / "part-1.parquet", d),
        ("label.input", f"{d}/parts/*.parquet", d),
        ("generate.input", f"{bucket}/g/parts/part-1.parquet", f"{bucket}/g"),
        ("data.sources.chat.path", d / "rejects", d),
    ):
        stage = key.split(".")[0]
        with pytest.raises(ValueError, match=rf"{key} .*lies in {stage}.output_dir's (parts|rejects)/ .*deletes"):
            check(
                stage, compose(stage, [f"{key}={inp}", f"{stage}.output_dir={out}", *(ck if stage == "label" else [])])
            )
    assert within(f"{bucket}/c/./x", f"{bucket}//c") and not within(f"{bucket}/cd", f"{bucket}/c")
    assert not within(str(d), f"{bucket}{d}") and within(str(tmp_path / "link" / "a.jsonl"), str(d))


def test_a_bucket_s_files_are_stamped_from_its_listing_not_a_request_per_object(bucket, monkeypatch):
    """A rerun's check of its input (names, sizes, times) asked each object for its size and time, one
    request after another: 50,000 requests for a corpus of 50,000 files, twice (before Ray starts
    and once it has). A folder holding several of the files is listed instead; the stamp is the
    same, and still changes when a file is written again, added or removed."""
    from cerbero_ray import storage

    for i in range(12):
        storage.write_bytes(f"{bucket}/corpus/f{i:02d}.jsonl", JSONL)
    storage.write_bytes(f"{bucket}/corpus/sub/g.jsonl", JSONL)  # alone in its folder: asked on its own
    files, _ = inputs.list_inputs(f"{bucket}/corpus")
    fs, _ = storage.resolve(files[0])
    asked = fs.get_file_info([storage.resolve(f)[1] for f in files])  # a request per object
    want = hashlib.sha256(json.dumps([[f, i.size, i.mtime_ns] for f, i in zip(files, asked)]).encode()).hexdigest()[:16]
    calls = []

    class Counting:  # the bucket's filesystem, counting the objects asked about one by one
        def get_file_info(self, what):
            calls.append(len(what) if isinstance(what, list) else "listing")
            return fs.get_file_info(what)

    resolve = storage.resolve
    monkeypatch.setattr(storage, "resolve", lambda p: (Counting(), resolve(p)[1]))
    assert inputs.stamp(files) == (13 * len(JSONL), want)
    assert calls == ["listing", 1]  # the folder of 12 listed; the lone file asked
    monkeypatch.undo()
    storage.write_bytes(f"{bucket}/corpus/f03.jsonl", JSONL + JSONL[:40])
    assert inputs.stamp(files)[1] != want


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_a_folder_s_files_are_planned_side_by_side_each_opened_once(tmp_path, where, request, monkeypatch, capsys):
    """The plan (the scan for line ends) opened each line file three times, one file after another:
    on a bucket eight requests a file, each a round trip, before any work started. Now each file is
    opened once and several are planned at once; the chunks, their order and the contents hashes
    are those of a plan of one file at a time."""
    import threading
    import time

    from cerbero_ray import storage

    root = str(tmp_path / "corpus") if where == "local" else storage.join(request.getfixturevalue("bucket"), "corpus")
    bodies = {
        "a.jsonl": JSONL,
        "b.jsonl.gz": gzip.compress(JSONL),
        "c.txt": b"uno\r\ndue\rtre\n",
        "d.txt": "riga\n".encode("utf-16"),
        "e.jsonl": JSONL * 3,
    }
    for i in range(3):
        for name, body in bodies.items():
            storage.write_bytes(storage.join(root, f"{i}{name}"), body)
    monkeypatch.setattr(batchjob, "PLAN_THREADS", 1)
    one_at_a_time = {}
    want = batchjob.plan_chunks(root, "auto", 20, digests=one_at_a_time)
    monkeypatch.undo()
    opened, live, most = [], [0], [0]
    lock = threading.Lock()
    resolve = storage.resolve

    class Counting:  # the filesystem, counting opens and how many files are open at once
        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def open_input_file(self, p):
            with lock:
                opened.append(os.path.basename(p))
                live[0] += 1
                most[0] = max(most[0], live[0])
            time.sleep(0.05)  # a round trip
            f = self.fs.open_input_file(p)
            real_close = f.close

            def close():
                with lock:
                    live[0] -= 1
                return real_close()

            class Open:  # the file, its close counted
                def __getattr__(self, name):
                    return close if name == "close" else getattr(f, name)

                def __enter__(self):
                    return self

                def __exit__(self, *a):
                    close()

            return Open()

    monkeypatch.setattr(storage, "resolve", lambda p: (lambda fs, q: (Counting(fs), q))(*resolve(p)))
    digests = {}
    assert batchjob.plan_chunks(root, "auto", 20, digests=digests) == want
    assert digests == one_at_a_time and len(digests) == 12  # the UTF-16 files are decoded whole: no hash
    lines = [n for n in opened if not n.endswith("d.txt")]
    assert sorted(lines) == sorted(n for n in {f"{i}{k}" for i in range(3) for k in bodies} if not n.endswith("d.txt"))
    assert most[0] > 1
    monkeypatch.setattr(batchjob, "PLAN_BAR", 15)  # a bar from that many files on
    capsys.readouterr()
    batchjob.plan_chunks(root, "auto", 20, desc="label: plan")
    err = capsys.readouterr().err
    assert "label: plan: 100%" in err and "15/15" in err
    batchjob.plan_chunks(root, "auto", 20)  # none without a description (the tests' and bench's plans)
    assert "15/15" not in capsys.readouterr().err


def test_an_interrupted_plan_ends_every_scan_before_it_returns(tmp_path, monkeypatch):
    """Files are planned in threads: a Ctrl-C or SIGTERM (a KeyboardInterrupt in the main thread)
    while a large file is scanned must not wait for that scan to end, nor leave it running."""
    import contextlib

    from cerbero_ray import logs

    (tmp_path / "a.jsonl").write_bytes(JSONL)
    (tmp_path / "b.jsonl").write_bytes(JSONL * 200)  # ~0.5 MB in 256-byte blocks: 2,000 and more
    monkeypatch.setattr(batchjob, "_block", lambda compressed: 256)
    scans, real = [], batchjob._line_ends

    def slow(block, universal):
        scans.append(len(block))
        time.sleep(0.002)
        return real(block, universal)

    class Interrupted:  # the first file done: the interrupt arrives
        def update(self, n):
            raise KeyboardInterrupt

    monkeypatch.setattr(batchjob, "_line_ends", slow)
    monkeypatch.setattr(logs, "progress", lambda **kw: contextlib.nullcontext(Interrupted()))
    with pytest.raises(KeyboardInterrupt):
        batchjob.plan_chunks(str(tmp_path), "auto", 100)
    done = len(scans)
    assert done < 500  # a.jsonl's 5 blocks and b.jsonl's first few, not its 2,000
    time.sleep(0.1)
    assert len(scans) == done  # and none after


def test_the_format_peek_of_a_parquet_file_whose_first_row_group_is_empty(tmp_path):
    """The peek reads the first rows of row group 0 in one batch (not the group whole): an empty
    first row group gives no rows, as reading the group whole did, never StopIteration."""
    from cerbero_ray.data.sources import _peek

    f = str(tmp_path / "empty_first.parquet")
    with pq.ParquetWriter(f, pa.schema([("text", pa.string())])) as w:
        w.write_table(pa.table({"text": pa.array([], pa.string())}))
        w.write_table(pa.table({"text": ["ciao"]}))
    assert [pq.ParquetFile(f).metadata.row_group(g).num_rows for g in range(2)] == [0, 1]
    assert _peek(f) == []
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(80)]}), tmp_path / "full.parquet")
    assert [r["text"] for r in _peek(str(tmp_path / "full.parquet"))] == [f"t{i}" for i in range(50)]
