"""The data stage on an embedded Ray cluster: mixed sources and formats, rejects, determinism."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cerbero_ray.config import compose
from cerbero_ray.data.manifest import read_manifest
from cerbero_ray.data.pipeline import run_data
from conftest import SAMPLES, data_stage, write_jsonl

pytestmark = pytest.mark.integration

CHAT = {"messages": [{"role": "user", "content": "Ciao"}, {"role": "assistant", "content": "Buongiorno!"}]}


def cfg_for(out, sources, **data):
    return data_stage(out, sources, **data)


def test_mixed_formats_and_bad_rows(ray_local, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    write_jsonl(
        src / "chat.jsonl",
        [CHAT, b"\xc3\x28 bad utf-8", b"{oops", CHAT, b"", {"messages": [{"role": "user", "content": "solo domanda"}]}],
    )
    write_jsonl(
        src / "sharegpt.jsonl",
        [{"conversations": [{"from": "human", "value": "Come va?"}, {"from": "gpt", "value": "Bene."}]}],
    )
    (src / "doc.txt").write_text("Nel mezzo del cammin di nostra vita.")
    pq.write_table(pa.table({"id": [1, 2], "body": ["Primo testo.", "Secondo testo."]}), src / "t.parquet")
    out = tmp_path / "out"
    m = run_data(
        cfg_for(
            out,
            {
                "chat": {"path": str(src / "chat.jsonl"), "format": "auto"},
                "sg": {"path": str(src / "sharegpt.jsonl"), "format": "auto"},
                "txt": {"path": str(src / "doc.txt"), "format": "auto"},
                "pq": {"path": str(src / "t.parquet"), "format": "text", "text_field": "body", "weight": 2.0},
            },
        )
    )
    assert m["sources"]["chat"]["format"] == "openai" and m["sources"]["sg"]["format"] == "sharegpt"
    # line 4 repeats line 1 (data.dedup=exact by default): a counted reject naming the row kept
    assert m["documents_by_source"] == {"chat": 1, "sg": 1, "txt": 1, "pq": 4}
    assert m["rejects_by_reason"] == {
        "duplicate": 1,
        "invalid_utf8": 1,
        "invalid_json": 1,
        "no_assistant_turn": 1,
        "empty": 1,
    }
    assert m["dedup"] | {"seconds": 0} == {
        "mode": "exact",
        "documents": 6,  # the rows that parse, before weights (pq: 2 rows, 4 documents)
        "duplicates": 1,
        "near_duplicates": 0,
        "contaminated": 0,  # data.decontaminate: no evaluation set named
        "ngram": 13,
        "min_words": 8,
        "evaluation_sets": {},
        "evaluation_sha256": {},
        "evaluation_stamp": "",
        "seconds": 0,
    }
    # the blank line is a row too, counted: input rows = documents + rejects for every file
    assert m["rejected"] == 5 and m["input_rows"] == 6 + 1 + 1 + 2
    rejects = [json.loads(line) for f in m["rejects_files"] for line in open(f)]
    assert sorted(r["line_no"] for r in rejects) == [2, 3, 4, 5, 6]
    (dup,) = [r for r in rejects if r["reason"] == "duplicate"]
    assert dup["detail"] == f"same text as chat {src / 'chat.jsonl'}:1 (kept)" and json.loads(dup["raw"]) == CHAT
    assert not (out / "duplicates.parquet").exists()  # the rejects say it all once the manifest is written
    rows = sum(pq.read_table(s["path"]).num_rows for s in m["shards"])
    assert rows == m["rows"] and m["tokens"] + m["padding"] == rows * m["seq_len"]
    assert read_manifest(str(out))["config_hash"] == m["config_hash"]


def test_sample_corpus_is_deterministic_resumable_and_readable_by_ray_data(ray_local, tmp_path, monkeypatch, caplog):
    """Two runs write the same shards, the second one stopped before its manifest (SIGTERM, a dead
    node) and run again: that keeps the buffers the stopped run finished, processes only those
    without their record, and drops what it left of buffers this run does not have."""
    import logging

    import ray.data

    import cerbero_ray.data.pipeline as pipeline

    caplog.set_level(logging.INFO, logger="cerbero_ray")
    sources = {
        "chat": {"path": os.path.join(SAMPLES, "chat_it_openassistant.jsonl"), "format": "openai"},
        "novels": {"path": os.path.join(SAMPLES, "novels_it_sample.jsonl"), "format": "text", "weight": 0.5},
    }
    a = run_data(cfg_for(tmp_path / "a", sources, seq_len=2048, buffer_docs=32))
    out = tmp_path / "b"

    def stopped(*_):  # every buffer done, the manifest not written: what a SIGTERM there leaves
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_manifest", stopped)
    with pytest.raises(KeyboardInterrupt):
        run_data(cfg_for(out, sources, seq_len=2048, buffer_docs=32))
    monkeypatch.undo()
    done = sorted((out / "buffers").iterdir())
    assert (out / "run.json").exists() and not (out / "manifest.json").exists()
    shards = [m for m in done if json.loads(m.read_text())["shard"]]  # a buffer of no rows has no shard
    assert len(shards) > 3
    for marker in shards[:2]:  # two buffers had not finished: no record (one's shard written, one's not)
        marker.unlink()
    (out / "shards" / f"shard-{shards[1].stem}.parquet").unlink()
    kept = out / "shards" / f"shard-{shards[-1].stem}.parquet"
    before = kept.stat().st_mtime_ns
    foreign = out / "shards" / "shard-00000000deadbeef.parquet"  # a buffer of rows batched otherwise
    foreign.write_bytes(kept.read_bytes())
    (out / "buffers" / "00000000deadbeef.json").write_text("{}")
    caplog.clear()
    b = run_data(cfg_for(out, sources, seq_len=2048, buffer_docs=32))
    assert f"resumed, {len(done) - 2 + 1} buffer(s) done" in caplog.text  # the foreign record counted
    assert "2 file(s) of the unfinished run's other buffers deleted" in caplog.text
    assert kept.stat().st_mtime_ns == before and not foreign.exists()
    assert not (out / "buffers").exists() and not (out / "run.json").exists()
    assert sorted(os.listdir(out / "shards")) == sorted(os.path.basename(s["path"]) for s in b["shards"])
    assert (b["rows"], b["documents"], b["tokens"]) == (a["rows"], a["documents"], a["tokens"])
    assert len(a["shards"]) > 1
    assert [os.path.basename(s["path"]) for s in a["shards"]] == [os.path.basename(s["path"]) for s in b["shards"]]
    for sa, sb in zip(a["shards"], b["shards"]):
        assert pq.read_table(sa["path"]).equals(pq.read_table(sb["path"]))
    ds = ray.data.read_parquet(str(tmp_path / "a" / "shards"))
    batch = next(iter(ds.iter_batches(batch_size=4, batch_format="numpy")))
    assert np.stack(batch["input_ids"]).shape == (4, 2048)
    assert ds.count() == a["rows"] and a["documents"] == 107 + a["documents_by_source"]["novels"]


def test_refuses_to_mix_runs_and_rejects_unusable_sources(ray_local, tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [CHAT])
    cfg = cfg_for(tmp_path / "out", {"c": {"path": src, "format": "auto"}})
    first = run_data(cfg)
    assert run_data(cfg) == first  # the same config on the same files: up to date, reused
    # the file edited since, to the same size (a case fix): its shards are not up to date
    text = open(src).read()
    open(src, "w").write(text.replace("Ciao", "ciao") if "Ciao" in text else text.swapcase())
    os.utime(src, ns=(os.stat(src).st_atime_ns, os.stat(src).st_mtime_ns + 1_000_000_000))
    assert os.path.getsize(src) == first["sources"]["c"]["bytes"]
    with pytest.raises(FileExistsError, match=r"holds a data run of the files of data\.sources\.c as they were"):
        run_data(cfg)
    cfg["data"]["seq_len"] = 256
    with pytest.raises(FileExistsError, match="of another config; pass data.overwrite=true"):  # never mixed in
        run_data(cfg)
    cfg["data"]["overwrite"] = True
    assert run_data(cfg)["documents"] == 1
    # a run stopped before its manifest (the last file written), without the run record of this
    # config and these files (another config's, an older release's): cleared and redone, not refused
    os.remove(tmp_path / "out" / "manifest.json")
    (tmp_path / "out" / "shards" / "shard-99999.parquet").write_bytes(b"half a shard")
    cfg["data"]["overwrite"] = False
    assert run_data(cfg)["documents"] == 1
    assert not (tmp_path / "out" / "shards" / "shard-99999.parquet").exists()
    assert (tmp_path / "out" / "manifest.json").exists()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"titolo": "x", "corpo": "y"}])
    with pytest.raises(ValueError, match="no usable column"):
        run_data(cfg_for(tmp_path / "o2", {"b": {"path": bad, "format": "auto"}}))
    with pytest.raises(ValueError, match="data.sources.b.path: no such file or folder"):  # named, before any work
        run_data(cfg_for(tmp_path / "o3", {"b": {"path": str(tmp_path / "missing.jsonl")}}))
    many = cfg_for(tmp_path / "o4", {"c": {"path": src, "format": "auto"}})
    many["data"]["workers"] = 100_000  # more packing actors than Ray can share 1 CPU among: one line
    with pytest.raises(ValueError, match=r"^data.workers: 100,000 actors on 1 CPU\(s\) would get 1e-05 CPU each"):
        run_data(many)


def test_shipped_config_runs(ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("CERBERO_OUTPUT_DIR", str(tmp_path))
    m = run_data(compose("data", ["data=mix_sample"]))
    assert m["documents_by_source"]["chat"] == 214 and m["documents_by_source"]["novels"] == 50
    assert m["fill"] > 0.9 and m["rejected"] == 0


def test_a_folder_with_compressed_corrupt_and_foreign_files_accounts_for_every_file(ray_local, tmp_path):
    """gzip and zstd files read in a folder (by their bytes), a Parquet file with a corrupt row group
    a counted reject naming it (its other row groups read), a CSV and a hidden file listed as
    skipped in the manifest: nothing stops the run and nothing goes unaccounted."""
    import gzip

    src = tmp_path / "in"
    src.mkdir()
    chats = [json.dumps(CHAT).encode() for _ in range(30)]
    (src / "a.jsonl.gz").write_bytes(gzip.compress(b"\n".join(chats) + b"\n"))
    (src / "b.jsonl").write_bytes(gzip.compress(b"\n".join(chats[:10]) + b"\n"))  # a gzip under a plain name
    table = pa.Table.from_pylist([{"messages": CHAT["messages"]} for _ in range(40)])
    pq.write_table(table, src / "c.parquet", row_group_size=10)
    data = bytearray((src / "c.parquet").read_bytes())
    col = pq.ParquetFile(src / "c.parquet").metadata.row_group(1).column(0)
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    data[start + 4 : start + col.total_compressed_size - 4] = b"\xff" * (col.total_compressed_size - 8)
    (src / "c.parquet").write_bytes(bytes(data))
    (src / "d.csv").write_text("a,b\n1,2\n")
    (src / ".e.jsonl").write_bytes(b"\n".join(chats))
    # the same chat in every row: this test counts reads, not duplicates
    m = run_data(cfg_for(tmp_path / "out", {"s": {"path": str(src), "format": "auto"}}, dedup="none"))
    assert m["documents_by_source"] == {"s": 30 + 10 + 30}, m["rejects_by_reason"]
    assert m["rejects_by_reason"] == {"unreadable_file": 1}
    assert m["input_rows"] == 30 + 10 + 30 + 1 == m["documents"] + m["rejected"]
    rejects = [json.loads(line) for f in m["rejects_files"] for line in open(f)]
    assert [os.path.basename(r["path"]) for r in rejects] == ["c.parquet"] and "row group 1" in rejects[0]["detail"]
    skipped = {os.path.basename(s["path"]): s["reason"] for s in m["sources"]["s"]["skipped_files"]}
    assert skipped == {"d.csv": "not an input format (.csv)", ".e.jsonl": "hidden name (starts with '.' or '_')"}
