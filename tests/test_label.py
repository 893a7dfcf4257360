"""The labeling job: every input row exactly once in the output, bad rows flagged not fatal, and a
job killed midway finishes on rerun by processing only the missing chunks."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from cerbero_ray.batchjob import plan_chunks, read_chunk, start_run
from cerbero_ray.config import REPO_DIR, compose, to_container
from cerbero_ray.label import run_label
from conftest import SAMPLES, write_jsonl

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
    chunks = plan_chunks(str(f), "auto", 10)
    assert [(c.start, c.stop) for c in chunks] == [(i, min(i + 10, 103)) for i in range(0, 103, 10)]
    ids = [r["id"] for c in chunks for r in read_chunk(c, "auto", "text", "id")]
    assert ids == [str(i) for i in range(103)]


def test_a_missing_input_or_unknown_format_is_named_before_the_output_is_claimed(tmp_path):
    out, f = str(tmp_path / "out"), tmp_path / "x.jsonl"
    f.write_text('{"text": "ciao"}\n')
    start_run(out, "run.json", {"input": str(f)}, False, "label", str(f), "auto", 10)  # a run claims out
    with pytest.raises(FileNotFoundError, match="label.input: no such file or folder: .*typo.jsonl"):
        start_run(out, "run.json", {"input": "typo"}, False, "label", str(tmp_path / "typo.jsonl"), "auto", 10)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="generate.format: cannot tell the format of .*x.csv"):
        start_run(out, "run.json", {}, False, "generate", str(tmp_path / "x.csv"), "auto", 10)
    with pytest.raises(ValueError, match="label.format must be one of"):
        start_run(out, "run.json", {}, False, "label", str(f), "csv", 10)


def test_killed_job_resumes_exactly_once(tmp_path, tiny_hf, ray_local):
    texts = [json.loads(x)["text"] for x in open(os.path.join(SAMPLES, "label_it_sample.jsonl"))]
    inp = write_jsonl(tmp_path / "corpus.jsonl", [{"id": f"r{i}", "text": texts[i % len(texts)]} for i in range(1500)])
    args = [
        f"paths.output_dir={tmp_path}",
        f"label.checkpoint={tiny_hf}",
        f"label.input={inp}",
        "label.chunk_rows=50",
        "cluster.num_cpus=2",
    ]
    log = open(tmp_path / "job.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO_DIR, "jobs", "label.py"), *args],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    parts = tmp_path / "label" / "sentiment" / "parts"
    deadline = time.monotonic() + 300
    while not (parts.exists() and len([p for p in os.listdir(parts) if p.endswith(".parquet")]) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "the job ended before it could be killed"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)  # what `ray job stop`, Kubernetes and systemd send
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log.seek(0)
    said = log.read()
    assert proc.returncode == 128 + signal.SIGTERM, said[-3000:]
    assert "[label] stopped by SIGTERM; the same command resumes" in said
    assert "Traceback" not in said and "SIGTERM received" not in said  # no stack, no C++ dump
    done_before = len([p for p in os.listdir(parts) if p.endswith(".parquet")])
    assert done_before < 30  # killed midway
    s = run_label(label_cfg(tmp_path, tiny_hf, inp, "label.chunk_rows=50"))
    assert s["chunks_skipped"] >= done_before and s["chunks_processed"] == 30 - s["chunks_skipped"]
    ids = [r["id"] for r in output(tmp_path / "label" / "sentiment")]
    assert sorted(ids) == sorted(f"r{i}" for i in range(1500))
    assert not [p for p in os.listdir(parts) if p.endswith(".tmp")]
    # a rerun with another task into the same folder is refused, not mixed in
    with pytest.raises(FileExistsError, match="task"):
        run_label(
            label_cfg(
                tmp_path,
                tiny_hf,
                inp,
                "label.chunk_rows=50",
                "label/task=irony",
                f"label.output_dir={tmp_path}/label/sentiment",
            )
        )
