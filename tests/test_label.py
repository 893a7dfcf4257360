"""The labeling job: every input row exactly once in the output, bad rows flagged not fatal, and a
job killed midway finishes on rerun by processing only the missing chunks."""

import json
import os

import pyarrow.parquet as pq
import pytest

from cerbero_ray import inputs
from cerbero_ray.batchjob import ChunkWorker, map_chunks, plan_chunks, read_chunk, start_run
from cerbero_ray.config import compose, to_container
from cerbero_ray.config.label import BatchInferenceConfig
from cerbero_ray.label import run_label
from conftest import write_jsonl

pytestmark = pytest.mark.integration


def label_cfg(tmp_path, checkpoint, inp, *extra):
    return to_container(
        compose(
            "label", [f"paths.output_dir={tmp_path}", f"label.checkpoint={checkpoint}", f"label.input={inp}", *extra]
        )
    )


def output(out):
    return pq.read_table(os.path.join(out, "parts")).to_pylist()


def test_bad_rows_get_an_error_and_every_row_is_there(tmp_path, tiny_hf, ray_local):
    inp = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"id": "a", "text": "Che bella giornata!"},
            {"id": "b", "text": ""},  # empty
            b'{"id": "c", "text": "caff\xe8"}',  # invalid UTF-8 (latin-1 byte)
            b'{"id": "d", "text": ',  # not JSON
            {"id": "e", "body": "no text field"},
            {"id": "f", "text": 42},
            {"text": "senza id"},  # id derived from the line
            {"id": "h", "text": "parola " * 2000},  # over-long: truncated, still labeled
            b"",  # blank line
        ],
    )
    s = run_label(label_cfg(tmp_path, tiny_hf, inp, "label.chunk_rows=4", "label.max_text_tokens=64"))
    rows = {r["id"]: r for r in output(s["output"].rsplit("/", 1)[0])}
    assert len(rows) == 9 == s["rows"] == s["unique_ids"]
    assert {k: rows[k]["error"] for k in "bcef"} == {
        "b": "empty",
        "c": "invalid_utf8",
        "e": "no_text",
        "f": "text_not_a_string",
    }
    assert rows["in.jsonl:4"]["error"] == "invalid_json"  # no id to read: the line number stands in
    assert rows["in.jsonl:9"]["error"] == "empty" and rows["in.jsonl:7"]["label"] is not None
    assert rows["h"]["truncated"] and rows["h"]["label"] in ("positive", "negative", "neutral")
    a = rows["a"]
    assert a["error"] is None and abs(a["p_positive"] + a["p_negative"] + a["p_neutral"] - 1) < 1e-9
    assert a["task"] == "sentiment" and a["model"] == tiny_hf and len(a["prompt_hash"]) == 16
    assert os.path.getsize(s["chart"]) > 5000


def test_chunks_cover_every_line_once(tmp_path):
    lines = [json.dumps({"id": i, "text": f"t{i}"}) for i in range(103)]
    f = tmp_path / "x.jsonl"
    f.write_text("\n".join(lines))  # no final newline
    chunks = plan_chunks(str(f), "auto", 10)[0]
    assert [(c.start, c.stop) for c in chunks] == [(i, min(i + 10, 103)) for i in range(0, 103, 10)]
    ids = [r["id"] for c in chunks for r in read_chunk(c, "auto", "text", "id")]
    assert ids == [str(i) for i in range(103)]


def test_a_missing_input_or_unknown_format_is_named_before_the_output_is_claimed(tmp_path):
    out, f = str(tmp_path / "out"), tmp_path / "x.jsonl"
    f.write_text('{"text": "ciao"}\n')

    def job(path, fmt="auto"):
        return BatchInferenceConfig(input=str(path), format=fmt, output_dir=out, checkpoint="-", chunk_rows=10)

    start_run("label", job(f), "run.json", {"input": str(f)})  # a run claims out
    with pytest.raises(FileNotFoundError, match="label.input: no such file or folder: .*typo.jsonl"):
        start_run("label", job(tmp_path / "typo.jsonl"), "run.json", {"input": "typo"})
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="generate.format: cannot tell the format of .*x.csv"):
        start_run("generate", job(tmp_path / "x.csv"), "run.json", {})
    with pytest.raises(ValueError, match="label.format must be one of"):
        start_run("label", job(f, "csv"), "run.json", {})


@pytest.mark.parametrize("stage", ["label", "generate"])
def test_a_text_field_no_file_has_is_refused_before_any_row_is_read(tmp_path, stage, caplog):
    """``label.text_field=body`` on a corpus whose text is ``text`` labeled every row as an error row
    (``no_text``) and exited 0. The plan notes each file's first records' fields: a field no file
    has is refused (naming those there are) before the output is claimed; a field some files lack
    is a warning naming them, and their rows are error rows as before."""
    import gzip
    import shutil
    from dataclasses import replace

    import pyarrow as pa

    src, out = tmp_path / "in", str(tmp_path / "out")
    src.mkdir()
    write_jsonl(src / "a.jsonl", [{"id": f"a{i}", "text": "ciao", "lang": "it"} for i in range(30)])
    (src / "b.jsonl.gz").write_bytes(gzip.compress(b'\xef\xbb\xbf{"id": "b0", "text": "ciao"}\n'))
    pq.write_table(pa.table({"id": ["c0"], "text": ["ciao"], "url": ["u"]}), src / "c.parquet")
    (src / "d.json").write_text('[{"id": "d0", "text": "ciao"}]')
    (src / "e.txt").write_text("una riga di testo\n")  # a text file has no fields: never counted

    def job(field):
        return BatchInferenceConfig(input=str(src), output_dir=out, checkpoint="-", chunk_rows=10, text_field=field)

    with pytest.raises(ValueError, match=rf"{stage}.text_field='body': no input file has that field") as e:
        start_run(stage, job("body"), "run.json", {})
    assert "'id', 'lang', 'text', 'url'" in str(e.value) and not os.path.exists(out)  # nothing claimed
    chunks, todo, _ = start_run(stage, job("text"), "run.json", {})  # every file has it
    assert len(chunks) == len(todo) == 7 and "no 'text' field" not in caplog.text
    write_jsonl(src / "meta.jsonl", [{"source": "x", "count": 3}])  # a file beside the corpus without it
    caplog.set_level("WARNING")
    shutil.rmtree(out)  # another input now: a new run
    start_run(stage, job("text"), "run.json", {})
    assert f"[{stage}] 1 of 5 input file(s) have no 'text' field in their first records (meta.jsonl" in caplog.text
    assert "ids are <file>:<line>" not in caplog.text
    caplog.set_level("INFO")  # an id field no file has: the rows are named by file and line, said once
    shutil.rmtree(out)
    start_run(stage, replace(job("text"), id_field="doc_id"), "run.json", {})
    assert f"[{stage}] no input file has 'doc_id' ({stage}.id_field) in its first records" in caplog.text


def test_a_checkpoint_written_again_under_its_path_is_another_run(tmp_path):
    """A labeling (or generation) folder is resumed only with the checkpoint it began with: one
    trained again under the same path is refused, naming it, unless overwrite; a folder recorded
    before versions were kept resumes whatever the checkpoint holds."""
    from cerbero_ray import storage
    from cerbero_ray.batchjob import CHECKPOINT_VERSION, claim_output

    ck, out = tmp_path / "hf", str(tmp_path / "out")

    def save(weights: bytes):  # as training writes a model folder: its files, then its marker
        ck.mkdir(exist_ok=True)
        (ck / "model.safetensors").write_bytes(weights)
        storage.mark_complete(str(ck))

    def ident():
        return {"checkpoint": str(ck), CHECKPOINT_VERSION: [storage.version(str(ck))], "input": "in.jsonl"}

    save(b"a" * 100)
    claim_output(out, "run.json", ident(), False, "label")
    (tmp_path / "out" / "parts").mkdir()
    claim_output(out, "run.json", ident(), False, "label")  # the same checkpoint: resumed
    save(b"b" * 100)  # trained again: same sizes
    with pytest.raises(FileExistsError, match=r"holds a label run of .*/hf as it was before: it was written again"):
        claim_output(out, "run.json", ident(), False, "label")
    before = {k: v for k, v in ident().items() if k != CHECKPOINT_VERSION}
    storage.write_json(os.path.join(out, "run.json"), before)  # an older release's record
    claim_output(out, "run.json", ident(), False, "label")
    assert storage.read_json(os.path.join(out, "run.json")) == ident()
    with pytest.raises(FileExistsError, match=r"\(input differ\)"):
        claim_output(out, "run.json", {**ident(), "input": "other.jsonl"}, False, "label")
    save(b"c" * 100)
    for name in ("summary.json", "chart.png", "notes.txt"):  # the run's files and one of the user's
        (tmp_path / "out" / name).write_text("x")
    claim_output(out, "run.json", ident(), True, "label", ("chart.png",))  # overwrite: started over
    assert sorted(os.listdir(out)) == ["notes.txt", "run.json"]  # what the run wrote is gone, nothing else


# a job killed midway and rerun (exactly once, the SIGTERM line, another task refused into the same
# folder): tests/test_label_extract.py, on the extract task (the same chunk machinery, its slower rows)


def test_a_folder_of_mixed_broken_and_compressed_files_is_labeled_row_for_row(tmp_path, tiny_hf, ray_local):
    """The hostile pass's folder: a good JSONL, a good Parquet, a Parquet with corrupt data pages and
    one cut short, a gzip JSONL, a gzip file named .jsonl, a CR-only and a UTF-16 text file, a CSV.
    Every readable row is labeled, every unreadable one is an error row naming why, the CSV is
    listed as skipped, and the rerun finds the run complete (it does not fail the same way)."""
    import gzip

    import pyarrow as pa

    src = tmp_path / "in"
    src.mkdir()
    rows = [{"id": f"g{i}", "text": f"Che bella giornata numero {i}!"} for i in range(30)]
    write_jsonl(src / "good.jsonl", rows)
    pq.write_table(pa.Table.from_pylist([{**r, "id": f"p{i}"} for i, r in enumerate(rows)]), src / "good.parquet")
    corrupt = [{**r, "id": f"c{i}"} for i, r in enumerate(rows)]
    pq.write_table(pa.Table.from_pylist(corrupt), src / "corrupt.parquet", row_group_size=10, compression="zstd")
    data = bytearray((src / "corrupt.parquet").read_bytes())
    col = pq.ParquetFile(src / "corrupt.parquet").metadata.row_group(0).column(1)
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    size = col.total_compressed_size
    data[start + 4 : start + size - 4] = (b"\x00\xff" * size)[: size - 8]
    (src / "corrupt.parquet").write_bytes(bytes(data))
    cut = (src / "good.parquet").read_bytes()
    (src / "cut.parquet").write_bytes(cut[: len(cut) // 2])
    lines = b"".join(json.dumps({**r, "id": f"z{i}"}).encode() + b"\n" for i, r in enumerate(rows))
    (src / "z.jsonl.gz").write_bytes(gzip.compress(lines))
    (src / "y.jsonl").write_bytes(gzip.compress(lines.replace(b'"z', b'"y')))
    (src / "cr.txt").write_bytes(b"uno\rdue\rtre\rquattro")
    (src / "wide.txt").write_bytes("Perché sì.\nÈ così!\n".encode("utf-16"))
    (src / "table.csv").write_text("id,text\n1,ciao\n")
    s = run_label(label_cfg(tmp_path, tiny_hf, src, "label.chunk_rows=8"))
    out = {r["id"]: r for r in output(s["output"].rsplit("/", 1)[0])}
    assert len(out) == s["rows"] == 30 * 5 + 1 + 4 + 2  # the cut Parquet file is one error row
    errors = {k: r["error"] for k, r in out.items() if r["error"]}
    assert set(errors) == {f"corrupt.parquet:{i}" for i in range(10)} | {"cut.parquet:0"}, errors
    assert all(e.startswith("unreadable_row_group: 0") for k, e in errors.items() if k.startswith("corrupt"))
    assert errors["cut.parquet:0"].startswith("unreadable_file")
    assert {f"z{i}" for i in range(30)} | {f"y{i}" for i in range(30)} <= set(out)
    assert [out[f"cr.txt:{i}"]["label"] is not None for i in (1, 2, 3, 4)] == [True] * 4
    assert out["wide.txt:1"]["error"] is None and out["wide.txt:2"]["error"] is None
    assert [os.path.basename(x["path"]) for x in s["skipped_files"]] == ["table.csv"]
    again = run_label(label_cfg(tmp_path, tiny_hf, src, "label.chunk_rows=8"))
    assert again["chunks_processed"] == 0 and again["rows"] == s["rows"]


def test_an_input_written_since_its_run_is_refused_never_labeled_twice(tmp_path, tiny_hf, ray_local):
    """A file that grew since its run began: chunks are line ranges, so the new last chunk (rows 2-3)
    sat beside the old one's part (row 2) and row 2 was in the output twice (seen: 444 rows for 400
    ids, "the input repeats ids"). Now the run record holds the input's stamp: refused, naming why;
    overwrite starts over and every row is there once."""
    rows = [{"id": f"r{i}", "text": f"Testo numero {i}"} for i in range(5)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows[:3])
    cfg = label_cfg(tmp_path, tiny_hf, inp, "label.chunk_rows=2")
    out = cfg["label"]["output_dir"]
    run_label(cfg)
    # written again with the same bytes (copied again, touched): the same input, resumed with nothing
    # to do (before: refused, and overwrite labeled it all again)
    before = (tmp_path / "in.jsonl").read_bytes()
    (tmp_path / "in.jsonl").write_bytes(before)
    os.utime(tmp_path / "in.jsonl", ns=(1, 10**18))
    assert run_label(cfg)["chunks_processed"] == 0
    (tmp_path / "in.jsonl").write_bytes(before.replace(b"numero 1", b"numero 7"))  # edited, same size
    with pytest.raises(FileExistsError, match=r"holds a label run of label.input \(.*in.jsonl\) as its files were"):
        run_label(cfg)
    (tmp_path / "in.jsonl").write_bytes(before)
    write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(FileExistsError, match=r"holds a label run of label.input \(.*in.jsonl\) as its files were"):
        run_label(cfg)
    assert sorted(r["id"] for r in output(out)) == ["r0", "r1", "r2"]  # nothing mixed in
    cfg["label"]["overwrite"] = True
    run_label(cfg)
    assert sorted(r["id"] for r in output(out)) == [r["id"] for r in rows]


def test_what_the_embedded_cluster_lacks_is_refused_before_ray_waits_for_it(tmp_path, tiny_hf, ray_local):
    """On the embedded cluster (no autoscaler) a request for GPUs it does not have would wait
    forever ("No available node types can fulfill resource request" every ~35 s): a model actor's
    GPUs, Ray Train's workers together, a Serve replica's are refused first, naming the keys. So is
    a port another program holds, and a replica that cannot start (its cache larger than the memory
    free) is one line too."""
    import ray

    from cerbero_ray.serve.service import run_serve

    assert ray.cluster_resources().get("GPU", 0) == 0
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "Ciao"}])
    cfg = label_cfg(tmp_path, tiny_hf, inp, "label.gpus_per_worker=1")
    with pytest.raises(
        ValueError,
        match=r"label.gpus_per_worker=1 \(one model actor's\) needs 1 GPU; the embedded Ray cluster has 0 GPU",
    ):
        run_label(cfg)
    # more model actors than Ray can share the CPUs among (under 0.0001 CPU each): one line naming
    # the key, not Ray's traceback about "precision"
    many = write_jsonl(tmp_path / "many.jsonl", [{"id": str(i), "text": "Ciao"} for i in range(30_000)])
    cfg = label_cfg(tmp_path, tiny_hf, many, "label.workers=20000", "label.chunk_rows=1", "label.overwrite=true")
    with pytest.raises(ValueError, match=r"^label.workers: 20,000 actors on 1 CPU\(s\) would get 5e-05 CPU each"):
        run_label(cfg)
    over = ["serve.cpus_per_replica=3", "serve.gpus_per_replica=0"]
    serve_cfg = to_container(compose("serve", [f"serve.checkpoint={tiny_hf}", *over]))
    with pytest.raises(
        ValueError, match=r"serve.cpus_per_replica=3 and serve.gpus_per_replica=0 needs 3 CPU; .* has 2 CPU"
    ):
        run_serve(serve_cfg)
    # a port another program holds: before Serve's proxy fails to bind
    import socket

    from ray import serve

    from conftest import free_port

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        taken = [f"serve.checkpoint={tiny_hf}", f"serve.port={port}", "serve.cpus_per_replica=0.5"]
        with pytest.raises(ValueError, match=rf"serve.host and serve.port: cannot listen on 127.0.0.1:{port}: "):
            run_serve(to_container(compose("serve", taken)))
    # what only the replica can find (the memory its machine has free) fails the start in one line,
    # and leaves nothing retrying on the cluster

    # (started once: Serve would start it 3 times, loading the weights again to fail alike)
    from ray.util.state import list_actors

    def replicas() -> set[str]:  # this test's cluster's (under pytest -n 2 the box has several)
        kind = [("class_name", "=", "ServeReplica:cerbero:cerbero")]
        at = ray.get_runtime_context().gcs_address
        return {a.actor_id for a in list_actors(address=at, filters=kind, limit=10_000)}

    before = replicas()
    huge = ["serve.max_batch_size=100000000", f"serve.port={free_port()}", "serve.cpus_per_replica=0.5"]
    try:
        with pytest.raises(ValueError, match=r"the model replica did not start: the engine's cache does not fit: "):
            run_serve(to_container(compose("serve", [f"serve.checkpoint={tiny_hf}", *huge])))
        assert "cerbero" not in serve.status().applications
        assert len(replicas() - before) == 1
    finally:
        serve.shutdown()
    # an attached cluster may scale up to the request: nothing is checked there
    from cerbero_ray import cluster

    cluster.started_here(False)
    try:
        cluster.check_fits({"GPU": 8}, "anything")
    finally:
        cluster.started_here(True)


def test_ray_data_hands_each_actor_a_file_s_chunks_in_order(tmp_path, ray_local):
    """What the readers that go on from the chunk before rest on: the actor pool of the batch jobs
    (:func:`map_chunks`) hands each actor a file's chunks in order, so each actor opens a
    compressed file once; every row is read once. With many chunks an actor call takes several
    (Ray Data's cost is per call): 200 chunks on 2 actors, 6 a call."""
    import collections
    import gzip

    f = tmp_path / "in.jsonl.gz"
    rows = [{"id": f"r{i}", "text": f"Testo {i}."} for i in range(400)]
    f.write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in rows)))
    chunks = plan_chunks(str(f), "auto", 2)[0]

    class Reader(ChunkWorker):  # defined here: Ray pickles it whole
        def __init__(self, cfg):
            self.opens, self.calls, real = [0], 0, inputs.open_stream
            inputs.open_stream = lambda p: self.opens.__setitem__(0, self.opens[0] + 1) or real(p)

        def __call__(self, batch):
            self.calls += 1
            return super().__call__(batch)

        def process(self, ch):
            ids = [r["id"] for r in read_chunk(ch, "auto", "text", "id")]
            return {
                "rows": len(ids),
                "pid": os.getpid(),
                "opens": self.opens[0],
                "start": ch.start,
                "ids": ids,
                "calls": self.calls,
            }

    class Pool:
        workers, gpus_per_worker, cpus_per_worker = 2, 0, 0.5

    by_actor, calls = collections.defaultdict(list), {}
    ids = []
    for r in map_chunks(chunks, Reader, Pool, "label", "read"):
        by_actor[r["pid"]].append((r["start"], r["opens"]))
        calls[r["pid"]] = max(calls.get(r["pid"], 0), r["calls"])
        ids += list(r["ids"])
    assert sorted(ids) == sorted(r["id"] for r in rows) and len(by_actor) == 2
    assert sum(calls.values()) == -(-200 // 6)  # 34 calls for 200 chunks
    for seen in by_actor.values():
        assert [s for s, _ in seen] == sorted(s for s, _ in seen) and seen[-1][1] == 1, seen
