"""Extract tasks: a JSON schema's properties as typed Parquet columns from a bulk, exactly-once
labeling job. The answer is generated under the schema (constrained decoding), so every row
validates against it or is an error row saying why; a schema with no column type, a feature the
grammar cannot follow or a few-shot answer that breaks the schema is refused at compose time."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cerbero_ray.config import REPO_DIR, compose, to_container
from cerbero_ray.config.label_task import column_types, get_task, task_from_dict
from cerbero_ray.inference.batch import Labeler
from cerbero_ray.label import run_label
from conftest import SAMPLES, write_jsonl

pytest.importorskip("llguidance")

SCHEMA = {
    "type": "object",
    "properties": {
        "tema": {"enum": ["sport", "cucina", "altro"]},
        "citta": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 2},
        "voto": {"type": "integer", "minimum": 1, "maximum": 5},
        "prezzo": {"type": ["number", "null"]},
        "urgente": {"type": "boolean"},
        "autore": {
            "type": "object",
            "properties": {"nome": {"type": "string", "maxLength": 10}, "eta": {"type": "integer", "maximum": 99}},
            "required": ["nome", "eta"],
            "additionalProperties": False,
        },
    },
    "required": ["tema", "citta", "voto", "prezzo", "urgente", "autore"],
    "additionalProperties": False,
}
TYPES = {
    "tema": pa.dictionary(pa.int32(), pa.string()),
    "citta": pa.list_(pa.string()),
    "voto": pa.int64(),
    "prezzo": pa.float64(),
    "urgente": pa.bool_(),
    "autore": pa.struct([("nome", pa.string()), ("eta", pa.int64())]),
}


def extract_task(**kw) -> dict:
    return {"name": "recensioni", "instruction": "Estrai i campi.", "kind": "extract", "schema": SCHEMA, **kw}


def texts(n: int) -> list[str]:
    sample = [json.loads(x)["text"] for x in open(os.path.join(SAMPLES, "label_it_sample.jsonl"))]
    return [sample[i % len(sample)] for i in range(n)]


def test_the_schema_gives_each_property_its_column_type():
    assert column_types(SCHEMA) == {
        "tema": "dictionary",
        "citta": ("list", "string"),
        "voto": "int64",
        "prezzo": "float64",
        "urgente": "bool",
        "autore": ("struct", {"nome": "string", "eta": "int64"}),
    }
    shipped = get_task("question_fields")
    assert shipped.kind == "extract" and set(column_types(shipped.schema)) == {
        "argomento",
        "luoghi",
        "chiede_opinione",
        "parole",
    }


def _with(prop) -> dict:
    return {"type": "object", "properties": {"x": prop}}


@pytest.mark.parametrize(
    "task, says",
    [
        (extract_task(schema=None), "needs a JSON schema"),
        (extract_task(labels={"a": "A", "b": "B"}), "has a schema, not labels"),
        (extract_task(schema={"type": "array"}), "top level must be"),
        (extract_task(schema=_with({"anyOf": [{"type": "string"}, {"type": "integer"}]})), "properties.x: anyOf"),
        (extract_task(schema=_with({"type": ["string", "integer"]})), "no single column type"),
        (extract_task(schema=_with({"type": "array"})), "properties.x: an array needs one `items`"),
        (extract_task(schema=_with({"type": "object"})), "an object needs `properties`"),
        (extract_task(schema=_with({"type": "strnig"})), "not a valid JSON schema"),
        (extract_task(schema={"type": "object", "properties": {"error": {"type": "string"}}}), "collide"),
        (extract_task(schema=_with({"type": "string", "pattern": "(?<=a)b"})), "look-around"),
        (extract_task(few_shot=[{"text": "t", "label": "a"}]), "each example of an extract task is {text, output}"),
        (extract_task(few_shot=[{"text": "t", "output": {"voto": "cinque"}}]), "output breaks the schema"),
        (extract_task(max_new_tokens=0), "max_new_tokens must be within"),
        ({**extract_task(), "kind": "summarize"}, "kind must be one of"),
        ({"name": "s", "instruction": "i", "labels": {"a": "A", "b": "B"}, "schema": SCHEMA}, "schema is for kind"),
    ],
)
def test_a_task_that_cannot_make_typed_columns_is_refused_naming_why(task, says):
    with pytest.raises(ValueError, match=says.replace("{", r"\{").replace("}", r"\}")):
        task_from_dict(task)


def test_a_bad_extract_task_is_named_at_compose_and_the_server_refuses_extract_tasks(tmp_path, tiny_hf):
    from cerbero_ray.config import check, typed
    from cerbero_ray.config.serve import check_serve

    over = [f"paths.output_dir={tmp_path}", f"label.checkpoint={tiny_hf}", "label/task=question_fields"]
    assert check("label", compose("label", over)).label.task.kind == "extract"
    with pytest.raises(ValueError, match="label.task.max_new_tokens must be within"):
        check("label", compose("label", [*over, "label.task.max_new_tokens=0"]))
    c = typed("serve", compose("serve", [f"paths.output_dir={tmp_path}", f"serve.checkpoint={tiny_hf}"]))
    c.serve.label_tasks = {"campi": extract_task()}
    with pytest.raises(ValueError, match="serve.label_tasks.campi: an extract task runs in the label job"):
        check_serve(c)


def test_answers_validate_and_become_typed_values_or_error_rows(tiny_hf):
    task = task_from_dict(extract_task(max_new_tokens=96))
    lab = Labeler(tiny_hf, task, slots=8)
    rows = texts(12) + ["", None]
    cols = lab.columns(rows, [None] * 13 + ["bad_row"])
    table = pa.table(cols, schema=pa.schema([*lab.fields, ("truncated", pa.bool_()), ("error", pa.string())]))
    assert {n: table.schema.field(n).type for n in TYPES} == TYPES
    assert cols["error"][12:] == ["empty", "bad_row"] and cols["json"][12:] == [None, None]
    validator = jsonschema.Draft202012Validator(SCHEMA)
    answered = [i for i, e in enumerate(cols["error"]) if e is None]
    # the random model's greedy answers: some close within 96 tokens, some run on in a number's digits
    assert 0 < len(answered) < 12
    for i in range(12):
        if i in answered:
            value = json.loads(cols["json"][i])
            assert list(value) == list(SCHEMA["properties"])  # generated in the schema's order
            validator.validate(value)
            assert {k: cols[k][i] for k in TYPES} == value  # each column holds the answer's value
        else:  # cut short, or a number no float64 holds (7e707): an error row keeping the raw text
            e = cols["error"][i]
            assert (e.startswith("incomplete_json") and cols["new_tokens"][i] == 96) or (
                e == "schema_mismatch: a number beyond float64's range"
                and math.isinf(json.loads(cols["json"][i])["prezzo"])
            ), e
            assert [cols[k][i] for k in TYPES] == [None] * len(TYPES) and cols["json"][i].startswith("{")
    # the same rows with too few tokens: no half-read value, an error row naming the reason
    short = Labeler(tiny_hf, task_from_dict(extract_task(max_new_tokens=5)), slots=8)
    cut = short.columns(rows[:3])
    assert all(e.startswith("incomplete_json: the answer reached max_new_tokens=5") for e in cut["error"])
    assert all(cut[k] == [None] * 3 for k in TYPES) and all(cut["new_tokens"][i] == 5 for i in range(3))


@pytest.mark.integration
def test_a_killed_extraction_of_200_rows_resumes_to_every_row_once_typed_and_valid(tmp_path, tiny_hf, ray_local):
    """The issue's done-means in one job: 200 rows of the Italian sample through the shipped extract
    task, killed midway by SIGTERM, rerun: every id once, every row valid under the schema or an
    error row with a reason, and the Parquet columns typed as the schema says."""
    inp = write_jsonl(tmp_path / "domande.jsonl", [{"id": f"q{i}", "text": t} for i, t in enumerate(texts(200))])
    args = [
        f"paths.output_dir={tmp_path}",
        f"label.checkpoint={tiny_hf}",
        f"label.input={inp}",
        "label/task=question_fields",
        "label.chunk_rows=10",
    ]
    log = open(tmp_path / "job.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO_DIR, "jobs", "label.py"), *args, "cluster.num_cpus=2"],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    parts = tmp_path / "label" / "question_fields" / "parts"
    deadline = time.monotonic() + 300
    while not (parts.exists() and len([p for p in os.listdir(parts) if p.endswith(".parquet")]) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "the job ended before it could be killed"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
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
    assert done_before < 20  # killed midway
    s = run_label(to_container(compose("label", args)))
    assert s["chunks_skipped"] >= done_before and s["chunks_processed"] == 20 - s["chunks_skipped"]
    table = pq.read_table(parts)
    rows = table.to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(f"q{i}" for i in range(200)) and s["unique_ids"] == 200
    schema = get_task("question_fields").schema
    validator = jsonschema.Draft202012Validator(schema)
    for r in rows:
        if r["error"] is None:
            validator.validate(json.loads(r["json"]))
            assert {k: r[k] for k in schema["properties"]} == json.loads(r["json"])
        else:
            assert r["error"].split(":")[0] in ("incomplete_json", "schema_mismatch", "empty"), r["error"]
    assert s["labels"]["extracted"] == sum(r["error"] is None for r in rows) > 0
    got = {n: table.schema.field(n).type for n in schema["properties"]}
    assert got == {
        "argomento": pa.dictionary(pa.int32(), pa.string()),
        "luoghi": pa.list_(pa.string()),
        "chiede_opinione": pa.bool_(),
        "parole": pa.int64(),
    }
    assert set(table.column("argomento").combine_chunks().dictionary.to_pylist()) <= set(
        schema["properties"]["argomento"]["enum"]
    )
    assert not [p for p in os.listdir(parts) if p.endswith(".tmp")]
    # a rerun with another task into the same folder is refused, not mixed in
    with pytest.raises(FileExistsError, match="task"):
        other = [*args[:3], "label.chunk_rows=10", f"label.output_dir={parts.parent}"]  # the default task
        run_label(to_container(compose("label", other)))
