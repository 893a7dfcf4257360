"""Object storage end to end, on a real S3-protocol server (moto's, on loopback): the main job with
``paths.output_dir=s3://…`` writes everything to the bucket and training rerun resumes from it; the
stages that load a checkpoint from a URI (generate, serve) do; faults on the wire mid-job (503
SlowDown, dropped connections, stalls) are retried and nothing is lost; an endpoint gone for good
stops the job with one line naming the URI, and the same command then finishes; no output holds
the secret key."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
from faults import FaultProxy

from cerbero_ray import storage
from cerbero_ray.config import REPO_DIR, compose, to_container
from conftest import S3_PORT, S3_SECRET

pytestmark = pytest.mark.integration


def _objects(uri: str) -> dict[str, int]:
    fs, p = storage.resolve(uri)
    infos = fs.get_file_info(storage.pafs.FileSelector(p, recursive=True, allow_not_found=True))
    return {i.path[len(p) + 1 :]: i.size for i in infos if i.type == storage.pafs.FileType.File}


def _no_secret_in(uri: str) -> None:
    fs, p = storage.resolve(uri)
    for name in _objects(uri):
        with fs.open_input_stream(f"{p}/{name}", compression=None) as f:
            assert S3_SECRET.encode() not in f.read(), name


def _job(stage: str, *overrides: str, env: dict | None = None, check: bool = True):
    r = subprocess.run(
        [sys.executable, os.path.join(REPO_DIR, "jobs", f"{stage}.py"), *overrides],
        env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})},
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_the_main_job_writes_everything_to_the_bucket_and_resumes_from_it(bucket, tmp_path, ray_local, caplog):
    import ray

    out = f"{bucket}/recipe"
    # the data checked against the SQuAD-it slice the evaluation reads, a gzipped copy in the bucket
    import gzip

    sample = os.path.join(REPO_DIR, "data", "samples", "squad_it_sample.json")
    evals = storage.write_bytes(f"{bucket}/evals/squad_it_sample.json.gz", gzip.compress(open(sample, "rb").read()))
    args = (  # the job attaches to this test's Ray (one cluster on the box, not two competing for its cores)
        f"cluster.address={ray.get_runtime_context().gcs_address}",
        f"paths.output_dir={out}/",  # as users write a folder: no key of s3://b/recipe//data (printed or written)
        f"paths.data_dir={tmp_path / 'no-shared-data'}",
        f"data.decontaminate.paths=[{evals}]",
        "train.epochs=1",
        "train.max_steps=6",  # a bucket's checkpoint, every rank's marker and a resume need no more
        "evaluate.tasks.squad_it.max_rows=4",
        "~evaluate.checkpoints.untrained",  # one model's evaluation writes to the bucket as three would
        "~evaluate.checkpoints.trained-Q4_K_M",
        "export.types=[f16]",
    )
    r = _job("recipe", *args, env={"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")})  # the test's Ray's
    said = r.stdout + r.stderr
    objs = _objects(out)
    assert "data/chat_sample/manifest.json" in objs and any(k.startswith("data/chat_sample/shards/") for k in objs)
    assert "train/tiny-cpu/hf/model.safetensors" in objs and f"train/tiny-cpu/hf/{storage.COMPLETE}" in objs
    assert any(re.match(r"train/tiny-cpu/checkpoint_step_\d+/complete/rank_1", k) for k in objs)
    assert "label/sentiment/summary.json" in objs and any(k.startswith("label/sentiment/parts/") for k in objs)
    assert "evaluate/results.json" in objs and "export/tiny-cpu/cerbero-F16.gguf" in objs
    assert "train/tiny-cpu/hf/README.md" in objs and "export/tiny-cpu/README.md" in objs  # the two cards
    assert not any(k.endswith(storage.TMP_SUFFIX) or storage.WRITING in k for k in objs)
    assert re.search(rf"checkpoint: {re.escape(out)}/train/tiny-cpu/checkpoint_step_\d+", said), said[-3000:]
    assert "[export] f16: llama.cpp check ok" in said or "check skipped" in said
    # results.md knows the trained model's data was checked against that very set: the record in its
    # card on the bucket, the bucket's .gz and the evaluation's local file one by their contents
    fs, p = storage.resolve(f"{out}/evaluate/results.md")
    with fs.open_input_stream(p) as f:
        md = f.read().decode()
    assert "| trained | checked (0 dropped) |" in md, md[-2000:]
    assert f"aws s3 cp {out}/export/tiny-cpu/cerbero-F16.gguf ." in said and 'model_path="cerbero-F16.gguf"' in said
    # a rerun resumes from the bucket: checked on training (its checkpoint read back from the bucket;
    # every stage's own rerun is tested on a local disk, test_recipe and the stage tests)
    # (in this process, on the test's Ray: the same train stage as the job's, without a second start)
    from cerbero_ray.train import run_train

    # Ray Train's record of the run, as another Ray version left it: it would refuse to start; the
    # driver sets it aside on the bucket and the run resumes from its own checkpoints all the same
    from cerbero_ray.train.trainer import RAY_RECORD

    record = f"{out}/train/tiny-cpu/{RAY_RECORD}"
    storage.write_json(record, {**storage.read_json(record), "ray_version": "2.9.0"})
    # the run as if stopped after its last checkpoint, before rank 0 wrote its summary (a finished
    # run starts no worker: below): the workers resume from the bucket
    from cerbero_ray.train.metrics import SUMMARY

    fs, p = storage.resolve(f"{out}/train/tiny-cpu/{SUMMARY}")
    fs.delete_file(p)
    c = to_container(compose("recipe", list(args)))
    stage = {k: c[k] for k in ("cluster", "paths", "tokenizer", "model", "deepspeed", "train")}
    again = run_train(stage)
    assert again["resumed_from"] and again["checkpoint"].startswith(f"{out}/train/tiny-cpu/checkpoint_step_")
    assert any(k.startswith(f"train/tiny-cpu/{RAY_RECORD}.set-aside-") for k in _objects(out))
    # finished now, with its summary on the bucket: a third run returns it, starting no worker
    objs = _objects(out)
    caplog.set_level(logging.INFO, logger="cerbero_ray.train.trainer")
    assert run_train(stage) == again
    assert "finished its 6 steps: nothing to train" in caplog.text and _objects(out) == objs
    # the checkpoint the workers downloaded to resume from is not kept once they have loaded it
    import hashlib

    key = hashlib.sha256(again["checkpoint"].encode()).hexdigest()[:16]
    assert not [n for n in os.listdir(storage.cache_dir()) if n.startswith(key)]
    _no_secret_in(out)
    assert S3_SECRET not in said


def test_generate_and_serve_load_a_checkpoint_from_the_bucket(bucket, tiny_hf, ray_local):
    from ray import serve

    from cerbero_ray.generate import run_generate
    from cerbero_ray.serve.service import run_serve
    from conftest import free_port

    ckpt = storage.upload_folder(tiny_hf, f"{bucket}/run/hf")
    storage.write_bytes(f"{bucket}/in/q.jsonl", b'{"id": "a", "text": "Ciao!"}\n{"id": "b", "text": "Come va?"}\n')
    g = run_generate(
        to_container(
            compose(
                "generate",
                [
                    f"generate.checkpoint={ckpt}",
                    f"generate.input={bucket}/in/q.jsonl",
                    f"generate.output_dir={bucket}/gen",
                    "generate.sampling.max_new_tokens=4",
                ],
            )
        )
    )
    assert g["counts"] and sum(g["counts"].values()) == 2 and storage.is_file(f"{bucket}/gen/summary.json")
    url = run_serve(
        to_container(
            compose("serve", [f"serve.checkpoint={ckpt}", f"serve.port={free_port()}", "serve.cpus_per_replica=0.5"])
        )
    )
    try:
        import urllib.request

        body = json.dumps({"messages": [{"role": "user", "content": "Ciao"}], "max_tokens": 3}).encode()
        req = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert resp.status == 200 and json.loads(resp.read())["choices"][0]["message"]["content"] is not None
    finally:
        serve.shutdown()
    _no_secret_in(bucket)


def test_a_cut_short_hf_folder_in_the_bucket_is_refused_naming_the_key(bucket, tiny_hf):
    ckpt = storage.upload_folder(tiny_hf, f"{bucket}/run/hf")
    fs, p = storage.resolve(f"{ckpt}/{storage.COMPLETE}")
    fs.delete_file(p)
    storage.write_bytes(f"{ckpt}/{storage.WRITING}", b"")
    r = _job("export", f"export.checkpoint={ckpt}", f"export.output_dir={bucket}/gguf", check=False)
    assert r.returncode == 2 and "export.checkpoint" in r.stderr and "incomplete" in r.stderr, r.stderr[-2000:]


def test_shards_the_bucket_lacks_or_holds_cut_are_refused_before_training(bucket, tmp_path):
    """A data folder copied whole to a bucket trains from its shards there; the driver's check of each
    listed shard (Parquet footer) on a bucket, as on a local disk (tests/test_train_config.py): a
    data folder copied in part fails naming the key."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_train_config import manifest_dir

    from cerbero_ray.train.run_plan import plan_run

    local = manifest_dir(tmp_path)
    m = json.load(open(os.path.join(local, "manifest.json")))
    key = f"{bucket}/data/shards/a.parquet"
    # the data folder copied whole (aws s3 sync): its manifest lists the shards where they were
    # written; the trainer reads the copies beside it (the local folder is gone: on a cluster it
    # never was there), as it reads a manifest that names them in the bucket
    storage.write_bytes(key, open(m["shards"][0]["path"], "rb").read())
    storage.write_json(f"{bucket}/data/manifest.json", m)
    shutil.rmtree(local)
    c = to_container(compose("train", [f"paths.output_dir={tmp_path}", f"train.data_dir={bucket}/data/"]))
    run = plan_run(c)
    assert run.rows == 40 and run.shards[0]["path"] == key
    m["shards"][0]["path"] = key
    storage.write_json(f"{bucket}/data/manifest.json", m)
    assert plan_run(c).shards == run.shards
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"input_ids": [[0, 1]] * 7}), sink)
    storage.write_bytes(key, sink.getvalue().to_pybytes())
    with pytest.raises(ValueError, match=rf"train\.data_dir: {re.escape(key)} has 7 rows; the manifest says 40"):
        plan_run(c)
    fs, p = storage.resolve(key)
    fs.delete_file(p)
    with pytest.raises(ValueError, match=rf"train\.data_dir: {re.escape(key)} is missing"):
        plan_run(c)


@pytest.fixture
def proxy(s3_server):
    p = FaultProxy(S3_PORT).start()
    yield p
    p.stop()


@pytest.mark.slow  # ~1 minute; the client's retries of the same faults: tests/test_storage.py, by default
def test_faults_on_the_wire_mid_job_are_retried_and_nothing_is_lost(bucket, proxy, tmp_path):
    """The data stage reads its input from the bucket and writes its shards there, through a proxy
    that throttles, drops and stalls requests; the manifest equals a run without faults."""
    data = os.path.join(REPO_DIR, "data", "samples")
    src = f"{bucket}/in/chat.jsonl"
    storage.upload_file(os.path.join(data, "chat_it_openassistant.jsonl"), src)
    over = ("+data.sources.s.path=" + src, "~data.sources.chat", "data.seq_len=256")
    clean = _job("data", f"paths.output_dir={bucket}/clean", *over)
    assert clean.returncode == 0
    proxy.inject("slowdown", 4, every=3)
    proxy.inject("drop", 3, every=3)
    proxy.inject("stall", 2, 2.0, every=2)
    proxy.inject("slowdown", 2, every=2)
    _job("data", f"paths.output_dir={bucket}/faulty", *over, env={"AWS_ENDPOINT_URL": proxy.url})
    assert sum(proxy.seen.values()) == 11 and not proxy.faults, proxy.seen  # every fault happened, mid-job
    a = storage.read_json(f"{bucket}/clean/data/chat_sample/manifest.json")
    b = storage.read_json(f"{bucket}/faulty/data/chat_sample/manifest.json")
    for k in ("input_rows", "documents", "rows", "tokens", "rejected", "loss_tokens"):
        assert a[k] == b[k], k


@pytest.mark.slow  # two data jobs against a dead endpoint (~40 s)
def test_an_endpoint_gone_for_good_stops_the_job_in_one_line_and_the_same_command_resumes(bucket, proxy):
    src = f"{bucket}/in/q.jsonl"
    storage.write_bytes(src, b"".join(b'{"id": "%d", "text": "Ciao %d"}\n' % (i, i) for i in range(20)))
    proxy.down(True)
    env = {"AWS_ENDPOINT_URL": proxy.url, "CERBERO_S3_MAX_ATTEMPTS": "2", "CERBERO_S3_CONNECT_TIMEOUT_S": "2"}
    over = (
        "paths.output_dir=" + bucket + "/out",
        "data.seq_len=256",
        "+data.sources.s.path=" + src,
        "~data.sources.chat",
    )
    r = _job("data", *over, env=env, check=False)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 75 and len(lines) == 1 and bucket[5:] in lines[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    proxy.down(False)
    _job("data", *over, env=env)
    assert storage.read_json(f"{bucket}/out/data/chat_sample/manifest.json")["documents"] == 20


def test_an_evaluation_set_in_the_bucket_decontaminates_as_the_local_file(bucket, tmp_path):
    """``data.decontaminate.paths`` read from a bucket, gzip-compressed there: the same passages as
    the local file."""
    import gzip

    from cerbero_ray import inputs
    from cerbero_ray.data.decontaminate import eval_sets
    from conftest import SHARED_DATA

    local = os.path.join(SHARED_DATA, "squad_it", "SQuAD_it-test.sample_1k.json")
    key = storage.write_bytes(f"{bucket}/evals/squad.json.gz", gzip.compress(open(local, "rb").read()))
    (mine,), (theirs,) = eval_sets([local], 13), eval_sets([key], 13)
    here, there = mine.runs, theirs.runs
    assert len(here[13]) > 10_000 and here.keys() == there.keys() and all((here[n] == there[n]).all() for n in here)
    # each file's identity, from the one read: its contents' (the JSON inside the .gz: the same set)
    assert mine.sha256 == theirs.sha256 == inputs.file_hash(key) == inputs.file_hash(local)
    # a URI is not looked up at config time: the run names one that is not there, or a folder, first
    from cerbero_ray.data.decontaminate import eval_stamp

    assert len(eval_stamp([key])) == 16
    with pytest.raises(FileNotFoundError, match=r"data.decontaminate.paths\[1\]: no such file"):
        eval_stamp([key, f"{bucket}/evals/missing.json"])
    with pytest.raises(ValueError, match=r"data.decontaminate.paths\[0\]: .* is a folder"):
        eval_stamp([f"{bucket}/evals"])
    from cerbero_ray.config import data as data_config

    with pytest.MonkeyPatch.context() as m:  # a file over the limit (lowered here): named by its size
        m.setattr(data_config, "EVAL_MAX_BYTES", 1000)
        with pytest.raises(ValueError, match=r"data.decontaminate.paths\[0\]: .*squad.json.gz is 0.0 GiB, over the"):
            eval_stamp([key])
